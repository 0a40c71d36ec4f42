// What the dashboard and `pullthrough stats` show: totals since start, the most recent pulls and the
// last hours minute by minute, fed by the access-log entries like the metrics.
import type { FillOutcome } from './cache/fill-protocol.ts';
import type { AccessEntry, CacheStatus } from './log.ts';

/** Statuses served without an upstream transfer of their own. */
export const FROM_CACHE: ReadonlySet<CacheStatus> = new Set(['HIT', 'JOINED', 'STALE', 'REVALIDATED']);
const RECENT_PULLS = 50;
/** Minutes of history kept: Docker Hub's rate-limit window (6 hours), so its budget chart shows one whole window. */
export const HISTORY_MINUTES = 360;

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

/**
 * The last minutes, one series per figure, oldest minute first: `start` is the first minute's
 * beginning, and every series has one value per minute up to the current one (0 for a quiet minute).
 */
export interface History {
  stepSeconds: number;
  /** ISO time the first minute began. */
  start: string;
  /**
   * Image requests (manifests and blobs) by how they were answered: from the cache (HIT, JOINED,
   * REVALIDATED, STALE), from upstream (MISS, BYPASS), or failed (a 5xx answer, whatever the cache).
   */
  requests: { fromCache: number[]; fromUpstream: number[]; failed: number[] };
  /** Body bytes of image requests sent to clients, and those of them served from the cache. */
  bytes: { served: number[]; saved: number[] };
  /**
   * Upstream responses (every request type) by status: answered (2xx–4xx but 429), throttled (429),
   * failed (5xx); and blob fills that failed (upstream cut or lied, or the cache could not write).
   */
  upstream: { answered: number[]; throttled: number[]; failed: number[]; failedFills: number[] };
}

/** One minute's figures, in a ring of HISTORY_MINUTES slots. */
interface Minute {
  /** Minutes since the epoch: which minute the slot holds now. */
  minute: number;
  fromCache: number;
  fromUpstream: number;
  failed: number;
  served: number;
  saved: number;
  answered: number;
  throttled: number;
  upstreamFailed: number;
  failedFills: number;
}

export class Stats {
  readonly totals: Totals = { requests: 0, requestsFromCache: 0, bytes: 0, bytesFromCache: 0 };
  private readonly recent: RecentPull[] = [];
  /** Each client's latest pull on each registry: its manifest(s) and then its blobs. */
  private readonly current = new Map<string, PullInProgress>();
  /** Tags each client just resolved with a HEAD (containerd does, then GETs the manifest by digest). */
  private readonly resolved = new Map<string, { repository: string; image: string; at: number }>();
  /** Slot `minute % HISTORY_MINUTES`: a fixed size whatever the traffic. */
  private readonly minutes: Array<Minute | undefined> = new Array(HISTORY_MINUTES);
  /** The minute the history starts at: the first one of this process. */
  private readonly firstMinute: number;
  private readonly now: () => number;

  constructor(now: () => number = Date.now) {
    this.now = now;
    this.firstMinute = minuteOf(now());
  }

  observe(entry: AccessEntry): void {
    // Cluster mode: another replica's client, counted by that replica (the dashboard shows this one's).
    if (entry.forPeer) return;
    this.countMinute(entry);
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
    const now = this.now();
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

  /**
   * A blob fill ended (Fills.finish): a failed one is a failure of its own on the history, whatever
   * its clients were answered (they may go on from upstream, or be cut mid-body with a 200 begun).
   */
  fillEnded(outcome: FillOutcome): void {
    if (outcome.kind === 'failed') this.slot(minuteOf(this.now())).failedFills++;
  }

  /** The last HISTORY_MINUTES minutes (fewer since start), up to and with the current one. */
  history(): History {
    const last = minuteOf(this.now());
    const first = Math.max(this.firstMinute, last - HISTORY_MINUTES + 1);
    const history: History = {
      stepSeconds: 60,
      start: new Date(first * 60_000).toISOString(),
      requests: { fromCache: [], fromUpstream: [], failed: [] },
      bytes: { served: [], saved: [] },
      upstream: { answered: [], throttled: [], failed: [], failedFills: [] },
    };
    for (let minute = first; minute <= last; minute++) {
      const held = this.minutes[minute % HISTORY_MINUTES];
      const m = held?.minute === minute ? held : undefined;
      history.requests.fromCache.push(m?.fromCache ?? 0);
      history.requests.fromUpstream.push(m?.fromUpstream ?? 0);
      history.requests.failed.push(m?.failed ?? 0);
      history.bytes.served.push(m?.served ?? 0);
      history.bytes.saved.push(m?.saved ?? 0);
      history.upstream.answered.push(m?.answered ?? 0);
      history.upstream.throttled.push(m?.throttled ?? 0);
      history.upstream.failed.push(m?.upstreamFailed ?? 0);
      history.upstream.failedFills.push(m?.failedFills ?? 0);
    }
    return history;
  }

  /** An entry on the history, in the minute it ended (a long blob transfer counts when it is done). */
  private countMinute(entry: AccessEntry): void {
    if (entry.method === 'CONNECT' || entry.type === 'admin') return;
    const upstreamStatus = upstreamStatusOf(entry);
    const image = entry.type === 'blob' || entry.type === 'manifest';
    if (!image && upstreamStatus === undefined) return;
    const m = this.slot(minuteOf(this.now()));
    if (image) {
      if (entry.status >= 500) m.failed++;
      else if (entry.cache !== undefined && FROM_CACHE.has(entry.cache)) m.fromCache++;
      else m.fromUpstream++;
      m.served += entry.bytes;
      if (entry.cache !== undefined && FROM_CACHE.has(entry.cache)) m.saved += entry.bytes;
    }
    if (upstreamStatus === undefined) return;
    if (upstreamStatus === 429) m.throttled++;
    else if (upstreamStatus >= 500) m.upstreamFailed++;
    else m.answered++;
  }

  /** The slot of `minute`, emptied first if it still holds a minute HISTORY_MINUTES or more ago. */
  private slot(minute: number): Minute {
    const index = minute % HISTORY_MINUTES;
    let m = this.minutes[index];
    if (m?.minute !== minute) {
      m = { minute, fromCache: 0, fromUpstream: 0, failed: 0, served: 0, saved: 0, answered: 0, throttled: 0, upstreamFailed: 0, failedFills: 0 };
      this.minutes[index] = m;
    }
    return m;
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

function minuteOf(ms: number): number {
  return Math.floor(ms / 60_000);
}

/**
 * The upstream response a request cost, if any. A JOINED client shares its leader's fill: that one
 * upstream response is counted once, with the leader. A leader's blob GET served from its fill carries
 * no upstream status in its entry: the fill had upstream's 200 (after any redirects) when it served it.
 */
export function upstreamStatusOf(entry: AccessEntry): number | undefined {
  if (entry.cache === 'JOINED') return undefined;
  if (entry.upstreamStatus !== undefined) return entry.upstreamStatus;
  if (entry.type === 'blob' && entry.cache === 'MISS' && entry.method === 'GET' && (entry.status === 200 || entry.status === 206)) return 200;
  return undefined;
}
