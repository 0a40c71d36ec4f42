// State-changing admin actions and the admin token: without one, only loopback clients may purge (the
// default); with one, every request must carry it as `Authorization: Bearer` — loopback included,
// since behind a sidecar proxy (Istio connects from 127.0.0.6) every client looks local. The CLI sends
// it; it is never logged, printed or shown by check-config.
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { rmSync, writeFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { request } from 'undici';
import { describePolicy } from '../../config/describe.ts';
import { ConfigError, loadPolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import { createAdminHandler, type PurgeRequest } from '../../src/admin/index.ts';
import type { CertificateAuthority } from '../../src/ca.ts';
import type { Metrics } from '../../src/metrics.ts';
import { envWithoutProxies, makeTempDir, removeTempDir, run } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

const TOKEN = 'f3c1e0a9b8d7c6e5f4a3b2c1d0e9f8a7';
const OTHER = 'a-different-token-of-some-length';
const CLI = join(import.meta.dirname, '../../src/cli.ts');

interface Answer {
  status: number;
  text: string;
  headers: Record<string, string | string[] | undefined>;
}

async function purgeAt(url: string, authorization?: string): Promise<Answer> {
  const response = await request(`${url}/admin/purge`, {
    method: 'POST',
    body: JSON.stringify({ registry: 'quay.io' }),
    headers: { 'content-type': 'application/json', ...(authorization !== undefined ? { authorization } : {}) },
  });
  return { status: response.statusCode, text: await response.body.text(), headers: response.headers };
}

/** The proxy's own admin handler on a server that lets the test say which address the client has. */
async function handlerServer(admin: Policy['admin'] | undefined): Promise<{ url: string; remote: (address: string) => void; asked: PurgeRequest[]; close(): void }> {
  const asked: PurgeRequest[] = [];
  let remote = '127.0.0.1';
  const handler = createAdminHandler({
    ca: {} as CertificateAuthority,
    version: 'test',
    fallbackHost: '127.0.0.1:0',
    metrics: {} as Metrics,
    dashboard: () => Promise.reject(new Error('not in this test')),
    purge: async (what) => {
      asked.push(what);
      return { blobs: 0, bytes: 0, manifests: 0, tags: 0, busy: [] };
    },
    ...(admin ? { admin } : {}),
  });
  const server = http.createServer((req, res) => {
    Object.defineProperty(req.socket, 'remoteAddress', { value: remote, configurable: true });
    void handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    remote: (address) => void (remote = address),
    asked,
    close: () => server.close(),
  };
}

describe('no admin token (the default): loopback only', () => {
  let server: Awaited<ReturnType<typeof handlerServer>>;
  before(async () => (server = await handlerServer(undefined)));
  after(() => server?.close());

  test('a loopback client may purge, without any Authorization', async () => {
    for (const address of ['127.0.0.1', '127.0.0.6', '::1', '::ffff:127.0.0.1']) {
      server.remote(address);
      assert.equal((await purgeAt(server.url)).status, 200, address);
    }
  });

  test('any other client may not, token or not', async () => {
    for (const address of ['10.0.0.1', '192.0.2.7', 'fe80::1']) {
      server.remote(address);
      server.asked.length = 0;
      const answer = await purgeAt(server.url, `Bearer ${TOKEN}`);
      assert.equal(answer.status, 403, address);
      assert.match(answer.text, /accepted from the proxy host only.*admin\.token/);
      assert.deepEqual(server.asked, []);
    }
  });
});

describe('with admin.token: the token, from any address; loopback alone is not enough', () => {
  let server: Awaited<ReturnType<typeof handlerServer>>;
  before(async () => (server = await handlerServer({ token: TOKEN })));
  after(() => server?.close());

  const refusedWith = async (address: string, authorization: string | undefined, message: RegExp) => {
    server.remote(address);
    server.asked.length = 0;
    const answer = await purgeAt(server.url, authorization);
    assert.equal(answer.status, 401, `${address} ${authorization}: ${answer.text}`);
    assert.equal(answer.headers['www-authenticate'], 'Bearer realm="pullthrough-admin"');
    assert.match(answer.text, message);
    assert.ok(!answer.text.includes(TOKEN), 'the answer never holds the token');
    assert.deepEqual(server.asked, [], 'nothing purged');
  };

  test('without a token: 401, from loopback and from a sidecar alike', async () => {
    for (const address of ['127.0.0.1', '127.0.0.6', '::1']) await refusedWith(address, undefined, /needs the admin token/);
  });

  test('a wrong token, a token of another length, another scheme, an empty one: 401', async () => {
    await refusedWith('127.0.0.1', `Bearer ${OTHER}`, /not right/);
    await refusedWith('127.0.0.1', `Bearer ${TOKEN.slice(0, -1)}`, /not right/);
    await refusedWith('127.0.0.1', `Bearer ${TOKEN}x`, /not right/);
    await refusedWith('127.0.0.1', `Basic ${Buffer.from(`admin:${TOKEN}`).toString('base64')}`, /needs the admin token/);
    await refusedWith('127.0.0.1', 'Bearer ', /needs the admin token/);
    await refusedWith('127.0.0.1', TOKEN, /needs the admin token/);
  });

  test('the right token: accepted from any address', async () => {
    for (const address of ['127.0.0.1', '127.0.0.6', '10.0.0.1', '2001:db8::1']) {
      server.remote(address);
      server.asked.length = 0;
      assert.equal((await purgeAt(server.url, `Bearer ${TOKEN}`)).status, 200, address);
      assert.deepEqual(server.asked, [{ registry: 'quay.io' }]);
    }
    assert.equal((await purgeAt(server.url, `bearer ${TOKEN}`)).status, 200, 'the scheme is case-insensitive');
  });

  test('a GET of /admin/purge changes nothing, and needs no token to say so', async () => {
    server.remote('10.0.0.1');
    server.asked.length = 0;
    const response = await request(`${server.url}/admin/purge?registry=quay.io`);
    assert.equal(response.statusCode, 405);
    await response.body.dump();
    assert.deepEqual(server.asked, []);
  });
});

describe('admin.tokenFile', () => {
  let dir: string;
  let file: string;
  let server: Awaited<ReturnType<typeof handlerServer>>;

  before(async () => {
    dir = makeTempDir('admin-token-file');
    file = join(dir, 'admin-token');
    writeFileSync(file, `${TOKEN}\n`, { mode: 0o600 });
    server = await handlerServer({ token: OTHER, tokenFile: file });
  });
  after(() => {
    server?.close();
    if (dir) removeTempDir(dir);
  });

  test("the file's token (one trailing newline removed) and admin.token are both accepted: a rotation", async () => {
    assert.equal((await purgeAt(server.url, `Bearer ${TOKEN}`)).status, 200);
    assert.equal((await purgeAt(server.url, `Bearer ${OTHER}`)).status, 200);
  });

  test('the file is read at each use: a rotated Secret applies without a restart', async () => {
    const next = 'the-next-token-after-rotation-0001';
    writeFileSync(file, next);
    assert.equal((await purgeAt(server.url, `Bearer ${next}`)).status, 200);
    assert.equal((await purgeAt(server.url, `Bearer ${TOKEN}`)).status, 401);
    writeFileSync(file, `${TOKEN}\n`);
  });

  test('a file that cannot be read refuses every change (503), and stops the start', async () => {
    rmSync(file);
    server.asked.length = 0;
    const answer = await purgeAt(server.url, `Bearer ${OTHER}`);
    assert.equal(answer.status, 503);
    assert.match(answer.text, /admin\.tokenFile: cannot read .*ENOENT/);
    assert.deepEqual(server.asked, []);
    assert.throws(() => createAdminHandler({ admin: { tokenFile: file } } as Parameters<typeof createAdminHandler>[0]), (err: Error) => err instanceof ConfigError && /ENOENT/.test(err.message));
    writeFileSync(file, 'short\n');
    assert.throws(() => createAdminHandler({ admin: { tokenFile: file } } as Parameters<typeof createAdminHandler>[0]), /at least 16 visible ASCII characters/);
    writeFileSync(file, `${TOKEN}\n`);
  });
});

describe('the admin token in the running proxy and the CLI', () => {
  let proxy: TestProxy;
  let dir: string;

  before(async () => {
    dir = makeTempDir('admin-token-cli');
    proxy = await startTestProxy('admin:\n  token: ${PULLTHROUGH_ADMIN_TOKEN}\n', { PULLTHROUGH_ADMIN_TOKEN: TOKEN });
  });
  after(async () => {
    await proxy?.close();
    if (dir) removeTempDir(dir);
  });

  const cli = (args: string[], env: Record<string, string> = {}) =>
    run(process.execPath, [CLI, ...args], { env: envWithoutProxies({ PULLTHROUGH_ADMIN_TOKEN: '', ...env }), cwd: dir, timeoutMs: 60_000 });

  test('a purge over loopback without the token is refused; with it, done; the token is never logged', async () => {
    const refused = await purgeAt(proxy.url);
    assert.equal(refused.status, 401);
    assert.equal((await purgeAt(proxy.url, `Bearer ${OTHER}`)).status, 401);
    assert.equal((await purgeAt(proxy.url, `Bearer ${TOKEN}`)).status, 200);
    const admin = proxy.access.filter((e) => e.path === '/admin/purge').map((e) => e.status);
    assert.deepEqual(admin, [401, 401, 200], 'each attempt is in the access log');
    assert.ok(!proxy.lines.some((line) => line.includes(TOKEN) || line.includes(OTHER)), 'no token in any log line');
  });

  test('`pullthrough purge` sends $PULLTHROUGH_ADMIN_TOKEN', async () => {
    const empty = join(dir, 'empty.yaml');
    writeFileSync(empty, '');
    const result = await cli(['purge', '--config', empty, '--registry', 'quay.io', '--proxy', proxy.url], { PULLTHROUGH_ADMIN_TOKEN: TOKEN });
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^purged 0 blobs/);
    assert.ok(!`${result.stdout}${result.stderr}`.includes(TOKEN));
  });

  test('`pullthrough purge` sends the token of its proxy.yaml: admin.tokenFile', async () => {
    const tokenFile = join(dir, 'admin-token');
    writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    const config = join(dir, 'with-file.yaml');
    writeFileSync(config, `admin:\n  tokenFile: ./admin-token\n`);
    const result = await cli(['purge', '--config', config, '--registry', 'quay.io', '--proxy', proxy.url]);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^purged 0 blobs/);
  });

  test('`pullthrough purge` without a token: refused, with what to set; a wrong one: refused', async () => {
    const empty = join(dir, 'empty.yaml');
    writeFileSync(empty, '');
    const none = await cli(['purge', '--config', empty, '--registry', 'quay.io', '--proxy', proxy.url]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /^pullthrough purge: this needs the admin token.*set PULLTHROUGH_ADMIN_TOKEN/);
    const wrong = await cli(['purge', '--config', empty, '--registry', 'quay.io', '--proxy', proxy.url], { PULLTHROUGH_ADMIN_TOKEN: OTHER });
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /the admin token is not right/);
    assert.ok(!wrong.stderr.includes(OTHER), 'the token is not printed');
  });

  test('check-config shows that a token is set, never the token', () => {
    const dirOf = makeTempDir('admin-token-describe');
    try {
      const file = join(dirOf, 'proxy.yaml');
      writeFileSync(file, 'admin:\n  token: ${PULLTHROUGH_ADMIN_TOKEN}\n  tokenFile: ./admin-token\n');
      const text = describePolicy(loadPolicy({ configPath: file, env: { PULLTHROUGH_ADMIN_TOKEN: TOKEN } }));
      assert.ok(!text.includes(TOKEN));
      assert.match(text, /admin:\n {2}token: "\*{8}"\n {2}tokenFile: .*admin-token\n/);
    } finally {
      removeTempDir(dirOf);
    }
  });

  test('PULLTHROUGH_ADMIN_TOKEN alone sets it (a container configured by environment only)', () => {
    const policy = loadPolicy({ configPath: join(dir, 'empty.yaml'), env: { PULLTHROUGH_ADMIN_TOKEN: TOKEN } });
    assert.equal(policy.admin.token, TOKEN);
    assert.throws(() => loadPolicy({ configPath: join(dir, 'empty.yaml'), env: { PULLTHROUGH_ADMIN_TOKEN: 'too short' } }), /PULLTHROUGH_ADMIN_TOKEN: an admin token is at least 16/);
  });
});
