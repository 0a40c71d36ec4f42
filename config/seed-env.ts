// The environment variables of rpardini/docker-registry-proxy, mapped onto the policy so that its users
// can switch by changing only the image. Each variable below changes exactly the keys its comment names.
import { parseDuration, parseSize } from './units.ts';
import { makeTier, defaultManifestPolicy } from './defaults.ts';
import { registryKey, type Policy, type RegistryPolicy } from './policy.ts';
import { ConfigError } from './yaml-cursor.ts';

/** Docker Hub is always intercepted by the seed: the registry and its token realm. */
const DOCKER_HUB = 'registry-1.docker.io';
const DOCKER_HUB_REALM = 'auth.docker.io';

export function applySeedEnvironment(policy: Policy, env: NodeJS.ProcessEnv): void {
  const value = (name: string) => (env[name] !== undefined && env[name] !== '' ? env[name] : undefined);
  const parse = <T>(name: string, parser: (text: string) => T): T | undefined => {
    const text = value(name);
    if (text === undefined) return undefined;
    try {
      return parser(text);
    } catch (err) {
      throw new ConfigError(`${name}=${JSON.stringify(text)}: ${(err as Error).message}`);
    }
  };
  const bool = (text: string) => {
    if (/^(true|yes|on|1)$/i.test(text)) return true;
    if (/^(false|no|off|0)$/i.test(text)) return false;
    throw new Error('expected true or false');
  };

  // REGISTRIES="quay.io gcr.io k8s.gcr.io": each becomes registries.<host> with the defaults.
  const listed = value('REGISTRIES')?.split(/\s+/).filter(Boolean) ?? [];
  const authEntries = parseAuthRegistries(env);
  if (listed.length > 0 || authEntries.length > 0) {
    for (const host of [DOCKER_HUB, DOCKER_HUB_REALM, ...listed]) ensureRegistry(policy, host);
  }
  // AUTH_REGISTRIES="host:user:password …" → registries.<host>.auth; auth.docker.io means Docker Hub.
  for (const { host, username, password } of authEntries) {
    if (host === DOCKER_HUB_REALM || host === DOCKER_HUB) {
      ensureRegistry(policy, DOCKER_HUB).auth = { realm: DOCKER_HUB_REALM, username, password };
    } else {
      ensureRegistry(policy, host).auth = { username, password };
    }
  }

  // ENABLE_MANIFEST_CACHE and MANIFEST_CACHE_*: the global manifests policy (inherited by every registry
  // that does not override it in proxy.yaml).
  const manifests = policy.manifests;
  const enabled = parse('ENABLE_MANIFEST_CACHE', bool);
  if (enabled !== undefined) manifests.enabled = enabled;
  const seedDefaults = defaultManifestPolicy();
  const tiersFromEnv = ['PRIMARY', 'SECONDARY'].map((tier, i) => ({
    regex: value(`MANIFEST_CACHE_${tier}_REGEX`),
    ttl: parse(`MANIFEST_CACHE_${tier}_TIME`, parseDuration),
    fallback: manifests.tiers[i] ?? seedDefaults.tiers[i]!,
  }));
  if (tiersFromEnv.some((t) => t.regex !== undefined || t.ttl !== undefined)) {
    manifests.tiers = tiersFromEnv.map((t, i) => {
      const match = t.regex ?? t.fallback.match;
      try {
        return makeTier(match, t.ttl ?? t.fallback.ttlMs);
      } catch (err) {
        throw new ConfigError(`MANIFEST_CACHE_${i === 0 ? 'PRIMARY' : 'SECONDARY'}_REGEX: ${(err as Error).message}`);
      }
    });
  }
  const defaultTtl = parse('MANIFEST_CACHE_DEFAULT_TIME', parseDuration);
  if (defaultTtl !== undefined) manifests.defaultTtlMs = defaultTtl;

  // ALLOW_PUSH=true → push: bypass everywhere; VERIFY_SSL=false → tls.verify: false everywhere.
  const allowPush = parse('ALLOW_PUSH', bool);
  const verify = parse('VERIFY_SSL', bool);
  if (allowPush !== undefined) policy.defaults.push = allowPush ? 'bypass' : 'deny';
  if (verify !== undefined) policy.defaults.tlsVerify = verify;
  for (const registry of policy.registries.values()) {
    if (allowPush !== undefined) registry.push = policy.defaults.push;
    if (verify !== undefined) registry.tls.verify = verify;
  }

  const maxSize = parse('CACHE_MAX_SIZE', parseSize);
  if (maxSize !== undefined) policy.cache.maxSize = maxSize;
  const disableIpv6 = parse('DISABLE_IPV6', bool);
  if (disableIpv6 !== undefined) policy.ipv6 = !disableIpv6;
  const buffering = parse('PROXY_REQUEST_BUFFERING', bool);
  if (buffering !== undefined) policy.requestBuffering = buffering;

  // nginx timeouts → defaults.timeouts (inherited by registries without their own) and tunnel.timeouts.
  const t = policy.defaults.timeouts;
  const longest = (...names: string[]) => {
    const found = names.map((n) => parse(n, parseDuration)).filter((v): v is number => v !== undefined);
    return found.length > 0 ? Math.max(...found) : undefined;
  };
  t.clientHeaderMs = longest('CLIENT_HEADER_TIMEOUT') ?? t.clientHeaderMs;
  t.clientIdleMs = longest('CLIENT_BODY_TIMEOUT', 'SEND_TIMEOUT') ?? t.clientIdleMs;
  t.keepAliveMs = longest('KEEPALIVE_TIMEOUT') ?? t.keepAliveMs;
  t.connectMs = longest('PROXY_CONNECT_TIMEOUT') ?? t.connectMs;
  const upstreamRead = longest('PROXY_READ_TIMEOUT');
  if (upstreamRead !== undefined) t.headersMs = upstreamRead;
  t.idleMs = longest('PROXY_READ_TIMEOUT', 'PROXY_SEND_TIMEOUT') ?? t.idleMs;
  policy.tunnel.connectTimeoutMs = longest('PROXY_CONNECT_CONNECT_TIMEOUT') ?? policy.tunnel.connectTimeoutMs;
  policy.tunnel.idleTimeoutMs = longest('PROXY_CONNECT_READ_TIMEOUT', 'PROXY_CONNECT_SEND_TIMEOUT') ?? policy.tunnel.idleTimeoutMs;
}

