// An open-loop load generator: requests are scheduled on a clock at a fixed rate, whether or not the
// earlier ones have been answered, and each latency is measured from the request's *scheduled* time
// (as wrk2 does). A server that stalls for 200 ms then shows 200 ms of latency on every request
// scheduled during the stall, instead of one slow request and a pause in sending ("coordinated
// omission", which a closed loop — send, wait, send — hides).
//
// The clock is Node's timers (1 ms resolution): at 2,000 requests/s several requests leave in one tick,
// up to ~1 ms after their scheduled time. That send lag is part of every latency here, on both sides of
// a comparison alike, and is reported on its own (lag percentiles) so it can be told apart. A busy-wait
// would be more precise but would take a core from the server being measured on a 2-core machine.
//
// Bounded in count (rate × duration requests) and in time (duration + drainMs; whatever is still
// unanswered then is counted as unfinished and left to the caller to abort, e.g. by destroying its pool).

export interface OpenLoopOptions {
  /** Requests per second. */
  rate: number;
  durationMs: number;
  /** After the last scheduled request, how long the outstanding ones may take to finish. */
  drainMs: number;
  /** Sends one request and resolves with undefined when its answer was right, else with what was wrong. */
  send: () => Promise<string | undefined>;
}

export interface OpenLoopResult {
  rate: number;
  durationMs: number;
  scheduled: number;
  /** Answered, and the answer was right. */
  ok: number;
  /** Wrong answers and failed requests, by what went wrong. */
  errors: Record<string, number>;
  /** Still outstanding when the drain time was up. */
  unfinished: number;
  /** ok / (from the first scheduled time to the last answer, or the duration if longer). */
  achievedRate: number;
  /** Of the right answers, from scheduled time to the last byte of the body, ms. */
  latency: Percentiles;
  /**
   * Of the right answers, from the moment the request was handed to the client (send time) to the last
   * byte: the latency without the generator's own send lag (a stall of the server still shows, since
   * requests keep being sent during it; a stall of the generator's event loop does not). For comparison.
   */
  service: Percentiles;
  /** Send time − scheduled time, ms: the generator's own lateness (timer resolution, a busy event loop). */
  lag: Percentiles;
  /** The most requests outstanding at once (queued in the client or on the wire). */
  maxOutstanding: number;
}

export interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

export function runOpenLoop(options: OpenLoopOptions): Promise<OpenLoopResult> {
  const { rate, durationMs, drainMs, send } = options;
  const total = Math.max(1, Math.floor((rate * durationMs) / 1000));
  const interval = 1000 / rate;
  const latencies = new Float64Array(total);
  const services = new Float64Array(total);
  const lags = new Float64Array(total);
  const errors: Record<string, number> = {};
  let ok = 0;
  let answered = 0;
  let outstanding = 0;
  let maxOutstanding = 0;
  let lastAnswer = 0;
  let next = 0;
  let sent = 0;
  let finished = false;
  const start = performance.now() + 2;
  const due = (i: number) => start + i * interval;

  return new Promise((resolve) => {
    let drainTimer: NodeJS.Timeout | undefined;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(drainTimer);
      const window = Math.max(durationMs, lastAnswer - start);
      const okLatencies = latencies.subarray(0, ok);
      resolve({
        rate,
        durationMs,
        scheduled: total,
        ok,
        errors,
        unfinished: total - answered,
        achievedRate: ok / (window / 1000),
        latency: percentiles(okLatencies),
        service: percentiles(services.subarray(0, ok)),
        lag: percentiles(lags.subarray(0, sent)),
        maxOutstanding,
      });
    };
    const fire = (scheduled: number) => {
      const sentAt = performance.now();
      lags[sent++] = sentAt - scheduled;
      outstanding++;
      if (outstanding > maxOutstanding) maxOutstanding = outstanding;
      const done = (error: string | undefined) => {
        if (finished) return;
        const now = performance.now();
        outstanding--;
        answered++;
        lastAnswer = now;
        if (error === undefined) {
          services[ok] = now - sentAt;
          latencies[ok++] = now - scheduled;
        }
        else errors[error] = (errors[error] ?? 0) + 1;
        if (next >= total && outstanding === 0) finish();
      };
      send().then(done, (err: Error) => done(describeError(err)));
    };
    const pump = () => {
      const now = performance.now();
      while (next < total && due(next) <= now) fire(due(next++));
      if (next < total) {
        setTimeout(pump, Math.max(0, due(next) - performance.now()));
      } else if (outstanding === 0) {
        finish();
      } else {
        drainTimer = setTimeout(finish, drainMs);
      }
    };
    setTimeout(pump, Math.max(0, start - performance.now()));
  });
}

/** Percentiles by the nearest-rank method (the value below which q of the samples lie). */
export function percentiles(values: Float64Array): Percentiles {
  if (values.length === 0) return { p50: Number.NaN, p90: Number.NaN, p99: Number.NaN, p999: Number.NaN, max: Number.NaN, mean: Number.NaN };
  const sorted = Float64Array.from(values).sort();
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
  let sum = 0;
  for (const v of sorted) sum += v;
  return { p50: at(0.5), p90: at(0.9), p99: at(0.99), p999: at(0.999), max: sorted[sorted.length - 1]!, mean: sum / sorted.length };
}

/** A short, stable key for an error (undici's codes, else the first words of the message). */
function describeError(err: Error): string {
  const code = (err as Error & { code?: string }).code;
  return code ?? err.message.slice(0, 80);
}
