// The pullthrough command as users run it: a child process on Node 24, configured by file and env.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, statSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parse } from 'yaml';
import { loadPolicy } from '../config/load.ts';
import { httpOverSocket, tlsThroughProxy } from './helpers/connect.ts';
import { sendSlowly } from './helpers/fake-registry.ts';
import { createTestCa } from './helpers/pki.ts';

const CLI = path.join(import.meta.dirname, '../src/cli.ts');

function runCli(args: string[], env: NodeJS.ProcessEnv = {}, cwd = os.tmpdir()): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c));
    child.stderr.on('data', (c: Buffer) => (stderr += c));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Starts `pullthrough start` and resolves once it logs that it listens; returns its port and a stop. */
async function startCli(env: NodeJS.ProcessEnv, cwd: string): Promise<{ port: number; stop(): Promise<number | null>; output(): string }> {
  const child = spawn(process.execPath, [CLI, 'start'], { cwd, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (c: Buffer) => (output += c));
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr.on('data', (c: Buffer) => {
      output += c;
      const match = /"listen":"[^"]*:(\d+)"/.exec(output);
      if (match) resolve(Number(match[1]));
    });
    child.once('exit', (code) => reject(new Error(`exited with ${code}: ${output}`)));
  });
  return {
    port,
    output: () => output,
    stop: () =>
      new Promise((resolve) => {
        child.once('exit', (code) => resolve(code));
        child.kill('SIGTERM');
      }),
  };
}

describe('the pullthrough command', () => {
  test('an invalid proxy.yaml stops it with file:line:key and a non-zero exit', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-'));
    writeFileSync(path.join(dir, 'proxy.yaml'), 'listen: 127.0.0.1:0\nregistries:\n  quay.io:\n    push: sometimes\n');
    const result = await runCli(['start'], {}, dir);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /proxy\.yaml:4:11: registries\.quay\.io\.push: expected one of: deny, bypass/);
  });

  test('an unreadable --config is named, and nothing starts', async () => {
    const result = await runCli(['start', '--config', '/nonexistent/proxy.yaml']);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /\/nonexistent\/proxy\.yaml: cannot read the policy file: ENOENT/);
  });

  test('check-config prints the effective policy with secrets masked', async () => {
    const result = await runCli(['check-config'], { PULLTHROUGH_CONFIG: path.join(import.meta.dirname, '../proxy.yaml'), AUTH_REGISTRIES: 'auth.docker.io:hubuser:very-secret-token' });
    assert.equal(result.code, 0, result.stderr);
    assert.ok(!result.stdout.includes('very-secret-token'));
    assert.match(result.stdout, /registry-1\.docker\.io:443:[\s\S]*username: hubuser/);
  });

  test('start: creates the CA (key 0600) once, serves it, trusts NODE_EXTRA_CA_CERTS upstream, stops on SIGTERM', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-'));
    const upstreamCa = createTestCa('cli upstream CA');
    const leaf = upstreamCa.issue(['up.test']);
    const upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('{}'));
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const upstreamPort = (upstream.address() as AddressInfo).port;
    writeFileSync(path.join(dir, 'proxy.yaml'), `registries:\n  up.test:${upstreamPort}: {}\nhosts:\n  up.test: 127.0.0.1\n`);
    writeFileSync(path.join(dir, 'upstream-ca.pem'), upstreamCa.certPem);
    const env = { PULLTHROUGH_LISTEN: '127.0.0.1:0', PULLTHROUGH_DATA_DIR: path.join(dir, 'state') };
    try {
      // Without the upstream CA the proxy refuses to talk to the upstream, and says why.
      let proxy = await startCli(env, dir);
      let caPem = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      let response = await httpOverSocket(await tlsThroughProxy(proxy.port, 'up.test', upstreamPort, caPem), 'GET', '/v2/', 'up.test');
      assert.equal(response.status, 502);
      assert.match(response.body.toString(), /UNAVAILABLE.*unable to verify the first certificate.*NODE_EXTRA_CA_CERTS/);
      assert.equal(await proxy.stop(), 0);
      assert.equal(statSync(path.join(dir, 'state/ca.key')).mode & 0o777, 0o600);

      // With NODE_EXTRA_CA_CERTS it does, and the CA created on first start is reused.
      proxy = await startCli({ ...env, NODE_EXTRA_CA_CERTS: path.join(dir, 'upstream-ca.pem') }, dir);
      const again = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      assert.equal(again, caPem, 'the same CA after a restart');
      caPem = again;
      response = await httpOverSocket(await tlsThroughProxy(proxy.port, 'up.test', upstreamPort, caPem), 'GET', '/v2/', 'up.test');
      assert.equal(response.status, 200);
      assert.equal(await proxy.stop(), 0);
    } finally {
      upstream.closeAllConnections();
      upstream.close();
    }
  });
});

