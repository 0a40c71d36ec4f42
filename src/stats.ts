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

/** A platform manifest fetched by digest this soon after its index's tag is part of the same pull. */
const SAME_PULL_MS = 10_000;
/** Clients × registries followed at once; the longest idle are forgotten first. */
const TRACKED_CLIENTS = 1000;

interface PullInProgress {
  pull: RecentPull;
  repository: string;
  /** Date.now() when its first request began. */
  startedAt: number;
  lastAt: number;
}

export class Stats {
  readonly totals: Totals = { requests: 0, requestsFromCache: 0, bytes: 0, bytesFromCache: 0 };
  private readonly recent: RecentPull[] = [];
  /** Each client's latest pull on each registry: its manifest(s) and then its blobs. */
  private readonly current = new Map<string, PullInProgress>();
  /** Tags each client just resolved with a HEAD (containerd does, then GETs the manifest by digest). */
  private readonly resolved = new Map<string, { repository: string; image: string; at: number }>();

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
    const key = `${client} ${entry.host}`;
    const now = Date.now();
    const manifest = entry.type === 'manifest' ? /^\/v2\/(.+)\/manifests\/(.+)$/.exec(entry.path) : null;
    if (entry.method === 'HEAD' && manifest && !manifest[2]!.includes(':') && entry.status < 400) {
      remember(this.resolved, key, { repository: manifest[1]!, image: imageOf(entry), at: now });
    }
    if (entry.method !== 'GET') return;
    const current = this.current.get(key);
    // A new pull starts with a manifest named by tag, or by digest unless it follows its index (a
    // multi-platform image: the index by tag, then the platform's manifest by digest).
    const continues = current && manifest && manifest[2]!.includes(':') && manifest[1] === current.repository && now - current.lastAt < SAME_PULL_MS;
    if (entry.type === 'manifest' && !continues) {
      // Named by the tag the client just resolved, if it did, rather than by the digest it then fetched.
      const tag = this.resolved.get(key);
      const named = tag && manifest && tag.repository === manifest[1] && now - tag.at < SAME_PULL_MS ? tag.image : imageOf(entry);
      this.resolved.delete(key);
      const pull: RecentPull = { time: new Date(now - entry.ms).toISOString(), image: named, client, cache: entry.cache, status: entry.status, bytes: entry.bytes, ms: entry.ms };
      this.recent.unshift(pull);
      if (this.recent.length > RECENT_PULLS) this.recent.pop();
      remember(this.current, key, { pull, repository: manifest?.[1] ?? '', startedAt: now - entry.ms, lastAt: now });
      return;
    }
    // Blobs (and the platform manifest) follow their manifest on the same client: they are that pull's.
    if (!current) return;
    const pull = current.pull;
    pull.bytes += entry.bytes;
    pull.ms = now - current.startedAt;
    current.lastAt = now;
    // A pull is from the cache only if all of it was: one layer fetched upstream makes it a MISS.
    if (!fromCache && pull.cache !== undefined && FROM_CACHE.has(pull.cache)) pull.cache = entry.cache;
    if (entry.status >= 400 && pull.status < 400) pull.status = entry.status;
  }

  recentPulls(): readonly RecentPull[] {
    return this.recent;
  }

  hitRatio(): { byRequests: number; byBytes: number } {
    const { requests, requestsFromCache, bytes, bytesFromCache } = this.totals;
    return { byRequests: requests ? requestsFromCache / requests : 0, byBytes: bytes ? bytesFromCache / bytes : 0 };
  }
}

/** Sets key (as the newest) and forgets the oldest beyond TRACKED_CLIENTS. */
function remember<V>(map: Map<string, V>, key: string, value: V): void {
  map.delete(key);
  map.set(key, value);
  if (map.size > TRACKED_CLIENTS) map.delete(map.keys().next().value!);
}

/** registry/name:tag or registry/name@digest from a manifest request's path. */
function imageOf(entry: AccessEntry): string {
  const match = /^\/v2\/(.+)\/manifests\/(.+)$/.exec(entry.path);
  if (!match) return `${entry.host}${entry.path}`;
  const host = entry.host.replace(/:443$/, '');
  return `${host}/${match[1]}${match[2]!.includes(':') ? '@' : ':'}${match[2]}`;
}
