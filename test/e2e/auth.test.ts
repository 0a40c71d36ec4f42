// Credentials and access control end to end (R5, R6): real registries (distribution 2.8) with Basic
// (htpasswd) and token auth (a token service in the tests), pulled by real skopeo through the proxy.
// Every log line and every response header the proxy sends in this file is kept and grepped for the
// passwords, Basic values and tokens in play.
import assert from 'node:assert/strict';
import http from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { httpOverSocket, sendConnect, tlsThroughProxy } from '../helpers/connect.ts';
import { buildOciImage, MEDIA_TYPES, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { ctrUnavailable, startContainerd } from '../helpers/ctr.ts';
import { podmanPullThroughProxy, podmanUnavailable } from '../helpers/podman.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';
import { startTokenService, type TokenService } from '../helpers/token-service.ts';

const CENTRAL_TOKEN_PASSWORD = 'central-token-pw-7731';
const BUILDER_PASSWORD = 'builder-basic-pw-4410';
const ALICE = { username: 'alice', password: 'alice-own-pw-9012' };
const BOB = { username: 'bob', password: 'bob-own-pw-5527' };
const WRONG_CENTRAL_PASSWORD = 'wrong-central-pw-0000';
/** A GCR/GAR service account key: JSON with spaces and colons, as _json_key's password. */
const JSON_KEY = '{"type": "service_account", "private_key_id": "k:1:2", "client_email": "puller@project.iam.gserviceaccount.com"}';
const CI_PROXY_PASSWORD = 'ci-proxy-pw-3388';
const OPS_PROXY_PASSWORD = 'ops-proxy-pw-6241';
const SECRETS = [CENTRAL_TOKEN_PASSWORD, BUILDER_PASSWORD, ALICE.password, BOB.password, WRONG_CENTRAL_PASSWORD, JSON_KEY, 'k:1:2', CI_PROXY_PASSWORD, OPS_PROXY_PASSWORD];
const BASIC_VALUES = [
  ['central', CENTRAL_TOKEN_PASSWORD],
  ['builder', BUILDER_PASSWORD],
  ['alice', ALICE.password],
  ['bob', BOB.password],
  ['central', WRONG_CENTRAL_PASSWORD],
  ['_json_key', JSON_KEY],
  ['ci', CI_PROXY_PASSWORD],
  ['ops', OPS_PROXY_PASSWORD],
].map(([user, password]) => Buffer.from(`${user}:${password}`).toString('base64'));
/** Any JWT (header.payload.…): a token in a log line or response header is a leak. */
const JWT = /eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}/;
const OCI_ACCEPT = `${MEDIA_TYPES.manifest}, ${MEDIA_TYPES.index}`;

/** Every response header the proxy writes in this process (it runs in process): grepped at the end. */
const responseHeaders: string[] = [];
const originalWriteHead = http.ServerResponse.prototype.writeHead;

function assertNoSecrets(text: string, what: string): void {
  for (const secret of [...SECRETS, ...BASIC_VALUES]) assert.ok(!text.includes(secret), `${what} contains a credential (${secret.slice(0, 6)}…)`);
  assert.doesNotMatch(text, JWT, `${what} contains a token`);
}

