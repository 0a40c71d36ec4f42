// `pullthrough stats` and `pullthrough purge` as users run them (the CLI as a child process against a
// running proxy), the figures behind stats, and what a purge may and may not remove: blobs being read
// are waited for, blobs being fetched are never touched, and only this host may ask.
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, afterEach, before, describe, test } from 'node:test';
import { request } from 'undici';
import { createAdminHandler, type PurgeRequest } from '../../src/admin/index.ts';
import type { DashboardData } from '../../src/admin/dashboard.ts';
import { purgeTiming } from '../../src/cache/purge.ts';
import { formatStats } from '../../src/commands/stats.ts';
import type { AccessEntry } from '../../src/log.ts';
import type { Metrics } from '../../src/metrics.ts';
import { Stats } from '../../src/stats.ts';
import type { CertificateAuthority } from '../../src/ca.ts';
import { hasBlobFile, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { sendSlowly } from '../helpers/fake-registry.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { envWithoutProxies, makeTempDir, removeTempDir, run } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

const CLI = join(import.meta.dirname, '../../src/cli.ts');

function cli(...args: string[]) {
  return run(process.execPath, [CLI, ...args], { env: envWithoutProxies(), timeoutMs: 60_000 });
}

interface PurgeAnswer {
  blobs: number;
  bytes: number;
  manifests: number;
  tags: number;
  busy: string[];
}

async function purgeOver(proxyUrl: string, what: PurgeRequest): Promise<{ status: number; body: PurgeAnswer }> {
  const response = await request(`${proxyUrl}/admin/purge`, { method: 'POST', body: JSON.stringify(what), headers: { 'content-type': 'application/json' } });
  const text = await response.body.text();
  return { status: response.statusCode, body: response.statusCode === 200 ? (JSON.parse(text) as PurgeAnswer) : ({ text } as unknown as PurgeAnswer) };
}

describe('stats and purge against a real registry', () => {
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let app: BuiltImage;
  let sub: BuiltImage;
  let work: string;
  let blobBytes: number;

  before(async () => {
    const ca = createTestCa('stats-purge test CA');
    work = makeTempDir('stats-purge');
    registry = await startRegistry({ host: 'registry.test', ca });
    app = await buildOciImage(join(work, 'app'), { layers: [{ files: { 'etc/motd': 'app\n' } }, { randomBytes: 1024 * 1024 }], tag: 'v1' });
    // A repository nested under the first one, with content of its own: a purge of team/app is not one of team/app/sub.
    sub = await buildOciImage(join(work, 'sub'), { layers: [{ randomBytes: 512 * 1024 }], tag: 'v1', labels: { repo: 'sub' } });
    await pushImage(app.layoutDir, 'v1', registry, { repository: 'team/app' });
    await pushImage(sub.layoutDir, 'v1', registry, { repository: 'team/app/sub' });
    proxy = await startTestProxy(`# Statuses and figures are counted exactly: no layer is fetched ahead of the client (cache.prefetch).\ncache: { prefetch: false }\nregistries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
    blobBytes = [app.configDigest, ...app.layerDigests].reduce((sum, d) => sum + app.blobs.get(d)!, 0);
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  const pull = async (repository: string, image: BuiltImage, name: string) => {
    const before = proxy.access.length;
    const dest = join(work, name);
    const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/${repository}:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(dest)).manifestDigest, image.manifestDigest);
    return proxy.access.slice(before).filter((e) => e.type === 'manifest' || e.type === 'blob');
  };

  test('stats prints the hit ratio, the recent pulls and the largest images', async () => {
    await pull('team/app', app, 'cold');
    await pull('team/app', app, 'warm');
    const result = await cli('stats', '--proxy', proxy.url);
    assert.equal(result.code, 0, result.stderr);
    const out = result.stdout;
    const image = `${registry.hostPort}/team/app:v1`;
    // Cold (manifest + 3 blobs, MISS) and warm (the same, HIT): half of each.
    assert.match(out, /^hit ratio: +50\.0% of bytes, 50\.0% of 8 requests$/m);
    assert.match(out, new RegExp(`^bytes saved: +${((blobBytes + app.manifestSize) / MiB).toFixed(1)} MiB of `, 'm'));
    assert.match(out, /^fills running: +0$/m);
    assert.match(out, /^cache: +1\.0 MiB of 32\.0 GiB in 3 blobs$/m);
    const recent = out.slice(out.indexOf('recent pulls:'), out.indexOf('largest cached images:')).trim().split('\n').slice(1);
    assert.equal(recent.length, 2, out);
    assert.match(recent[0]!, new RegExp(`^  \\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z  HIT +1\\.0 MiB  127\\.0\\.0\\.1  ${escape(image)}$`));
    assert.match(recent[1]!, new RegExp(`  MISS +1\\.0 MiB  127\\.0\\.0\\.1  ${escape(image)}$`));
    const largest = out.slice(out.indexOf('largest cached images:')).trim().split('\n').slice(1);
    assert.deepEqual(largest.map((l) => l.trim()), [`1.0 MiB  ${image}`]);

    const json = await cli('stats', '--proxy', proxy.url, '--json');
    assert.equal(json.code, 0, json.stderr);
    const data = JSON.parse(json.stdout) as DashboardData;
    assert.deepEqual(data.hitRatio, { byRequests: 0.5, byBytes: 0.5 });
    assert.deepEqual(data.totals, { requests: 8, requestsFromCache: 4, bytes: 2 * (blobBytes + app.manifestSize), bytesFromCache: blobBytes + app.manifestSize });
    assert.deepEqual(data.largestImages, [{ image, bytes: blobBytes }]);
    assert.deepEqual(data.recentPulls.map((p) => [p.image, p.cache, p.bytes]), [[image, 'HIT', blobBytes + app.manifestSize], [image, 'MISS', blobBytes + app.manifestSize]]);
  });

  test('stats names an unreachable proxy and exits non-zero', async () => {
    const result = await cli('stats', '--proxy', 'http://127.0.0.1:9');
    assert.equal(result.code, 1);
    assert.match(result.stderr, /^pullthrough stats: .*ECONNREFUSED/);
  });

  test('purge --registry --repository drops its blobs, manifests and tags; the next pull goes upstream; a nested repository stays', async () => {
    await pull('team/app/sub', sub, 'sub-cold');
    const result = await cli('purge', '--registry', registry.hostPort, '--repository', 'team/app', '--proxy', proxy.url);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `purged 3 blobs (${blobBytes} bytes), 1 manifests, 1 tags\n`);
    for (const digest of [app.configDigest, ...app.layerDigests]) assert.ok(!hasBlobFile(proxy.dataDir, digest), `${digest} is gone from the disk`);

    registry.resetCounts();
    const again = await pull('team/app', app, 'after-purge');
    assert.deepEqual(again.map((e) => `${e.type} ${e.cache}`), ['manifest MISS', 'blob MISS', 'blob MISS', 'blob MISS']);
    await registry.settle();
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', repository: 'team/app' }), 1);
    assert.equal(registry.count({ method: 'GET', kind: 'blob' }), 3);

    const nested = await pull('team/app/sub', sub, 'sub-warm');
    assert.deepEqual(nested.map((e) => `${e.type} ${e.cache}`), ['manifest HIT', 'blob HIT', 'blob HIT'], 'team/app/sub is another repository');
  });

  test('purge --registry drops everything of that registry', async () => {
    const result = await cli('purge', '--registry', registry.hostPort, '--proxy', proxy.url);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^purged 5 blobs \(\d+ bytes\), 2 manifests, 2 tags\n$/);
    const stats = (await (await request(`${proxy.url}/ui/data.json`)).body.json()) as DashboardData;
    assert.deepEqual([stats.cache.blobs, stats.cache.bytes, stats.largestImages], [0, 0, []]);
  });

  test('purge refuses requests that name nothing, or a repository without its registry', async () => {
    // The command says so itself (a usage mistake: exit 2) ...
    const nothing = await cli('purge', '--proxy', proxy.url);
    assert.equal(nothing.code, 2);
    assert.match(nothing.stderr, /name what to purge/);
    const bare = await cli('purge', '--repository', 'team/app', '--proxy', proxy.url);
    assert.equal(bare.code, 2);
    assert.match(bare.stderr, /--repository needs --registry/);
    // ... and the proxy refuses such requests from any other client.
    assert.equal((await purgeOver(proxy.url, {})).status, 400);
    const answer = await purgeOver(proxy.url, { repository: 'team/app' });
    assert.equal(answer.status, 400);
    assert.match((answer.body as unknown as { text: string }).text, /a repository needs its registry/);
  });
});

describe('purge and the blobs in use', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig();
  });

  afterEach(() => {
    rig.registry.reset();
    purgeTiming.waitForReadersMs = 30_000;
  });

  after(async () => {
    await rig?.close();
  });

  test('purge --digest removes a cached blob: the next request is a MISS that goes upstream', async () => {
    const blob = rig.registry.addBlob(256 * 1024);
    assert.equal((await rig.blob(blob.digest)).headers['x-cache'], 'MISS');
    await rig.waitForHit(blob.digest);
    const result = await cli('purge', '--digest', blob.digest, '--proxy', rig.proxy.url);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `purged 1 blobs (${256 * 1024} bytes), 0 manifests, 0 tags\n`);
    assert.ok(!hasBlobFile(rig.dataDir, blob.digest));
    rig.registry.clearSeen();
    const again = await rig.blob(blob.digest);
    assert.equal(again.headers['x-cache'], 'MISS');
    assert.equal(again.digest, blob.digest);
    assert.equal(rig.registry.count({ method: 'GET', digest: blob.digest }), 1);
  });

  /** A client reading the cached blob that stops after 1 MiB until released. */
  async function holdReader(digest: string) {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let received = 0;
    const reading = rig.blob(digest, { onData: (bytes) => ((received = bytes) >= MiB ? released : undefined) });
    await waitFor('the reader to be mid-blob', () => received >= MiB);
    return { release, reading };
  }

  test('a purge waits for a client reading the blob, then removes it; the reader gets all of it', async () => {
    const blob = rig.registry.addBlob(32 * MiB);
    await rig.blob(blob.digest);
    await rig.waitForHit(blob.digest);
    const reader = await holdReader(blob.digest);
    let settled = false;
    const purging = purgeOver(rig.proxy.url, { digest: blob.digest }).finally(() => (settled = true));
    try {
      await sleep(500);
      assert.equal(settled, false, 'the purge waits while the client reads');
      assert.ok(hasBlobFile(rig.dataDir, blob.digest));
    } finally {
      reader.release();
    }
    const got = await reader.reading;
    assert.equal(got.headers['x-cache'], 'HIT');
    assert.ok(got.complete, got.error);
    assert.equal(got.digest, blob.digest, 'the reader got the blob intact');
    const purged = await purging;
    assert.equal(purged.status, 200);
    assert.deepEqual(purged.body, { blobs: 1, bytes: 32 * MiB, manifests: 0, tags: 0, busy: [] });
    assert.ok(!hasBlobFile(rig.dataDir, blob.digest));
  });

  test('a reader that outlasts the wait: the blob is left in place and reported in use', async () => {
    purgeTiming.waitForReadersMs = 300;
    const blob = rig.registry.addBlob(32 * MiB);
    await rig.blob(blob.digest);
    await rig.waitForHit(blob.digest);
    const reader = await holdReader(blob.digest);
    try {
      const result = await cli('purge', '--digest', blob.digest, '--proxy', rig.proxy.url);
      assert.equal(result.code, 0, result.stderr);
      assert.equal(result.stdout, `purged 0 blobs (0 bytes), 0 manifests, 0 tags; left in use: ${blob.digest}\n`);
      assert.ok(hasBlobFile(rig.dataDir, blob.digest));
    } finally {
      reader.release();
    }
    const got = await reader.reading;
    assert.ok(got.complete && got.digest === blob.digest);
    assert.equal((await rig.blob(blob.digest, { method: 'HEAD' })).headers['x-cache'], 'HIT', 'still cached');
  });

  test('a blob being fetched is never purged, by digest or by registry; it is cached once its fill ends', async () => {
    const blob = rig.registry.addBlob(8 * MiB);
    rig.registry.behave = async (req, res, seen) => {
      if (seen.blob?.digest !== blob.digest || req.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.bytes.length, 'Docker-Content-Digest': blob.digest });
      if (await sendSlowly(res, blob.bytes, 256 * 1024, 25)) res.end();
      return true;
    };
    let received = 0;
    const fetching = rig.blob(blob.digest, { onData: (bytes) => void (received = bytes) });
    await waitFor('the fill to be under way', () => received > 0);

    const byDigest = await purgeOver(rig.proxy.url, { digest: blob.digest });
    assert.deepEqual(byDigest.body, { blobs: 0, bytes: 0, manifests: 0, tags: 0, busy: [blob.digest] });
    // The other blobs of the registry go; the one being fetched is not in the cache yet.
    const byRegistry = await purgeOver(rig.proxy.url, { registry: rig.registry.hostPort });
    assert.equal(byRegistry.status, 200);
    assert.ok(received < blob.bytes.length, 'both purges ran while the blob was still coming');

    const got = await fetching;
    assert.equal(got.headers['x-cache'], 'MISS');
    assert.ok(got.complete && got.digest === blob.digest, 'the client that started the fill got all of it');
    await rig.waitForHit(blob.digest);
    assert.ok(hasBlobFile(rig.dataDir, blob.digest));
    assert.equal(rig.registry.count({ method: 'GET', digest: blob.digest }), 1);
  });
});

describe('purge is accepted from this host only', () => {
  let server: http.Server;
  let url: string;
  let remote = '127.0.0.1';
  const asked: PurgeRequest[] = [];

  before(async () => {
    // The proxy's own admin handler, on a server that lets the test say which address the client has.
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
    });
    server = http.createServer((req, res) => {
      Object.defineProperty(req.socket, 'remoteAddress', { value: remote, configurable: true });
      void handler(req, res);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(() => {
    server?.close();
  });

  for (const address of ['192.0.2.7', '10.0.0.1', '::ffff:10.1.2.3', 'fe80::1', '2001:db8::1', '128.0.0.1']) {
    test(`refused from ${address}`, async () => {
      remote = address;
      asked.length = 0;
      const answer = await purgeOver(url, { registry: 'quay.io' });
      assert.equal(answer.status, 403);
      assert.match((answer.body as unknown as { text: string }).text, /accepted from the proxy host only/);
      assert.deepEqual(asked, [], 'nothing purged');
    });
  }

  for (const address of ['127.0.0.1', '127.0.0.2', '::1', '::ffff:127.0.0.1']) {
    test(`accepted from ${address}`, async () => {
      remote = address;
      asked.length = 0;
      const answer = await purgeOver(url, { registry: 'quay.io', repository: 'team/app' });
      assert.equal(answer.status, 200);
      assert.deepEqual(asked, [{ registry: 'quay.io', repository: 'team/app' }]);
    });
  }

  test('a GET of /admin/purge changes nothing', async () => {
    remote = '127.0.0.1';
    asked.length = 0;
    const response = await request(`${url}/admin/purge?registry=quay.io`);
    assert.equal(response.statusCode, 405);
    await response.body.dump();
    assert.deepEqual(asked, []);
  });
});

describe('the figures behind stats', () => {
  const base = { host: 'registry.test:5000', client: '10.0.0.5', ms: 3 };
  const entry = (method: string, path: string, type: string, cache: AccessEntry['cache'], bytes: number, status = 200): AccessEntry => ({ ...base, method, path, type, cache, bytes, status });

  test('a multi-platform pull is one pull, named by its tag, with the bytes of all of it', () => {
    const stats = new Stats();
    // containerd: HEAD the tag, GET the index by digest, the platform manifest by digest, then blobs.
    stats.observe(entry('HEAD', '/v2/lib/app/manifests/v2', 'manifest', 'HIT', 0));
    stats.observe(entry('GET', `/v2/lib/app/manifests/sha256:${'1'.repeat(64)}`, 'manifest', 'HIT', 400));
    stats.observe(entry('GET', `/v2/lib/app/manifests/sha256:${'2'.repeat(64)}`, 'manifest', 'HIT', 500));
    stats.observe(entry('GET', `/v2/lib/app/blobs/sha256:${'3'.repeat(64)}`, 'blob', 'HIT', 1000));
    stats.observe(entry('GET', `/v2/lib/app/blobs/sha256:${'4'.repeat(64)}`, 'blob', 'MISS', 5000));
    stats.observe(entry('GET', '/v2/', 'ping', 'BYPASS', 2));
    // The same client then pulls another image by tag: a second pull.
    stats.observe(entry('GET', '/v2/lib/other/manifests/latest', 'manifest', 'HIT', 300));
    stats.observe(entry('GET', `/v2/lib/other/blobs/sha256:${'5'.repeat(64)}`, 'blob', 'HIT', 700));
    const pulls = stats.recentPulls().map((p) => [p.image, p.client, p.cache, p.bytes]);
    assert.deepEqual(pulls, [
      ['registry.test:5000/lib/other:latest', '10.0.0.5', 'HIT', 1000],
      // One layer came from upstream: the pull was not served from the cache.
      ['registry.test:5000/lib/app:v2', '10.0.0.5', 'MISS', 400 + 500 + 1000 + 5000],
    ]);
    assert.deepEqual(stats.totals, { requests: 7, requestsFromCache: 6, bytes: 7900, bytesFromCache: 2900 });
    assert.deepEqual(stats.hitRatio(), { byRequests: 6 / 7, byBytes: 2900 / 7900 });
  });

  test('a pull by digest alone is named by its digest', () => {
    const stats = new Stats();
    const digest = `sha256:${'a'.repeat(64)}`;
    stats.observe(entry('GET', `/v2/lib/app/manifests/${digest}`, 'manifest', 'MISS', 400));
    assert.equal(stats.recentPulls()[0]!.image, `registry.test:5000/lib/app@${digest}`);
  });

  test('formatStats: rate limits, and empty lists said plainly', () => {
    const data: DashboardData = {
      version: '1.2.3',
      node: 'v24.0.0',
      uptimeSeconds: 600,
      health: { status: 'ok', workers: 'ok' },
      hitRatio: { byRequests: 0, byBytes: 0 },
      totals: { requests: 0, requestsFromCache: 0, bytes: 0, bytesFromCache: 0 },
      fillsInFlight: 2,
      cache: { bytes: 0, blobs: 0, maxSize: 32 * 1024 * MiB },
      rateLimits: [{ registry: 'registry-1.docker.io:443', limit: 100, remaining: 76, updatedAt: new Date().toISOString() }],
      recentPulls: [],
      largestImages: [],
    };
    const out = formatStats(data);
    assert.match(out, /^pullthrough 1\.2\.3 \(node v24\.0\.0\), up 10 min, ok$/m);
    assert.match(out, /^hit ratio: +0\.0% of bytes, 0\.0% of 0 requests$/m);
    assert.match(out, /^fills running: +2$/m);
    assert.match(out, /^rate limits: +registry-1\.docker\.io 76\/100$/m);
    assert.match(out, /recent pulls:\n  none yet\n/);
    assert.match(out, /largest cached images:\n  none yet\n/);
  });
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