describe('the pullthrough command, stopped while it serves', () => {
  test('SIGTERM: a blob in flight is finished whole, new connections are refused, and it exits 0', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-drain-'));
    const upstreamCa = createTestCa('drain upstream CA');
    const leaf = upstreamCa.issue(['slow.test']);
    const blob = randomBytes(2 * 1024 * 1024);
    const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
    // ~2 s for the whole blob: long enough to stop the proxy in the middle of it.
    const upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      if (req.url !== `/v2/team/app/blobs/${digest}`) return res.writeHead(404).end();
      res.writeHead(200, { 'Content-Length': blob.length, 'Content-Type': 'application/octet-stream' });
      void sendSlowly(res, blob, 64 * 1024, 60).then(() => res.end());
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const upstreamPort = (upstream.address() as AddressInfo).port;
    writeFileSync(path.join(dir, 'upstream-ca.pem'), upstreamCa.certPem);
    writeFileSync(path.join(dir, 'proxy.yaml'), `registries:\n  slow.test:${upstreamPort}: { tls: { ca: upstream-ca.pem } }\nhosts:\n  slow.test: 127.0.0.1\n`);
    try {
      const proxy = await startCli({ PULLTHROUGH_LISTEN: '127.0.0.1:0', PULLTHROUGH_DATA_DIR: path.join(dir, 'state') }, dir);
      const caPem = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      const socket = await tlsThroughProxy(proxy.port, 'slow.test', upstreamPort, caPem);
      const pulling = httpOverSocket(socket, 'GET', `/v2/team/app/blobs/${digest}`, `slow.test:${upstreamPort}`);
      await new Promise((resolve) => setTimeout(resolve, 500));
      const stopped = proxy.stop();
      await new Promise((resolve) => setTimeout(resolve, 200));
      // Stopping: no new client gets in.
      await assert.rejects(fetch(`http://127.0.0.1:${proxy.port}/healthz`));
      const response = await pulling;
      assert.equal(response.status, 200);
      assert.equal(createHash('sha256').update(response.body).digest('hex'), digest.slice(7), 'the client got the whole blob');
      assert.equal(await stopped, 0);
      assert.match(proxy.output(), /"message":"stopping"/);
      assert.doesNotMatch(proxy.output(), /requests still in flight/);
    } finally {
      upstream.closeAllConnections();
      upstream.close();
    }
  });
});

describe('the pullthrough command, called the wrong way', () => {
  const digest = `sha256:${'a'.repeat(64)}`;

  test('purge --digest takes a digest only: anything else exits 2 with a message, and the proxy is not asked', async () => {
    for (const bad of ['nope', 'sha256:ABC', `sha256:${'a'.repeat(63)}`, `md5:${'a'.repeat(32)}`, digest.slice(7)]) {
      // Port 1: were the proxy asked, the message would be a connection error.
      const result = await runCli(['purge', '--digest', bad, '--proxy', 'http://127.0.0.1:1']);
      assert.equal(result.code, 2, `${bad}: ${result.stderr}`);
      assert.equal(result.stderr, `pullthrough purge: --digest "${bad}" is not a digest: expected sha256: and 64 lower-case hex digits (or sha512: and 128), as "docker images --digests" shows them\n`);
    }
    const valid = await runCli(['purge', '--digest', digest, '--proxy', 'http://127.0.0.1:1']);
    assert.equal(valid.code, 1, 'a digest goes to the proxy (which is not there)');
    assert.match(valid.stderr, /ECONNREFUSED/);
  });

  test('purge with nothing to purge, or a repository without its registry: exit 2', async () => {
    const none = await runCli(['purge', '--proxy', 'http://127.0.0.1:1']);
    assert.equal(none.code, 2);
    assert.equal(none.stderr, 'pullthrough purge: name what to purge: --registry [--repository], or --digest\n');
    const repository = await runCli(['purge', '--repository', 'team/app', '--proxy', 'http://127.0.0.1:1']);
    assert.equal(repository.code, 2);
    assert.match(repository.stderr, /--repository needs --registry/);
  });

  test('an unknown option or a missing argument: exit 2', async () => {
    assert.equal((await runCli(['--no-such-option'])).code, 2);
    const warm = await runCli(['warm']);
    assert.equal(warm.code, 2);
    assert.match(warm.stderr, /missing required argument 'image'/);
  });
});

