// The effective policy as the documentation tests compare it: what `check-config` prints, flattened
// to key paths, and values compared the way the documentation writes them.
import { parse } from 'yaml';
import { describePolicy } from '../../config/describe.ts';
import type { Policy } from '../../config/policy.ts';
import { parseDuration, parseSize } from '../../config/units.ts';

/** describePolicy's YAML (what `check-config` prints), parsed. */
export function described(policy: Policy): Record<string, unknown> {
  return parse(describePolicy(policy)) as Record<string, unknown>;
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
