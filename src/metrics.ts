// Prometheus metrics (prom-client), named as Prometheus asks (`_total` counters, `_seconds` and
// `_bytes` units, exact status codes in `status`, cache statuses as the access log writes them) so
// that stock dashboards and alerts understand them; Node's process and runtime metrics keep their
// standard names. Every request already becomes one access-log entry that names its registry, type,
// cache status, bytes, status and times, so the request figures are fed from those entries in one
// place; blob fills report their end and their retries through the methods below; gauges read the
// live state (fills, cache, rate limits, certificates) at scrape time. Fills run in worker threads but
// report to the primary, so one scrape shows the whole process.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type LabelValues } from 'prom-client';
import type { FillOutcome } from './cache/fill-protocol.ts';
import type { AccessEntry } from './log.ts';
import { FROM_CACHE, upstreamStatusOf } from './stats.ts';
import type { WarmStatus } from './warm-schedule.ts';

export interface LiveState {
  fillsInFlight(): number;
  cacheBytes(): number;
  cacheEntries(): number;
  evictions(): { blobs: number; bytes: number };
  /** Layers whose fill was started ahead of the client's request (cache.prefetch), since start. */
  prefetched(): number;
  /** Upstream pull budgets, one per registry and identity (RateLimits.all()). */
  rateLimits(): Iterable<[string, { registry: string; identity: string; limit?: number; remaining?: number }]>;
  caNotAfter(): Date;
  /** The leaf certificates in use, by the name they were minted for. */
  leafExpiries(): Iterable<{ host: string; notAfter: Date }>;
  /** The warm-up of the policy's list (undefined before the proxy listens). */
  warm?(): WarmStatus | undefined;
  /** Cluster mode: the members this replica knows, itself included, those it passes over now, and failovers so far. */
  cluster?(): { members: number; unreachable: number; failovers: number };
}

export interface Metrics {
  registry: Registry;
  /** Every access-log entry. */
  observe(entry: AccessEntry): void;
  /**
   * A blob fill ended (src/cache/fills.ts, Fills.finish): a failed one is counted by its reason, and a
   * digest mismatch also as one. `registry`: the FillRequest's.
   */
  fillEnded(registry: string, outcome: FillOutcome): void;
  /** A blob fill asks upstream again (a 'retry' message) from byte `offset`: > 0 is a resume with Range. */
  fillRetried(registry: string, offset: number): void;
  /** Upstream sent content that does not hash to the digest asked for (fillEnded counts a blob's itself). */
  digestMismatch(registry: string, type: 'blob' | 'manifest'): void;
}

/**
 * Registries labelled at once. An entry's host is the registry's key when a session or the mirror
 * routed it, but the Host header of a plain-HTTP request the front refused: any text. Beyond this many
 * the least recently seen registry's series go (a counter that comes back starts again from 0, which
 * Prometheus reads as a reset).
 */
export const MAX_REGISTRY_LABELS = 256;
/** A label value longer than this is cut (a Host header may be 32 KiB). */
const MAX_LABEL_LENGTH = 253;

/**
 * prom-client's defaults that are gauges named `_total` (Prometheus reserves the suffix for counters,
 * and stock tooling treats them as counters). Their per-type siblings stay (`nodejs_active_handles`…):
 * sum() of one is the total.
 */
const GAUGES_NAMED_TOTAL = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

