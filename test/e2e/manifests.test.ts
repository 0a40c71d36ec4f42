// End to end, manifests and tags (R4, R7): a real registry (distribution 2.8) behind the proxy, real
// skopeo pulling and pushing through it. What is counted is what the proxy costs upstream: every test
// asserts the registry's own access log, by method, because a manifest GET is what Docker Hub bills.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { buildMultiArchIndex, buildOciImage, type BuiltImage, type BuiltIndex, type LayerSpec } from '../helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, pushImageThroughProxy, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

/** The tier the short-lived tags (v…) fall in; everything else is fresh for an hour. */
const SHORT_TTL_MS = 1000;
/** Comfortably past SHORT_TTL_MS, measured from the end of a pull (the tag was validated before it). */
const PAST_TTL_MS = SHORT_TTL_MS + 200;

describe('manifests and tags through the proxy, against a real registry', () => {
  let ca: TestCa;
  let work: string;
  let caFile: string;
  let registry: RegistryHandle;
  /** A registry of its own for the outage test: it gets stopped. */
  let doomed: RegistryHandle;
  let doomedStopped = false;
  let proxy: TestProxy;
  let small: { a: BuiltImage; b: BuiltImage };
  let multi: BuiltIndex;

  before(async () => {
    ca = createTestCa('pullthrough e2e manifests CA');
    work = makeTempDir('e2e-manifests');
    [registry, doomed] = await Promise.all([startRegistry({ host: 'registry.test', ca }), startRegistry({ host: 'doomed.test', ca })]);
    const layout = join(work, 'layout');
    // Two versions of one image: same layers, another label, so another config and manifest digest.
    const layers: LayerSpec[] = [{ files: { 'etc/motd': 'manifest tests\n' } }, { files: { 'data.bin': randomBytes(256 * 1024) } }];
    small = {
      a: await buildOciImage(layout, { layers, tag: 'a', labels: { version: 'a' } }),
      b: await buildOciImage(layout, { layers, tag: 'b', labels: { version: 'b' } }),
    };
    assert.notEqual(small.a.manifestDigest, small.b.manifestDigest);
    multi = await buildMultiArchIndex(join(work, 'multi-layout'), { layers: [{ files: { 'etc/shared': 'both platforms\n' } }, { randomBytes: 64 * 1024 }], tag: 'multi' });

    // One push at a time: distribution 2.8 sometimes answers 500 to concurrent pushes of the same
    // blobs into one repository (seen in a full run).
    await pushImage(layout, 'a', registry, { repository: 'team/app', destinationTag: 'fresh' });
    await pushImage(layout, 'a', registry, { repository: 'team/app', destinationTag: 'v2' });
    await pushImage(layout, 'a', registry, { repository: 'team/app', destinationTag: 'v3' });
    await pushImage(multi.layoutDir, 'multi', registry, { repository: 'team/multi', all: true });
    await pushImage(layout, 'a', doomed, { repository: 'team/app', destinationTag: 'v1' });
    await pushImage(layout, 'a', doomed, { repository: 'team/app', destinationTag: 'v9' });

    caFile = writePem(work, 'upstream-ca.pem', ca.certPem);
    proxy = await startTestProxy(`
manifests:
  tiers:
    - { match: "v.*", ttl: ${SHORT_TTL_MS}ms }
  defaultTtl: 1h
  maxStale: 1h
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
  ${doomed.hostPort}:
    tls: { ca: ${caFile} }
hosts:
  registry.test: 127.0.0.1
  doomed.test: 127.0.0.1
`);
  });

  after(async () => {
    await proxy?.close();
    await Promise.all([registry?.stop(), doomedStopped ? undefined : doomed?.stop()]);
    if (work) removeTempDir(work);
  });

  const pull = (image: string, dest: string, architecture?: 'amd64' | 'arm64') =>
    skopeoCopyThroughProxy({ image, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, dest), ...(architecture ? { architecture } : {}) });

  /** The proxy's manifest lines since `from` (an index into proxy.access). */
  const manifestLines = (from: number) => proxy.access.slice(from).filter((e) => e.type === 'manifest');

  test('a tag pulled twice within its TTL: one upstream GET, no HEAD, the second pull a cache HIT', async () => {
    registry.resetCounts();
    const from = proxy.access.length;
    for (const dest of ['fresh-1', 'fresh-2']) {
      const result = await pull(`${registry.hostPort}/team/app:fresh`, dest);
      assert.equal(result.code, 0, result.stderr);
      assert.equal((await verifyDirCopy(join(work, dest))).manifestDigest, small.a.manifestDigest);
    }
    await registry.settle();
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: 'fresh' }), 1, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'HEAD', kind: 'manifest' }), 0);
    assert.equal(registry.count({ kind: 'manifest' }), 1, 'nothing by digest either');
    assert.deepEqual(manifestLines(from).map((e) => e.cache), ['MISS', 'HIT']);
  });

  test('a tag moved upstream is seen once its TTL has passed: one HEAD, one GET, the new digest', async () => {
    const first = await pull(`${registry.hostPort}/team/app:v2`, 'v2-old');
    assert.equal(first.code, 0, first.stderr);
    assert.equal((await verifyDirCopy(join(work, 'v2-old'))).manifestDigest, small.a.manifestDigest);

    await pushImage(small.b.layoutDir, 'b', registry, { repository: 'team/app', destinationTag: 'v2' });
    await sleep(PAST_TTL_MS);
    await registry.settle();
    registry.resetCounts();
    const from = proxy.access.length;
    const second = await pull(`${registry.hostPort}/team/app:v2`, 'v2-new');
    assert.equal(second.code, 0, second.stderr);
    assert.equal((await verifyDirCopy(join(work, 'v2-new'))).manifestDigest, small.b.manifestDigest);

    await registry.settle();
    assert.equal(registry.count({ method: 'HEAD', kind: 'manifest', reference: 'v2' }), 1, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: 'v2' }), 1);
    assert.equal(registry.count({ kind: 'manifest' }), 2);
    // Only the new config is new; the layers are the same and were cached by the first pull.
    assert.equal(registry.count({ method: 'GET', kind: 'blob' }), 1, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'GET', kind: 'blob', reference: small.b.configDigest }), 1);
    assert.deepEqual(manifestLines(from).map((e) => e.cache), ['MISS'], 'new bytes from upstream: a miss, not a revalidation');
  });

  test('a tag that does not change is revalidated with HEADs only once its TTL has passed', async () => {
    const first = await pull(`${registry.hostPort}/team/app:v3`, 'v3-0');
    assert.equal(first.code, 0, first.stderr);
    await registry.settle();
    registry.resetCounts();
    const from = proxy.access.length;
    for (let round = 1; round <= 3; round++) {
      await sleep(PAST_TTL_MS);
      const result = await pull(`${registry.hostPort}/team/app:v3`, `v3-${round}`);
      assert.equal(result.code, 0, result.stderr);
      assert.equal((await verifyDirCopy(join(work, `v3-${round}`))).manifestDigest, small.a.manifestDigest);
    }
    await registry.settle();
    assert.equal(registry.count({ method: 'HEAD', kind: 'manifest', reference: 'v3' }), 3, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'GET', kind: 'manifest' }), 0);
    assert.equal(registry.count({ method: 'GET', kind: 'blob' }), 0);
    assert.deepEqual(manifestLines(from).map((e) => e.cache), ['REVALIDATED', 'REVALIDATED', 'REVALIDATED']);
  });

  test('with the registry down a cached tag still pulls (STALE) and an uncached one fails fast', async () => {
    const first = await pull(`${doomed.hostPort}/team/app:v1`, 'doomed-0');
    assert.equal(first.code, 0, first.stderr);
    await doomed.settle();
    assert.equal(doomed.count({ method: 'GET', kind: 'manifest', reference: 'v1' }), 1);

    await doomed.stop();
    doomedStopped = true;
    await sleep(PAST_TTL_MS);

    const from = proxy.access.length;
    const stale = await pull(`${doomed.hostPort}/team/app:v1`, 'doomed-1');
    assert.equal(stale.code, 0, stale.stderr);
    assert.equal((await verifyDirCopy(join(work, 'doomed-1'))).manifestDigest, small.a.manifestDigest);
    const lines = proxy.access.slice(from).filter((e) => e.host === doomed.hostPort);
    // skopeo's ping (GET /v2/) would end the pull before the manifest: the proxy answers it itself.
    assert.deepEqual(lines.filter((e) => e.type === 'ping').map((e) => [e.status, e.cache]), [[200, 'STALE']]);
    assert.deepEqual(lines.filter((e) => e.type === 'manifest').map((e) => e.cache), ['STALE']);
    assert.deepEqual(lines.filter((e) => e.type === 'blob').map((e) => e.cache), ['HIT', 'HIT', 'HIT']);

    // v9 exists upstream but was never pulled: nothing to serve, and no waiting for it either.
    let started = performance.now();
    const uncached = await pull(`${doomed.hostPort}/team/app:v9`, 'doomed-2');
    const skopeoMs = performance.now() - started;
    assert.notEqual(uncached.code, 0);
    assert.match(uncached.stderr, /reading manifest v9 .*502/);
    assert.ok(skopeoMs < 1000, `skopeo failed after ${Math.round(skopeoMs)} ms`);

    started = performance.now();
    const socket = await tlsThroughProxy(proxy.port, 'doomed.test', doomed.port, proxy.caPem);
    const direct = await httpOverSocket(socket, 'GET', '/v2/team/app/manifests/v9', doomed.hostPort, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
    const directMs = performance.now() - started;
    assert.equal(direct.status, 502);
    assert.match(direct.body.toString(), /"code":"UNAVAILABLE".*ECONNREFUSED/);
    assert.ok(directMs < 1000, `answered after ${Math.round(directMs)} ms`);
  });

  test('a multi-arch index pulled for two platforms: the index from the cache, only the new platform from upstream', async () => {
    const [amd64, arm64] = multi.images as [BuiltImage, BuiltImage];
    const image = `${registry.hostPort}/team/multi:multi`;
    registry.resetCounts();
    const first = await pull(image, 'multi-amd64', 'amd64');
    assert.equal(first.code, 0, first.stderr);
    assert.equal((await verifyDirCopy(join(work, 'multi-amd64'))).manifestDigest, amd64.manifestDigest);
    await registry.settle();
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: 'multi' }), 1, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: amd64.manifestDigest }), 1);
    assert.equal(registry.count({ kind: 'manifest' }), 2);

    registry.resetCounts();
    const from = proxy.access.length;
    const second = await pull(image, 'multi-arm64', 'arm64');
    assert.equal(second.code, 0, second.stderr);
    const copy = await verifyDirCopy(join(work, 'multi-arm64'));
    assert.equal(copy.manifestDigest, arm64.manifestDigest);
    await registry.settle();
    assert.equal(registry.count({ kind: 'manifest', reference: 'multi' }), 0, JSON.stringify(registry.requests()));
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: arm64.manifestDigest }), 1);
    assert.equal(registry.count({ kind: 'manifest' }), 1);
    // The shared first layer was cached by the amd64 pull; arm64's config and last layer are new.
    const shared = amd64.layerDigests[0]!;
    assert.equal(arm64.layerDigests[0], shared);
    const upstreamBlobs = registry.requests().filter((r) => r.kind === 'blob').map((r) => `${r.method} ${r.reference}`).sort();
    assert.deepEqual(upstreamBlobs, [`GET ${arm64.configDigest}`, `GET ${arm64.layerDigests[1]}`].sort());
    assert.deepEqual(manifestLines(from).map((e) => [e.path.split('/').pop(), e.cache]), [
      ['multi', 'HIT'],
      [arm64.manifestDigest, 'MISS'],
    ]);
  });

  test('push through the proxy: denied by default with the reason in skopeo\'s output, streamed when allowed', async () => {
    const pushLayout = join(work, 'push-layout');
    const pushed = await buildOciImage(pushLayout, { layers: [{ randomBytes: 6 * 1024 * 1024 }], tag: 'p', labels: { pushed: 'yes' } });
    registry.resetCounts();
    const denied = await pushImageThroughProxy(pushLayout, 'p', { image: `${registry.hostPort}/team/pushed:v1`, proxyUrl: proxy.url, caFile: proxy.caFile });
    assert.notEqual(denied.code, 0);
    assert.match(denied.stderr, /unsupported: pushing through the proxy is disabled for registry\.test/i);
    await registry.settle();
    assert.equal(registry.count((r) => !['GET', 'HEAD'].includes(r.method)), 0, `writes reached upstream: ${JSON.stringify(registry.requests())}`);
    assert.equal((await registry.fetch('/v2/team/pushed/manifests/v1')).status, 404);

    // The seed's ALLOW_PUSH=true and push: bypass in proxy.yaml both let it through.
    const variants: Array<[string, string, NodeJS.ProcessEnv]> = [
      ['allowpush', `registries:\n  ${registry.hostPort}:\n    tls: { ca: ${caFile} }\nhosts:\n  registry.test: 127.0.0.1\n`, { ALLOW_PUSH: 'true' }],
      ['bypass', `registries:\n  ${registry.hostPort}:\n    tls: { ca: ${caFile} }\n    push: bypass\nhosts:\n  registry.test: 127.0.0.1\n`, {}],
    ];
    for (const [name, yaml, env] of variants) {
      const allowing = await startTestProxy(yaml, env);
      try {
        registry.resetCounts();
        const result = await pushImageThroughProxy(pushLayout, 'p', { image: `${registry.hostPort}/team/${name}:v1`, proxyUrl: allowing.url, caFile: allowing.caFile });
        assert.equal(result.code, 0, `${name}: ${result.stderr}`);
        await registry.settle();
        // The layer went up as an upload (POST, then PATCH/PUT with the bytes) and the manifest with a PUT.
        assert.equal(registry.count({ method: 'POST', kind: 'upload' }), 2, `${name}: ${JSON.stringify(registry.requests())}`);
        assert.equal(registry.count({ method: 'PUT', kind: 'manifest', reference: 'v1' }), 1);
        const manifest = await registry.fetch(`/v2/team/${name}/manifests/v1`, { headers: { Accept: 'application/vnd.oci.image.manifest.v1+json' } });
        assert.equal(manifest.status, 200);
        assert.equal(manifest.headers['docker-content-digest'], pushed.manifestDigest);
        const layer = await registry.fetch(`/v2/team/${name}/blobs/${pushed.layerDigests[0]}`, { method: 'HEAD' });
        assert.equal(layer.status, 200);
        assert.equal(Number(layer.headers['content-length']), pushed.blobs.get(pushed.layerDigests[0]!));
        const writes = allowing.access.filter((e) => !['GET', 'HEAD'].includes(e.method));
        assert.ok(writes.length >= 3 && writes.every((e) => e.cache === 'BYPASS' && e.status < 300), JSON.stringify(writes));
      } finally {
        await allowing.close();
      }
    }
  });
});
