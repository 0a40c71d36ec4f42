// What to do with a CONNECT: parse its target strictly, then intercept (a registry in the policy),
// tunnel (allowed by tunnel.allow and not by tunnel.deny) or deny.
import { isIP } from 'node:net';
import { registryKey, type Policy, type RegistryPolicy } from '../config/policy.ts';

export interface Target {
  /** Lower-case host name or bare IP literal (no brackets). */
  host: string;
  port: number;
}

export type Decision =
  | { kind: 'intercept'; registry: RegistryPolicy }
  | { kind: 'tunnel' }
  | { kind: 'deny'; reason: string };

const HOST_NAME = /^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$/;

/** Parses "host:port" or "[v6]:port"; returns a message for anything else. */
export function parseTarget(text: string | undefined): Target | { error: string } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]+)):(\d{1,5})$/.exec(text ?? '');
  if (!match) return { error: `CONNECT needs host:port, got "${truncate(text ?? '')}"` };
  const port = Number(match[3]);
  if (port < 1 || port > 65535) return { error: `port ${match[3]} is out of range (1-65535)` };
  const host = (match[1] ?? match[2]!).toLowerCase();
  if (match[1] !== undefined ? isIP(host) !== 6 : !(isIP(host) === 4 || HOST_NAME.test(host))) {
    return { error: `"${truncate(host)}" is not a host name or IP address` };
  }
  return { host: host.replace(/\.$/, ''), port };
}

export function decide(policy: Policy, target: Target): Decision {
  const registry = policy.registries.get(registryKey(target.host, target.port));
  if (registry && !registry.http) return { kind: 'intercept', registry };
  const hostPort = `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
  if (policy.tunnel.deny.some((pattern) => matchesPattern(pattern, target))) {
    return { kind: 'deny', reason: `${hostPort} is denied by tunnel.deny` };
  }
  if (tunnelAllowList(policy).some((pattern) => matchesPattern(pattern, target))) return { kind: 'tunnel' };
  return { kind: 'deny', reason: `${hostPort} is not in tunnel.allow` };
}

/** tunnel.allow, plus the ports of the configured registries (so that a registry's CDN on the same port works). */
function tunnelAllowList(policy: Policy): string[] {
  const registryPorts = [...new Set([...policy.registries.values()].map((r) => r.port))];
  return [...policy.tunnel.allow, ...registryPorts.map((port) => `*:${port}`)];
}

/** "host-glob:port" where the glob's * matches any characters and the port is a number or *. */
export function matchesPattern(pattern: string, target: Target): boolean {
  const colon = pattern.lastIndexOf(':');
  const hostGlob = pattern.slice(0, colon).replace(/^\[(.*)\]$/, '$1').toLowerCase();
  const port = pattern.slice(colon + 1);
  if (port !== '*' && Number(port) !== target.port) return false;
  const regex = new RegExp(`^${hostGlob.split('*').map(escapeRegex).join('.*')}$`);
  return regex.test(target.host);
}

function escapeRegex(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function truncate(text: string): string {
  return text.length > 80 ? `${text.slice(0, 80)}…` : text;
}