describe('credentials and access control, end to end', () => {
  let ca: TestCa;
  let work: string;
  let tokens: TokenService;
  let tokenRegistry: RegistryHandle;
  let refusingRegistry: RegistryHandle;
  let basicRegistry: RegistryHandle;
  let jsonKeyRegistry: RegistryHandle;
  let proxy: TestProxy;
  let usersProxy: TestProxy;
  const images: Record<string, BuiltImage> = {};

  before(async () => {
    http.ServerResponse.prototype.writeHead = function (this: http.ServerResponse, ...args: unknown[]) {
      responseHeaders.push(JSON.stringify([args, this.getHeaders()]));
      return (originalWriteHead as (...a: unknown[]) => http.ServerResponse).apply(this, args);
    } as typeof originalWriteHead;
    ca = createTestCa('pullthrough auth e2e CA');
    work = makeTempDir('e2e-auth');
    // exp is set 63 s before expires_in says (distribution allows 60 s of leeway): a token the proxy
    // believes valid for another 1.5 s can be refused by the registry, as a token revoked early is.
    tokens = await startTokenService({
      host: 'auth.test',
      ca,
      leewaySeconds: 63,
      users: {
        central: { password: CENTRAL_TOKEN_PASSWORD, access: [{ repository: 'private/*', actions: ['pull'] }] },
        alice: { password: ALICE.password, access: [{ repository: 'alice/*', actions: ['pull'] }] },
        bob: { password: BOB.password, access: [{ repository: 'alice/*', actions: ['pull'] }] },
      },
      anonymous: [{ repository: 'public/*', actions: ['pull'] }],
    });
    tokenRegistry = await startRegistry({ host: 'tokenreg.test', ca, tokenAuth: tokens.registryAuth });
    refusingRegistry = await startRegistry({ host: 'tokenreg2.test', ca, tokenAuth: tokens.registryAuth });
    basicRegistry = await startRegistry({ host: 'basicreg.test', ca, htpasswd: { username: 'builder', password: BUILDER_PASSWORD } });
    jsonKeyRegistry = await startRegistry({ host: 'jsonkey.test', ca, htpasswd: { username: '_json_key', password: JSON_KEY } });

    const build = async (name: string, megabytes: number) => {
      images[name] = await buildOciImage(join(work, `layout-${name}`), { layers: [{ files: { [`etc/${name}`]: `${name}\n` } }, { randomBytes: megabytes * 1024 * 1024 }], tag: 'v1' });
      return images[name]!;
    };
    const pushWithToken = async (registry: RegistryHandle, repository: string, image: BuiltImage) =>
      pushImage(image.layoutDir, 'v1', registry, { repository, registryToken: tokens.mint([{ name: repository, actions: ['pull', 'push'] }]) });
    await pushWithToken(tokenRegistry, 'private/app', await build('private-app', 2));
    await pushWithToken(tokenRegistry, 'private/other', await build('private-other', 1));
    await pushWithToken(tokenRegistry, 'private/third', await build('private-third', 1));
    await pushWithToken(tokenRegistry, 'alice/app', await build('alice-app', 2));
    await pushWithToken(refusingRegistry, 'private/app', images['private-app']!);
    await pushImage((await build('team-app', 2)).layoutDir, 'v1', basicRegistry, { repository: 'team/app' });
    await pushImage((await build('other-app', 1)).layoutDir, 'v1', basicRegistry, { repository: 'other/app' });
    await pushImage((await build('gcr-app', 1)).layoutDir, 'v1', jsonKeyRegistry, { repository: 'project/app' });

    const caFile = writePem(work, 'upstream-ca.pem', ca.certPem);
    const passwordFile = writePem(work, 'builder-password', `${BUILDER_PASSWORD}\n`);
    const hosts = `
hosts:
  tokenreg.test: 127.0.0.1
  tokenreg2.test: 127.0.0.1
  basicreg.test: 127.0.0.1
  jsonkey.test: 127.0.0.1
  auth.test: 127.0.0.1
`;
    const registries = `
  ${tokenRegistry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { realm: ${tokens.hostPort}, username: central, password: "\${CENTRAL_TOKEN_PASSWORD}" }
  ${basicRegistry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { username: builder, passwordFile: ${passwordFile} }
`;
    proxy = await startTestProxy(
      `
registries:${registries}
  ${refusingRegistry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { realm: ${tokens.hostPort}, username: central, password: ${WRONG_CENTRAL_PASSWORD} }
  ${jsonKeyRegistry.hostPort}:
    tls: { ca: ${caFile} }
${hosts}`,
      {
        CENTRAL_TOKEN_PASSWORD,
        // The seed's way, with both delimiters changed: the JSON key holds spaces and colons.
        AUTH_REGISTRIES_DELIMITER: ';;',
        AUTH_REGISTRY_DELIMITER: '::',
        AUTH_REGISTRIES: `${jsonKeyRegistry.hostPort}::_json_key::${JSON_KEY}`,
      },
    );
    usersProxy = await startTestProxy(
      `
registries:${registries}
users:
  ci:
    password: ${CI_PROXY_PASSWORD}
    read: ["${basicRegistry.hostPort}/team/*"]
  ops:
    password: ${OPS_PROXY_PASSWORD}
    read: ["*"]
${hosts}`,
      { CENTRAL_TOKEN_PASSWORD },
    );
  });

  after(async () => {
    http.ServerResponse.prototype.writeHead = originalWriteHead;
    await proxy?.close();
    await usersProxy?.close();
    await Promise.all([tokenRegistry?.stop(), refusingRegistry?.stop(), basicRegistry?.stop(), jsonKeyRegistry?.stop(), tokens?.stop()]);
    if (work) removeTempDir(work);
  });

  const pull = (through: TestProxy, image: string, dest: string, options: { credentials?: { username: string; password: string }; proxyUser?: string } = {}) =>
    skopeoCopyThroughProxy({
      image,
      proxyUrl: options.proxyUser ? through.url.replace('http://', `http://${options.proxyUser}@`) : through.url,
      caFile: through.caFile,
      destDir: join(work, dest),
      ...(options.credentials ? { credentials: options.credentials } : {}),
    });

  const rawGet = async (through: TestProxy, registry: RegistryHandle, path: string, headers: Record<string, string> = {}) => {
    const socket = await tlsThroughProxy(through.port, registry.host, registry.port, through.caPem);
    try {
      return await httpOverSocket(socket, 'GET', path, registry.hostPort, headers);
    } finally {
      socket.destroy();
    }
  };

  test('central Basic credentials (passwordFile): a client without any pulls a private image', async () => {
    basicRegistry.resetCounts();
    const result = await pull(proxy, `${basicRegistry.hostPort}/team/app:v1`, 'basic-central');
    assert.equal(result.code, 0, result.stderr);
    const copy = await verifyDirCopy(join(work, 'basic-central'));
    assert.equal(copy.manifestDigest, images['team-app']!.manifestDigest);
    await basicRegistry.settle();
    assert.equal(basicRegistry.count({ method: 'GET', kind: 'blob', status: 200 }), 3, JSON.stringify(basicRegistry.requests()));
  });

  test('central credentials at an intercepted realm: a client without any gets a token with them and pulls', async () => {
    tokens.resetCounts();
    tokenRegistry.resetCounts();
    const result = await pull(proxy, `${tokenRegistry.hostPort}/private/app:v1`, 'token-central');
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(join(work, 'token-central'))).manifestDigest, images['private-app']!.manifestDigest);
    // skopeo asked the realm for a token without credentials; the proxy put the central ones in.
    assert.ok(tokens.count({ user: 'central', status: 200 }) >= 1, JSON.stringify(tokens.requests()));
    assert.ok(proxy.access.some((e) => e.host === tokens.hostPort && e.type === 'token' && e.status === 200));

    // Fetched with central credentials: shared with a second client without credentials, from cache.
    tokenRegistry.resetCounts();
    const again = await pull(proxy, `${tokenRegistry.hostPort}/private/app:v1`, 'token-central-2');
    assert.equal(again.code, 0, again.stderr);
    await tokenRegistry.settle();
    assert.equal(tokenRegistry.count({ kind: 'blob' }), 0, JSON.stringify(tokenRegistry.requests()));
  });

  test("the proxy's own token exchange for a client that sends no Authorization; tokens cached per scope", async () => {
    tokens.resetCounts();
    const image = images['private-other']!;
    const manifest = await rawGet(proxy, tokenRegistry, '/v2/private/other/manifests/v1', { Accept: OCI_ACCEPT });
    assert.equal(manifest.status, 200, manifest.body.toString());
    assert.equal(manifest.headers['docker-content-digest'], image.manifestDigest);
    const layer = await rawGet(proxy, tokenRegistry, `/v2/private/other/blobs/${image.layerDigests[1]}`);
    assert.equal(layer.status, 200);
    assert.equal(layer.body.length, image.blobs.get(image.layerDigests[1]!));
    const exchanges = tokens.requests().filter((r) => r.scopes.includes('repository:private/other:pull'));
    assert.equal(exchanges.length, 1, `one token for the scope, reused: ${JSON.stringify(exchanges)}`);
    assert.equal(exchanges[0]!.user, 'central');
  });

  test('a cached token the registry refuses (expired early) is dropped and exchanged again', async () => {
    const image = images['private-third']!;
    tokens.tokenTtlSeconds = 5; // the registry accepts it for 2 s; the proxy would use it for 4.5 s
    try {
      tokens.resetCounts();
      tokenRegistry.resetCounts();
      const manifest = await rawGet(proxy, tokenRegistry, '/v2/private/third/manifests/v1', { Accept: OCI_ACCEPT });
      assert.equal(manifest.status, 200);
      await sleep(2600);
      const config = await rawGet(proxy, tokenRegistry, `/v2/private/third/blobs/${image.configDigest}`);
      assert.equal(config.status, 200, config.body.toString());
      await tokenRegistry.settle();
      assert.equal(tokenRegistry.count({ kind: 'blob', status: 401 }), 1, 'the stale token was tried once');
      assert.equal(tokens.requests().filter((r) => r.scopes.includes('repository:private/third:pull')).length, 2, 'then a fresh one was fetched');
    } finally {
      tokens.tokenTtlSeconds = 300;
    }
  });

  test('a realm that refuses the central credentials: a clear log line, and the client sees the challenge', async () => {
    const response = await rawGet(proxy, refusingRegistry, '/v2/private/app/manifests/v1', { Accept: OCI_ACCEPT });
    assert.equal(response.status, 401);
    assert.match(response.headers['www-authenticate'] ?? '', /^Bearer realm="https:\/\/auth\.test:\d+\/token"/);
    const warning = proxy.lines.find((line) => line.includes('refused the central credentials') && line.includes(refusingRegistry.hostPort));
    assert.ok(warning, proxy.lines.filter((l) => l.includes('"warn"')).join('\n'));
    assert.match(warning, /"status":401/);
  });

  test('_json_key through AUTH_REGISTRIES with custom delimiters: a JSON password with spaces and colons works', async () => {
    const result = await pull(proxy, `${jsonKeyRegistry.hostPort}/project/app:v1`, 'json-key');
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(join(work, 'json-key'))).manifestDigest, images['gcr-app']!.manifestDigest);
  });

  test("a client's own credentials: its cached image is refused to others, and served from cache to another valid client", async () => {
    const image = `${tokenRegistry.hostPort}/alice/app:v1`;
    const first = await pull(proxy, image, 'alice-1', { credentials: ALICE });
    assert.equal(first.code, 0, first.stderr);
    assert.equal((await verifyDirCopy(join(work, 'alice-1'))).manifestDigest, images['alice-app']!.manifestDigest);

    // Cached now; a client without credentials (whose token carries only the central rights) is refused.
    const anonymous = await pull(proxy, image, 'alice-anon');
    assert.notEqual(anonymous.code, 0, 'an image fetched with alice’s credentials is not served to a client without any');
    const layer = images['alice-app']!.layerDigests[1]!;
    const stolen = await rawGet(proxy, tokenRegistry, `/v2/alice/app/blobs/${layer}`);
    assert.equal(stolen.status, 401);
    assert.ok(stolen.body.length < 1000, 'no blob bytes');
    assert.match(stolen.headers['www-authenticate'] ?? '', /^Bearer /);

    // Bob may read alice/* upstream: served from the cache, the registry sees HEADs only.
    tokenRegistry.resetCounts();
    const bob = await pull(proxy, image, 'alice-bob', { credentials: BOB });
    assert.equal(bob.code, 0, bob.stderr);
    assert.equal((await verifyDirCopy(join(work, 'alice-bob'))).manifestDigest, images['alice-app']!.manifestDigest);
    await tokenRegistry.settle();
    assert.equal(tokenRegistry.count({ method: 'GET', kind: 'blob' }), 0, JSON.stringify(tokenRegistry.requests()));
    assert.ok(tokens.count({ user: 'bob', status: 200 }) >= 1);
  });

  test('proxy users: the right password is required on CONNECT (407 otherwise)', async () => {
    const target = tokenRegistry.hostPort;
    const none = await sendConnect(usersProxy.port, target);
    assert.equal(none.status, 407);
    assert.match(none.head, /\r\nProxy-Authenticate: Basic realm="pullthrough"/i);
    none.socket.destroy();
    const wrong = await sendConnect(usersProxy.port, target, `Proxy-Authorization: Basic ${Buffer.from('ci:not-the-password').toString('base64')}\r\n`);
    assert.equal(wrong.status, 407);
    wrong.socket.destroy();
    const unknown = await sendConnect(usersProxy.port, target, `Proxy-Authorization: Basic ${Buffer.from(`nobody:${CI_PROXY_PASSWORD}`).toString('base64')}\r\n`);
    assert.equal(unknown.status, 407);
    unknown.socket.destroy();
    const right = await sendConnect(usersProxy.port, target, `Proxy-Authorization: Basic ${Buffer.from(`ci:${CI_PROXY_PASSWORD}`).toString('base64')}\r\n`);
    assert.equal(right.status, 200);
    right.socket.destroy();
    const skopeo = await pull(usersProxy, `${basicRegistry.hostPort}/team/app:v1`, 'users-wrong', { proxyUser: 'ci:not-the-password' });
    assert.notEqual(skopeo.code, 0);
    assert.match(skopeo.stderr, /407|Proxy Authentication Required/i);
  });

  test('proxy users: HTTPS_PROXY=http://user:pass@… pulls what the read rules allow, 403 elsewhere', async () => {
    const allowed = await pull(usersProxy, `${basicRegistry.hostPort}/team/app:v1`, 'users-ci', { proxyUser: `ci:${CI_PROXY_PASSWORD}` });
    assert.equal(allowed.code, 0, allowed.stderr);
    assert.equal((await verifyDirCopy(join(work, 'users-ci'))).manifestDigest, images['team-app']!.manifestDigest);

    const denied = await pull(usersProxy, `${basicRegistry.hostPort}/other/app:v1`, 'users-ci-denied', { proxyUser: `ci:${CI_PROXY_PASSWORD}` });
    assert.notEqual(denied.code, 0);
    assert.match(denied.stderr, /denied|403/i);
    assert.ok(usersProxy.access.some((e) => e.user === 'ci' && e.status === 403 && e.path.startsWith('/v2/other/app/')));
  });

  test("proxy users: a user whose rules grant a repository reads what another client's credentials cached", async () => {
    const image = `${tokenRegistry.hostPort}/alice/app:v1`;
    const alice = await pull(usersProxy, image, 'users-alice', { proxyUser: `ops:${OPS_PROXY_PASSWORD}`, credentials: ALICE });
    assert.equal(alice.code, 0, alice.stderr);
    // ops without registry credentials: its rules grant alice/app, so the cache serves it.
    tokenRegistry.resetCounts();
    const ops = await pull(usersProxy, image, 'users-ops', { proxyUser: `ops:${OPS_PROXY_PASSWORD}` });
    assert.equal(ops.code, 0, ops.stderr);
    assert.equal((await verifyDirCopy(join(work, 'users-ops'))).manifestDigest, images['alice-app']!.manifestDigest);
    await tokenRegistry.settle();
    assert.equal(tokenRegistry.count({ method: 'GET', kind: 'blob' }), 0, JSON.stringify(tokenRegistry.requests()));
    // ci's rules do not name that registry: 403, cached or not.
    const ci = await pull(usersProxy, image, 'users-ci-alice', { proxyUser: `ci:${CI_PROXY_PASSWORD}`, credentials: ALICE });
    assert.notEqual(ci.code, 0);
  });

  test('proxy users with podman and ctr: credentials in HTTPS_PROXY, central registry credentials from the proxy', { skip: podmanUnavailable() && ctrUnavailable() ? 'neither podman nor ctr is installed' : false }, async () => {
    const ref = `${basicRegistry.hostPort}/team/app:v1`;
    const proxyUrl = usersProxy.url.replace('http://', `http://ops:${OPS_PROXY_PASSWORD}@`);
    if (!podmanUnavailable()) {
      const podman = await podmanPullThroughProxy({ image: ref, proxyUrl, caFile: usersProxy.caFile });
      assert.equal(podman.code, 0, podman.stderr);
      assert.equal(podman.image?.digest, images['team-app']!.manifestDigest);
    }
    if (!ctrUnavailable()) {
      const containerd = await startContainerd();
      try {
        const ctr = await containerd.pull({ image: ref, proxyUrl, caFile: usersProxy.caFile });
        assert.equal(ctr.code, 0, ctr.stderr);
        assert.deepEqual((await containerd.images()).map((i) => i.digest), [images['team-app']!.manifestDigest]);
        const refused = await containerd.pull({ image: ref, proxyUrl: usersProxy.url.replace('http://', 'http://ops:wrong@'), caFile: usersProxy.caFile });
        assert.notEqual(refused.code, 0, 'a wrong proxy password fails the pull');
      } finally {
        await containerd.stop();
      }
    }
    assert.ok(usersProxy.access.some((e) => e.user === 'ops' && e.type === 'manifest' && e.status === 200));
  });

  test('startup warns about registries shared through central credentials; no credential anywhere in logs or headers', () => {
    const warnings = proxy.lines.filter((line) => line.includes('central credentials is served to every client'));
    assert.ok(warnings.some((line) => line.includes(tokenRegistry.hostPort)) && warnings.some((line) => line.includes(basicRegistry.hostPort)), warnings.join('\n'));
    assert.ok(!usersProxy.lines.some((line) => line.includes('served to every client')), 'with users, nothing is shared with everyone');
    assert.ok(responseHeaders.length > 50, `${responseHeaders.length} responses recorded`);
    assertNoSecrets(proxy.lines.join('\n'), 'the log');
    assertNoSecrets(usersProxy.lines.join('\n'), 'the users proxy log');
    assertNoSecrets(responseHeaders.join('\n'), 'the response headers');
  });
});
