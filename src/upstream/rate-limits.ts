// Docker Hub's pull budget as upstream reports it (`ratelimit-limit: 100;w=21600`,
// `ratelimit-remaining: 76;w=21600`), kept per registry and per identity for the metrics and the
// dashboard. Docker Hub counts anonymous pulls by the proxy's address and authenticated ones by the
// account: two budgets of one registry, which must not overwrite each other.
import { HISTORY_MINUTES } from '../stats.ts';

export interface RateLimit {
  limit?: number;
  remaining?: number;
  /** Window in seconds, when given (w=…). */
  windowSeconds?: number;
  updatedAt: number;
}

/** One budget: a registry's, for one identity, with what it reported minute by minute. */
export interface Budget extends RateLimit {
  registry: string;
  /**
   * Whose budget: the AuthDecision's access of the request that reported it ('anonymous', 'central',
   * 'client'), or '' when the caller did not say.
   */
  identity: string;
  /** The last report of each minute, oldest first, within the dashboard's history (HISTORY_MINUTES). */
  history: Array<{ minute: number; remaining?: number; limit?: number }>;
}

/**
 * Budgets kept, the least recently reported forgotten first. Only registries the policy routes to
 * report one, and identities are a few kinds, so this bounds a policy, not a client.
 */
export const MAX_RATE_LIMITED_REGISTRIES = 256;

export class RateLimits {
  /** `registry identity` → its budget, the most recently reported last. */
  private readonly budgets = new Map<string, Budget>();
  private readonly now: () => number;

  constructor(now: () => number = Date.now) {
    this.now = now;
  }

  /** `identity`: whose budget the response counted against (see Budget.identity). */
  record(registry: string, headers: Record<string, string | string[] | undefined>, identity = ''): void {
    const limit = parse(headers['ratelimit-limit']);
    const remaining = parse(headers['ratelimit-remaining']);
    if (!limit && !remaining) return;
    const windowSeconds = remaining?.window ?? limit?.window;
    const key = `${registry} ${identity}`;
    const now = this.now();
    const history = this.budgets.get(key)?.history ?? [];
    this.budgets.delete(key);
    const budget: Budget = {
      registry,
      identity,
      ...(limit ? { limit: limit.value } : {}),
      ...(remaining ? { remaining: remaining.value } : {}),
      ...(windowSeconds !== undefined ? { windowSeconds } : {}),
      updatedAt: now,
      history,
    };
    this.budgets.set(key, budget);
    const minute = Math.floor(now / 60_000);
    const point = { minute, ...(remaining ? { remaining: remaining.value } : {}), ...(limit ? { limit: limit.value } : {}) };
    if (history.at(-1)?.minute === minute) history[history.length - 1] = point;
    else history.push(point);
    while (history[0]!.minute <= minute - HISTORY_MINUTES) history.shift();
    if (this.budgets.size > MAX_RATE_LIMITED_REGISTRIES) this.budgets.delete(this.budgets.keys().next().value!);
  }

  /** A registry's budget for `identity`; without one, the one it reported last. */
  get(registry: string, identity?: string): RateLimit | undefined {
    const budget = identity !== undefined ? this.budgets.get(`${registry} ${identity}`) : [...this.budgets.values()].findLast((b) => b.registry === registry);
    if (!budget) return undefined;
    const { registry: _registry, identity: _identity, history: _history, ...limit } = budget;
    return limit;
  }

  /** Every budget by `registry identity`, the least recently reported first. */
  all(): ReadonlyMap<string, Budget> {
    return this.budgets;
  }
}

function parse(header: string | string[] | undefined): { value: number; window?: number } | undefined {
  const text = Array.isArray(header) ? header[0] : header;
  const match = /^\s*(\d+)(?:\s*;\s*w=(\d+))?/.exec(text ?? '');
  if (!match) return undefined;
  return { value: Number(match[1]), ...(match[2] ? { window: Number(match[2]) } : {}) };
}
