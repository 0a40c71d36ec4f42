// Built-in defaults: what a key means when proxy.yaml does not set it.
import type { ManifestPolicy, Timeouts, TtlTier } from './policy.ts';

/** Copied, never shared: the seed's variables change the copy in place. */
export const DEFAULT_TIMEOUTS: Readonly<Timeouts> = {
  connectMs: 30_000,
  headersMs: 60_000,
  idleMs: 60_000,
  clientIdleMs: 300_000,
  clientHeaderMs: 60_000,
  keepAliveMs: 60_000,
};

const DAY = 86_400_000;

/** The seed's tiers: primary (stable|nightly|production|test) 10m, secondary "versioned" 60d; default 1h. */
const SEED_TIERS: ReadonlyArray<{ match: string; ttlMs: number }> = [
  { match: '(stable|nightly|production|test)', ttlMs: 10 * 60_000 },
  { match: '.*\\d.*\\d.*\\d.*', ttlMs: 60 * DAY },
];

export function defaultManifestPolicy(): ManifestPolicy {
  return {
    enabled: true,
    tiers: SEED_TIERS.map(({ match, ttlMs }) => makeTier(match, ttlMs)),
    defaultTtlMs: 3_600_000,
    maxStaleMs: 7 * DAY,
  };
}

export function makeTier(match: string, ttlMs: number): TtlTier {
  return { match, regex: new RegExp(`^(?:${match})$`), ttlMs };
}

