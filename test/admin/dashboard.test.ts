// The dashboard in a real browser (Debian's headless Chromium through playwright-core): after a cold
// and a warm pull through the proxy, /ui shows the hit ratio, the image in the recent pulls and the
// largest images, and health, at desktop and phone widths without sideways scrolling. The screenshots
// are kept in test-artifacts/ (not committed) for a human to look at.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy } from '../helpers/skopeo.ts';

const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = join(import.meta.dirname, '../../test-artifacts');
/** What the page measures (evaluated in the page; the tests are type-checked without the DOM lib). */
interface Layout {
  scroll: number;
  inner: number;
  /** Header and cards sticking out at the right: cut even when the page itself does not scroll. */
  outside: string[];
}
const LAYOUT = `({
  scroll: document.documentElement.scrollWidth,
  inner: window.innerWidth,
  outside: [...document.querySelectorAll('header, .card')].filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5).map((el) => el.id || el.className),
})`;
/** Long enough to wrap on a phone: the layout must not scroll sideways for it. */
const REPOSITORY = 'platform-team/build-images/node-builder';

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
    proxy = await startTestProxy(`registries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
    for (const name of ['cold', 'warm']) {
      const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/${REPOSITORY}:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, name) });
      assert.equal(result.code, 0, result.stderr);
    }
    // What Docker Hub's manifest responses say (the real registry here sends no budget).
    proxy.proxy.rateLimits.record('registry-1.docker.io:443', { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '76;w=21600' });
    const { chromium } = await import('playwright-core');
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      // Without the background-networking flags Chromium keeps trying to reach Google.
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    mkdirSync(ARTIFACTS, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  async function open(width: number, height: number): Promise<{ page: Page; errors: string[] }> {
    const page = await browser.newPage({ viewport: { width, height }, deviceScaleFactor: width < 600 ? 2 : 1 });
    const errors: string[] = [];
    page.on('pageerror', (err) => errors.push(err.message));
    page.on('console', (message) => {
      if (message.type() === 'error') errors.push(message.text());
    });
    const response = await page.goto(`${proxy.url}/ui`);
    assert.equal(response?.status(), 200);
    assert.match(response!.headers()['content-type'] ?? '', /^text\/html/);
    // The page fills itself from ui/data.json once loaded.
    await page.locator('#health', { hasText: 'healthy' }).waitFor({ timeout: 10_000 });
    return { page, errors };
  }

  async function checkContent(page: Page): Promise<void> {
    const image = `${registry.hostPort}/${REPOSITORY}:v1`;
    // Cold then warm: 4 MISS (manifest, config, 2 layers) then 4 HIT, by requests and by bytes.
    assert.equal(await page.locator('#hit-bytes').textContent(), '50.0%');
    assert.match((await page.locator('#hit-requests').textContent()) ?? '', /^by requests: 50\.0% of 8$/);
    assert.match((await page.locator('#saved').textContent()) ?? '', /^2\.0 MiB$/);
    assert.equal(await page.locator('#fills').textContent(), '0');
    assert.equal(await page.locator('#ratelimits').textContent(), 'registry-1.docker.io: 76 of 100 left');
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

  test('desktop, 1280×800: hit ratio, the pulled image, health', async () => {
    const { page, errors } = await open(1280, 800);
    try {
      await checkContent(page);
      const layout = await page.evaluate<Layout>(LAYOUT);
      assert.ok(layout.scroll <= layout.inner, `no sideways scrolling: ${JSON.stringify(layout)}`);
      assert.deepEqual(layout.outside, []);
      await page.screenshot({ path: join(ARTIFACTS, 'dashboard-desktop.png'), fullPage: true });
      assert.deepEqual(errors, []);
    } finally {
      await page.close();
    }
  });

  test('phone, 390×844: the same content, and nothing wider than the screen', async () => {
    const { page, errors } = await open(390, 844);
    try {
      await checkContent(page);
      const layout = await page.evaluate<Layout>(LAYOUT);
      assert.ok(layout.scroll <= layout.inner, `no sideways scrolling: ${JSON.stringify(layout)}`);
      assert.deepEqual(layout.outside, []);
      // Every cell of both tables is on screen inside its card: the image name wraps, and a pull's
      // client, cache status, bytes and time are not hidden in a sideways-scrolled table.
      const cut = await page.evaluate<string[]>(`[...document.querySelectorAll('#pulls td, #largest td')]
        .filter((td) => td.getBoundingClientRect().right > td.closest('.card').getBoundingClientRect().right + 0.5)
        .map((td) => td.textContent)`);
      assert.deepEqual(cut, [], 'cells cut off at the right');
      await page.screenshot({ path: join(ARTIFACTS, 'dashboard-phone.png'), fullPage: true });
      assert.deepEqual(errors, []);
    } finally {
      await page.close();
    }
  });

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
    } finally {
      await page.close();
    }
  });
});
