// The warm-up list of the policy (warm: in proxy.yaml), kept warm by the running proxy: a run a short
// delay after it starts listening, then one every interval, never two at once. Each run is
// `pullthrough warm` (src/commands/warm.ts) through the proxy's own front on loopback, so the cache
// fills exactly as a client's pull fills it. Nothing here can stop the proxy: every failure is caught,
// logged and counted; an image that fails does not stop the others.
import { randomBytes } from 'node:crypto';
import type { Policy, ProxyUser } from '../config/policy.ts';
import type { WarmPolicy } from '../config/warm.ts';
import { warm, type WarmSummary } from './commands/warm.ts';
import type { Logger } from './log.ts';

export interface WarmRun {
  startedAt: number;
  durationMs: number;
  ok: number;
  failed: number;
}

/** What the metrics and the dashboard show. */
export interface WarmStatus {
  images: number;
  running: boolean;
  /** Runs so far by result: ok (every image warmed) or failed (at least one did not). */
  runs: { ok: number; failed: number };
  lastRun?: WarmRun;
  /** When the next run starts (absent: none is planned). */
  nextRunAt?: number;
}

export interface WarmScheduleOptions {
  warm: WarmPolicy;
  /** The front on loopback, e.g. http://127.0.0.1:3128. */
  proxyUrl: string;
  caPem: string;
  /** The proxy user the warm-up authenticates as, when users are configured. */
  user?: ProxyUser;
  /**
   * Cluster mode: whether this replica is the one that warms now. One replica's run fills every owner
   * (its pulls go to them); the others would only pull the same bytes through the peers again.
   */
  leads?: () => boolean;
  log: Logger;
}

export class WarmSchedule {
  private readonly options: WarmScheduleOptions;
  private readonly abort = new AbortController();
  private timer: NodeJS.Timeout | undefined;
  private current: Promise<void> | undefined;
  private closed = false;
  private readonly state: WarmStatus;

  constructor(options: WarmScheduleOptions) {
    this.options = options;
    this.state = { images: options.warm.images.length, running: false, runs: { ok: 0, failed: 0 } };
  }

  /** Plans the first run, `warm.delay` from now. */
  start(): void {
    if (this.options.warm.images.length === 0) return;
    this.plan(this.options.warm.delayMs);
  }

  status(): WarmStatus {
    return { ...this.state, runs: { ...this.state.runs }, ...(this.state.lastRun ? { lastRun: { ...this.state.lastRun } } : {}) };
  }

  /** No further run; the one in flight is cut and awaited. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    delete this.state.nextRunAt;
    this.abort.abort();
    await this.current;
  }

  private plan(delayMs: number): void {
    if (this.closed) return;
    this.state.nextRunAt = Date.now() + delayMs;
    this.timer = setTimeout(() => {
      // run() catches what warm() throws; this is for a mistake of its own, which must not stop the proxy either.
      this.current = this.run()
        .catch((err: Error) => this.options.log.error('warm-up: the run broke off', { error: err.message }))
        .finally(() => (this.current = undefined));
    }, delayMs);
    this.timer.unref();
  }

  private async run(): Promise<void> {
    const { warm: policy, log } = this.options;
    const startedAt = Date.now();
    if (this.options.leads && !this.options.leads()) {
      log.info('warm-up: another replica of the cluster runs it; this one asks again at the next interval');
      if (policy.intervalMs > 0) this.plan(policy.intervalMs);
      return;
    }
    delete this.state.nextRunAt;
    this.state.running = true;
    const failures = new Map<string, string>();
    const summaries: WarmSummary[] = [];
    try {
      await warm(
        policy.images.map((entry) => ({ image: entry.image, ...(entry.platforms ? { platforms: entry.platforms } : {}) })),
        {
          proxyUrl: this.options.proxyUrl,
          caPem: this.options.caPem,
          platforms: policy.platforms,
          ...(this.options.user ? { proxyUser: { name: this.options.user.name, password: this.options.user.password } } : {}),
          progress: false,
          out: () => {},
          warmed: (s) => {
            summaries.push(s);
            log.info('warm-up: image warmed', { image: s.image, platforms: s.platforms, ...(s.missing.length ? { missing: s.missing } : {}), manifests: s.manifests, blobs: s.blobs, bytes: s.bytes, cache: s.cache });
          },
          failed: (image, err) => {
            failures.set(image, err.message);
            log.warn('warm-up: an image failed', { image, error: err.message });
          },
          signal: this.abort.signal,
        },
      );
    } catch (err) {
      // The proxy closing, or what fails before any image (the proxy's own front not answering).
      for (const entry of policy.images) if (!summaries.some((s) => s.image === entry.image) && !failures.has(entry.image)) failures.set(entry.image, (err as Error).message);
      if (!this.closed) log.warn('warm-up: the run failed', { error: (err as Error).message });
    }
    this.state.running = false;
    if (this.closed) {
      log.info('warm-up: the run was stopped with the proxy', { ok: summaries.length, durationMs: Date.now() - startedAt });
      return;
    }
    const durationMs = Date.now() - startedAt;
    const run: WarmRun = { startedAt, durationMs, ok: summaries.length, failed: failures.size };
    this.state.lastRun = run;
    this.state.runs[run.failed === 0 ? 'ok' : 'failed']++;
    const sum = (pick: (s: WarmSummary) => number) => summaries.reduce((total, s) => total + pick(s), 0);
    log.info('warm-up: run finished', {
      images: policy.images.length,
      ok: run.ok,
      failed: run.failed,
      manifests: sum((s) => s.manifests),
      blobs: sum((s) => s.blobs),
      bytes: sum((s) => s.bytes),
      durationMs,
    });
    if (policy.intervalMs > 0) this.plan(Math.max(0, startedAt + policy.intervalMs - Date.now()));
  }
}

/**
 * With proxy users configured, the warm-up is a user too: an internal one, added at start, whose
 * random password is in no file and no log, and who may read everything ("*").
 */
export function addWarmUser(policy: Policy): ProxyUser | undefined {
  if (policy.users.size === 0 || policy.warm.images.length === 0) return undefined;
  let name = 'pullthrough-warm';
  while (policy.users.has(name)) name = `pullthrough-warm-${randomBytes(4).toString('hex')}`;
  const user: ProxyUser = { name, password: randomBytes(32).toString('hex'), read: ['*'] };
  policy.users.set(name, user);
  return user;
}

/** Where the proxy's own front is reached from itself: 0.0.0.0 as 127.0.0.1, :: as ::1. */
export function loopbackUrl(host: string, port: number): string {
  const reachable = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '::1' : host;
  return `http://${reachable.includes(':') ? `[${reachable}]` : reachable}:${port}`;
}
