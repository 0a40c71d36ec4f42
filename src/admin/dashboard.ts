// The data behind /ui and `pullthrough stats`: one JSON document assembled from the live parts.
import { readFileSync } from 'node:fs';
import type { BlobStore } from '../cache/blob-store.ts';
import type { Fills } from '../cache/fills.ts';
import type { ImageSize, ManifestStore } from '../cache/manifest-store.ts';
import type { RecentPull, Stats, Totals } from '../stats.ts';
import type { RateLimits } from '../upstream/rate-limits.ts';

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
  rateLimits: Array<{ registry: string; limit?: number; remaining?: number; updatedAt: string }>;
  recentPulls: readonly RecentPull[];
  largestImages: ImageSize[];
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
    rateLimits: [...s.rateLimits.all()].map(([registry, r]) => ({
      registry,
      ...(r.limit !== undefined ? { limit: r.limit } : {}),
      ...(r.remaining !== undefined ? { remaining: r.remaining } : {}),
      updatedAt: new Date(r.updatedAt).toISOString(),
    })),
    recentPulls: s.stats.recentPulls(),
    largestImages: s.manifests.largestImages(10),
  };
}
