// The dashboard's history without a proxy: per-minute buckets in a fixed ring fed by access entries
// (and failed fills), failures apart from misses, and the rate-limit budgets per identity placed on
// the same minutes. A clock of the test's own drives the minutes.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { dashboardHistory } from '../../src/admin/dashboard.ts';
import type { AccessEntry } from '../../src/log.ts';
import { HISTORY_MINUTES, Stats } from '../../src/stats.ts';
import { RateLimits } from '../../src/upstream/rate-limits.ts';

const MINUTE = 60_000;
/** 10:00:00 UTC on some day: minute 0 of the tests. */
const T0 = Date.UTC(2025, 5, 2, 10, 0, 0);

function clock(): { now: () => number; at(minute: number, second?: number): void } {
  let t = T0;
  return { now: () => t, at: (minute, second = 30) => void (t = T0 + minute * MINUTE + second * 1000) };
}

const base = { host: 'registry.test:443', client: '10.0.0.5', ms: 4 };
const blob = (cache: AccessEntry['cache'], bytes: number, extra: Partial<AccessEntry> = {}): AccessEntry => ({ ...base, method: 'GET', path: `/v2/lib/app/blobs/sha256:${'a'.repeat(64)}`, type: 'blob', cache, bytes, status: 200, ...extra });
const manifest = (cache: AccessEntry['cache'], extra: Partial<AccessEntry> = {}): AccessEntry => ({ ...base, method: 'GET', path: '/v2/lib/app/manifests/v1', type: 'manifest', cache, bytes: 500, status: 200, ...extra });

describe('history: per-minute buckets', () => {
  test('one value per minute since start, quiet minutes 0, each request in the minute it ended', () => {
    const c = clock();
    const stats = new Stats(c.now);
    stats.observe(manifest('MISS', { upstreamStatus: 200, upstreamMs: 80 }));
    stats.observe(blob('MISS', 1000));
    c.at(0, 59);
    stats.observe(blob('HIT', 1000));
    c.at(3);
    stats.observe(blob('JOINED', 2000));
    stats.observe(manifest('HIT'));
    const h = stats.history();
    assert.equal(h.stepSeconds, 60);
    assert.equal(h.start, new Date(T0).toISOString());
    assert.deepEqual(h.requests, { fromCache: [1, 0, 0, 2], fromUpstream: [2, 0, 0, 0], failed: [0, 0, 0, 0] });
    assert.deepEqual(h.bytes, { served: [2500, 0, 0, 2500], saved: [1000, 0, 0, 2500] });
    // The manifest's 200, the blob fill's 200; the joiner shares its leader's.
    assert.deepEqual(h.upstream, { answered: [2, 0, 0, 0], throttled: [0, 0, 0, 0], failed: [0, 0, 0, 0], failedFills: [0, 0, 0, 0] });
  });

  test('failures are failures: a 5xx answer is not a miss, a 429 and a 5xx upstream are apart from answers, a failed fill is its own', () => {
    const c = clock();
    const stats = new Stats(c.now);
    stats.observe(blob('MISS', 0, { status: 502, error: 'upstream unreachable' }));
    stats.observe(manifest('MISS', { status: 503, bytes: 0, upstreamStatus: 503, upstreamMs: 20 }));
    stats.observe(manifest('MISS', { status: 429, bytes: 0, upstreamStatus: 429, upstreamMs: 20 }));
    stats.observe(manifest('STALE', { upstreamStatus: 503, upstreamMs: 20, error: 'upstream answered 503' }));
    stats.observe(manifest('MISS', { status: 404, bytes: 0, upstreamStatus: 404, upstreamMs: 20 }));
    stats.fillEnded({ kind: 'failed', reason: 'cut', offset: 100, mismatch: true });
    stats.fillEnded({ kind: 'committed', size: 10 });
    stats.fillEnded({ kind: 'upstream-status', status: 404, headers: {}, body: '' });
    const h = stats.history();
    // The 502 and the 503 failed; the 429 and the 404 were answers from upstream; the stale copy came from the cache.
    assert.deepEqual(h.requests, { fromCache: [1], fromUpstream: [2], failed: [2] });
    assert.deepEqual(h.upstream, { answered: [1], throttled: [1], failed: [2], failedFills: [1] });
  });

  test('other request types count upstream only; admin requests and CONNECTs not at all', () => {
    const c = clock();
    const stats = new Stats(c.now);
    stats.observe({ ...base, method: 'GET', path: '/v2/', type: 'ping', cache: 'BYPASS', status: 200, bytes: 2, upstreamStatus: 200, upstreamMs: 5 });
    stats.observe({ ...base, method: 'GET', path: '/token', type: 'token', cache: 'BYPASS', status: 200, bytes: 900, upstreamStatus: 200 });
    stats.observe({ ...base, method: 'GET', host: 'pullthrough', path: '/metrics', type: 'admin', status: 200, bytes: 9000 });
    stats.observe({ ...base, method: 'CONNECT', host: 'example.com:443', path: '', cache: 'TUNNEL', status: 200, bytes: 9000 });
    const h = stats.history();
    assert.deepEqual(h.requests, { fromCache: [0], fromUpstream: [0], failed: [0] });
    assert.deepEqual(h.bytes, { served: [0], saved: [0] });
    assert.deepEqual(h.upstream.answered, [2]);
    assert.deepEqual(stats.totals, { requests: 0, requestsFromCache: 0, bytes: 0, bytesFromCache: 0 }, 'the totals are image requests only, as before');
  });

  test(`a fixed ring: after a day, the last ${HISTORY_MINUTES} minutes, a minute's slot emptied when it comes round again`, () => {
    const c = clock();
    const stats = new Stats(c.now);
    for (let minute = 0; minute < 24 * 60; minute += 7) {
      c.at(minute);
      stats.observe(blob('HIT', minute));
    }
    c.at(24 * 60 + 5);
    const h = stats.history();
    assert.equal(h.requests.fromCache.length, HISTORY_MINUTES);
    const first = 24 * 60 + 5 - HISTORY_MINUTES + 1;
    assert.equal(h.start, new Date(T0 + first * MINUTE).toISOString());
    // Minute m holds a request iff m % 7 === 0 and m < 24 h: a slot last written a lap ago reads as 0.
    const expected = Array.from({ length: HISTORY_MINUTES }, (_, i) => ((first + i) % 7 === 0 && first + i < 24 * 60 ? 1 : 0));
    assert.deepEqual(h.requests.fromCache, expected);
    assert.deepEqual(h.bytes.saved, expected.map((v, i) => v * (first + i)));
    // Quiet for longer than the ring: all zeros, still one value per minute.
    c.at(3 * 24 * 60);
    assert.deepEqual(new Set(Object.values(stats.history().requests).flat()), new Set([0]));
  });

  test('answers quickly: a full ring is a few hundred numbers per series', () => {
    const c = clock();
    const stats = new Stats(c.now);
    for (let minute = 0; minute < HISTORY_MINUTES; minute++) {
      c.at(minute);
      for (let i = 0; i < 20; i++) stats.observe(blob(i % 3 ? 'HIT' : 'MISS', 1000));
    }
    const started = performance.now();
    for (let i = 0; i < 100; i++) stats.history();
    const ms = (performance.now() - started) / 100;
    assert.ok(ms < 5, `${ms.toFixed(2)} ms per history`);
    assert.ok(JSON.stringify(stats.history()).length < 40_000, 'small enough to poll every 5 s');
  });
});

