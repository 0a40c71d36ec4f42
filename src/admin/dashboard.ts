// The data behind /ui and `pullthrough stats`: one JSON document assembled from the live parts.
import { readFileSync } from 'node:fs';
import type { BlobStore } from '../cache/blob-store.ts';
import type { Fills } from '../cache/fills.ts';
import type { ImageSize, ManifestStore } from '../cache/manifest-store.ts';
import type { History, RecentPull, Stats, Totals } from '../stats.ts';
import type { Budget, RateLimits } from '../upstream/rate-limits.ts';
import type { WarmStatus } from '../warm-schedule.ts';

/** The page itself: static, no build step; it polls ui/data.json. */
export const DASHBOARD_HTML = readFileSync(new URL('./dashboard.html', import.meta.url), 'utf8');

export interface DashboardData {
  version: string;
  node: string;
  uptimeSeconds: number;
  health: { status: string; workers: string };
  hitRatio: { byRequests: number; byBytes: number };
  totals: Totals;
  fillsInFlight: number;
  cache: { bytes: number; blobs: number; maxSize: number };
  /** `identity`: whose budget (anonymous, central, client; '' when not said). Absent from older proxies. */
  rateLimits: Array<{ registry: string; identity?: string; limit?: number; remaining?: number; updatedAt: string }>;
  recentPulls: readonly RecentPull[];
  largestImages: ImageSize[];
  /** The last hours minute by minute (absent from older proxies). */
  history?: DashboardHistory;
  /** The warm-up of the policy's list (warm: in proxy.yaml); absent when it lists no image. */
  warm?: DashboardWarm;
}

export interface DashboardWarm {
  images: number;
  running: boolean;
  runs: { ok: number; failed: number };
  lastRun?: { startedAt: string; durationSeconds: number; ok: number; failed: number };
  nextRunAt?: string;
}

export interface DashboardHistory extends History {
  /**
   * Each budget's reports within the history, as [minute index into the history's series, remaining]:
   * between two reports the budget stood where the first one left it.
   */
  rateLimits: Array<{ registry: string; identity: string; limit?: number; points: Array<[number, number]> }>;
}

export interface DashboardSources {
  version: string;
  startedAt: number;
  maxSize: number;
  stats: Stats;
  store: BlobStore;
  fills: Fills;
  manifests: ManifestStore;
  rateLimits: RateLimits;
  workersHealthy: () => Promise<string>;
  warm?: () => WarmStatus | undefined;
}

/**
 * Every figure is a running total or a bounded snapshot, never a scan of the cache: /healthz asks for
 * this too, and Kubernetes probes it every few seconds (with 20,000 tags a scan stalled the event loop
 * 0.5–0.9 s per call). Keep it so.
 */
export async function dashboardData(s: DashboardSources): Promise<DashboardData> {
  const workers = await s.workersHealthy();
  return {
    version: s.version,
    node: process.version,
    uptimeSeconds: Math.round((Date.now() - s.startedAt) / 1000),
    health: { status: workers === 'ok' ? 'ok' : 'failing', workers },
    hitRatio: s.stats.hitRatio(),
    totals: s.stats.totals,
    fillsInFlight: s.fills.active,
    cache: { bytes: s.store.total, blobs: s.store.count, maxSize: s.maxSize },
    rateLimits: budgetsInOrder(s.rateLimits).map((r) => ({
      registry: r.registry,
      identity: r.identity,
      ...(r.limit !== undefined ? { limit: r.limit } : {}),
      ...(r.remaining !== undefined ? { remaining: r.remaining } : {}),
      updatedAt: new Date(r.updatedAt).toISOString(),
    })),
    recentPulls: s.stats.recentPulls(),
    largestImages: s.manifests.largestImages(10),
    history: dashboardHistory(s.stats, s.rateLimits),
    ...warmFigures(s.warm?.()),
  };
}

function warmFigures(status: WarmStatus | undefined): { warm?: DashboardWarm } {
  if (!status || status.images === 0) return {};
  const last = status.lastRun;
  return {
    warm: {
      images: status.images,
      running: status.running,
      runs: status.runs,
      ...(last ? { lastRun: { startedAt: new Date(last.startedAt).toISOString(), durationSeconds: last.durationMs / 1000, ok: last.ok, failed: last.failed } } : {}),
      ...(status.nextRunAt !== undefined ? { nextRunAt: new Date(status.nextRunAt).toISOString() } : {}),
    },
  };
}

/** By registry, then identity: a budget keeps its place (and its colour on the chart) whichever reported last. */
function budgetsInOrder(rateLimits: RateLimits): Budget[] {
  const key = (b: Budget) => `${b.registry} ${b.identity}`;
  return [...rateLimits.all().values()].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
}

/** The stats' minutes, and each budget's reports placed on the same minutes. */
export function dashboardHistory(stats: Stats, rateLimits: RateLimits): DashboardHistory {
  const minutes = stats.history();
  const first = Date.parse(minutes.start) / 60_000;
  const length = minutes.requests.fromCache.length;
  const budgets: DashboardHistory['rateLimits'] = [];
  for (const budget of budgetsInOrder(rateLimits)) {
    const points: Array<[number, number]> = [];
    let limit = budget.limit;
    for (const point of budget.history) {
      const at = point.minute - first;
      if (at < 0 || at >= length || point.remaining === undefined) continue;
      points.push([at, point.remaining]);
      if (point.limit !== undefined) limit = Math.max(limit ?? 0, point.limit);
    }
    if (points.length > 0) budgets.push({ registry: budget.registry, identity: budget.identity, ...(limit !== undefined ? { limit } : {}), points });
  }
  return { ...minutes, rateLimits: budgets };
}
