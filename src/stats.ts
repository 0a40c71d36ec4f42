// What the dashboard and `pullthrough stats` show: totals since start and the most recent pulls, fed
// by the access-log entries like the metrics.
import type { AccessEntry, CacheStatus } from './log.ts';

/** Statuses served without an upstream transfer of their own. */
const FROM_CACHE: ReadonlySet<CacheStatus> = new Set(['HIT', 'JOINED', 'STALE', 'REVALIDATED']);
const RECENT_PULLS = 50;

export interface RecentPull {
  time: string;
  image: string;
  client: string;
  cache: CacheStatus | undefined;
  status: number;
  bytes: number;
  ms: number;
}

export interface Totals {
  requests: number;
  requestsFromCache: number;
  bytes: number;
  bytesFromCache: number;
}

export class Stats {
  readonly totals: Totals = { requests: 0, requestsFromCache: 0, bytes: 0, bytesFromCache: 0 };
  private readonly recent: RecentPull[] = [];
  /** Bytes of blobs each client fetched since its last manifest: a pull's size. */
  private readonly pullBytes = new Map<string, RecentPull>();

  observe(entry: AccessEntry): void {
    if (entry.type !== 'blob' && entry.type !== 'manifest') return;
    const fromCache = entry.cache !== undefined && FROM_CACHE.has(entry.cache);
    this.totals.requests++;
    this.totals.bytes += entry.bytes;
    if (fromCache) {
      this.totals.requestsFromCache++;
      this.totals.bytesFromCache += entry.bytes;
    }
    const client = entry.client ?? '';
    if (entry.type === 'manifest' && entry.method === 'GET') {
      const pull: RecentPull = { time: new Date().toISOString(), image: imageOf(entry), client, cache: entry.cache, status: entry.status, bytes: entry.bytes, ms: entry.ms };
      this.recent.unshift(pull);
      if (this.recent.length > RECENT_PULLS) this.recent.pop();
      this.pullBytes.set(`${client} ${entry.host}`, pull);
    } else if (entry.type === 'blob') {
      // Layers follow their manifest on the same client: count them into that pull.
      const pull = this.pullBytes.get(`${client} ${entry.host}`);
      if (pull) pull.bytes += entry.bytes;
    }
  }

  recentPulls(): readonly RecentPull[] {
    return this.recent;
  }

  hitRatio(): { byRequests: number; byBytes: number } {
    const { requests, requestsFromCache, bytes, bytesFromCache } = this.totals;
    return { byRequests: requests ? requestsFromCache / requests : 0, byBytes: bytes ? bytesFromCache / bytes : 0 };
  }
}

/** registry/name:tag or registry/name@digest from a manifest request's path. */
function imageOf(entry: AccessEntry): string {
  const match = /^\/v2\/(.+)\/manifests\/(.+)$/.exec(entry.path);
  if (!match) return `${entry.host}${entry.path}`;
  const host = entry.host.replace(/:443$/, '');
  return `${host}/${match[1]}${match[2]!.includes(':') ? '@' : ':'}${match[2]}`;
}
