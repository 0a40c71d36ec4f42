// /metrics after known traffic: a cold and a warm skopeo pull of one image from a real registry give
// exact request, byte, cache and latency figures, and the names and types a stock dashboard expects
// (checked against docs/operations.md); fake upstreams give the rate-limit budgets, 429s, a JOINED
// fill and an eviction; a proxy with users gives 407s and tunnels.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import type { FillOutcome } from '../../src/cache/fill-protocol.ts';
import type { AccessEntry, CacheStatus } from '../../src/log.ts';
import { createMetrics, type LiveState } from '../../src/metrics.ts';
import { RateLimits } from '../../src/upstream/rate-limits.ts';
import { fetchThroughProxy } from '../helpers/blob-client.ts';
import { waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { sendConnect, tlsThroughProxy } from '../helpers/connect.ts';
import { sendSlowly, sha256 } from '../helpers/fake-registry.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { Scrape, scrape } from '../helpers/prometheus.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';
import { codeSpans, readDoc, section, tables } from '../docs/markdown.ts';

const CACHE_STATUSES: ReadonlySet<string> = new Set<CacheStatus>(['HIT', 'MISS', 'STALE', 'REVALIDATED', 'JOINED', 'BYPASS', 'TUNNEL']);

/** Every metric name in the first column of the tables under docs/operations.md's "Metrics". */
function documentedMetrics(): string[] {
  const names = tables(section(readDoc('docs/operations.md'), 'Metrics')).flatMap((t) => t.rows.flatMap((row) => codeSpans(row[0] ?? '')));
  return names.filter((name) => /^[a-z_][a-z0-9_]*$/.test(name));
}

/** A histogram's _count samples as "label value…" -> count. */
function histogramCounts(m: Scrape, name: string, labels: string[], filter: Record<string, string> = {}): Record<string, number> {
  const out: Record<string, number> = {};
  for (const s of m.select(`${name}_count`, filter)) out[labels.map((l) => s.labels[l]).join(' ')] = s.value;
  return out;
}

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
    proxy = await startTestProxy(`# Statuses and figures are counted exactly: no layer is fetched ahead of the client (cache.prefetch).\ncache: { prefetch: false }\nregistries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
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
    assert.deepEqual(requestSeries(m, reg), { 'ping BYPASS 200': 1, 'manifest MISS 200': 1, 'blob MISS 200': 3 });
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), blobBytes);
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'manifest', cache: 'MISS' }), image.manifestSize);
    assert.equal(m.sum('pullthrough_saved_bytes_total'), 0, 'nothing came from the cache');
    // /v2/, the manifest and three blob fills each cost one upstream 200.
    assert.deepEqual(m.select('pullthrough_upstream_responses_total').map((s) => [s.labels.registry, s.labels.status, s.value]), [[reg, '200', 5]]);
    assert.equal(m.value('pullthrough_cache_bytes'), blobBytes);
    assert.equal(m.value('pullthrough_cache_blobs'), 3);
    assert.equal(m.value('pullthrough_fills_in_flight'), 0);
    assert.equal(m.value('pullthrough_cache_evictions_total'), 0);
    assert.deepEqual(m.select('pullthrough_ratelimit_remaining'), [], 'distribution sends no ratelimit-* headers');
    assert.equal(m.types.get('pullthrough_requests_total'), 'counter');
    assert.equal(m.types.get('pullthrough_cache_bytes'), 'gauge');
  });

  test('a warm pull: every blob and the manifest a HIT; bytes saved are exactly what the cache served', async () => {
    await pull('warm');
    const m = await scrape(proxy.url);
    assert.deepEqual(requestSeries(m, reg), {
      'ping BYPASS 200': 2,
      'manifest MISS 200': 1,
      'blob MISS 200': 3,
      'manifest HIT 200': 1,
      'blob HIT 200': 3,
    });
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'HIT' }), blobBytes);
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), blobBytes, 'unchanged');
    assert.equal(m.value('pullthrough_response_bytes_total', { registry: reg, type: 'manifest', cache: 'HIT' }), image.manifestSize);
    assert.equal(m.value('pullthrough_saved_bytes_total', { registry: reg }), blobBytes + image.manifestSize);
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

  test('latency histograms: one observation per client request by type and cache status, one per upstream request', async () => {
    const m = await scrape(proxy.url);
    // Cold and warm: /v2/ twice, the manifest and the three blobs once from upstream and once from the cache.
    const expected = { 'ping BYPASS': 2, 'manifest MISS': 1, 'blob MISS': 3, 'manifest HIT': 1, 'blob HIT': 3 };
    assert.deepEqual(histogramCounts(m, 'pullthrough_request_duration_seconds', ['type', 'cache']), expected);
    // The same requests as requests_total counts, and as the access log has them.
    for (const [key, count] of Object.entries(expected)) {
      const [type, cache] = key.split(' ');
      assert.equal(m.sum('pullthrough_requests_total', { type: type!, cache: cache! }), count, key);
    }
    const entries = proxy.access.filter((e) => e.method !== 'CONNECT' && e.type !== 'admin');
    assert.equal(m.sum('pullthrough_request_duration_seconds_count'), entries.length);
    assert.ok(Math.abs(m.sum('pullthrough_request_duration_seconds_sum') - entries.reduce((t, e) => t + e.ms, 0) / 1000) < 1e-6, 'the sum is the access log\'s ms');
    // Cumulative buckets ending in +Inf = count.
    for (const [key, count] of Object.entries(expected)) {
      const [type, cache] = key.split(' ');
      const buckets = m.select('pullthrough_request_duration_seconds_bucket', { type: type!, cache: cache! });
      assert.equal(buckets.at(-1)!.labels.le, '+Inf');
      assert.equal(buckets.at(-1)!.value, count);
      assert.ok(buckets.every((b, i) => i === 0 || b.value >= buckets[i - 1]!.value), 'cumulative');
    }
    // Upstream: each /v2/ and the manifest GET carry their time to upstream's headers.
    assert.deepEqual(histogramCounts(m, 'pullthrough_upstream_duration_seconds', ['registry', 'type']), { [`${reg} ping`]: 2, [`${reg} manifest`]: 1 });
    const timed = entries.filter((e) => e.upstreamMs !== undefined);
    assert.ok(Math.abs(m.sum('pullthrough_upstream_duration_seconds_sum') - timed.reduce((t, e) => t + e.upstreamMs!, 0) / 1000) < 1e-6);
  });

  test('names and types as Prometheus has them: _total counters only, units in names, exact status codes, standard process metrics', async () => {
    const m = await scrape(proxy.url);
    const types = m.types;
    for (const [name, type] of types) {
      assert.ok(/^(pullthrough|process|nodejs)_/.test(name), `${name}: ours are pullthrough_, the runtime's process_ and nodejs_`);
      assert.ok(!/^pullthrough_(process|nodejs)_/.test(name), `${name}: the runtime's metrics are not prefixed`);
      if (type === 'gauge') assert.ok(!name.endsWith('_total'), `${name}: a gauge named _total`);
      if (type === 'counter' && name.startsWith('pullthrough_')) assert.ok(name.endsWith('_total'), `${name}: a counter not named _total`);
      if (type === 'histogram') assert.ok(name.endsWith('_seconds'), `${name}: a histogram of seconds`);
    }
    assert.equal(types.get('process_cpu_seconds_total'), 'counter');
    assert.equal(types.get('process_start_time_seconds'), 'gauge');
    assert.equal(types.get('nodejs_gc_duration_seconds'), 'histogram');
    assert.ok(m.value('process_resident_memory_bytes') > 0);
    assert.ok(m.value('nodejs_heap_size_used_bytes') > 0);
    assert.ok(m.sum('nodejs_active_handles') > 0, 'the active handles by type; sum() is their total');
    for (const [name, type] of Object.entries({
      pullthrough_requests_total: 'counter',
      pullthrough_saved_bytes_total: 'counter',
      pullthrough_request_duration_seconds: 'histogram',
      pullthrough_upstream_duration_seconds: 'histogram',
      pullthrough_tunnels_total: 'counter',
      pullthrough_proxy_auth_failures_total: 'counter',
      pullthrough_fill_failures_total: 'counter',
      pullthrough_fill_retries_total: 'counter',
      pullthrough_digest_mismatches_total: 'counter',
      pullthrough_ratelimit_limit: 'gauge',
      pullthrough_ratelimit_remaining: 'gauge',
      pullthrough_cache_bytes: 'gauge',
    })) {
      assert.equal(types.get(name), type, name);
    }
    // One convention for labels: status is the code, cache the access log's word.
    const statuses = m.samples.filter((s) => s.labels.status !== undefined).map((s) => s.labels.status!);
    assert.ok(statuses.length > 0);
    assert.deepEqual(statuses.filter((v) => !/^[1-5]\d\d$/.test(v)), []);
    const caches = m.samples.filter((s) => s.labels.cache !== undefined).map((s) => s.labels.cache!);
    assert.deepEqual(caches.filter((v) => !CACHE_STATUSES.has(v)), []);
  });

  test('docs/operations.md names every metric /metrics exposes, and no other', async () => {
    const exposed = [...(await scrape(proxy.url)).types.keys()].sort();
    const documented = documentedMetrics();
    assert.deepEqual([...new Set(documented)].sort(), exposed);
    assert.equal(new Set(documented).size, documented.length, 'each named once');
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

  /** A registry that counts manifest GETs against two budgets: the anonymous one and the authenticated one. */
  const countingRegistry = (budget: { anonymous: number; authenticated: number }) => {
    rig.registry.behave = (req, res, seen) => {
      const tag = /\/manifests\/(.+)$/.exec(seen.path)?.[1];
      if (!tag) return false;
      const body = manifestBody(tag);
      const [limit, remaining] = req.headers.authorization ? [200, budget.authenticated] : [100, budget.anonymous];
      res.writeHead(200, {
        'Content-Type': MANIFEST_TYPE,
        'Content-Length': body.length,
        'Docker-Content-Digest': sha256(body),
        'RateLimit-Limit': `${limit};w=21600`,
        'RateLimit-Remaining': `${remaining};w=21600`,
      });
      res.end(req.method === 'HEAD' ? undefined : body);
      return true;
    };
  };

  test('ratelimit-limit and -remaining: the last values upstream reported, per registry', async () => {
    const budget = { anonymous: 76, authenticated: 190 };
    countingRegistry(budget);
    try {
      assert.equal((await getManifest('one')).status, 200);
      let m = await scrape(rig.proxy.url);
      assert.deepEqual(m.select('pullthrough_ratelimit_remaining', { registry: reg }).map((s) => s.value), [76]);
      assert.deepEqual(m.select('pullthrough_ratelimit_limit', { registry: reg }).map((s) => s.value), [100], 'the ceiling beside the budget');
      budget.anonymous = 75;
      assert.equal((await getManifest('two')).status, 200);
      assert.deepEqual((await scrape(rig.proxy.url)).select('pullthrough_ratelimit_remaining', { registry: reg }).map((s) => s.value), [75]);
      // A cached manifest costs no pull: the budget stays what upstream said last.
      budget.anonymous = 10;
      const again = await getManifest('one');
      assert.equal(again.headers['x-cache'], 'HIT');
      m = await scrape(rig.proxy.url);
      assert.deepEqual(m.select('pullthrough_ratelimit_remaining', { registry: reg }).map((s) => s.value), [75]);
      assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'MISS', status: '200' }), 2);
      assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'HIT', status: '200' }), 1);
      assert.equal(m.value('pullthrough_upstream_responses_total', { registry: reg, status: '200' }), 2);
    } finally {
      rig.registry.reset();
    }
  });

  test('budgets of one registry by identity: what one reports never overwrites the other', async () => {
    // What the manifest handler records (upstream's headers, and whose request it was).
    const limits = rig.proxy.proxy.rateLimits;
    limits.record('registry-1.docker.io:443', { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '76;w=21600' }, 'anonymous');
    limits.record('registry-1.docker.io:443', { 'ratelimit-limit': '200;w=21600', 'ratelimit-remaining': '190;w=21600' }, 'central');
    limits.record('registry-1.docker.io:443', { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '75;w=21600' }, 'anonymous');
    const m = await scrape(rig.proxy.url);
    const hub = { registry: 'registry-1.docker.io:443' };
    assert.equal(m.value('pullthrough_ratelimit_remaining', { ...hub, identity: 'anonymous' }), 75);
    assert.equal(m.value('pullthrough_ratelimit_limit', { ...hub, identity: 'anonymous' }), 100);
    assert.equal(m.value('pullthrough_ratelimit_remaining', { ...hub, identity: 'central' }), 190);
    assert.equal(m.value('pullthrough_ratelimit_limit', { ...hub, identity: 'central' }), 200);
    assert.equal(m.types.get('pullthrough_ratelimit_limit'), 'gauge');
    assert.deepEqual({ ...limits.get('registry-1.docker.io:443', 'central'), updatedAt: 0 }, { limit: 200, remaining: 190, windowSeconds: 21600, updatedAt: 0 });
    assert.equal(limits.get('registry-1.docker.io:443')?.remaining, 75, 'without an identity: the budget reported last');
  });

  test('budgets by identity through the proxy: a client with its own credentials and one without', async () => {
    countingRegistry({ anonymous: 50, authenticated: 150 });
    try {
      assert.equal((await getManifest('anonymous-one')).status, 200);
      assert.equal((await fetchThroughProxy(rig.target, '/v2/lib/app/manifests/client-one', { headers: { accept: MANIFEST_TYPE, authorization: 'Bearer a-client-token' } })).status, 200);
      const m = await scrape(rig.proxy.url);
      assert.equal(m.value('pullthrough_ratelimit_remaining', { registry: reg, identity: 'anonymous' }), 50);
      assert.equal(m.value('pullthrough_ratelimit_limit', { registry: reg, identity: 'anonymous' }), 100);
      assert.equal(m.value('pullthrough_ratelimit_remaining', { registry: reg, identity: 'client' }), 150);
      assert.equal(m.value('pullthrough_ratelimit_limit', { registry: reg, identity: 'client' }), 200);
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
    assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'manifest', cache: 'MISS', status: '429' }), 1);
    assert.equal(m.value('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'MISS', status: '429' }), 1);
    // The anonymous budget (a client's own, from the test before, is apart once manifests.ts says whose).
    const anonymous = m.select('pullthrough_ratelimit_remaining', { registry: reg }).filter((s) => s.labels.identity !== 'client');
    assert.deepEqual(anonymous.map((s) => s.value), [0], "the manifest's 429 said 0 remaining");
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
      assert.equal(delta('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'MISS', status: '200' }), 1);
      assert.equal(delta('pullthrough_requests_total', { registry: reg, type: 'blob', cache: 'JOINED', status: '200' }), 1);
      assert.equal(delta('pullthrough_request_duration_seconds_count', { type: 'blob', cache: 'JOINED' }), 1);
      assert.equal(delta('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'JOINED' }), 8 * MiB);
      assert.equal(delta('pullthrough_response_bytes_total', { registry: reg, type: 'blob', cache: 'MISS' }), 8 * MiB);
      assert.equal(delta('pullthrough_saved_bytes_total', { registry: reg }), 8 * MiB, "the joiner's bytes cost no transfer of their own");
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

describe('407s and tunnels', () => {
  const PASSWORD = 'metrics-proxy-password';
  const GREETING = 'hello from a server the proxy does not intercept\n';
  let proxy: TestProxy;
  let server: net.Server;
  let port: number;
  const basic = (user: string, password: string) => `Proxy-Authorization: Basic ${Buffer.from(`${user}:${password}`).toString('base64')}\r\n`;

  before(async () => {
    server = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.end(GREETING);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as net.AddressInfo).port;
    proxy = await startTestProxy(`users:\n  ci:\n    password: ${PASSWORD}\n    read: ["*"]\ntunnel:\n  allow: ["127.0.0.1:${port}"]\n`);
  });

  after(async () => {
    await proxy?.close();
    await new Promise((resolve) => server?.close(resolve));
  });

  test('a CONNECT without proxy credentials, or with wrong ones, is a 407, counted', async () => {
    for (const header of ['', basic('ci', 'not-the-password'), basic('nobody', PASSWORD)]) {
      const reply = await sendConnect(proxy.port, `127.0.0.1:${port}`, header);
      assert.equal(reply.status, 407);
      reply.socket.destroy();
    }
    const m = await scrape(proxy.url);
    assert.equal(m.value('pullthrough_proxy_auth_failures_total'), 3);
    assert.deepEqual(m.select('pullthrough_tunnels_total'), [], 'refused before any tunnel');
    assert.deepEqual(m.select('pullthrough_requests_total'), [], 'CONNECTs are not requests to a registry');
  });

  test('tunnels, by the status the client got, with the bytes they carried back', async () => {
    // The whole exchange: the proxy's answer, then what the server said, until it closed.
    const exchange = await new Promise<string>((resolve, reject) => {
      const socket = net.connect(proxy.port, '127.0.0.1', () => socket.write(`CONNECT 127.0.0.1:${port} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n${basic('ci', PASSWORD)}\r\n`));
      let text = '';
      socket.setEncoding('latin1');
      socket.on('data', (chunk: string) => void (text += chunk));
      socket.once('end', () => {
        socket.end();
        resolve(text);
      });
      socket.once('error', reject);
    });
    assert.match(exchange, /^HTTP\/1\.1 200 /);
    assert.equal(exchange.slice(exchange.indexOf('\r\n\r\n') + 4), GREETING);
    const refused = await sendConnect(proxy.port, '127.0.0.1:1', basic('ci', PASSWORD));
    assert.equal(refused.status, 403, 'not in tunnel.allow');
    refused.socket.destroy();

    let m = await scrape(proxy.url);
    // A tunnel is counted when both sides closed.
    await waitFor('the tunnel to be counted', () => m.sum('pullthrough_tunnels_total', { status: '200' }) === 1, 10_000, async () => void (m = await scrape(proxy.url)));
    assert.deepEqual(m.select('pullthrough_tunnels_total').map((s) => [s.labels.status, s.value]), [['200', 1], ['403', 1]]);
    assert.equal(m.value('pullthrough_tunnel_bytes_total'), GREETING.length);
    assert.equal(m.value('pullthrough_proxy_auth_failures_total'), 3, 'unchanged');
  });
});

describe('fill failures, retries and digest mismatches', () => {
  const live: LiveState = {
    fillsInFlight: () => 0,
    cacheBytes: () => 0,
    cacheEntries: () => 0,
    evictions: () => ({ blobs: 0, bytes: 0 }),
    prefetched: () => 0,
    rateLimits: () => new RateLimits().all(),
    caNotAfter: () => new Date(),
    leafExpiries: () => [],
  };
  const failed = (extra: Partial<Extract<FillOutcome, { kind: 'failed' }>> = {}): FillOutcome => ({ kind: 'failed', reason: 'cut', offset: 0, ...extra });

  test('the methods the fills and the manifest handler call: by registry and reason', async () => {
    const metrics = createMetrics(live);
    metrics.fillEnded('registry.test:443', { kind: 'committed', size: 10 });
    metrics.fillEnded('registry.test:443', { kind: 'upstream-status', status: 404, headers: {}, body: '' });
    metrics.fillEnded('registry.test:443', failed());
    metrics.fillEnded('registry.test:443', failed({ mismatch: true }));
    metrics.fillEnded('registry.test:443', failed({ writeError: true }));
    metrics.fillEnded('quay.io:443', failed());
    metrics.fillRetried('registry.test:443', 0);
    metrics.fillRetried('registry.test:443', 3 * MiB);
    metrics.fillRetried('registry.test:443', 5 * MiB);
    metrics.digestMismatch('registry.test:443', 'manifest');
    const m = new Scrape(await metrics.registry.metrics());
    const r = { registry: 'registry.test:443' };
    assert.deepEqual(m.select('pullthrough_fill_failures_total').map((s) => [s.labels.registry, s.labels.reason, s.value]), [
      ['registry.test:443', 'upstream', 1],
      ['registry.test:443', 'digest_mismatch', 1],
      ['registry.test:443', 'cache_write', 1],
      ['quay.io:443', 'upstream', 1],
    ]);
    assert.equal(m.value('pullthrough_fill_retries_total', { ...r, kind: 'retry' }), 1);
    assert.equal(m.value('pullthrough_fill_retries_total', { ...r, kind: 'resume' }), 2);
    assert.equal(m.value('pullthrough_digest_mismatches_total', { ...r, type: 'blob' }), 1);
    assert.equal(m.value('pullthrough_digest_mismatches_total', { ...r, type: 'manifest' }), 1);
  });

  test('registry labels stay bounded on the histograms too', async () => {
    const metrics = createMetrics(live);
    const entry = (host: string): AccessEntry => ({ method: 'GET', host, path: '/v2/', status: 200, bytes: 0, ms: 5, type: 'ping', cache: 'BYPASS', upstreamStatus: 200, upstreamMs: 4 });
    for (let i = 0; i < 600; i++) metrics.observe(entry(`r${i}.test:443`));
    metrics.fillRetried('r0.test:443', 0);
    const m = new Scrape(await metrics.registry.metrics());
    const labelled = new Set(m.samples.filter((s) => s.labels.registry !== undefined).map((s) => s.labels.registry));
    assert.ok(labelled.size <= 256, `${labelled.size} registries labelled`);
    assert.ok(labelled.has('r599.test:443') && labelled.has('r0.test:443'), 'the most recently seen are kept');
    assert.ok(!labelled.has('r1.test:443'));
    assert.equal(m.value('pullthrough_request_duration_seconds_count', { type: 'ping', cache: 'BYPASS' }), 600, 'no registry label: nothing dropped');
  });
});

describe('fill failures, retries and digest mismatches through the proxy', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig();
  });

  after(async () => {
    await rig?.close();
  });

  test('a blob whose bytes do not hash to its digest: a failed fill and a digest mismatch', async () => {
    const blob = rig.registry.addBlob(256 * 1024);
    rig.registry.behave = (req, res, seen) => {
      if (seen.blob !== blob) return false;
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.bytes.length, 'Docker-Content-Digest': blob.digest });
      res.end(req.method === 'HEAD' ? undefined : Buffer.alloc(blob.bytes.length, 7));
      return true;
    };
    try {
      const got = await rig.blob(blob.digest);
      assert.notEqual(got.digest, blob.digest);
      assert.ok(!got.complete || got.status >= 500, 'the client never gets the lie whole');
      const r = { registry: rig.registry.hostPort };
      let m = await scrape(rig.proxy.url);
      await waitFor('the failed fill to be counted', () => m.sum('pullthrough_fill_failures_total', r) > 0, 3000, async () => void (m = await scrape(rig.proxy.url)));
      assert.equal(m.value('pullthrough_fill_failures_total', { ...r, reason: 'digest_mismatch' }), 1);
      assert.equal(m.value('pullthrough_digest_mismatches_total', { ...r, type: 'blob' }), 1);
    } finally {
      rig.registry.reset();
    }
  });

  test('a fill cut mid-blob resumes with Range: one resume', async () => {
    const blob = rig.registry.addBlob(4 * MiB);
    rig.registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.bytes.length });
      await new Promise<void>((resolve) => res.write(blob.bytes.subarray(0, MiB), () => resolve()));
      await sleep(100);
      req.socket.destroy();
      return true;
    };
    try {
      const before = await scrape(rig.proxy.url);
      const got = await rig.blob(blob.digest);
      assert.equal(got.digest, blob.digest);
      await rig.waitForHit(blob.digest);
      const m = await scrape(rig.proxy.url);
      assert.equal(m.value('pullthrough_fill_retries_total', { registry: rig.registry.hostPort, kind: 'resume' }), 1);
      assert.equal(m.sum('pullthrough_fill_failures_total'), before.sum('pullthrough_fill_failures_total'), 'resumed, not failed');
    } finally {
      rig.registry.reset();
    }
  });

  test('a manifest whose body does not hash to the digest asked for: a digest mismatch', async () => {
    const digest = sha256(Buffer.from('the manifest that was asked for'));
    rig.registry.behave = (req, res, seen) => {
      if (!seen.path.includes('/manifests/')) return false;
      const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', layers: [] }));
      res.writeHead(200, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json', 'Content-Length': body.length, 'Docker-Content-Digest': digest });
      res.end(req.method === 'HEAD' ? undefined : body);
      return true;
    };
    try {
      const got = await fetchThroughProxy(rig.target, `/v2/lib/app/manifests/${digest}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
      assert.equal(got.status, 502);
      const m = await scrape(rig.proxy.url);
      assert.equal(m.value('pullthrough_digest_mismatches_total', { registry: rig.registry.hostPort, type: 'manifest' }), 1);
    } finally {
      rig.registry.reset();
    }
  });
});
