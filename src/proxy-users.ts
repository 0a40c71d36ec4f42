// Proxy users (`users:` in proxy.yaml): who is on the other end of a CONNECT, proven with
// Proxy-Authorization: Basic (what HTTPS_PROXY=http://user:pass@proxy:3128 makes Go and curl send),
// and which repositories each may read ("registry/repository" globs).
import { createHash, timingSafeEqual } from 'node:crypto';
import type { Policy, ProxyUser, RegistryPolicy } from '../config/policy.ts';

export type ProxyAuthentication =
  /** No users configured: every client may use the proxy. */
  | { kind: 'open' }
  | { kind: 'user'; user: ProxyUser }
  /** `user`: the name the client gave, for the log (never the password). */
  | { kind: 'refused'; reason: string; user?: string };

export function authenticateProxyUser(policy: Policy, header: string | undefined): ProxyAuthentication {
  if (policy.users.size === 0) return { kind: 'open' };
  const match = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header ?? '');
  if (!match) return { kind: 'refused', reason: header ? 'Proxy-Authorization is not Basic' : 'proxy users are configured: Proxy-Authorization is required' };
  const decoded = Buffer.from(match[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  const name = colon < 0 ? decoded : decoded.slice(0, colon);
  const password = colon < 0 ? '' : decoded.slice(colon + 1);
  const user = policy.users.get(name);
  // Compared as hashes, in constant time, also for unknown users (no timing difference to probe names).
  const valid = sameSecret(password, user?.password ?? '\0no such user');
  if (!user || !valid) return { kind: 'refused', reason: 'wrong proxy user or password', user: name };
  return { kind: 'user', user };
}

function sameSecret(a: string, b: string): boolean {
  return timingSafeEqual(createHash('sha256').update(a).digest(), createHash('sha256').update(b).digest());
}

/**
 * Does one of the user's `read` globs match "registry/repository"? The registry is written as clients
 * name it: the host, with :port unless 443 (Docker Hub also as docker.io). `*` matches any characters,
 * slashes included.
 */
export function mayRead(user: ProxyUser, registry: Pick<RegistryPolicy, 'host' | 'port'>, repository: string): boolean {
  const names = registryNames(registry).map((name) => `${name}/${repository}`);
  return user.read.some((pattern) => {
    const regex = globRegex(pattern);
    return names.some((name) => regex.test(name));
  });
}

function registryNames(registry: Pick<RegistryPolicy, 'host' | 'port'>): string[] {
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  const names = [`${host}:${registry.port}`];
  if (registry.port === 443) names.push(host);
  if (registry.host === 'registry-1.docker.io' && registry.port === 443) names.push('docker.io', 'index.docker.io');
  return names;
}

const globs = new Map<string, RegExp>();

function globRegex(pattern: string): RegExp {
  let regex = globs.get(pattern);
  if (!regex) {
    regex = new RegExp(`^${pattern.toLowerCase().split('*').map((part) => part.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`);
    globs.set(pattern, regex);
  }
  return regex;
}
