// The effective policy as YAML for `check-config`: every default filled in, every secret masked.
import type { MirrorPolicy } from './mirror.ts';
import { stringify } from 'yaml';
import { proxyUrlForDisplay, type ManifestPolicy, type Policy, type Timeouts, type UpstreamProxy } from './policy.ts';
import { formatDuration, formatSize } from './units.ts';

const MASK = '********';

export function describePolicy(policy: Policy): string {
  const timeouts = (t: Timeouts) => ({
    connect: formatDuration(t.connectMs),
    headers: formatDuration(t.headersMs),
    idle: formatDuration(t.idleMs),
    clientIdle: formatDuration(t.clientIdleMs),
    clientHeader: formatDuration(t.clientHeaderMs),
    keepAlive: formatDuration(t.keepAliveMs),
  });
  const manifests = (m: ManifestPolicy) => ({
    enabled: m.enabled,
    tiers: m.tiers.map((tier) => ({ match: tier.match, ttl: formatDuration(tier.ttlMs) })),
    defaultTtl: formatDuration(m.defaultTtlMs),
    maxStale: formatDuration(m.maxStaleMs),
  });
  const registries = Object.fromEntries(
    [...policy.registries.values()].map((r) => [
      r.key,
      {
        ...(r.http ? { http: true } : {}),
        ...(r.tokenServiceFor.length > 0 ? { tokenServiceFor: r.tokenServiceFor } : {}),
        push: r.push,
        tls: { verify: r.tls.verify, ...(r.tls.caFile ? { ca: r.tls.caFile } : {}) },
        ...(r.auth
          ? { auth: { ...(r.auth.realm ? { realm: r.auth.realm } : {}), username: r.auth.username, password: MASK } }
          : {}),
        timeouts: timeouts(r.timeouts),
        manifests: manifests(r.manifests),
        ...upstreamProxy(r.upstreamProxy),
      },
    ]),
  );
  const effective = {
    source: policy.source,
    listen: `${policy.listen.host.includes(':') ? `[${policy.listen.host}]` : policy.listen.host}:${policy.listen.port}`,
    dataDir: policy.dataDir,
    caDir: policy.caDir,
    cache: { maxSize: formatSize(policy.cache.maxSize), minFree: formatSize(policy.cache.minFree), readCheckTtl: formatDuration(policy.cache.readCheckTtlMs) },
    manifests: manifests(policy.manifests),
    defaults: {
      push: policy.defaults.push,
      tls: { verify: policy.defaults.tlsVerify },
      timeouts: timeouts(policy.defaults.timeouts),
      ...upstreamProxy(policy.defaults.upstreamProxy),
    },
    registries,
    tunnel: {
      allow: policy.tunnel.allow,
      deny: policy.tunnel.deny,
      timeouts: { connect: formatDuration(policy.tunnel.connectTimeoutMs), idle: formatDuration(policy.tunnel.idleTimeoutMs) },
    },
    // No token: state-changing admin actions are accepted from loopback clients only.
    admin: { ...(policy.admin.token ? { token: MASK } : {}), ...(policy.admin.tokenFile ? { tokenFile: policy.admin.tokenFile } : {}) },
    ...(policy.mirror ? { mirror: mirrorDescription(policy.mirror) } : {}),
    users: Object.fromEntries([...policy.users.values()].map((u) => [u.name, { password: MASK, read: u.read }])),
    hosts: Object.fromEntries(policy.hosts),
    ipv6: policy.ipv6,
    requestBuffering: policy.requestBuffering,
    workers: policy.workers,
  };
  return stringify(effective, { lineWidth: 0 });
}

/**
 * upstreamProxy as configured (`none`, `env`, or the URL with its password masked); with `env`, what
 * the environment gave (environmentProxy); noProxy with NO_PROXY's entries when they apply.
 */
function upstreamProxy(proxy: UpstreamProxy | undefined): Record<string, unknown> {
  if (!proxy) return { upstreamProxy: 'none', noProxy: [] };
  const shown = (url: string | undefined) => (url ? proxyUrlForDisplay(url, MASK) : 'none');
  return {
    upstreamProxy: proxy.mode === 'url' ? shown(proxy.https) : proxy.mode,
    ...(proxy.mode === 'env' ? { environmentProxy: { https: shown(proxy.https), http: shown(proxy.http) } } : {}),
    noProxy: [...proxy.noProxy, ...(proxy.mode === 'env' ? (proxy.environmentNoProxy ?? []) : [])],
  };
}

/** The mirror front as it will run: plain HTTP or the TLS it has, and where unnamed requests go. */
function mirrorDescription(mirror: MirrorPolicy): Record<string, unknown> {
  return {
    listen: `${mirror.listen.host.includes(':') ? `[${mirror.listen.host}]` : mirror.listen.host}:${mirror.listen.port}`,
    ...(mirror.tls ? { tls: { ...(mirror.tls.names.length ? { names: mirror.tls.names } : {}), ...(mirror.tls.certFile ? { cert: mirror.tls.certFile, key: mirror.tls.keyFile } : {}) } } : {}),
    default: mirror.defaultRegistry ?? null,
  };
}
