// Docker Hub's pull budget as upstream reports it (`ratelimit-limit: 100;w=21600`,
// `ratelimit-remaining: 76;w=21600`), kept per registry for the metrics and the dashboard.

export interface RateLimit {
  limit?: number;
  remaining?: number;
  /** Window in seconds, when given (w=…). */
  windowSeconds?: number;
  updatedAt: number;
}

/**
 * Registries whose budget is kept, the least recently reported forgotten first. Only registries the
 * policy routes to report one, so this bounds a policy, not a client.
 */
export const MAX_RATE_LIMITED_REGISTRIES = 256;

export class RateLimits {
  private readonly byRegistry = new Map<string, RateLimit>();

  record(registry: string, headers: Record<string, string | string[] | undefined>): void {
    const limit = parse(headers['ratelimit-limit']);
    const remaining = parse(headers['ratelimit-remaining']);
    if (!limit && !remaining) return;
    const windowSeconds = remaining?.window ?? limit?.window;
    this.byRegistry.delete(registry); // the most recently reported last
    this.byRegistry.set(registry, {
      ...(limit ? { limit: limit.value } : {}),
      ...(remaining ? { remaining: remaining.value } : {}),
      ...(windowSeconds !== undefined ? { windowSeconds } : {}),
      updatedAt: Date.now(),
    });
    if (this.byRegistry.size > MAX_RATE_LIMITED_REGISTRIES) this.byRegistry.delete(this.byRegistry.keys().next().value!);
  }

  get(registry: string): RateLimit | undefined {
    return this.byRegistry.get(registry);
  }

  all(): ReadonlyMap<string, RateLimit> {
    return this.byRegistry;
  }
}

function parse(header: string | string[] | undefined): { value: number; window?: number } | undefined {
  const text = Array.isArray(header) ? header[0] : header;
  const match = /^\s*(\d+)(?:\s*;\s*w=(\d+))?/.exec(text ?? '');
  if (!match) return undefined;
  return { value: Number(match[1]), ...(match[2] ? { window: Number(match[2]) } : {}) };
}
