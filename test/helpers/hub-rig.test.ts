// Self-test of the Docker-Hub-shaped rig (hub-rig.ts), no proxy involved: every behaviour the R9 tests
// rely on, shown directly against the rig with undici (through the rig's own resolving agent) and with
// skopeo through the rig's plain CONNECT tunnel (Go clients cannot resolve the test names themselves).
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request } from 'undici';
import { loadPolicy } from '../../config/load.ts';
import { startHubRig, type HubRig } from './hub-rig.ts';
import { blobPath, buildOciImage, digestBytes, MEDIA_TYPES, type BuiltImage } from './oci-image.ts';
import { makeTempDir, removeTempDir } from './process.ts';
import { skopeoCopyThroughProxy, verifyDirCopy } from './skopeo.ts';

const ACCEPT = `${MEDIA_TYPES.manifest}, ${MEDIA_TYPES.index}`;
const PRIVATE_USER = { username: 'hubber', password: 'hub-private-pw-5150' };
const UA = 'pullthrough-hub-rig-test';

describe('the Docker Hub / registry.k8s.io rig', () => {
  let rig: HubRig;
  let work: string;
  let publicImage: BuiltImage;
  let privateImage: BuiltImage;
  let k8sImage: BuiltImage;

  before(async () => {
    rig = await startHubRig({ privateUser: PRIVATE_USER });
    work = makeTempDir('hub-rig-test');
    publicImage = await buildOciImage(join(work, 'public'), {
      layers: [{ files: { 'etc/motd': 'a public image on the hub\n' } }, { randomBytes: 512 * 1024 }],
      tag: '3.20',
    });
    privateImage = await buildOciImage(join(work, 'private'), { layers: [{ files: { 'etc/secret': 'private\n' } }], tag: 'v1' });
    k8sImage = await buildOciImage(join(work, 'k8s'), {
      layers: [{ files: { 'etc/pause': 'registry.k8s.io\n' } }, { randomBytes: 256 * 1024 }],
      tag: '3.9',
    });
    assert.equal(await rig.pushHub(publicImage.layoutDir, '3.20', 'library/alpine'), `${rig.hubHostPort}/library/alpine:3.20`);
    await rig.pushHub(privateImage.layoutDir, 'v1', 'private/app');
    assert.equal(await rig.pushK8s(k8sImage.layoutDir, '3.9', 'pause'), `${rig.k8sHostPort}/pause:3.9`);
  });

  after(async () => {
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  const hubUrl = (path: string): string => `${rig.endpoints.registry.url}${path}`;
  const k8sUrl = (path: string): string => `${rig.endpoints.k8s.url}${path}`;
  const tokenUrl = (repository: string): string => `${rig.realm}?service=${encodeURIComponent(rig.service)}&scope=repository:${repository}:pull`;
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
  const basic = (c: { username: string; password: string }) => ({ authorization: `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}` });
  const layer = (): string => publicImage.layerDigests[1]!;
  const layerBytes = (): Buffer => readFileSync(blobPath(publicImage.layoutDir, layer()));

  async function token(repository: string, headers: Record<string, string> = {}): Promise<string> {
    const res = await rig.fetch(tokenUrl(repository), { headers });
    assert.equal(res.status, 200, res.body.toString());
    return (JSON.parse(res.body.toString()) as { token: string }).token;
  }

  test('challenges name the realm host; anonymous tokens pull public repositories, never private ones; the private user does', async () => {
    rig.resetCounts();
    const ping = await rig.fetch(hubUrl('/v2/'));
    assert.equal(ping.status, 401);
    assert.equal(ping.headers['www-authenticate'], `Bearer realm="${rig.realm}",service="${rig.service}"`);
    assert.equal(new URL(rig.realm).host, rig.endpoints.auth.hostPort, 'the realm is a host of its own');
    const unauthorised = await rig.fetch(hubUrl('/v2/library/alpine/manifests/3.20'), { headers: { accept: ACCEPT } });
    assert.equal(unauthorised.status, 401);
    assert.match(String(unauthorised.headers['www-authenticate']), /scope="repository:library\/alpine:pull"/);

    const manifest = (repository: string, tag: string, t: string) => rig.fetch(hubUrl(`/v2/${repository}/manifests/${tag}`), { headers: { accept: ACCEPT, ...bearer(t) } });
    const pub = await manifest('library/alpine', '3.20', await token('library/alpine'));
    assert.equal(pub.status, 200);
    assert.equal(pub.headers['docker-content-digest'], publicImage.manifestDigest);
    assert.equal(digestBytes(pub.body), publicImage.manifestDigest);

    const anonymousPrivate = await token('private/app');
    assert.deepEqual(claims(anonymousPrivate).access, [], 'an anonymous token for a private repository grants nothing');
    assert.equal((await manifest('private/app', 'v1', anonymousPrivate)).status, 401);
    const wrongPassword = await rig.fetch(tokenUrl('private/app'), { headers: basic({ username: PRIVATE_USER.username, password: 'nope' }) });
    assert.equal(wrongPassword.status, 401);
    const priv = await manifest('private/app', 'v1', await token('private/app', basic(PRIVATE_USER)));
    assert.equal(priv.status, 200);
    assert.equal(priv.headers['docker-content-digest'], privateImage.manifestDigest);

    // The auth host's own log (the rig's front) and the token service's agree.
    assert.equal(rig.count({ host: 'auth', kind: 'token', status: 200 }), 3, rig.describeRequests());
    assert.equal(rig.count({ host: 'auth', status: 401 }), 1);
    assert.equal(rig.count({ host: 'auth', authorization: true }), 2);
    assert.equal(rig.tokens.count({ user: PRIVATE_USER.username, status: 200 }), 1);
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET' }), 4, rig.describeRequests());
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }), 2);
  });

  test('a blob GET is checked, then 307-redirected to a signed CDN URL serving the bytes; HEAD is answered; no token, no URL', async () => {
    rig.resetCounts();
    const t = await token('library/alpine');
    const redirect = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`), { headers: bearer(t) });
    assert.equal(redirect.status, 307);
    const location = new URL(String(redirect.headers.location));
    assert.equal(location.host, rig.endpoints.cdn.hostPort);
    assert.match(location.search, /^\?expires=\d+&sig=[0-9a-f]{64}$/);
    const expires = Number(location.searchParams.get('expires'));
    assert.ok(Math.abs(expires - (Date.now() / 1000 + rig.cdnUrlLifetimeSeconds)) < 5, 'expires after the configured lifetime');

    const blob = await rig.fetch(location.href);
    assert.equal(blob.status, 200);
    assert.equal(digestBytes(blob.body), layer());
    assert.equal(Number(blob.headers['content-length']), publicImage.blobs.get(layer()));
    assert.equal(blob.headers['docker-content-digest'], undefined, 'a CDN sends no registry headers');

    const head = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`), { method: 'HEAD', headers: bearer(t) });
    assert.equal(head.status, 200);
    assert.equal(Number(head.headers['content-length']), publicImage.blobs.get(layer()));
    const denied = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`));
    assert.equal(denied.status, 401, 'the registry\'s 401 is relayed as it is');
    assert.equal(denied.headers.location, undefined);
    assert.match(String(denied.headers['www-authenticate']), /^Bearer realm=/);
    const unknown = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/sha256:${'0'.repeat(64)}`), { headers: bearer(t) });
    assert.equal(unknown.status, 404);
    assert.equal((JSON.parse(unknown.body.toString()) as { errors: Array<{ code: string }> }).errors[0]?.code, 'BLOB_UNKNOWN');

    assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET', status: 307 }), 1, rig.describeRequests());
    assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET', status: 401 }), 1);
    assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'HEAD', status: 200 }), 1);
    const [download, ...more] = rig.requests({ host: 'cdn' });
    assert.equal(more.length, 0);
    assert.deepEqual(
      { kind: download?.kind, reference: download?.reference, status: download?.status, authorization: download?.authorization, userAgent: download?.userAgent },
      { kind: 'download', reference: layer(), status: 200, authorization: false, userAgent: UA },
    );
    assert.equal(download?.path.includes('?'), false, 'the log keeps no signature');
    assert.ok(download?.complete);
    assert.equal(download?.bytes, publicImage.blobs.get(layer()));
  });

  test('the CDN answers 403 to expired or tampered URLs and 206 to a Range', async () => {
    rig.resetCounts();
    const t = await token('library/alpine');
    rig.cdnUrlLifetimeSeconds = -5;
    try {
      const redirect = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`), { headers: bearer(t) });
      const expired = await rig.fetch(String(redirect.headers.location));
      assert.equal(expired.status, 403);
      assert.match(expired.body.toString(), /<Code>AccessDenied<\/Code><Message>Request has expired<\/Message>/);
    } finally {
      rig.cdnUrlLifetimeSeconds = 600;
    }
    const url = new URL(rig.cdnUrl(layer(), { repository: 'library/alpine' }));
    const badSig = new URL(url);
    badSig.searchParams.set('sig', `${url.searchParams.get('sig')!.slice(0, -1)}${url.searchParams.get('sig')!.endsWith('0') ? '1' : '0'}`);
    assert.equal((await rig.fetch(badSig.href)).status, 403);
    const longer = new URL(url);
    longer.searchParams.set('expires', String(Number(url.searchParams.get('expires')) + 3600));
    assert.equal((await rig.fetch(longer.href)).status, 403, 'expires is signed');
    const unsigned = new URL(url);
    unsigned.search = '';
    assert.equal((await rig.fetch(unsigned.href)).status, 403);

    const size = publicImage.blobs.get(layer())!;
    const part = await rig.fetch(url.href, { headers: { range: 'bytes=100-199' } });
    assert.equal(part.status, 206);
    assert.equal(part.headers['content-range'], `bytes 100-199/${size}`);
    assert.deepEqual(part.body, layerBytes().subarray(100, 200));
    const tail = await rig.fetch(url.href, { headers: { range: 'bytes=1000-' } });
    assert.equal(tail.status, 206);
    assert.deepEqual(tail.body, layerBytes().subarray(1000));

    // A ranged blob GET at the registry is still redirected; the CDN answers the Range.
    const ranged = await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`), { headers: { ...bearer(t), range: 'bytes=0-9' } });
    assert.equal(ranged.status, 307);
    const first = await rig.fetch(String(ranged.headers.location), { headers: { range: 'bytes=0-9' } });
    assert.equal(first.status, 206);
    assert.deepEqual(first.body, layerBytes().subarray(0, 10));

    assert.equal(rig.count({ host: 'cdn', status: 403 }), 4, rig.describeRequests());
    assert.deepEqual(rig.requests({ host: 'cdn', status: 206 }).map((r) => r.range), ['bytes=100-199', 'bytes=1000-', 'bytes=0-9']);
  });

  test('manifest GETs carry ratelimit headers and count; past the limit, or switched to 429, they answer TOOMANYREQUESTS; HEAD is free', async () => {
    rig.resetCounts();
    rig.resetRateLimit(2);
    try {
      const t = await token('library/alpine');
      const manifest = (method: string) => rig.fetch(hubUrl('/v2/library/alpine/manifests/3.20'), { method, headers: { accept: ACCEPT, ...bearer(t) } });
      const limitHeaders = (res: { headers: Record<string, unknown> }) => [res.headers['ratelimit-limit'], res.headers['ratelimit-remaining']];

      const head = await manifest('HEAD');
      assert.equal(head.status, 200);
      assert.deepEqual(limitHeaders(head), ['2;w=21600', '2;w=21600']);
      const first = await manifest('GET');
      assert.equal(first.status, 200);
      assert.deepEqual(limitHeaders(first), ['2;w=21600', '1;w=21600']);
      assert.equal((await manifest('GET')).status, 200);
      assert.equal(rig.rateLimitRemaining(), 0);
      assert.equal((await manifest('HEAD')).status, 200, 'HEAD is never limited');
      const limited = await manifest('GET');
      assert.equal(limited.status, 429);
      assert.deepEqual(limitHeaders(limited), ['2;w=21600', '0;w=21600']);
      const body = JSON.parse(limited.body.toString()) as { errors: Array<{ code: string; message: string }> };
      assert.equal(body.errors[0]?.code, 'TOOMANYREQUESTS');
      assert.match(body.errors[0]?.message ?? '', /pull rate limit/);

      rig.resetRateLimit(100);
      assert.equal((await manifest('GET')).status, 200);
      rig.manifestGets = '429';
      assert.equal((await manifest('GET')).status, 429);
      assert.equal((await manifest('HEAD')).status, 200);
      assert.equal((await rig.fetch(hubUrl(`/v2/library/alpine/blobs/${layer()}`), { headers: bearer(t) })).status, 307, 'blobs are not limited');
      rig.manifestGets = 'ok';
      assert.equal((await manifest('GET')).status, 200);

      const manifests = rig.requests({ host: 'registry', kind: 'manifest' });
      assert.deepEqual(manifests.map((r) => `${r.method} ${r.status}`), ['HEAD 200', 'GET 200', 'GET 200', 'HEAD 200', 'GET 429', 'GET 200', 'GET 429', 'HEAD 200', 'GET 200']);
      assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 429 }), 2);
    } finally {
      rig.manifestGets = 'ok';
      rig.resetRateLimit(100);
    }
  });

  test('down() refuses connections to the registry and the token service; up() brings them back on the same ports', async () => {
    const { registry, auth, cdn } = rig.endpoints;
    assert.equal((await rig.fetch(hubUrl('/v2/'))).status, 401);
    await rig.down();
    try {
      assert.equal(await connectOutcome(registry.port), 'ECONNREFUSED');
      assert.equal(await connectOutcome(auth.port), 'ECONNREFUSED');
      assert.equal(await connectOutcome(cdn.port), 'connected', 'the CDN stays up');
      await assert.rejects(rig.fetch(hubUrl('/v2/')));
      await assert.rejects(rig.fetch(tokenUrl('library/alpine')));
    } finally {
      await rig.up();
    }
    assert.deepEqual([rig.endpoints.registry.port, rig.endpoints.auth.port], [registry.port, auth.port]);
    assert.equal((await rig.fetch(hubUrl('/v2/'))).status, 401);
    assert.ok(await token('library/alpine'));
    await rig.down(['cdn']);
    assert.equal(await connectOutcome(cdn.port), 'ECONNREFUSED');
    await rig.up(['cdn']);
    assert.equal(await connectOutcome(cdn.port), 'connected');
  });

  test('registry.k8s.test answers /v2/ and 307s manifests and blobs to the regional host, which 302s blobs to a relative download path', async () => {
    rig.resetCounts();
    const ping = await rig.fetch(k8sUrl('/v2/'));
    assert.equal(ping.status, 200);
    const regional = `${rig.endpoints.regional.url}/v2/${rig.regionalPrefix}/pause`;

    const manifest = await rig.fetch(k8sUrl('/v2/pause/manifests/3.9'), { headers: { accept: ACCEPT } });
    assert.equal(manifest.status, 307);
    assert.equal(manifest.headers.location, `${regional}/manifests/3.9`);
    const served = await rig.fetch(String(manifest.headers.location), { headers: { accept: ACCEPT } });
    assert.equal(served.status, 200);
    assert.equal(digestBytes(served.body), k8sImage.manifestDigest);
    const head = await rig.fetch(k8sUrl('/v2/pause/manifests/3.9'), { method: 'HEAD', headers: { accept: ACCEPT } });
    assert.equal(head.status, 307);
    const headServed = await rig.fetch(String(head.headers.location), { method: 'HEAD', headers: { accept: ACCEPT } });
    assert.equal(headServed.headers['docker-content-digest'], k8sImage.manifestDigest);

    const digest = k8sImage.layerDigests[1]!;
    const blob = await rig.fetch(k8sUrl(`/v2/pause/blobs/${digest}`));
    assert.equal(blob.status, 307);
    assert.equal(blob.headers.location, `${regional}/blobs/${digest}`);
    const hop = await rig.fetch(String(blob.headers.location));
    assert.equal(hop.status, 302);
    const relative = String(hop.headers.location);
    assert.match(relative, /^\/artifacts-downloads\//, 'a relative Location, as GAR sends');
    const bytes = await rig.fetch(new URL(relative, String(blob.headers.location)).href);
    assert.equal(bytes.status, 200);
    assert.equal(digestBytes(bytes.body), digest);

    assert.equal(rig.count({ host: 'k8s', status: 307 }), 3, rig.describeRequests());
    assert.equal(rig.count({ host: 'k8s', kind: 'manifest', repository: 'pause', reference: '3.9' }), 2);
    assert.equal(rig.count({ host: 'regional', kind: 'manifest', repository: `${rig.regionalPrefix}/pause`, status: 200 }), 2);
    assert.equal(rig.count({ host: 'regional', kind: 'blob', method: 'GET', status: 302 }), 1);
    assert.equal(rig.count({ host: 'regional', kind: 'download', reference: digest, status: 200 }), 1);
    assert.equal(rig.count({ authorization: true }), 0);
  });

  test('fault injection: a download cut after N bytes, then 401 and 503, then the bytes', async () => {
    rig.resetCounts();
    const url = rig.cdnUrl(layer(), { repository: 'library/alpine' });
    const size = publicImage.blobs.get(layer())!;
    // One script for the digest: a cut, then two statuses; another digest's downloads are not touched.
    rig.failNext('cdn', [{ cutAfter: 1000 }, 401, 503], { digest: layer() });
    try {
    const other = await rig.fetch(rig.cdnUrl(publicImage.configDigest, { repository: 'library/alpine' }));
    assert.equal(other.status, 200);

    const cut = await request(url, { dispatcher: rig.agent });
    assert.equal(cut.statusCode, 200);
    assert.equal(Number(cut.headers['content-length']), size, 'the head promises the whole blob');
    let received = 0;
    await assert.rejects(async () => {
      for await (const chunk of cut.body) received += (chunk as Buffer).length;
    });
    assert.equal(received, 1000);
    const unauthorised = await rig.fetch(url);
    assert.equal(unauthorised.status, 401);
    assert.match(unauthorised.body.toString(), /<Error><Code>Unauthorized<\/Code>/);
    assert.equal((await rig.fetch(url)).status, 503);
    const whole = await rig.fetch(url);
    assert.equal(whole.status, 200);
    assert.equal(digestBytes(whole.body), layer());

    const log = rig.requests({ host: 'cdn' });
    assert.deepEqual(log.map((r) => [r.status, r.complete]), [[200, true], [200, false], [401, true], [503, true], [200, true]], rig.describeRequests());
    assert.equal(log[1]?.bytes, 1000, 'the log shows where the cut was');
    assert.equal(log[4]?.bytes, size);

    // Any host takes faults; a digest-less rule hits the next request whatever it is.
    rig.failNext('registry', [503]);
    assert.equal((await rig.fetch(hubUrl('/v2/'))).status, 503);
    assert.equal((await rig.fetch(hubUrl('/v2/'))).status, 401);
    const k8sDigest = k8sImage.layerDigests[1]!;
    rig.cutNext('regional', k8sDigest, 10);
    const hop = await rig.fetch(`${rig.endpoints.regional.url}/v2/${rig.regionalPrefix}/pause/blobs/${k8sDigest}`);
    const download = await request(new URL(String(hop.headers.location), rig.endpoints.regional.url).href, { dispatcher: rig.agent });
    await assert.rejects(download.body.arrayBuffer());
    assert.equal(rig.requests({ host: 'regional', kind: 'download' }).at(-1)?.bytes, 10);
    } finally {
      rig.clearFaults();
    }
  });

  test('skopeo pulls through a plain CONNECT tunnel: anonymous token, 307 to the CDN; k8s redirects; private only with credentials', async (t) => {
    rig.resetCounts();
    const pull = (image: string, dest: string, credentials?: { username: string; password: string }) =>
      skopeoCopyThroughProxy({ image, proxyUrl: rig.tunnelUrl, caFile: rig.caFile, destDir: join(work, dest), ...(credentials ? { credentials } : {}) });

    const hub = await pull(`${rig.hubHostPort}/library/alpine:3.20`, 'skopeo-hub');
    assert.equal(hub.code, 0, hub.stderr);
    assert.equal((await verifyDirCopy(join(work, 'skopeo-hub'))).manifestDigest, publicImage.manifestDigest);
    t.diagnostic(`skopeo from the hub: ${rig.describeRequests()}`);
    assert.ok(rig.count({ host: 'auth', status: 200, authorization: false }) >= 1, 'an anonymous token');
    assert.ok(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }) >= 1);
    for (const digest of [publicImage.configDigest, ...publicImage.layerDigests]) {
      assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET', reference: digest, status: 307 }), 1, digest);
      assert.equal(rig.count({ host: 'cdn', kind: 'download', reference: digest, status: 200 }), 1, digest);
    }
    assert.match(rig.requests({ host: 'cdn' })[0]?.userAgent ?? '', /skopeo|containers/i);

    rig.resetCounts();
    const k8s = await pull(`${rig.k8sHostPort}/pause:3.9`, 'skopeo-k8s');
    assert.equal(k8s.code, 0, k8s.stderr);
    assert.equal((await verifyDirCopy(join(work, 'skopeo-k8s'))).manifestDigest, k8sImage.manifestDigest);
    t.diagnostic(`skopeo from registry.k8s.test: ${rig.describeRequests()}`);
    for (const digest of [k8sImage.configDigest, ...k8sImage.layerDigests]) {
      assert.equal(rig.count({ host: 'regional', kind: 'download', reference: digest, status: 200 }), 1, digest);
    }

    const refused = await pull(`${rig.hubHostPort}/private/app:v1`, 'skopeo-private-anonymous');
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /unauthorized|authentication required|denied/i);
    const allowed = await pull(`${rig.hubHostPort}/private/app:v1`, 'skopeo-private', PRIVATE_USER);
    assert.equal(allowed.code, 0, allowed.stderr);
    assert.equal((await verifyDirCopy(join(work, 'skopeo-private'))).manifestDigest, privateImage.manifestDigest);
  });

  test('proxyConfig() is a registries/hosts fragment the pullthrough loader accepts', () => {
    const file = join(work, 'proxy.yaml');
    writeFileSync(file, `listen: 127.0.0.1:0\ndataDir: ${join(work, 'data')}\n${rig.proxyConfig()}`);
    const policy = loadPolicy({ configPath: file, env: {} });
    for (const key of [rig.hubHostPort, rig.k8sHostPort]) {
      assert.equal(policy.registries.get(key)?.tls.caPem, rig.caPem, key);
    }
    for (const { name } of Object.values(rig.endpoints)) assert.deepEqual(policy.hosts.get(name), ['127.0.0.1'], name);
  });
});

/** 'connected', or the error code of a plain TCP connect to a loopback port. */
function connectOutcome(port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve('connected');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
}

function claims(jwt: string): { access: unknown[] } {
  return JSON.parse(Buffer.from(jwt.split('.')[1] ?? '', 'base64url').toString('utf8')) as { access: unknown[] };
}