/** Seconds. A client request may be a manifest from memory (a millisecond) or a 4 GiB layer (minutes). */
const REQUEST_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];
/** Seconds to upstream's response headers. */
const UPSTREAM_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export function createMetrics(live: LiveState): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  for (const name of GAUGES_NAMED_TOTAL) registry.removeSingleMetric(name);
  const registers = [registry];

  const requests = new Counter({ name: 'pullthrough_requests_total', help: 'Client requests through the interception, the mirror and plain HTTP, by registry, request type, cache status and HTTP status', labelNames: ['registry', 'type', 'cache', 'status'], registers });
  const bytes = new Counter({ name: 'pullthrough_response_bytes_total', help: 'Body bytes sent to clients', labelNames: ['registry', 'type', 'cache'], registers });
  const saved = new Counter({ name: 'pullthrough_saved_bytes_total', help: 'Body bytes sent to clients without an upstream transfer of their own (HIT, JOINED, STALE, REVALIDATED)', labelNames: ['registry'], registers });
  const duration = new Histogram({ name: 'pullthrough_request_duration_seconds', help: 'Client requests from their start to the last byte of the answer, by request type and cache status', labelNames: ['type', 'cache'], buckets: REQUEST_BUCKETS, registers });
  const upstream = new Counter({ name: 'pullthrough_upstream_responses_total', help: 'Upstream responses by registry and HTTP status (429: throttled)', labelNames: ['registry', 'status'], registers });
  const upstreamDuration = new Histogram({ name: 'pullthrough_upstream_duration_seconds', help: 'Upstream requests from sending to the response headers, by registry and request type', labelNames: ['registry', 'type'], buckets: UPSTREAM_BUCKETS, registers });
  const tunnels = new Counter({ name: 'pullthrough_tunnels_total', help: 'CONNECTs to hosts the proxy does not intercept, by the status the client got (200: tunnelled; 403: the tunnel policy refused; 502, 504: unreachable; 499: the client left)', labelNames: ['status'], registers });
  const tunnelBytes = new Counter({ name: 'pullthrough_tunnel_bytes_total', help: 'Bytes tunnels carried from servers to clients', registers });
  const proxyAuth = new Counter({ name: 'pullthrough_proxy_auth_failures_total', help: 'Requests answered 407 Proxy Authentication Required: no proxy user, or a wrong one (users: in proxy.yaml)', registers });
  const fillFailures = new Counter({ name: 'pullthrough_fill_failures_total', help: 'Blob fills that failed, by registry and reason (upstream: cut or unreachable after every retry; digest_mismatch; cache_write: the disk failed)', labelNames: ['registry', 'reason'], registers });
  const fillRetries = new Counter({ name: 'pullthrough_fill_retries_total', help: 'Upstream requests a blob fill made again after a failure, by registry and kind (resume: with Range from the bytes already in; retry: from the start)', labelNames: ['registry', 'kind'], registers });
  const mismatches = new Counter({ name: 'pullthrough_digest_mismatches_total', help: 'Blobs and manifests upstream sent that do not match their digest (never cached, never served)', labelNames: ['registry', 'type'], registers });
  // Counted by the store; read at scrape time.
  new Counter({ name: 'pullthrough_cache_evictions_total', help: 'Blobs evicted (least recently used first)', registers, collect() { this.reset(); this.inc(live.evictions().blobs); } });
  new Counter({ name: 'pullthrough_cache_evicted_bytes_total', help: 'Bytes of evicted blobs', registers, collect() { this.reset(); this.inc(live.evictions().bytes); } });
  new Counter({ name: 'pullthrough_prefetch_fills_total', help: 'Layer fills started ahead of the client\'s request for them (cache.prefetch): the other layers of an image a client pulls', registers, collect() { this.reset(); this.inc(live.prefetched()); } });
  new Gauge({ name: 'pullthrough_fills_in_flight', help: 'Blob fills running in the worker pool', registers, collect() { this.set(live.fillsInFlight()); } });
  new Gauge({ name: 'pullthrough_cache_bytes', help: 'Bytes of verified blobs in the cache', registers, collect() { this.set(live.cacheBytes()); } });
  new Gauge({ name: 'pullthrough_cache_blobs', help: 'Verified blobs in the cache', registers, collect() { this.set(live.cacheEntries()); } });
  const budgetGauge = (name: string, help: string, pick: (budget: { limit?: number; remaining?: number }) => number | undefined) =>
    new Gauge({
      name,
      help,
      labelNames: ['registry', 'identity'],
      registers,
      collect() {
        this.reset();
        for (const [, budget] of live.rateLimits()) {
          const value = pick(budget);
          if (value !== undefined) this.set({ registry: budget.registry, identity: budget.identity }, value);
        }
      },
    });
  budgetGauge('pullthrough_ratelimit_limit', 'The pull budget of the window (ratelimit-limit) an upstream reported last, by registry and identity (anonymous, central, client)', (b) => b.limit);
  budgetGauge('pullthrough_ratelimit_remaining', 'What is left of the pull budget (ratelimit-remaining) as an upstream reported last, by registry and identity', (b) => b.remaining);
  new Gauge({ name: 'pullthrough_ca_expiry_timestamp_seconds', help: 'When the proxy CA expires (Unix time)', registers, collect() { this.set(Math.floor(live.caNotAfter().getTime() / 1000)); } });
  // Leaves are minted again a week before they expire, so min() of these going below that means renewal is failing.
  new Gauge({
    name: 'pullthrough_leaf_expiry_timestamp_seconds',
    help: 'When the leaf certificate the proxy presents for a host expires (Unix time); min() is the earliest',
    labelNames: ['host'],
    registers,
    collect() {
      this.reset();
      for (const leaf of live.leafExpiries()) this.set({ host: leaf.host }, Math.floor(leaf.notAfter.getTime() / 1000));
    },
  });

  // The warm-up (warm: in proxy.yaml), read from its schedule at scrape time.
  new Counter({
    name: 'pullthrough_warm_runs_total',
    help: 'Warm-up runs of the policy\'s list, by result (ok: every image warmed; failed: at least one did not)',
    labelNames: ['result'],
    registers,
    collect() {
      const runs = live.warm?.()?.runs ?? { ok: 0, failed: 0 };
      this.reset();
      for (const result of ['ok', 'failed'] as const) this.inc({ result }, runs[result]);
    },
  });
  new Gauge({
    name: 'pullthrough_warm_images',
    help: 'Images of the warm-up list by how the last run went (ok, failed)',
    labelNames: ['state'],
    registers,
    collect() {
      const last = live.warm?.()?.lastRun;
      this.set({ state: 'ok' }, last?.ok ?? 0);
      this.set({ state: 'failed' }, last?.failed ?? 0);
    },
  });
  new Gauge({ name: 'pullthrough_warm_last_run_timestamp_seconds', help: 'When the last warm-up run ended (Unix time; 0: none yet)', registers, collect() { const last = live.warm?.()?.lastRun; this.set(last ? Math.floor((last.startedAt + last.durationMs) / 1000) : 0); } });
  new Gauge({ name: 'pullthrough_warm_last_run_duration_seconds', help: 'How long the last warm-up run took', registers, collect() { this.set((live.warm?.()?.lastRun?.durationMs ?? 0) / 1000); } });

  // Cluster mode: what went between replicas. A client's request is counted once, in the figures above,
  // by the replica it reached; the owner counts what it served for that replica here only.
  const peerRequests = new Counter({ name: 'pullthrough_cluster_peer_requests_total', help: 'Cluster mode: blob and manifest requests between replicas, by role (relayed: this replica\'s client was served by the owner; served: this replica, the owner, served another\'s client), request type and cache status at the owner', labelNames: ['role', 'type', 'cache'], registers });
  const peerBytes = new Counter({ name: 'pullthrough_cluster_peer_bytes_total', help: 'Cluster mode: body bytes between replicas, by role (relayed: received from owners; served: sent to other replicas)', labelNames: ['role'], registers });
  new Counter({
    name: 'pullthrough_cluster_failovers_total',
    help: 'Cluster mode: requests that went past the replica that should have served them (it could not be reached, or refused this replica) to the next in rendezvous order',
    registers,
    collect() {
      this.reset();
      this.inc(live.cluster?.().failovers ?? 0);
    },
  });
  new Gauge({
    name: 'pullthrough_cluster_members',
    help: 'Cluster mode: the replicas this one knows (itself included), and those it passes over for now (unreachable); no samples outside cluster mode',
    labelNames: ['state'],
    registers,
    collect() {
      const now = live.cluster?.();
      if (!now) return;
      this.set({ state: 'known' }, now.members);
      this.set({ state: 'unreachable' }, now.unreachable);
    },
  });

  const series = new RegistrySeries(MAX_REGISTRY_LABELS);
  const registryLabel = (host: string) => {
    const label = host.slice(0, MAX_LABEL_LENGTH);
    series.seen(label);
    return label;
  };
  return {
    registry,
    observe(entry) {
      if (entry.type === 'admin') return;
      if (entry.status === 407 && (entry.method === 'CONNECT' || entry.type === 'plain-http')) proxyAuth.inc();
      if (entry.method === 'CONNECT') {
        // Intercepted CONNECTs are logged as their requests; these are the others.
        if (entry.status !== 400 && entry.status !== 407) tunnels.inc({ status: statusLabel(entry.status) });
        if (entry.cache === 'TUNNEL') tunnelBytes.inc(entry.bytes);
        return;
      }
      const host = registryLabel(entry.host);
      const base = { registry: host, type: entry.type ?? 'other', cache: entry.cache ?? 'BYPASS' };
      const upstreamStatus = upstreamStatusOf(entry);
      if (upstreamStatus !== undefined) series.inc(upstream, { registry: host, status: statusLabel(upstreamStatus) });
      // A joiner's upstream time is its leader's: counted once, with the leader.
      if (entry.upstreamMs !== undefined && entry.cache !== 'JOINED') series.observe(upstreamDuration, { registry: host, type: base.type }, entry.upstreamMs / 1000);
      if (entry.peer !== undefined || entry.forPeer) {
        const role = entry.forPeer ? 'served' : 'relayed';
        peerRequests.inc({ role, type: base.type, cache: base.cache });
        peerBytes.inc({ role }, entry.bytes);
      }
      // Another replica's client: what upstream did for it is this replica's (counted above), the
      // client's request is the other replica's.
      if (entry.forPeer) return;
      series.inc(requests, { ...base, status: statusLabel(entry.status) });
      series.inc(bytes, base, entry.bytes);
      duration.observe({ type: base.type, cache: base.cache }, entry.ms / 1000);
      if (FROM_CACHE.has(base.cache)) series.inc(saved, { registry: host }, entry.bytes);
    },
    fillEnded(registryKey, outcome) {
      if (outcome.kind !== 'failed') return;
      const host = registryLabel(registryKey);
      series.inc(fillFailures, { registry: host, reason: outcome.mismatch ? 'digest_mismatch' : outcome.writeError ? 'cache_write' : 'upstream' });
      if (outcome.mismatch) series.inc(mismatches, { registry: host, type: 'blob' });
    },
    fillRetried(registryKey, offset) {
      series.inc(fillRetries, { registry: registryLabel(registryKey), kind: offset > 0 ? 'resume' : 'retry' });
    },
    digestMismatch(registryKey, type) {
      series.inc(mismatches, { registry: registryLabel(registryKey), type });
    },
  };
}

