// Layer prefetch (src/registry/prefetch.ts) end to end, against the Docker-Hub-shaped rig (token realm
// on another host, anonymous tokens, blobs 307-redirected to a CDN): once a client asks for one layer of
// an image whose manifest it was served, the image's other layers are fetched ahead of its requests,
// each once, on its own credentials; a manifest and config read (a scanner, `skopeo inspect`) fetch no
// layer; `cache.prefetch: false` turns it off; skopeo, podman and ctr pull with it, one upstream
// download per blob. Every count is read from the rig's own logs.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { hasBlobFile, waitFor } from '../helpers/cache-files.ts';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, MEDIA_TYPES, type BuiltImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { CLIENT_KINDS, pullAs } from '../helpers/pull-as.ts';

const PRIVATE_USER = { username: 'prefetcher', password: 'prefetch-secret-pw' };
const CLIENT_TIMEOUT_MS = 180_000;

describe('layer prefetch: an image\'s layers are fetched ahead once a client asks for one', () => {
  let rig: HubRig;
  let proxy: TestProxy;
  let withoutPrefetch: TestProxy;
  let work: string;
  let pushes = 0;

  before(async () => {
    work = makeTempDir('e2e-prefetch');
    rig = await startHubRig({ privateUser: PRIVATE_USER, k8s: false });
    proxy = await startTestProxy(proxyPolicy(rig, true));
    withoutPrefetch = await startTestProxy(proxyPolicy(rig, false));
  });

  after(async () => {
    await proxy?.close();
    await withoutPrefetch?.close();
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  /** An image of `layers` layers of distinct random bytes (100–400 KiB), pushed to the hub as repository:1.0. */
  async function pushed(repository: string, layers: number): Promise<{ image: BuiltImage; ref: string }> {
    const image = await buildOciImage(join(work, `layout-${pushes++}`), { tag: '1.0', layers: Array.from({ length: layers }, (_, i) => ({ randomBytes: (100 + 100 * (i % 4)) * 1024 })), labels: { repository } });
    return { image, ref: await rig.pushHub(image.layoutDir, '1.0', repository) };
  }

  /** A token from the realm, through `through` (anonymous, or for the private user), as a client gets one after its 401. */
  async function token(through: TestProxy, repository: string, credentials?: { username: string; password: string }): Promise<string> {
    const realm = new URL(rig.realm);
    const socket = await tlsThroughProxy(through.port, realm.hostname, Number(realm.port), through.caPem);
    const basic: Record<string, string> = credentials ? { Authorization: `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64')}` } : {};
    const answer = await httpOverSocket(socket, 'GET', `${realm.pathname}?scope=repository:${repository}:pull&service=${rig.service}`, realm.host, basic);
    assert.equal(answer.status, 200, `the realm answered ${answer.status}: ${answer.body.toString()}`);
    return (JSON.parse(answer.body.toString()) as { token: string }).token;
  }

  /** One GET at the hub registry through `through`, on a connection of its own. */
  async function get(through: TestProxy, path: string, bearer?: string) {
    const { hostname, port } = new URL(`https://${rig.hubHostPort}`);
    const socket = await tlsThroughProxy(through.port, hostname, Number(port), through.caPem);
    return httpOverSocket(socket, 'GET', path, rig.hubHostPort, { Accept: MEDIA_TYPES.manifest, ...(bearer ? { Authorization: `Bearer ${bearer}` } : {}) });
  }

  const downloads = (digest: string) => rig.count({ host: 'cdn', reference: digest });
  const layerBytes = (image: BuiltImage, digest: string) => readFileSync(join(image.layoutDir, 'blobs', 'sha256', digest.slice('sha256:'.length)));

  /** Waits until the proxy's cache holds every one of `digests` (verified, renamed into the store). */
  const fetchedAhead = (through: TestProxy, digests: readonly string[]) =>
    waitFor(`the layers fetched ahead (upstream: ${rig.describeRequests({ host: 'cdn' })})`, () => digests.every((digest) => hasBlobFile(through.dataDir, digest)), 15_000);
  /** Served from the cache: a hit, or the fill that brought it, still finishing its index entry. */
  const FROM_CACHE = ['HIT', 'JOINED'];

  test('a layer asked for brings the image\'s other layers, each downloaded once; the client\'s requests for them are hits', async () => {
    const { image } = await pushed('library/ahead', 5);
    const [first, ...rest] = image.layerDigests as [string, ...string[]];
    rig.resetCounts();
    const bearer = await token(proxy, 'library/ahead');
    assert.equal((await get(proxy, '/v2/library/ahead/manifests/1.0', bearer)).status, 200);
    const layer = await get(proxy, `/v2/library/ahead/blobs/${first}`, bearer);
    assert.equal(layer.status, 200);
    assert.ok(layer.body.equals(layerBytes(image, first)), 'the layer asked for arrived intact');
    await fetchedAhead(proxy, rest);
    for (const digest of rest) {
      const answer = await get(proxy, `/v2/library/ahead/blobs/${digest}`, bearer);
      assert.equal(answer.status, 200);
      assert.ok(FROM_CACHE.includes(answer.headers['x-cache']!), `${digest} was fetched ahead: ${answer.headers['x-cache']}`);
      assert.ok(answer.body.equals(layerBytes(image, digest)), `${digest} intact`);
    }
    for (const digest of image.layerDigests) assert.equal(downloads(digest), 1, `${digest}: ${rig.describeRequests({ host: 'cdn' })}`);
    assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET' }), image.layerDigests.length, `one blob GET per layer: ${rig.describeRequests({ host: 'registry' })}`);
  });

  test('a manifest and its config read (a scanner, skopeo inspect) fetch no layer, and cache.prefetch: false fetches only what is asked for', async () => {
    const { image } = await pushed('library/inspected', 4);
    rig.resetCounts();
    const bearer = await token(proxy, 'library/inspected');
    assert.equal((await get(proxy, '/v2/library/inspected/manifests/1.0', bearer)).status, 200);
    assert.equal((await get(proxy, `/v2/library/inspected/blobs/${image.configDigest}`, bearer)).status, 200);
    await sleep(500);
    assert.equal(rig.count({ host: 'cdn', reference: image.configDigest }), 1);
    for (const digest of image.layerDigests) assert.equal(downloads(digest), 0, `no layer fetched for an inspection: ${rig.describeRequests({ host: 'cdn' })}`);

    const { image: other } = await pushed('library/not-ahead', 4);
    const [first, ...rest] = other.layerDigests as [string, ...string[]];
    rig.resetCounts();
    const offBearer = await token(withoutPrefetch, 'library/not-ahead');
    assert.equal((await get(withoutPrefetch, '/v2/library/not-ahead/manifests/1.0', offBearer)).status, 200);
    assert.equal((await get(withoutPrefetch, `/v2/library/not-ahead/blobs/${first}`, offBearer)).status, 200);
    await sleep(500);
    assert.equal(downloads(first), 1);
    for (const digest of rest) assert.equal(downloads(digest), 0, `prefetch is off: ${rig.describeRequests({ host: 'cdn' })}`);
  });

  test('a private image\'s layers are fetched ahead on the client\'s own credentials, and a client without them is refused', async () => {
    const { image } = await pushed('private/ahead', 4);
    const [first, ...rest] = image.layerDigests as [string, ...string[]];
    rig.resetCounts();
    const bearer = await token(proxy, 'private/ahead', PRIVATE_USER);
    assert.equal((await get(proxy, '/v2/private/ahead/manifests/1.0', bearer)).status, 200);
    assert.equal((await get(proxy, `/v2/private/ahead/blobs/${first}`, bearer)).status, 200);
    await fetchedAhead(proxy, rest);
    for (const digest of rest) assert.equal(downloads(digest), 1);

    const anonymous = await token(proxy, 'private/ahead');
    for (const digest of rest) {
      const refused = await get(proxy, `/v2/private/ahead/blobs/${digest}`, anonymous);
      assert.ok(refused.status === 401 || refused.status === 403 || refused.status === 404, `a client without rights got ${refused.status} for ${digest}`);
      assert.ok(!refused.body.includes(layerBytes(image, digest).subarray(0, 64)), 'not one byte of the layer');
      const served = await get(proxy, `/v2/private/ahead/blobs/${digest}`, bearer);
      assert.equal(served.status, 200);
      assert.ok(FROM_CACHE.includes(served.headers['x-cache']!), `${digest}: ${served.headers['x-cache']}`);
    }
    for (const digest of rest) assert.equal(downloads(digest), 1, 'nothing downloaded again');
  });

  test('skopeo, podman and ctr pull a many-layer image cold: each blob downloaded once, the image intact', async () => {
    for (const kind of CLIENT_KINDS) {
      const repository = `library/pulled-ahead-${kind}`;
      const { image, ref } = await pushed(repository, 6);
      rig.resetCounts();
      const pulled = await pullAs(kind, ref, { proxyUrl: proxy.url, caFile: proxy.caFile, timeoutMs: CLIENT_TIMEOUT_MS });
      assert.ok(pulled.ok, `${kind} pull failed:\n${pulled.detail}`);
      assert.equal(pulled.digest, image.manifestDigest);
      for (const digest of [image.configDigest, ...image.layerDigests]) assert.equal(downloads(digest), 1, `${kind}, ${digest}: ${rig.describeRequests({ host: 'cdn' })}`);
      const layers = proxy.access.filter((e) => e.path?.startsWith(`/v2/${repository}/blobs/`) && image.layerDigests.some((d) => e.path!.endsWith(d)));
      assert.ok(layers.every((e) => e.status === 200), `${kind}: ${JSON.stringify(layers)}`);
      // skopeo into a directory asks for one layer at a time: the layers after the first were under way or in.
      if (kind === 'skopeo') assert.ok(layers.some((e) => e.cache === 'HIT' || e.cache === 'JOINED'), `skopeo met the layers fetched ahead: ${layers.map((e) => e.cache).join(', ')}`);
    }
  });
});

function proxyPolicy(rig: HubRig, prefetch: boolean): string {
  const tls = `tls: { ca: ${rig.caFile} }`;
  return `
cache:
  prefetch: ${prefetch}
registries:
  ${rig.hubHostPort}:
    ${tls}
  ${rig.endpoints.auth.hostPort}:
    ${tls}
hosts:
${rig.hostsYaml()}
`;
}
