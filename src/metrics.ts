// Prometheus metrics (prom-client). Every request already becomes one access-log entry that names its
// registry, type, cache status, bytes and upstream status, so the counters are fed from those entries
// in one place; gauges read the live state (fills, cache, rate limits, certificates) at scrape time.
// Fills run in worker threads but report to the primary, so one scrape shows the whole process.
import { Counter, Gauge, Registry, collectDefaultMetrics, type LabelValues } from 'prom-client';
import type { AccessEntry } from './log.ts';

export interface LiveState {
  fillsInFlight(): number;
  cacheBytes(): number;
  cacheEntries(): number;
  evictions(): { blobs: number; bytes: number };
  rateLimits(): Iterable<[string, { limit?: number; remaining?: number }]>;
  caNotAfter(): Date;
  /** The leaf certificates in use, by the name they were minted for. */
  leafExpiries(): Iterable<{ host: string; notAfter: Date }>;
}

export interface Metrics {
  registry: Registry;
  observe(entry: AccessEntry): void;
}

/** Cache statuses whose bytes did not cost an upstream transfer. */
const SAVED = new Set(['HIT', 'JOINED', 'STALE', 'REVALIDATED']);
/**
 * Registries labelled at once. An entry's host is the registry's key when a session or the mirror
 * routed it, but the Host header of a plain-HTTP request the front refused: any text. Beyond this many
 * the least recently seen registry's series go (a counter that comes back starts again from 0, which
 * Prometheus reads as a reset).
 */
export const MAX_REGISTRY_LABELS = 256;
/** A label value longer than this is cut (a Host header may be 32 KiB). */
const MAX_LABEL_LENGTH = 253;

export function createMetrics(live: LiveState): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'pullthrough_' });
  const labels = ['registry', 'type', 'cache'] as const;
  const requests = new Counter({ name: 'pullthrough_requests_total', help: 'Client requests by registry, request type, cache status and status class', labelNames: [...labels, 'status'], registers: [registry] });
  const bytes = new Counter({ name: 'pullthrough_response_bytes_total', help: 'Body bytes sent to clients', labelNames: labels, registers: [registry] });
  const saved = new Counter({ name: 'pullthrough_bytes_saved_total', help: 'Body bytes sent to clients without an upstream transfer of their own (HIT, JOINED, STALE, REVALIDATED)', labelNames: ['registry'], registers: [registry] });
  const upstream = new Counter({ name: 'pullthrough_upstream_responses_total', help: 'Upstream responses by registry and status (429 is Docker Hub throttling)', labelNames: ['registry', 'status'], registers: [registry] });
  // Counted by the store; read at scrape time.
  new Counter({ name: 'pullthrough_cache_evictions_total', help: 'Blobs evicted (least recently used first)', registers: [registry], collect() { this.reset(); this.inc(live.evictions().blobs); } });
  new Counter({ name: 'pullthrough_cache_evicted_bytes_total', help: 'Bytes of evicted blobs', registers: [registry], collect() { this.reset(); this.inc(live.evictions().bytes); } });
  new Gauge({ name: 'pullthrough_fills_in_flight', help: 'Blob fills running in the worker pool', registers: [registry], collect() { this.set(live.fillsInFlight()); } });
  new Gauge({ name: 'pullthrough_cache_bytes', help: 'Bytes of verified blobs in the cache', registers: [registry], collect() { this.set(live.cacheBytes()); } });
  new Gauge({ name: 'pullthrough_cache_blobs', help: 'Verified blobs in the cache', registers: [registry], collect() { this.set(live.cacheEntries()); } });
  new Gauge({
    name: 'pullthrough_ratelimit_remaining',
    help: 'The last ratelimit-remaining an upstream reported',
    labelNames: ['registry'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [name, limit] of live.rateLimits()) if (limit.remaining !== undefined) this.set({ registry: name }, limit.remaining);
    },
  });
  new Gauge({ name: 'pullthrough_ca_expiry_timestamp_seconds', help: 'When the proxy CA expires (Unix time)', registers: [registry], collect() { this.set(Math.floor(live.caNotAfter().getTime() / 1000)); } });
  // Leaves are minted again a week before they expire, so min() of these going below that means renewal is failing.
  new Gauge({
    name: 'pullthrough_leaf_expiry_timestamp_seconds',
    help: 'When the leaf certificate the proxy presents for a host expires (Unix time); min() is the earliest',
    labelNames: ['host'],
    registers: [registry],
    collect() {
      this.reset();
      for (const leaf of live.leafExpiries()) this.set({ host: leaf.host }, Math.floor(leaf.notAfter.getTime() / 1000));
    },
  });

  const series = new RegistrySeries(MAX_REGISTRY_LABELS);
  return {
    registry,
    observe(entry) {
      if (entry.method === 'CONNECT' || entry.type === 'admin') return;
      const host = entry.host.slice(0, MAX_LABEL_LENGTH);
      const base = { registry: host, type: entry.type ?? 'other', cache: entry.cache ?? 'BYPASS' };
      series.seen(host);
      series.inc(requests, { ...base, status: `${Math.floor(entry.status / 100)}xx` });
      series.inc(bytes, base, entry.bytes);
      if (SAVED.has(base.cache)) series.inc(saved, { registry: host }, entry.bytes);
      const upstreamStatus = upstreamStatusOf(entry);
      if (upstreamStatus !== undefined) series.inc(upstream, { registry: host, status: String(upstreamStatus) });
    },
  };
}

/**
 * The counters' series by registry, that registry least recently seen first: at most `max` registries
 * are labelled, the oldest one's series are removed to make room for a new one.
 */
class RegistrySeries {
  private readonly max: number;
  /** Registry → counter → its label sets for that registry, by their JSON. */
  private readonly byRegistry = new Map<string, Map<Counter<string>, Map<string, LabelValues<string>>>>();

  constructor(max: number) {
    this.max = max;
  }

  /** Marks a registry as the most recently seen, making room for it. */
  seen(registry: string): void {
    const known = this.byRegistry.get(registry);
    this.byRegistry.delete(registry);
    this.byRegistry.set(registry, known ?? new Map());
    if (this.byRegistry.size <= this.max) return;
    const [oldest, its] = this.byRegistry.entries().next().value!;
    for (const [counter, labelSets] of its) for (const labels of labelSets.values()) counter.remove(labels);
    this.byRegistry.delete(oldest);
  }

  /** Counts on a series of a registry already seen(). */
  inc(counter: Counter<string>, labels: LabelValues<string> & { registry: string }, value = 1): void {
    const its = this.byRegistry.get(labels.registry)!;
    let labelSets = its.get(counter);
    if (!labelSets) its.set(counter, (labelSets = new Map()));
    const key = JSON.stringify(labels);
    if (!labelSets.has(key)) labelSets.set(key, labels);
    counter.inc(labels, value);
  }
}

/**
 * The upstream response a request cost, if any. A JOINED client shares its leader's fill: that one
 * upstream response is counted once, with the leader. A leader's blob GET served from its fill carries
 * no upstream status in its entry: the fill had upstream's 200 (after any redirects) when it served it.
 */
function upstreamStatusOf(entry: AccessEntry): number | undefined {
  if (entry.cache === 'JOINED') return undefined;
  if (entry.upstreamStatus !== undefined) return entry.upstreamStatus;
  if (entry.type === 'blob' && entry.cache === 'MISS' && entry.method === 'GET' && (entry.status === 200 || entry.status === 206)) return 200;
  return undefined;
}