describe('rate-limit budgets over time', () => {
  test('by registry and identity: the anonymous and the authenticated budget apart, each minute its last report', () => {
    const c = clock();
    const stats = new Stats(c.now);
    const limits = new RateLimits(c.now);
    const hub = 'registry-1.docker.io:443';
    const report = (identity: string, limit: number, remaining: number) => limits.record(hub, { 'ratelimit-limit': `${limit};w=21600`, 'ratelimit-remaining': `${remaining};w=21600` }, identity);
    report('anonymous', 100, 90);
    report('anonymous', 100, 89);
    report('central', 200, 150);
    c.at(2);
    report('anonymous', 100, 80);
    c.at(5);
    const h = dashboardHistory(stats, limits);
    assert.equal(h.requests.fromCache.length, 6);
    // In a steady order (registry, identity), whichever reported last.
    assert.deepEqual(h.rateLimits, [
      { registry: hub, identity: 'anonymous', limit: 100, points: [[0, 89], [2, 80]] },
      { registry: hub, identity: 'central', limit: 200, points: [[0, 150]] },
    ]);
    assert.equal(limits.get(hub, 'central')?.remaining, 150);
    assert.equal(limits.get(hub, 'anonymous')?.remaining, 80);
  });

  test('a budget keeps at most the history window of points; points before the window are left out', () => {
    const c = clock();
    const stats = new Stats(c.now);
    const limits = new RateLimits(c.now);
    for (let minute = 0; minute < 2 * HISTORY_MINUTES; minute++) {
      c.at(minute);
      limits.record('registry-1.docker.io:443', { 'ratelimit-remaining': `${minute % 100}` });
    }
    const budget = [...limits.all().values()][0]!;
    assert.equal(budget.history.length, HISTORY_MINUTES);
    assert.equal(budget.identity, '', 'not said');
    const h = dashboardHistory(stats, limits);
    assert.equal(h.rateLimits[0]!.points.length, HISTORY_MINUTES);
    assert.deepEqual(h.rateLimits[0]!.points[0], [0, HISTORY_MINUTES % 100]);
    assert.equal(h.rateLimits[0]!.limit, undefined, 'no ratelimit-limit reported');
  });
});