interface AuthEntry {
  host: string;
  username: string;
  password: string;
}

/**
 * AUTH_REGISTRIES is a list of "host<d>user<d>password" entries separated by AUTH_REGISTRIES_DELIMITER
 * (default a space), with <d> = AUTH_REGISTRY_DELIMITER (default ":"). The password is everything after
 * the second delimiter, so it may contain the delimiter itself (a GCR `_json_key` JSON document).
 */
export function parseAuthRegistries(env: NodeJS.ProcessEnv): AuthEntry[] {
  const text = env.AUTH_REGISTRIES;
  if (!text) return [];
  const between = env.AUTH_REGISTRIES_DELIMITER || ' ';
  const within = env.AUTH_REGISTRY_DELIMITER || ':';
  return text
    .split(between)
    .filter((entry) => entry.trim() !== '')
    .map((entry, i) => {
      const first = entry.indexOf(within);
      const second = first < 0 ? -1 : entry.indexOf(within, first + within.length);
      if (second < 0) {
        throw new ConfigError(
          `AUTH_REGISTRIES: entry ${i + 1} is not host${within}username${within}password ` +
            `(set AUTH_REGISTRIES_DELIMITER / AUTH_REGISTRY_DELIMITER if your values contain "${between}" or "${within}")`,
        );
      }
      return {
        host: entry.slice(0, first).trim().toLowerCase(),
        username: entry.slice(first + within.length, second),
        password: entry.slice(second + within.length),
      };
    });
}

function ensureRegistry(policy: Policy, name: string): RegistryPolicy {
  const [host, portText] = name.split(':') as [string, string | undefined];
  const port = portText ? Number(portText) : 443;
  if (!/^[a-z0-9.-]+$/i.test(host) || !(port >= 1 && port <= 65535)) {
    throw new ConfigError(`REGISTRIES: "${name}" is not a host or host:port`);
  }
  const key = registryKey(host, port);
  let registry = policy.registries.get(key);
  if (!registry) {
    registry = {
      key,
      host: host.toLowerCase(),
      port,
      http: false,
      tokenServiceFor: [],
      tls: { verify: policy.defaults.tlsVerify },
      push: policy.defaults.push,
      timeouts: policy.defaults.timeouts,
      manifests: policy.manifests,
    };
    policy.registries.set(key, registry);
  }
  return registry;
}
