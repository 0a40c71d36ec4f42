// The policy's warm-up list, kept warm by the running proxy against a real registry: a run at start
// (registry counts, log lines, /metrics, /ui/data.json), a second run after the interval that fetches
// no blob, an image that is not there logged and counted failed while the others are warmed, and the
// same with proxy users configured (the warm-up's own user, whose password no line shows).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request } from 'undici';
import { waitFor } from './helpers/cache-files.ts';
import { buildMultiArchIndex, buildOciImage, type BuiltImage, type BuiltIndex } from './helpers/oci-image.ts';
import { createTestCa, writePem } from './helpers/pki.ts';
import { makeTempDir, removeTempDir } from './helpers/process.ts';
import { scrape } from './helpers/prometheus.ts';
import { startTestProxy, type TestProxy } from './helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from './helpers/registry.ts';
import { pushImage } from './helpers/skopeo.ts';
import type { DashboardData } from '../src/admin/dashboard.ts';

interface Line {
  level?: string;
  message?: string;
  [key: string]: unknown;
}

const logged = (proxy: TestProxy): Line[] => proxy.lines.map((l) => JSON.parse(l) as Line);
const runsFinished = (proxy: TestProxy) => logged(proxy).filter((l) => l.message === 'warm-up: run finished');

describe('the warm-up list of the policy', () => {
  let registry: RegistryHandle;
  let index: BuiltIndex;
  let single: BuiltImage;
  let work: string;
  let registryPolicy: string;

  before(async () => {
    const ca = createTestCa('warm-up test CA');
    work = makeTempDir('warm-up');
    registry = await startRegistry({ host: 'registry.test', ca });
    index = await buildMultiArchIndex(join(work, 'index'), { layers: [{ randomBytes: 512 * 1024 }], tag: 'v1' });
    await pushImage(index.layoutDir, 'v1', registry, { repository: 'team/app', all: true });
    single = await buildOciImage(join(work, 'single'), { layers: [{ files: { 'etc/motd': 'warm\n' } }, { randomBytes: 256 * 1024 }], tag: 'v1' });
    await pushImage(single.layoutDir, 'v1', registry, { repository: 'team/tool' });
    registryPolicy = `# Statuses and figures are counted exactly: no layer is fetched ahead of the client (cache.prefetch).\ncache: { prefetch: false }\nregistries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`;
  });

  after(async () => {
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  test('warms at start and after the interval; a missing image is logged and counted, the others warmed', async () => {
    const reg = registry.hostPort;
    const amd64 = index.images.find((i) => i.architecture === 'amd64')!;
    const arm64 = index.images.find((i) => i.architecture === 'arm64')!;
    registry.resetCounts();
    const proxy = await startTestProxy(
      `${registryPolicy}warm:\n  interval: 4s\n  delay: 0s\n  platforms: [linux/amd64]\n  images:\n    - ${reg}/team/app:v1\n    - ${reg}/team/missing:v1\n    - { image: ${reg}/team/tool:v1, platforms: [linux/arm64] }\n`,
    );
    try {
      await waitFor('the first run', () => runsFinished(proxy).length >= 1, 60_000);
      await registry.settle();
      // Upstream: the index and the amd64 manifest only, each blob of amd64 and of the single image once.
      const blobs = registry.requests().filter((r) => r.kind === 'blob' && r.method === 'GET').map((r) => r.reference).sort();
      assert.deepEqual(blobs, [amd64.configDigest, ...amd64.layerDigests, single.configDigest, ...single.layerDigests].sort());
      assert.ok(!registry.requests().some((r) => r.reference === arm64.manifestDigest), 'nothing of linux/arm64');

      const lines = logged(proxy);
      const warmed = lines.filter((l) => l.message === 'warm-up: image warmed');
      assert.deepEqual(warmed.map((l) => l.image), [`${reg}/team/app:v1`, `${reg}/team/tool:v1`]);
      assert.deepEqual(warmed[0]!.platforms, ['linux/amd64']);
      assert.equal(warmed[0]!.manifests, 2);
      assert.deepEqual(warmed[0]!.cache, { MISS: 1 + amd64.layerDigests.length });
      assert.equal(warmed[0]!.bytes, [amd64.configDigest, ...amd64.layerDigests].reduce((sum, d) => sum + amd64.blobs.get(d)!, 0));
      // A single-platform image has no platforms to choose from: the entry's are not asked of it.
      assert.deepEqual(warmed[1]!.platforms, []);
      assert.deepEqual(warmed[1]!.cache, { MISS: 1 + single.layerDigests.length });
      const failures = lines.filter((l) => l.message === 'warm-up: an image failed');
      assert.equal(failures.length, 1);
      assert.equal(failures[0]!.level, 'warn');
      assert.equal(failures[0]!.image, `${reg}/team/missing:v1`);
      assert.match(String(failures[0]!.error), /404/);
      const [run] = runsFinished(proxy);
      assert.equal(run!.level, 'info');
      assert.deepEqual({ images: run!.images, ok: run!.ok, failed: run!.failed, manifests: run!.manifests, blobs: run!.blobs }, { images: 3, ok: 2, failed: 1, manifests: 3, blobs: blobs.length });
      assert.equal(typeof run!.durationMs, 'number');

      const metrics = await scrape(proxy.url);
      assert.equal(metrics.value('pullthrough_warm_runs_total', { result: 'failed' }), 1);
      assert.equal(metrics.value('pullthrough_warm_runs_total', { result: 'ok' }), 0);
      assert.equal(metrics.value('pullthrough_warm_images', { state: 'ok' }), 2);
      assert.equal(metrics.value('pullthrough_warm_images', { state: 'failed' }), 1);
      const last = metrics.value('pullthrough_warm_last_run_timestamp_seconds');
      assert.ok(Math.abs(last - Date.now() / 1000) < 60, String(last));

      const data = (await (await request(`${proxy.url}/ui/data.json`)).body.json()) as DashboardData;
      assert.equal(data.warm?.images, 3);
      assert.deepEqual({ ok: data.warm?.lastRun?.ok, failed: data.warm?.lastRun?.failed }, { ok: 2, failed: 1 });
      assert.ok(data.warm?.nextRunAt && Date.parse(data.warm.nextRunAt) > Date.parse(data.warm.lastRun!.startedAt), JSON.stringify(data.warm));
      const page = await (await request(`${proxy.url}/ui`)).body.text();
      assert.match(page, /id="warm"/);

      // The second run, after the interval: the cache answers; revalidation needs no blob.
      registry.resetCounts();
      await waitFor('the second run', () => runsFinished(proxy).length >= 2, 30_000);
      await registry.settle();
      assert.equal(registry.count({ kind: 'blob' }), 0, JSON.stringify(registry.requests()));
      const second = logged(proxy).filter((l) => l.message === 'warm-up: image warmed').slice(2);
      assert.deepEqual(second.map((l) => l.cache), [{ HIT: 1 + amd64.layerDigests.length }, { HIT: 1 + single.layerDigests.length }]);
      assert.equal((await scrape(proxy.url)).value('pullthrough_warm_runs_total', { result: 'failed' }), 2);
    } finally {
      await proxy.close();
    }
  });

  test('with proxy users configured, the warm-up authenticates as its own user', async () => {
    const reg = registry.hostPort;
    const proxy = await startTestProxy(
      `${registryPolicy}users:\n  ci: { password: ci-secret, read: ["nothing/*"] }\nwarm:\n  delay: 0s\n  images: [${reg}/team/tool:v1]\n`,
    );
    try {
      await waitFor('the run', () => runsFinished(proxy).length >= 1, 60_000);
      const [run] = runsFinished(proxy);
      assert.deepEqual({ ok: run!.ok, failed: run!.failed }, { ok: 1, failed: 0 }, proxy.lines.join('\n'));
      assert.ok(proxy.access.some((e) => e.type === 'blob' && e.user === 'pullthrough-warm'), 'the access log names the warm-up user');
      // Its password (64 hex digits) is in no line; digests are (after sha256:).
      for (const line of proxy.lines) assert.doesNotMatch(line, /(?<!sha256:)\b[0-9a-f]{64}\b/, line);
      // Nobody else gets in without a user.
      const metrics = await scrape(proxy.url);
      assert.equal(metrics.value('pullthrough_warm_runs_total', { result: 'ok' }), 1);
      assert.equal(metrics.value('pullthrough_proxy_auth_failures_total'), 0);
    } finally {
      await proxy.close();
    }
  });

  test('stopping the proxy during a run is clean', async () => {
    const reg = registry.hostPort;
    const proxy = await startTestProxy(`${registryPolicy}warm:\n  delay: 0s\n  images: [${reg}/team/app:v1]\n`);
    await waitFor('the run to start', () => proxy.access.length > 0, 30_000);
    await proxy.close();
    const lines = logged(proxy);
    assert.ok(!lines.some((l) => l.level === 'error' || l.message === 'warm-up: an image failed'), proxy.lines.join('\n'));
    // Cut (nothing counted), or done before the close.
    assert.ok(lines.some((l) => l.message === 'warm-up: the run was stopped with the proxy' || l.message === 'warm-up: run finished'), proxy.lines.join('\n'));
  });
});
