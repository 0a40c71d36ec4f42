// The proxy's own upstream traffic through a forward proxy (R2.4: upstreamProxy and noProxy, under
// defaults and per registry). A real squid on loopback (test/helpers/squid.ts) stands before the
// Docker-Hub-shaped rig (test/helpers/hub-rig.ts: a distribution registry behind token auth on another
// host, blobs 307-redirected to a CDN); skopeo pulls through pullthrough as a cluster would. squid's
// access log says which hosts went through it (and as which user); the rig's own log that the
// requests reached the registry. A plain-HTTP registry shows the absolute-form path, fetched by a fill
// worker. The noProxy matcher, the loader's checks and check-config's masking are tested directly.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { describePolicy } from '../../config/describe.ts';
import { ConfigError, loadPolicy, parsePolicy } from '../../config/load.ts';
import { NoProxy } from '../../src/upstream/forward-proxy.ts';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { sha256 } from '../helpers/fake-registry.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir, spawnTracked, stopChild } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';
import { squidUnavailable, startSquid, type SquidEntry, type SquidHandle } from '../helpers/squid.ts';

const squidSkip = squidUnavailable();
const FORWARD_USER = { username: 'pullthrough', password: 'fwd-Pr0xy-s3cret' };
const CLIENT_TIMEOUT_MS = 180_000;
const CLI = join(import.meta.dirname, '../../src/cli.ts');

describe('noProxy: which hosts go direct', () => {
  const direct = (entries: string[], url: string) => new NoProxy(entries).matches(new URL(url));

  test('a name covers itself and the hosts under it; a glob only what it matches; * everything', () => {
    assert.ok(direct(['registry.internal.example'], 'https://registry.internal.example/v2/'));
    assert.ok(direct(['registry.internal.example'], 'https://cdn.registry.internal.example/'));
    assert.ok(direct(['.internal.example'], 'https://registry.internal.example/'));
    assert.ok(!direct(['registry.internal.example'], 'https://xregistry.internal.example/'));
    assert.ok(direct(['*.corp.example'], 'https://a.b.corp.example/'));
    assert.ok(!direct(['*.corp.example'], 'https://corp.example/'));
    assert.ok(direct(['*'], 'https://anything.example:5000/'));
    assert.ok(!direct([], 'https://anything.example/'));
  });

  test('addresses and CIDR blocks match hosts written as addresses, IPv4 and IPv6; names are not resolved', () => {
    assert.ok(direct(['10.0.0.0/8'], 'https://10.20.30.40:5000/'));
    assert.ok(!direct(['10.0.0.0/8'], 'https://11.0.0.1/'));
    assert.ok(direct(['127.0.0.1'], 'http://127.0.0.1:8080/'));
    assert.ok(direct(['fd00::/8'], 'https://[fd00::5]/'));
    assert.ok(direct(['[fd00::/8]'], 'https://[fd12:3456::1]:5000/'));
    assert.ok(!direct(['fd00::/8'], 'https://[fe80::1]/'));
    assert.ok(!direct(['10.0.0.0/8'], 'https://localhost/'));
  });

  test('a :port restricts an entry to that port (443 and 80 are the schemes\' own)', () => {
    assert.ok(direct(['registry.example.com:5000'], 'https://registry.example.com:5000/'));
    assert.ok(!direct(['registry.example.com:5000'], 'https://registry.example.com/'));
    assert.ok(direct(['registry.example.com:443'], 'https://registry.example.com/'));
    assert.ok(direct(['[fd00::5]:443'], 'https://[fd00::5]/'));
    assert.ok(direct(['plain.example:80'], 'http://plain.example/'));
  });
});

