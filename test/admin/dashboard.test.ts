// The dashboard in a real browser (Debian's headless Chromium through playwright-core): after a cold
// and a warm pull through the proxy, /ui shows the hit ratio, the image in the recent pulls and the
// largest images, health, and the history charts; then six hours of history (a Stats and RateLimits
// fed on a clock of the test's own, with an outage, throttling and two budgets) drawn with a point per
// minute, failures in their own series. At desktop and phone widths, without sideways scrolling. The
// screenshots are written to os.tmpdir()/pullthrough-dashboard-screenshots and their paths printed.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { request } from 'undici';
import { dashboardHistory, type DashboardData, type DashboardHistory } from '../../src/admin/dashboard.ts';
import type { AccessEntry } from '../../src/log.ts';
import { HISTORY_MINUTES, Stats } from '../../src/stats.ts';
import { RateLimits } from '../../src/upstream/rate-limits.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy } from '../helpers/skopeo.ts';

const CHROMIUM = '/usr/bin/chromium';
const SCREENSHOTS = join(os.tmpdir(), 'pullthrough-dashboard-screenshots');
/** What the page measures (evaluated in the page; the tests are type-checked without the DOM lib). */
interface Layout {
  scroll: number;
  inner: number;
  /** Header, cards and charts sticking out at the right: cut even when the page itself does not scroll. */
  outside: string[];
}
const LAYOUT = `({
  scroll: document.documentElement.scrollWidth,
  inner: window.innerWidth,
  outside: [...document.querySelectorAll('header, .card, .chart svg, .legend li')].filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5).map((el) => el.id || el.getAttribute('class') || el.tagName),
})`;
/** Long enough to wrap on a phone: the layout must not scroll sideways for it. */
const REPOSITORY = 'platform-team/build-images/node-builder';
const COLUMN_CHARTS = {
  'chart-hits': (h: DashboardHistory) => ({ 's-cache': h.requests.fromCache, 's-upstream': h.requests.fromUpstream, 's-failed': h.requests.failed }),
  'chart-bytes': (h: DashboardHistory) => ({ 's-saved': h.bytes.saved, 's-fetched': h.bytes.served.map((v, i) => v - h.bytes.saved[i]!) }),
  'chart-upstream': (h: DashboardHistory) => ({ 's-answered': h.upstream.answered, 's-throttled': h.upstream.throttled, 's-failed': h.upstream.failed, 's-fill-failed': h.upstream.failedFills }),
};

/**
 * Six hours of a busy proxy, ending now: steady hits and misses, an outage (5xx answers, upstream 503s,
 * failed fills) at minutes 200–214, Docker Hub throttling (429) at 290–299, and two budgets of Docker
 * Hub draining: the anonymous one fast, the central account's slowly.
 */
function sixHours(): { history: DashboardHistory; rateLimits: DashboardData['rateLimits'] } {
  const end = Date.now();
  let t = end - (HISTORY_MINUTES - 1) * 60_000;
  const stats = new Stats(() => t);
  const limits = new RateLimits(() => t);
  const start = t;
  const entry = (type: string, cache: AccessEntry['cache'], bytes: number, extra: Partial<AccessEntry> = {}): AccessEntry => ({ method: 'GET', host: 'registry-1.docker.io:443', path: type === 'blob' ? `/v2/library/node/blobs/sha256:${'b'.repeat(64)}` : '/v2/library/node/manifests/22', type, cache, bytes, status: 200, client: '10.1.2.3', ms: 20, ...extra });
  const hub = (identity: string, limit: number, remaining: number) => limits.record('registry-1.docker.io:443', { 'ratelimit-limit': `${limit};w=21600`, 'ratelimit-remaining': `${Math.max(0, remaining)};w=21600` }, identity);
  for (let minute = 0; minute < HISTORY_MINUTES; minute++) {
    t = start + minute * 60_000;
    const wave = 4 + Math.round(6 * (1 + Math.sin(minute / 25)));
    for (let i = 0; i < wave; i++) stats.observe(entry('blob', 'HIT', 20e6 + minute * 1e5));
    if (minute % 3 === 0) stats.observe(entry('manifest', 'MISS', 1500, { upstreamStatus: 200, upstreamMs: 90 }));
    if (minute % 4 === 0) stats.observe(entry('blob', 'MISS', 60e6));
    if (minute >= 200 && minute < 215) {
      stats.observe(entry('blob', 'MISS', 0, { status: 502, error: 'upstream unreachable' }));
      stats.observe(entry('manifest', 'MISS', 0, { status: 503, upstreamStatus: 503, upstreamMs: 30 }));
      stats.fillEnded({ kind: 'failed', reason: 'connection reset', offset: 1000 });
    }
    if (minute >= 290 && minute < 300) stats.observe(entry('manifest', 'MISS', 0, { status: 429, upstreamStatus: 429, upstreamMs: 15 }));
    if (minute % 3 === 0) hub('anonymous', 100, 100 - Math.floor(minute / 3));
    if (minute % 10 === 0) hub('central', 200, 200 - Math.floor(minute / 10));
  }
  t = end;
  return {
    history: dashboardHistory(stats, limits),
    rateLimits: [...limits.all().values()].sort((a, b) => a.identity.localeCompare(b.identity)).map((r) => ({ registry: r.registry, identity: r.identity, limit: r.limit!, remaining: r.remaining!, updatedAt: new Date(r.updatedAt).toISOString() })),
  };
}