describe('check-config', () => {
  /** A policy that sets something at every level, with the files it names. */
  function richPolicy(): string {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-check-'));
    writeFileSync(path.join(dir, 'upstream-ca.pem'), createTestCa('check-config CA').certPem);
    writeFileSync(path.join(dir, 'quay-password'), 'file-secret\n');
    writeFileSync(path.join(dir, 'admin-token'), `${'t'.repeat(32)}\n`);
    const file = path.join(dir, 'proxy.yaml');
    writeFileSync(
      file,
      [
        'listen: 127.0.0.1:3999',
        'dataDir: ./state',
        'caDir: ./ca',
        'cache: { maxSize: 2GiB, minFree: 100MiB, readCheckTtl: 30s }',
        'manifests: { enabled: true, tiers: [{ match: "v.*", ttl: 5m }], defaultTtl: 20m, maxStale: 2d }',
        'defaults: { push: deny, tls: { verify: true }, timeouts: { connect: 10s, clientIdle: 2m } }',
        'registries:',
        '  registry-1.docker.io: { auth: { realm: auth.docker.io, username: hub, password: inline-secret } }',
        '  own.example.com:5443:',
        '    push: bypass',
        '    tls: { ca: ./upstream-ca.pem }',
        '    timeouts: { connect: 5s }',
        '    manifests: { defaultTtl: 1m, tiers: [{ match: latest, ttl: 30s }] }',
        '  plain.example.com:5000: { http: true, tls: { verify: false } }',
        '  quay.io: { auth: { username: robot, passwordFile: ./quay-password } }',
        'tunnel: { allow: ["*:443", "git.internal.example:22"], deny: ["evil.example:443"], timeouts: { connect: 3s, idle: 10m } }',
        'admin: { tokenFile: ./admin-token }',
        'mirror: { listen: 127.0.0.1:5999, tls: { names: [mirror.example] }, default: quay.io }',
        'users: { ci: { password: user-secret, read: ["quay.io/*"] } }',
        'hosts: { own.example.com: 127.0.0.1 }',
        'ipv6: false',
        'workers: 2',
        '',
      ].join('\n'),
    );
    return file;
  }

  test('its output is a proxy.yaml: fed back to the loader, it gives the same policy', async () => {
    const file = richPolicy();
    const first = await runCli(['check-config', '--config', file]);
    assert.equal(first.code, 0, first.stderr);
    for (const secret of ['inline-secret', 'file-secret', 'user-secret']) assert.ok(!first.stdout.includes(secret), `${secret} is masked`);
    const again = path.join(path.dirname(file), 'effective.yaml');
    writeFileSync(again, first.stdout);
    assert.doesNotThrow(() => loadPolicy({ configPath: again, env: {} }));
    const second = await runCli(['check-config', '--config', again]);
    assert.equal(second.code, 0, second.stderr);
    const withoutSource = (text: string) => text.replace(/^# source: .*\n/m, '');
    assert.equal(withoutSource(second.stdout), withoutSource(first.stdout));
    assert.match(first.stdout, new RegExp(`^# source: ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
    assert.match(second.stdout, new RegExp(`^# source: ${again.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));

    // The shipped proxy.yaml with the seed's variables, the way the quickstart runs it.
    const env = { PULLTHROUGH_CONFIG: path.join(import.meta.dirname, '../proxy.yaml'), REGISTRIES: 'registry.example.com:5000', AUTH_REGISTRIES: 'quay.io:robot:pw', PROXY_REQUEST_BUFFERING: 'true' };
    const shipped = await runCli(['check-config'], env);
    assert.equal(shipped.code, 0, shipped.stderr);
    const shippedAgain = path.join(path.dirname(file), 'shipped.yaml');
    writeFileSync(shippedAgain, shipped.stdout);
    const reloaded = await runCli(['check-config', '--config', shippedAgain]);
    assert.equal(reloaded.code, 0, reloaded.stderr);
    // What proxy.yaml has no key for is a comment: PROXY_REQUEST_BUFFERING is the one thing the file does not carry.
    assert.match(shipped.stdout, /^# requestBuffering: true$/m);
    assert.equal(withoutSource(reloaded.stdout).replace('# requestBuffering: false', '# requestBuffering: true'), withoutSource(shipped.stdout));
  });

  test('prints the defaults once; each registry shows only what it sets otherwise', async () => {
    const file = richPolicy();
    const result = await runCli(['check-config', '--config', file]);
    assert.equal(result.code, 0, result.stderr);
    for (const key of ['clientIdle', 'keepAlive', 'maxStale', 'defaultTtl: 20m', 'verify: true']) {
      assert.equal(result.stdout.split('\n').filter((l) => l.trim().startsWith(key)).length, 1, `${key} once:\n${result.stdout}`);
    }
    const effective = parse(result.stdout) as { defaults: { timeouts: Record<string, string> }; registries: Record<string, unknown> };
    assert.deepEqual(effective.defaults.timeouts, { connect: '10s', headers: '1m', idle: '1m', clientIdle: '2m', clientHeader: '1m', keepAlive: '1m' });
    assert.deepEqual(effective.registries['quay.io:443'], { auth: { username: 'robot', password: '********' } });
    assert.deepEqual(effective.registries['auth.docker.io:443'], {});
    assert.match(result.stdout, /^ {2}# tokenServiceFor: \[registry-1\.docker\.io:443\]\n {2}auth\.docker\.io:443: \{\}$/m);
    assert.deepEqual(effective.registries['own.example.com:5443'], {
      push: 'bypass',
      tls: { ca: path.join(path.dirname(file), 'upstream-ca.pem') },
      timeouts: { connect: '5s' },
      manifests: { tiers: [{ match: 'latest', ttl: '30s' }], defaultTtl: '1m' },
    });
    assert.deepEqual(effective.registries['plain.example.com:5000'], { http: true, tls: { verify: false } });
  });
});

describe('the access log', () => {
  async function adminRequests(env: NodeJS.ProcessEnv): Promise<Array<{ method: string; path: string; status: number }>> {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-probes-'));
    const proxy = await startCli({ PULLTHROUGH_LISTEN: '127.0.0.1:0', PULLTHROUGH_DATA_DIR: path.join(dir, 'data'), ...env }, dir);
    const base = `http://127.0.0.1:${proxy.port}`;
    try {
      for (const [method, at] of [['GET', '/healthz'], ['GET', '/healthz'], ['GET', '/ui/data.json'], ['GET', '/metrics'], ['HEAD', '/healthz'], ['GET', '/ca.crt'], ['POST', '/metrics']] as const) {
        const response = await fetch(`${base}${at}`, { method, ...(method === 'POST' ? { body: 'x' } : {}) });
        await response.arrayBuffer();
      }
    } finally {
      assert.equal(await proxy.stop(), 0);
    }
    return proxy
      .output()
      .split('\n')
      .filter((line) => line.includes('"type":"admin"'))
      .map((line) => JSON.parse(line) as { method: string; path: string; status: number });
  }

  test('leaves out probes and dashboard polls that succeed, unless PULLTHROUGH_LOG_PROBES=1', async () => {
    const quiet = await adminRequests({});
    assert.deepEqual(
      quiet.map((e) => `${e.method} ${e.path} ${e.status}`),
      ['GET /ca.crt 200', 'POST /metrics 405'],
      'only what is not a successful poll',
    );
    const all = await adminRequests({ PULLTHROUGH_LOG_PROBES: '1' });
    assert.deepEqual(
      all.map((e) => `${e.method} ${e.path}`),
      ['GET /healthz', 'GET /healthz', 'GET /ui/data.json', 'GET /metrics', 'HEAD /healthz', 'GET /ca.crt', 'POST /metrics'],
    );
  });
});