describe('upstreamProxy in the policy', () => {
  const load = (yaml: string, env: NodeJS.ProcessEnv = {}) => parsePolicy(yaml, 'proxy.yaml', env, '/tmp');
  const registry = (yaml: string, key: string, env: NodeJS.ProcessEnv = {}) => load(yaml, env).registries.get(key)!;

  test('registries inherit defaults.upstreamProxy and noProxy, override either, and `none` goes direct', () => {
    const yaml = `
defaults:
  upstreamProxy: http://proxy.corp.example:3128
  noProxy: [registry.internal.example]
registries:
  a.example: {}
  b.example: { upstreamProxy: none }
  c.example: { upstreamProxy: "https://other.corp.example:3129", noProxy: "x.example, 10.0.0.0/8" }
  d.example: { noProxy: [] }
  e.example: { upstreamProxy: "\${CORP_PROXY:-}" }
`;
    const policy = load(yaml);
    assert.deepEqual(policy.registries.get('a.example:443')!.upstreamProxy, { mode: 'url', https: 'http://proxy.corp.example:3128', http: 'http://proxy.corp.example:3128', noProxy: ['registry.internal.example'] });
    assert.equal(policy.registries.get('b.example:443')!.upstreamProxy!.mode, 'none');
    assert.deepEqual(policy.registries.get('c.example:443')!.upstreamProxy, { mode: 'url', https: 'https://other.corp.example:3129', http: 'https://other.corp.example:3129', noProxy: ['x.example', '10.0.0.0/8'] });
    assert.deepEqual(policy.registries.get('d.example:443')!.upstreamProxy!.noProxy, []);
    assert.equal(policy.registries.get('e.example:443')!.upstreamProxy!.mode, 'none', 'an empty value (an unset variable) means none');
  });

  test('the environment\'s proxy variables are read only with upstreamProxy: env', () => {
    const env = { HTTPS_PROXY: 'http://env-proxy.example:3128', HTTP_PROXY: 'http://plain-proxy.example:3128', NO_PROXY: '.svc,10.0.0.0/8' };
    assert.equal(registry('registries:\n  a.example: {}\n', 'a.example:443', env).upstreamProxy?.https, undefined);
    const fromEnv = registry('defaults: { upstreamProxy: env }\nregistries:\n  a.example: {}\n', 'a.example:443', env).upstreamProxy!;
    assert.equal(fromEnv.https, 'http://env-proxy.example:3128');
    assert.equal(fromEnv.http, 'http://plain-proxy.example:3128');
    assert.deepEqual(fromEnv.environmentNoProxy, ['.svc', '10.0.0.0/8']);
    // As undici's EnvHttpProxyAgent reads them: lower case first, https falls back to HTTP_PROXY.
    const onlyHttp = registry('defaults: { upstreamProxy: env }\nregistries:\n  a.example: {}\n', 'a.example:443', { http_proxy: 'http://lower.example:1', HTTP_PROXY: 'http://upper.example:2' }).upstreamProxy!;
    assert.equal(onlyHttp.https, 'http://lower.example:1');
  });

  test('the registries the seed\'s variables add inherit the defaults\' forward proxy', () => {
    const policy = loadPolicy({ configPath: writePolicy('defaults: { upstreamProxy: "http://proxy.corp.example:3128" }\n'), env: { REGISTRIES: 'quay.io' } });
    assert.equal(policy.registries.get('quay.io:443')?.upstreamProxy?.https, 'http://proxy.corp.example:3128');
    assert.equal(policy.registries.get('registry-1.docker.io:443')?.upstreamProxy?.https, 'http://proxy.corp.example:3128');
  });

  test('mistakes are reported with file, line and key, never with the password', () => {
    const cases: Array<[string, RegExp]> = [
      ['defaults: { upstreamProxy: "socks5://u:hunter2@proxy:1080" }', /proxy\.yaml:1:\d+: defaults\.upstreamProxy: .*http:\/\/ or https:\/\/, not socks5:/],
      ['defaults: { upstreamProxy: "http://u:hunter2@proxy:3128/path" }', /defaults\.upstreamProxy: "http:\/\/u:\*{8}@proxy:3128" is not a proxy URL/],
      ['registries:\n  a.example: { noProxy: ["10.0.0.0/99"] }', /proxy\.yaml:2:\d+: registries\.a\.example\.noProxy\[0\]: "10\.0\.0\.0\/99": an IPv4 prefix is at most \/32/],
      ['defaults: { noProxy: "ok.example, bad..name" }', /defaults\.noProxy: "bad\.\.name" is not a noProxy entry/],
      ['defaults: { upstreamProxy: nonsense:://x }', /defaults\.upstreamProxy: /],
      ['defaults: { upstreamProxy: "http://u:hunter2%zz@proxy:3128" }', /defaults\.upstreamProxy: "http:\/\/u:\*{8}@proxy:3128": a % in the user name or password starts no valid escape/],
    ];
    for (const [yaml, expected] of cases) {
      assert.throws(() => load(yaml), (err: Error) => err instanceof ConfigError && expected.test(err.message) && !err.message.includes('hunter2'), yaml);
    }
    assert.throws(() => load('defaults: { upstreamProxy: env }', { HTTPS_PROXY: 'ftp://u:hunter2@x' }), (err: Error) => /^HTTPS_PROXY \(upstreamProxy: env\): /.test(err.message) && !err.message.includes('hunter2'));
  });

  test('check-config shows the forward proxy with its password masked, and what the environment gave', () => {
    const text = describePolicy(
      load('defaults:\n  upstreamProxy: "http://bob:${FWD_PASSWORD}@proxy.corp.example:3128"\n  noProxy: [internal.example]\nregistries:\n  a.example: {}\n  b.example: { upstreamProxy: env }\n', {
        FWD_PASSWORD: 'hunter2',
        HTTPS_PROXY: 'http://eve:swordfish@env-proxy.example:8080',
        NO_PROXY: '.svc',
      }),
    );
    assert.ok(!text.includes('hunter2') && !text.includes('swordfish'), text);
    assert.match(text, /upstreamProxy: http:\/\/bob:\*{8}@proxy\.corp\.example:3128/);
    assert.match(text, /# environmentProxy: \{https: http:\/\/eve:\*{8}@env-proxy\.example:8080, http: none\}/);
    assert.match(text, /noProxy:\n\s+- internal\.example\n\s+- \.svc/);
  });
});

describe('a forward proxy that cannot be reached', () => {
  test('the client gets a registry-style 502 that names it, and the registry is not tried directly', async () => {
    const closed = http.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const proxy = await startTestProxy(`defaults:\n  upstreamProxy: http://127.0.0.1:${port}\nregistries:\n  registry.unreachable.test: {}\nhosts:\n  registry.unreachable.test: 127.0.0.1\n`);
    try {
      const socket = await tlsThroughProxy(proxy.port, 'registry.unreachable.test', 443, proxy.caPem);
      const answer = await httpOverSocket(socket, 'GET', '/v2/library/app/manifests/1.0', 'registry.unreachable.test');
      assert.equal(answer.status, 502, answer.body.toString());
      const body = JSON.parse(answer.body.toString()) as { errors: Array<{ message: string }> };
      assert.match(body.errors[0]!.message, new RegExp(`cannot reach the forward proxy http://127\\.0\\.0\\.1:${port}: connect ECONNREFUSED`));
    } finally {
      await proxy.close();
    }
  });
});

describe('upstream traffic through a real forward proxy (squid)', { skip: squidSkip }, () => {
  let rig: HubRig;
  let work: string;
  let image: BuiltImage;
  let ref: string;

  before(async () => {
    work = makeTempDir('upstream-proxy');
    rig = await startHubRig({ k8s: false });
    image = await buildOciImage(join(work, 'layout'), { layers: [{ files: { 'etc/image': 'through a forward proxy\n' } }, { randomBytes: 200 * 1024 }], tag: '1.0' });
    ref = await rig.pushHub(image.layoutDir, '1.0', 'library/app');
  });

  after(async () => {
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  /** The hub registry and its token service, both intercepted (the clients' token requests go upstream from pullthrough too). */
  const policy = (proxyKeys: string, registryKeys = '') => `
defaults:
${proxyKeys}
registries:
  ${rig.hubHostPort}:
    tls: { ca: ${rig.caFile} }
${registryKeys}
  ${rig.endpoints.auth.hostPort}:
    tls: { ca: ${rig.caFile} }
hosts:
${rig.hostsYaml()}`;

  async function pull(proxy: TestProxy): Promise<{ ok: boolean; detail: string }> {
    const destDir = makeTempDir('upstream-proxy-pull');
    try {
      const result = await skopeoCopyThroughProxy({ image: ref, proxyUrl: proxy.url, caFile: proxy.caFile, destDir, timeoutMs: CLIENT_TIMEOUT_MS });
      if (result.code !== 0) return { ok: false, detail: result.stderr };
      assert.equal((await verifyDirCopy(destDir)).manifestDigest, image.manifestDigest);
      return { ok: true, detail: '' };
    } finally {
      removeTempDir(destDir);
    }
  }

  /** What squid logged for a rig host ('registry.hub.test:PORT' CONNECTs). */
  const connectsTo = (entries: SquidEntry[], hostPort: string) => entries.filter((e) => e.method === 'CONNECT' && e.target === hostPort);

  async function withSquid<T>(options: Parameters<typeof startSquid>[0], body: (squid: SquidHandle) => Promise<T>): Promise<T> {
    const squid = await startSquid({ hosts: rig.hosts, ...options });
    try {
      return await body(squid);
    } finally {
      await squid.stop();
    }
  }

  test('a pull goes upstream through the forward proxy: CONNECTs to the registry, its token service and its CDN', async () => {
    await withSquid({}, async (squid) => {
      rig.resetCounts();
      const proxy = await startTestProxy(policy(`  upstreamProxy: ${squid.url}`));
      let pulled;
      try {
        pulled = await pull(proxy);
      } finally {
        await proxy.close(); // closes the tunnels: squid logs a CONNECT when it ends
      }
      assert.ok(pulled.ok, `skopeo through pullthrough through squid failed:\n${pulled.detail}`);
      // The registry's own log: the manifest and the blobs were asked for, the blobs fetched from the CDN.
      assert.ok(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }) >= 1, rig.describeRequests());
      assert.ok(rig.count({ host: 'registry', kind: 'blob', status: 307 }) >= 1, rig.describeRequests());
      assert.ok(rig.count({ host: 'cdn', kind: 'download', status: 200 }) >= 1, rig.describeRequests());
      assert.ok(rig.count({ host: 'auth', kind: 'token', status: 200 }) >= 1, rig.describeRequests());
      const entries = await squid.waitFor('the CDN', (e) => e.target === rig.endpoints.cdn.hostPort);
      await squid.waitFor('the registry', (e) => e.target === rig.hubHostPort);
      await squid.waitFor('the token service', (e) => e.target === rig.endpoints.auth.hostPort);
      for (const e of squid.entries()) assert.ok(e.method === 'CONNECT' && e.status === 200, `every request was a tunnel squid allowed:\n${squid.describe()}`);
      assert.ok(connectsTo(entries, rig.endpoints.cdn.hostPort).length >= 1);
    });
  });

  test('proxy authentication: credentials in the URL work; without them a registry-style 502 names the forward proxy and its 407', async () => {
    await withSquid({ user: FORWARD_USER }, async (squid) => {
      const withCredentials = `  upstreamProxy: http://${FORWARD_USER.username}:\${FORWARD_PROXY_PASSWORD}@127.0.0.1:${squid.port}`;
      const env = { FORWARD_PROXY_PASSWORD: FORWARD_USER.password };
      const proxy = await startTestProxy(policy(withCredentials), env);
      let pulled;
      try {
        pulled = await pull(proxy);
        const text = describePolicy(loadPolicy({ configPath: join(proxy.dir, 'proxy.yaml'), env }));
        assert.ok(!text.includes(FORWARD_USER.password), 'check-config masks the password');
        assert.match(text, new RegExp(`upstreamProxy: http://${FORWARD_USER.username}:\\*{8}@127\\.0\\.0\\.1:${squid.port}`));
      } finally {
        await proxy.close();
      }
      assert.ok(pulled.ok, `the pull with the forward proxy's credentials failed:\n${pulled.detail}`);
      await squid.waitFor('the CDN, as the user', (e) => e.target === rig.endpoints.cdn.hostPort && e.status === 200 && e.user === FORWARD_USER.username);
      await squid.waitFor('the registry, as the user', (e) => e.target === rig.hubHostPort && e.status === 200 && e.user === FORWARD_USER.username);
      assert.ok(!proxy.lines.some((line) => line.includes(FORWARD_USER.password)), 'the password is in no log line');

      // Without credentials, and with a wrong password: squid answers the CONNECT 407.
      for (const [upstreamProxy, advice] of [
        [`  upstreamProxy: ${squid.url}`, 'it wants credentials'],
        [`  upstreamProxy: http://${FORWARD_USER.username}:not-the-password@127.0.0.1:${squid.port}`, 'it refused the credentials in upstreamProxy'],
      ] as const) {
        const refused = await startTestProxy(policy(upstreamProxy));
        try {
          const socket = await tlsThroughProxy(refused.port, rig.endpoints.registry.name, rig.endpoints.registry.port, refused.caPem);
          const answer = await httpOverSocket(socket, 'GET', '/v2/library/app/manifests/1.0', rig.hubHostPort, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
          assert.equal(answer.status, 502, answer.body.toString());
          const body = JSON.parse(answer.body.toString()) as { errors: Array<{ code: string; message: string }> };
          const message = body.errors[0]!.message;
          assert.match(message, new RegExp(`the forward proxy http://127\\.0\\.0\\.1:${squid.port} answered 407 Proxy Authentication Required to CONNECT ${rig.endpoints.registry.name.replaceAll('.', '\\.')}:${rig.endpoints.registry.port}`));
          assert.ok(message.includes(advice), message);
          assert.ok(!message.includes('not-the-password') && !refused.lines.some((line) => line.includes('not-the-password')), 'a wrong password is not repeated either');
          const failed = await pull(refused);
          assert.ok(!failed.ok, 'skopeo cannot pull when the forward proxy refuses pullthrough');
        } finally {
          await refused.close();
        }
      }
      await squid.waitFor('the refused CONNECTs', (e) => e.method === 'CONNECT' && e.status === 407);
    });
  });

  test('a registry in noProxy goes direct; its CDN, judged by its own name, still goes through the forward proxy', async () => {
    await withSquid({}, async (squid) => {
      rig.resetCounts();
      // A registry's own noProxy replaces the defaults' list.
      const proxy = await startTestProxy(policy(`  upstreamProxy: ${squid.url}\n  noProxy: ["*.k8s.test"]`, `    noProxy: [${rig.endpoints.registry.name}]`));
      let pulled;
      try {
        pulled = await pull(proxy);
      } finally {
        await proxy.close();
      }
      assert.ok(pulled.ok, pulled.detail);
      assert.ok(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }) >= 1, 'the registry was asked, directly');
      const entries = await squid.waitFor('the CDN', (e) => e.target === rig.endpoints.cdn.hostPort);
      await sleep(500); // any tunnel still open would be logged by now
      assert.deepEqual(squid.entries().filter((e) => e.target.includes(rig.endpoints.registry.name)), [], `nothing for the registry in squid's log:\n${squid.describe()}`);
      assert.ok(connectsTo(entries, rig.endpoints.cdn.hostPort).length >= 1);
    });
  });

  test('the environment\'s HTTPS_PROXY is ignored, unless the policy says upstreamProxy: env (with NO_PROXY)', async () => {
    await withSquid({}, async (squid) => {
      const saved = { HTTPS_PROXY: process.env.HTTPS_PROXY, https_proxy: process.env.https_proxy, NO_PROXY: process.env.NO_PROXY, no_proxy: process.env.no_proxy };
      // The proxy's own environment (what its worker threads inherit) and the loader's both say squid.
      Object.assign(process.env, { HTTPS_PROXY: squid.url, https_proxy: squid.url });
      delete process.env.NO_PROXY;
      delete process.env.no_proxy;
      try {
        const ignoring = await startTestProxy(policy('  push: deny'), { HTTPS_PROXY: squid.url });
        let pulled;
        try {
          pulled = await pull(ignoring);
        } finally {
          await ignoring.close();
        }
        assert.ok(pulled.ok, pulled.detail);
        await sleep(1000);
        assert.deepEqual(squid.entries(), [], `without upstreamProxy: env nothing goes through HTTPS_PROXY:\n${squid.describe()}`);

        const following = await startTestProxy(policy('  upstreamProxy: env'), { HTTPS_PROXY: squid.url, NO_PROXY: rig.endpoints.cdn.name });
        try {
          pulled = await pull(following);
        } finally {
          await following.close();
        }
        assert.ok(pulled.ok, pulled.detail);
        await squid.waitFor('the registry', (e) => e.target === rig.hubHostPort);
        await sleep(500);
        assert.deepEqual(squid.entries().filter((e) => e.target.includes(rig.endpoints.cdn.name)), [], `the CDN is in NO_PROXY:\n${squid.describe()}`);
      } finally {
        for (const [name, value] of Object.entries(saved)) {
          if (value === undefined) delete process.env[name];
          else process.env[name] = value;
        }
      }
    });
  });

  test('an https:// forward proxy is verified against the default trust (NODE_EXTRA_CA_CERTS), never a registry\'s tls.ca', async () => {
    // squid's certificate comes from the rig's CA: the registry's tls.ca, not (in this process) a default.
    await withSquid({ tls: rig.ca.issue(['127.0.0.1']) }, async (squid) => {
      assert.match(squid.url, /^https:/);
      const untrusting = await startTestProxy(policy(`  upstreamProxy: ${squid.url}`));
      try {
        const socket = await tlsThroughProxy(untrusting.port, rig.endpoints.registry.name, rig.endpoints.registry.port, untrusting.caPem);
        const answer = await httpOverSocket(socket, 'GET', '/v2/library/app/manifests/1.0', rig.hubHostPort, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
        assert.equal(answer.status, 502, answer.body.toString());
        const message = (JSON.parse(answer.body.toString()) as { errors: Array<{ message: string }> }).errors[0]!.message;
        assert.match(message, new RegExp(`cannot reach the forward proxy https://127\\.0\\.0\\.1:${squid.port}: .*(certificate|CERT).*; trust its CA with NODE_EXTRA_CA_CERTS`));
      } finally {
        await untrusting.close();
      }

      // NODE_EXTRA_CA_CERTS is read when Node starts: a pullthrough started with it goes through squid.
      const dir = makeTempDir('upstream-proxy-cli');
      writeFileSync(join(dir, 'proxy.yaml'), `listen: 127.0.0.1:0\ndataDir: ./data\n${policy(`  upstreamProxy: ${squid.url}`)}`);
      const child = spawnTracked(process.execPath, [CLI, 'start', '--config', join(dir, 'proxy.yaml')], { env: { PATH: process.env.PATH, NODE_EXTRA_CA_CERTS: rig.caFile }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        const port = await listeningPort(child);
        const caFile = join(dir, 'data', 'ca.crt');
        const destDir = makeTempDir('upstream-proxy-pull');
        try {
          const result = await skopeoCopyThroughProxy({ image: ref, proxyUrl: `http://127.0.0.1:${port}`, caFile, destDir, timeoutMs: CLIENT_TIMEOUT_MS });
          assert.equal(result.code, 0, result.stderr);
          assert.equal((await verifyDirCopy(destDir)).manifestDigest, image.manifestDigest);
        } finally {
          removeTempDir(destDir);
        }
      } finally {
        await stopChild(child, 5000);
        removeTempDir(dir);
      }
      await squid.waitFor('the registry, over TLS to squid', (e) => e.method === 'CONNECT' && e.target === rig.hubHostPort && e.status === 200);
      await squid.waitFor('the CDN, over TLS to squid', (e) => e.method === 'CONNECT' && e.target === rig.endpoints.cdn.hostPort && e.status === 200);
    });
  });

  test('a plain-HTTP registry is reached with absolute-form requests through the forward proxy, by the fill worker too; a 407 there is a 502 naming it', async () => {
    const blob = Buffer.from('a blob of a plain-HTTP registry, fetched through the forward proxy\n'.repeat(100));
    const digest = sha256(blob);
    const seen: string[] = [];
    const plain = http.createServer((req, res) => {
      seen.push(`${req.method} ${req.url}`);
      if (req.url === `/v2/lib/app/blobs/${digest}`) {
        res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.length, 'Docker-Content-Digest': digest });
        res.end(req.method === 'HEAD' ? undefined : blob);
      } else {
        res.writeHead(404, { 'Content-Type': 'application/json' });
        res.end('{"errors":[{"code":"NOT_FOUND","message":"not here"}]}');
      }
    });
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    const plainHost = `plain.registry.test:${(plain.address() as AddressInfo).port}`;
    const plainPolicy = (upstreamProxy: string) => `defaults:\n  upstreamProxy: ${upstreamProxy}\nregistries:\n  ${plainHost}:\n    http: true\nhosts:\n  plain.registry.test: 127.0.0.1\n`;
    try {
      await withSquid({ hosts: { 'plain.registry.test': '127.0.0.1' }, user: FORWARD_USER }, async (squid) => {
        const proxy = await startTestProxy(plainPolicy(squid.urlWithCredentials()));
        try {
          const answer = await absoluteFormGet(proxy.port, `http://${plainHost}/v2/lib/app/blobs/${digest}`);
          assert.equal(answer.status, 200, answer.body.toString());
          assert.ok(answer.body.equals(blob));
        } finally {
          await proxy.close();
        }
        await squid.waitFor('the absolute-form blob GET', (e) => e.method === 'GET' && e.target === `http://${plainHost}/v2/lib/app/blobs/${digest}` && e.status === 200 && e.user === FORWARD_USER.username);
        assert.ok(seen.includes(`GET /v2/lib/app/blobs/${digest}`), seen.join('\n'));

        const refused = await startTestProxy(plainPolicy(squid.url));
        try {
          const answer = await absoluteFormGet(refused.port, `http://${plainHost}/v2/lib/app/blobs/${digest}`);
          assert.equal(answer.status, 502, answer.body.toString());
          assert.match(answer.body.toString(), new RegExp(`the forward proxy http://127\\.0\\.0\\.1:${squid.port} answered 407 Proxy Authentication Required to GET http://${plainHost.replaceAll('.', '\\.')}`));
        } finally {
          await refused.close();
        }
      });
    } finally {
      await new Promise<void>((resolve) => plain.close(() => resolve()));
    }
  });
});

/** The port a `pullthrough start` child listens on, from its start line. */
function listeningPort(child: ChildProcess): Promise<number> {
  return new Promise((resolve, reject) => {
    let output = '';
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const match = /"listen":"[^"]*:(\d+)"/.exec(output);
      if (match) resolve(Number(match[1]));
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('exit', (code) => reject(new Error(`pullthrough start exited with ${code}:\n${output}`)));
  });
}

/** GET in absolute form (what HTTP_PROXY clients send) to pullthrough. */
function absoluteFormGet(proxyPort: number, url: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: proxyPort, method: 'GET', path: url, headers: { host: new URL(url).host }, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

let policyDir: string | undefined;
function writePolicy(yaml: string): string {
  policyDir ??= makeTempDir('upstream-proxy-policy');
  const file = join(policyDir, `proxy-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, yaml);
  return file;
}