describe('the dashboard in headless Chromium', { skip: existsSync(CHROMIUM) ? false : `${CHROMIUM} is missing: apt-get install chromium` }, () => {
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let image: BuiltImage;
  let work: string;
  let browser: Browser;

  before(async () => {
    const ca = createTestCa('dashboard test CA');
    work = makeTempDir('dashboard');
    registry = await startRegistry({ host: 'registry.test', ca });
    image = await buildOciImage(join(work, 'layout'), { layers: [{ files: { 'etc/motd': 'dashboard\n' } }, { randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(image.layoutDir, 'v1', registry, { repository: REPOSITORY });
    proxy = await startTestProxy(`# Statuses and figures are counted exactly: no layer is fetched ahead of the client (cache.prefetch).\ncache: { prefetch: false }\nregistries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
    for (const name of ['cold', 'warm']) {
      const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/${REPOSITORY}:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, name) });
      assert.equal(result.code, 0, result.stderr);
    }
    // What Docker Hub's manifest responses say (the real registry here sends no budget): the proxy's
    // anonymous budget and the central account's, apart.
    proxy.proxy.rateLimits.record('registry-1.docker.io:443', { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '76;w=21600' }, 'anonymous');
    proxy.proxy.rateLimits.record('registry-1.docker.io:443', { 'ratelimit-limit': '200;w=21600', 'ratelimit-remaining': '190;w=21600' }, 'central');
    const { chromium } = await import('playwright-core');
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      // Without the background-networking flags Chromium keeps trying to reach Google.
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    mkdirSync(SCREENSHOTS, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  async function proxyData(): Promise<DashboardData> {
    const response = await request(`${proxy.url}/ui/data.json`);
    assert.equal(response.statusCode, 200);
    return (await response.body.json()) as DashboardData;
  }

  /** /ui at this size; with `data`, every poll of ui/data.json gets that (the figures stay put while they are checked). */
  async function open(width: number, height: number, data?: DashboardData): Promise<{ page: Page; errors: string[] }> {
    const page = await browser.newPage({ viewport: { width, height }, deviceScaleFactor: width < 600 ? 2 : 1 });
    const errors: string[] = [];
    page.on('pageerror', (err) => errors.push(err.message));
    page.on('console', (message) => {
      if (message.type() === 'error') errors.push(message.text());
    });
    if (data) await page.route('**/ui/data.json', (route) => route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(data) }));
    const response = await page.goto(`${proxy.url}/ui`);
    assert.equal(response?.status(), 200);
    assert.match(response!.headers()['content-type'] ?? '', /^text\/html/);
    // The page fills itself from ui/data.json once loaded.
    await page.locator('#health', { hasText: 'healthy' }).waitFor({ timeout: 10_000 });
    return { page, errors };
  }

  async function screenshot(t: TestContext, page: Page, name: string): Promise<void> {
    const file = join(SCREENSHOTS, name);
    await page.screenshot({ path: file, fullPage: true });
    t.diagnostic(`screenshot: ${file}`);
  }

  async function checkContent(page: Page): Promise<void> {
    const image = `${registry.hostPort}/${REPOSITORY}:v1`;
    // Cold then warm: 4 MISS (manifest, config, 2 layers) then 4 HIT, by requests and by bytes.
    assert.equal(await page.locator('#hit-bytes').textContent(), '50.0%');
    assert.match((await page.locator('#hit-requests').textContent()) ?? '', /^by requests: 50\.0% of 8$/);
    assert.match((await page.locator('#saved').textContent()) ?? '', /^2\.0 MiB$/);
    assert.equal(await page.locator('#fills').textContent(), '0');
    assert.deepEqual(await page.locator('#ratelimits div').allTextContents(), ['registry-1.docker.io (anonymous): 76 of 100 left', 'registry-1.docker.io (central): 190 of 200 left']);
    assert.match((await page.locator('#versions').textContent()) ?? '', /^v\d+\.\d+\.\d+ · node v24\./);

    const pulls = page.locator('#pulls tbody tr');
    assert.equal(await pulls.count(), 2, 'the cold and the warm pull');
    assert.equal(await pulls.nth(0).locator('td.image').textContent(), image);
    assert.equal(await pulls.nth(0).locator('.tag').textContent(), 'HIT', 'the newest first');
    assert.equal(await pulls.nth(1).locator('.tag').textContent(), 'MISS');
    assert.equal(await pulls.nth(0).locator('td').nth(1).textContent(), '127.0.0.1');

    const largest = page.locator('#largest tbody tr');
    assert.equal(await largest.count(), 1);
    assert.equal(await largest.nth(0).locator('td.image').textContent(), image);
    assert.match((await largest.nth(0).locator('td').nth(1).textContent()) ?? '', /^2\.0 MiB$/);
  }

  /**
   * Every chart has one point per minute of the history: a column (<g class="minute">) per minute, a
   * bar in it for each series with a value that minute; the budget chart a line per budget with a
   * vertex pair per report.
   */
  async function checkCharts(page: Page, h: DashboardHistory): Promise<void> {
    const minutes = h.requests.fromCache.length;
    for (const [id, seriesOf] of Object.entries(COLUMN_CHARTS)) {
      const svg = page.locator(`#${id} svg`);
      assert.equal(await svg.getAttribute('data-points'), String(minutes), id);
      assert.equal(await svg.locator('g.minute').count(), minutes, `${id}: a column per minute`);
      for (const [cls, values] of Object.entries(seriesOf(h))) {
        assert.equal(await svg.locator(`g.minute rect.${cls}`).count(), values.filter((v) => v > 0).length, `${id} ${cls}: a bar per minute with a value`);
      }
    }
    const lines = page.locator('#chart-budget svg polyline.budget');
    assert.equal(await lines.count(), h.rateLimits.length);
    for (let i = 0; i < h.rateLimits.length; i++) {
      const points = h.rateLimits[i]!.points.length;
      assert.equal(await lines.nth(i).getAttribute('data-points'), String(points));
      assert.equal((await lines.nth(i).getAttribute('points'))!.trim().split(/\s+/).length, 2 * points, 'a step per report');
    }
    assert.equal(await page.locator('#chart-budget .legend li').count(), h.rateLimits.length + (h.rateLimits.some((b) => b.limit !== undefined) ? 1 : 0));
  }

  async function checkLayout(page: Page): Promise<void> {
    const layout = await page.evaluate<Layout>(LAYOUT);
    assert.ok(layout.scroll <= layout.inner, `no sideways scrolling: ${JSON.stringify(layout)}`);
    assert.deepEqual(layout.outside, []);
  }

  test('desktop, 1280×800: hit ratio, the pulled image, health, the minutes since start', async (t) => {
    const data = await proxyData();
    const { page, errors } = await open(1280, 800, data);
    try {
      await checkContent(page);
      const h = data.history!;
      assert.ok(h.requests.fromCache.length >= 1 && h.requests.fromCache.length <= 3, `${h.requests.fromCache.length} minutes since the proxy started`);
      assert.deepEqual([h.requests.fromCache, h.requests.fromUpstream, h.requests.failed].map((s) => s.reduce((a, b) => a + b, 0)), [4, 4, 0]);
      await checkCharts(page, h);
      assert.match((await page.locator('#chart-hits .headline').textContent()) ?? '', /^50\.0% of 8 requests in \d min$/);
      assert.equal(await page.locator('#chart-budget polyline.budget').count(), 2, 'the anonymous and the central budget');
      assert.equal(await page.locator('#chart-budget .headline').textContent(), 'lowest: registry-1.docker.io (anonymous), 76 of 100 left');
      await checkLayout(page);
      await screenshot(t, page, 'dashboard-desktop.png');
      assert.deepEqual(errors, []);
    } finally {
      await page.close();
    }
  });

  test('phone, 390×844: the same content, and nothing wider than the screen', async (t) => {
    const data = await proxyData();
    const { page, errors } = await open(390, 844, data);
    try {
      await checkContent(page);
      await checkCharts(page, data.history!);
      await checkLayout(page);
      // Every cell of both tables is on screen inside its card: the image name wraps, and a pull's
      // client, cache status, bytes and time are not hidden in a sideways-scrolled table.
      const cut = await page.evaluate<string[]>(`[...document.querySelectorAll('#pulls td, #largest td')]
        .filter((td) => td.getBoundingClientRect().right > td.closest('.card').getBoundingClientRect().right + 0.5)
        .map((td) => td.textContent)`);
      assert.deepEqual(cut, [], 'cells cut off at the right');
      await screenshot(t, page, 'dashboard-phone.png');
      assert.deepEqual(errors, []);
    } finally {
      await page.close();
    }
  });

  for (const [width, height, name] of [[1280, 900, 'dashboard-history-desktop.png'], [390, 844, 'dashboard-history-phone.png']] as const) {
    test(`six hours of history at ${width} px: a point per minute, failures apart from misses, two budgets`, async (t) => {
      const { history, rateLimits } = sixHours();
      assert.equal(history.requests.fromCache.length, HISTORY_MINUTES);
      const data = { ...(await proxyData()), history, rateLimits };
      const { page, errors } = await open(width, height, data);
      try {
        await checkCharts(page, history);
        // The outage: 15 minutes with failed answers, upstream 5xx and failed fills; 10 throttled.
        assert.equal(await page.locator('#chart-hits rect.s-failed').count(), 15);
        assert.equal(await page.locator('#chart-upstream rect.s-failed').count(), 15);
        assert.equal(await page.locator('#chart-upstream rect.s-fill-failed').count(), 15);
        assert.equal(await page.locator('#chart-upstream rect.s-throttled').count(), 10);
        assert.match((await page.locator('#chart-hits .headline').textContent()) ?? '', /^\d+\.\d% of \d+ requests in 6 h · 30 failed$/);
        assert.match((await page.locator('#chart-upstream .headline').textContent()) ?? '', / · 10 throttled · 15 failed · 15 fills failed$/);
        assert.deepEqual(await page.locator('#chart-budget .legend li').allTextContents(), ['registry-1.docker.io (anonymous): 0 of 100', 'registry-1.docker.io (central): 165 of 200', 'limit']);
        assert.equal(await page.locator('#chart-budget .headline').textContent(), 'lowest: registry-1.docker.io (anonymous), 0 of 100 left');
        // Each column of the ratio chart fills the height: the shares of a minute add up to 100%.
        const heights = await page.evaluate<number[]>(`[...document.querySelectorAll('#chart-hits g.minute')].map((g) => [...g.querySelectorAll('rect')].reduce((a, r) => a + Number(r.getAttribute('height')), 0))`);
        assert.deepEqual(heights.filter((h) => Math.abs(h - 100) > 1e-6), []);
        await checkLayout(page);
        await screenshot(t, page, name);
        assert.deepEqual(errors, []);
      } finally {
        await page.close();
      }
    });
  }

  test('the page refreshes itself', async () => {
    const { page } = await open(1280, 800);
    try {
      const before = await page.locator('#hit-requests').textContent();
      // One more request through the proxy: a HIT for the manifest.
      const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/${REPOSITORY}:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, 'third') });
      assert.equal(result.code, 0, result.stderr);
      await page.locator('#pulls tbody tr').nth(2).waitFor({ timeout: 15_000 });
      assert.notEqual(await page.locator('#hit-requests').textContent(), before);
      assert.match((await page.locator('#hit-requests').textContent()) ?? '', /^by requests: 66\.7% of 12$/);
      assert.match((await page.locator('#chart-hits .headline').textContent()) ?? '', /^66\.7% of 12 requests in \d min$/);
    } finally {
      await page.close();
    }
  });
});
