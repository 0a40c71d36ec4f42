// /metrics after known traffic: a cold and a warm skopeo pull of one image from a real registry give
// exact request, byte and cache figures; fake upstreams give the rate-limit budget, 429s, a JOINED
// fill and an eviction.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { fetchThroughProxy } from '../helpers/blob-client.ts';
import { waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { tlsThroughProxy } from '../helpers/connect.ts';
import { sendSlowly, sha256 } from '../helpers/fake-registry.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { scrape, type Scrape } from '../helpers/prometheus.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

/** requests_total as "type cache status" -> count, for one registry. */
function requestSeries(metrics: Scrape, registry: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const s of metrics.select('pullthrough_requests_total', { registry })) out[`${s.labels.type} ${s.labels.cache} ${s.labels.status}`] = s.value;
  return out;
}

describe('metrics after a cold and a warm pull of one image', () => {
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let image: BuiltImage;
  let work: string;
  /** Config and layers: the blobs a pull fetches. */
  let blobBytes: number;
  let reg: string;

  before(async () => {
    const ca = createTestCa('metrics test CA');
    work = makeTempDir('metrics');
    registry = await startRegistry({ host: 'registry.test', ca });
    image = await buildOciImage(join(work, 'layout'), { layers: [{ files: { 'etc/motd': 'metrics\n' } }, { randomBytes: 1536 * 1024 }], tag: 'v1' });
    await pushImage(image.layoutDir, 'v1', registry, { repository: 'team/app' });
    proxy = await startTestProxy(`registries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
    blobBytes = [image.configDigest, ...image.layerDigests].reduce((sum, d) => sum + image.blobs.get(d)!, 0);
    reg = registry.hostPort;
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  const pull = async (name: string) => {
    const dest = join(work, name);
    const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/app:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(dest)).manifestDigest, image.manifestDigest);
  };

  test('a cold pull: every blob and the manifest a MISS, their bytes, the cache holding the image', async () => {
    await pull('cold');
    const m = await scrape(proxy.url);
    assert.deepEqual(requestSeries(m, reg), { 'ping BYPASS 2xx': 1, 'manifest MISS 2xx': 1, 'blob MISS 2xx': 3 });
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), blobBytes);
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'manifest', cache: 'MISS' }), image.manifestSize);
    assert.equal(m.sum('pullthrough_bytes_saved_total'), 0, 'nothing came from the cache');
    // /v2/, the manifest and three blob fills each cost one upstream 200.
    assert.deepEqual(m.select('pullthrough_upstream_responses_total').map((s) => [s.labels.registry, s.labels.status, s.value]), [[reg, '200', 5]]);
    assert.equal(m.value('pullthrough_cache_bytes'), blobBytes);
    assert.equal(m.value('pullthrough_cache_blobs'), 3);
    assert.equal(m.value('pullthrough_fills_in_flight'), 0);
    assert.equal(m.value('pullthrough_cache_evictions_total'), 0);
    assert.equal(m.sum('pullthrough_ratelimit_remaining'), 0, 'distribution sends no ratelimit-* headers');
    assert.equal(m.types.get('pullthrough_requests_total'), 'counter');
    assert.equal(m.types.get('pullthrough_cache_bytes'), 'gauge');
  });

  test('a warm pull: every blob and the manifest a HIT; bytes saved are exactly what the cache served', async () => {
    await pull('warm');
    const m = await scrape(proxy.url);
    assert.deepEqual(requestSeries(m, reg), {
      'ping BYPASS 2xx': 2,
      'manifest MISS 2xx': 1,
      'blob MISS 2xx': 3,
      'manifest HIT 2xx': 1,
      'blob HIT 2xx': 3,
    });
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'HIT' }), blobBytes);
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), blobBytes, 'unchanged');
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'manifest', cache: 'HIT' }), image.manifestSize);
    assert.equal(m.value('pullthrough_bytes_saved_total', { registry: reg }), blobBytes + image.manifestSize);
    // Only the second /v2/ went upstream.
    assert.equal(m.value('pullthrough_upstream_responses_total', { registry: reg, status: '200' }), 6);
    assert.equal(m.value('pullthrough_cache_bytes'), blobBytes);
    assert.equal(m.value('pullthrough_cache_blobs'), 3);
    assert.equal(m.value('pullthrough_fills_in_flight'), 0);
  });

  test('certificate expiry: the CA and the leaf presented for the registry', async () => {
    const m = await scrape(proxy.url);
    const caNotAfter = new X509Certificate(proxy.caPem).validToDate;
    assert.equal(m.value('pullthrough_ca_expiry_timestamp_seconds'), caNotAfter.getTime() / 1000);
    const socket = await tlsThroughProxy(proxy.port, 'registry.test', registry.port, proxy.caPem);
    const leaf = new X509Certificate(socket.getPeerX509Certificate()!.raw);
    socket.destroy();
    assert.equal(m.value('pullthrough_leaf_expiry_timestamp_seconds', { host: 'registry.test' }), leaf.validToDate.getTime() / 1000);
    assert.ok(leaf.validToDate < caNotAfter);
  });

  test("the process's own metrics carry the prefix once", async () => {
    const m = await scrape(proxy.url);
    assert.ok(m.value('pullthrough_process_resident_memory_bytes') > 0);
    assert.ok(m.value('pullthrough_nodejs_heap_size_used_bytes') > 0);
    assert.deepEqual(m.samples.filter((s) => !s.name.startsWith('pullthrough_') || s.name.includes('process_process')).map((s) => s.name), []);
  });
});

describe('metrics against fake upstreams', () => {
  let rig: CacheRig;
  let reg: string;

  before(async () => {
    rig = await startCacheRig();
    reg = rig.registry.hostPort;
  });

  after(async () => {
    await rig?.close();
  });

  const MANIFEST_TYPE = 'application/vnd.oci.image.manifest.v1+json';
  const manifestBody = (tag: string) =>
    Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MANIFEST_TYPE, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(Buffer.from(tag)), size: tag.length }, layers: [] }));
  const getManifest = (tag: string) => fetchThroughProxy(rig.target, `/v2/lib/app/manifests/${tag}`, { headers: { accept: MANIFEST_TYPE } });

  test('ratelimit-remaining: the last value upstream reported, per registry', async () => {
    let remaining = 76;
    rig.registry.behave = (req, res, seen) => {
      const tag = /\/manifests\/(.+)$/.exec(seen.path)?.[1];
      if (!tag) return false;
      const body = manifestBody(tag);
      res.writeHead(200, {
        'Content-Type': MANIFEST_TYPE,
        'Content-Length': body.length,
        'Docker-Content-Digest': sha256(body),
        'RateLimit-Limit': '100;w=21600',
        'RateLimit-Remaining': `${remaining};w=21600`,
      });
      res.end(req.method === 'HEAD' ? undefined : body);
      return true;
    };
    try {
      assert.equal((await getManifest('one')).status, 200);
      assert.equal((await scrape(rig.proxy.url)).value('pullthrough_ratelimit_remaining', { registry: reg }), 76);
      remaining = 75;
      assert.equal((await getManifest('two')).status, 200);
      assert.equal((await scrape(rig.proxy.url)).value('pullthrough_ratelimit_remaining', { registry: reg }), 75);
      // A cached manifest costs no pull: the budget stays what upstream said last.
      remaining = 10;
      const again = await getManifest('one');
      assert.equal(again.headers['x-cache'], 'HIT');
      const m = await scrape(rig.proxy.url);
      assert.equal(m.value('pullthrough_ratelimit_remaining', { registry: reg }), 75);
      assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'MISS', status: '2xx' }), 2);
      assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'HIT', status: '2xx' }), 1);
      assert.equal(m.value('pullthrough_upstream_responses_total', { registry: reg, status: '200' }), 2);
    } finally {
      rig.registry.reset();
    }
  });

  test('a 429 from upstream, for a manifest and for a blob, is counted by its status', async () => {
    const blob = rig.registry.addBlob(64 * 1024);
    const before = await scrape(rig.proxy.url);
    const tooMany = JSON.stringify({ errors: [{ code: 'TOOMANYREQUESTS', message: 'You have reached your pull rate limit.' }] });
    rig.registry.behave = (_req, res) => {
      res.writeHead(429, { 'Content-Type': 'application/json', 'Content-Length': tooMany.length, 'Retry-After': '60', 'RateLimit-Limit': '100;w=21600', 'RateLimit-Remaining': '0;w=21600' });
      res.end(tooMany);
      return true;
    };
    try {
      const manifest = await getManifest('throttled');
      assert.equal(manifest.status, 429);
      const got = await rig.blob(blob.digest);
      assert.equal(got.status, 429);
      assert.equal(got.headers['x-cache'], 'MISS');
    } finally {
      rig.registry.reset();
    }
    const m = await scrape(rig.proxy.url);
    assert.equal(m.value('pullthrough_upstream_responses_total', { registry: reg, status: '429' }), 2);
    assert.equal(m.value('pullthrough_upstream_responses_total', { registry: reg, status: '200' }), before.value('pullthrough_upstream_responses_total', { registry: reg, status: '200' }));
    assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'MISS', status: '4xx' }), 1);
    assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'MISS', status: '4xx' }), 1);
    assert.equal(m.value('pullthrough_ratelimit_remaining', { registry: reg }), 0, "the manifest's 429 said 0 remaining");
  });

  test('two clients of one slow blob: one MISS, one JOINED, one upstream GET, the fill in flight while it runs', async () => {
    const blob = rig.registry.addBlob(8 * MiB);
    rig.registry.behave = async (req, res, seen) => {
      if (seen.blob?.digest !== blob.digest || req.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.bytes.length, 'Docker-Content-Digest': blob.digest });
      if (await sendSlowly(res, blob.bytes, 256 * 1024, 25)) res.end();
      return true;
    };
    try {
      const before = await scrape(rig.proxy.url);
      let firstBytes = 0;
      const first = rig.blob(blob.digest, { onData: (n) => void (firstBytes = n) });
      await waitFor('the first client to receive bytes', () => firstBytes > 0);
      const during = await scrape(rig.proxy.url);
      assert.equal(during.value('pullthrough_fills_in_flight'), 1);
      const second = await rig.blob(blob.digest);
      const [a, b] = [await first, second];
      assert.deepEqual([a.headers['x-cache'], b.headers['x-cache']], ['MISS', 'JOINED']);
      assert.ok(a.complete && b.complete && a.digest === blob.digest && b.digest === blob.digest);
      assert.equal(rig.registry.count({ method: 'GET', digest: blob.digest }), 1);

      // The fill leaves the in-flight map once its index entry is committed.
      let m = during;
      await waitFor('the fill to settle', () => m.value('pullthrough_fills_in_flight') === 0, 10_000, async () => void (m = await scrape(rig.proxy.url)));
      const delta = (name: string, labels: Record<string, string>) => m.sum(name, labels) - before.sum(name, labels);
      assert.equal(delta('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'MISS', status: '2xx' }), 1);
      assert.equal(delta('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'JOINED', status: '2xx' }), 1);
      assert.equal(delta('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'JOINED' }), 8 * MiB);
      assert.equal(delta('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), 8 * MiB);
      assert.equal(delta('pullthrough_bytes_saved_total', { registry: reg }), 8 * MiB, "the joiner's bytes cost no transfer of their own");
      assert.equal(delta('pullthrough_upstream_responses_total', { registry: reg, status: '200' }), 1, 'one upstream response for both');
      assert.equal(delta('pullthrough_cache_blobs', {}), 1);
      assert.equal(delta('pullthrough_cache_bytes', {}), 8 * MiB);
    } finally {
      rig.registry.reset();
    }
  });
});

describe('eviction metrics', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig({ cache: '{ maxSize: 10MiB, minFree: 0 }' });
  });

  after(async () => {
    await rig?.close();
  });

  test('a blob evicted to make room is counted with its bytes; the cache gauges follow', async () => {
    const a = rig.registry.addBlob(6 * MiB);
    const b = rig.registry.addBlob(6 * MiB);
    assert.equal((await rig.blob(a.digest)).digest, a.digest);
    await rig.waitForHit(a.digest);
    let m = await scrape(rig.proxy.url);
    assert.equal(m.value('pullthrough_cache_evictions_total'), 0);
    assert.equal(m.value('pullthrough_cache_bytes'), 6 * MiB);

    assert.equal((await rig.blob(b.digest)).digest, b.digest);
    await rig.waitForHit(b.digest);
    await waitFor('the eviction to be counted', () => m.value('pullthrough_cache_evictions_total') === 1, 10_000, async () => {
      m = await scrape(rig.proxy.url);
      await sleep(10);
    });
    assert.equal(m.value('pullthrough_cache_evicted_bytes_total'), 6 * MiB);
    assert.equal(m.value('pullthrough_cache_blobs'), 1);
    assert.equal(m.value('pullthrough_cache_bytes'), 6 * MiB);
  });
});
