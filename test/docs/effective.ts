// The effective policy as the documentation tests compare it: what `check-config` prints, flattened
// to key paths, and values compared the way the documentation writes them.
import { parse } from 'yaml';
import { describePolicy } from '../../config/describe.ts';
import type { Policy } from '../../config/policy.ts';
import { parseDuration, parseSize } from '../../config/units.ts';

/**
 * describePolicy's YAML (what `check-config` prints), parsed, with the settings it prints as comments
 * because proxy.yaml has no key for them (`# requestBuffering: true` in its header) as keys.
 */
export function described(policy: Policy): Record<string, unknown> {
  const text = describePolicy(policy);
  const header = text.slice(0, text.search(/^[^#\n]/m));
  const notes = Object.fromEntries([...header.matchAll(/^# (source|requestBuffering): (.*)$/gm)].map((m) => [m[1]!, parse(m[2]!) as unknown]));
  return { ...notes, ...(parse(text) as Record<string, unknown>) };
}

/**
 * Each registry as it applies: check-config prints what a registry sets otherwise than `defaults:` and
 * the top-level `manifests:` once, and here they are filled in again (mapping by mapping, as the loader
 * inherits them), so that `registries.*.push` can be compared with what the row of a table claims.
 */
export function withInheritedSettings(effective: Record<string, unknown>): Record<string, unknown> {
  const inherited = { ...(effective.defaults as Record<string, unknown>), manifests: effective.manifests };
  const registries = Object.fromEntries(Object.entries((effective.registries ?? {}) as Record<string, Record<string, unknown>>).map(([key, own]) => [key, merge(inherited, own)]));
  return { ...effective, registries };
}

function merge(base: Record<string, unknown>, own: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(own)) {
    const from = base[key];
    out[key] = isRecord(value) && isRecord(from) ? merge(from, value) : value;
  }
  return out;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Leaf path → value, paths written as the documentation writes them: `a.b[0].c` (registry keys keep
 * their dots). Empty lists and mappings are leaves.
 */
export function flatten(value: unknown, prefix = '', out = new Map<string, unknown>()): Map<string, unknown> {
  if (Array.isArray(value) && value.length > 0) {
    value.forEach((item, i) => flatten(item, `${prefix}[${i}]`, out));
  } else if (value !== null && typeof value === 'object' && !Array.isArray(value) && Object.keys(value).length > 0) {
    for (const [key, child] of Object.entries(value)) flatten(child, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out.set(prefix, value);
  }
  return out;
}

/** Equal as text, or as the same duration or size written differently (`60s` and `1m`, `32g` and `32GiB`). */
export function sameValue(actual: unknown, documented: string): boolean {
  const text = typeof actual === 'string' ? actual : JSON.stringify(actual);
  if (text === documented) return true;
  for (const parseAs of [parseDuration, parseSize]) {
    try {
      if (parseAs(text) === parseAs(documented)) return true;
    } catch {
      // not that kind of value
    }
  }
  return false;
}