/** An HTTP status as a label: the code itself ("200", "429"), or "other" for what is not one. */
function statusLabel(status: number): string {
  return Number.isInteger(status) && status >= 100 && status <= 599 ? String(status) : 'other';
}

type RegistryMetric = Counter<string> | Histogram<string>;

/**
 * The series labelled by registry, that registry least recently seen first: at most `max` registries
 * are labelled, the oldest one's series are removed to make room for a new one.
 */
class RegistrySeries {
  private readonly max: number;
  /** Registry → metric → its label sets for that registry, by their JSON. */
  private readonly byRegistry = new Map<string, Map<RegistryMetric, Map<string, LabelValues<string>>>>();

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
    for (const [metric, labelSets] of its) for (const labels of labelSets.values()) metric.remove(labels);
    this.byRegistry.delete(oldest);
  }

  /** Counts on a series of a registry already seen(). */
  inc(counter: Counter<string>, labels: LabelValues<string> & { registry: string }, value = 1): void {
    this.track(counter, labels);
    counter.inc(labels, value);
  }

  /** Observes on a series of a registry already seen(). */
  observe(histogram: Histogram<string>, labels: LabelValues<string> & { registry: string }, value: number): void {
    this.track(histogram, labels);
    histogram.observe(labels, value);
  }

  private track(metric: RegistryMetric, labels: LabelValues<string> & { registry: string }): void {
    const its = this.byRegistry.get(labels.registry)!;
    let labelSets = its.get(metric);
    if (!labelSets) its.set(metric, (labelSets = new Map()));
    const key = JSON.stringify(labels);
    if (!labelSets.has(key)) labelSets.set(key, labels);
  }
}
