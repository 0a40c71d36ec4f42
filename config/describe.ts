// The effective policy as YAML for `check-config`: every default filled in, every secret masked, and
// itself a proxy.yaml: each registry shows only what it sets otherwise than the defaults it inherits
// (which are printed once), and what has no proxy.yaml key (NOT_KEYS) is printed as a comment.
import { formatPeer } from './cluster.ts';
import type { MirrorPolicy } from './mirror.ts';
import { Document, isMap, isScalar, Scalar, stringify, type YAMLMap } from 'yaml';
import { proxyUrlForDisplay, type ManifestPolicy, type Policy, type Timeouts, type UpstreamProxy } from './policy.ts';
import { formatDuration, formatSize } from './units.ts';

const MASK = '********';
/** Shown for information only, as `# key: value` comments: proxy.yaml has no such keys. */
const NOT_KEYS = new Set(['source', 'requestBuffering', 'tokenServiceFor', 'environmentProxy']);

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
  const defaults = {
    push: policy.defaults.push,
    tls: { verify: policy.defaults.tlsVerify },
    timeouts: timeouts(policy.defaults.timeouts),
    ...upstreamProxy(policy.defaults.upstreamProxy),
  };
  /** What a registry that sets nothing of its own applies. */
  const inherited = { ...defaults, manifests: manifests(policy.manifests) };
  const registries = Object.fromEntries(
    [...policy.registries.values()].map((r) => [
      r.key,
      ownSettings(inherited, {
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
      }),
    ]),
  );
  const effective = {
    source: policy.source,
    listen: `${policy.listen.host.includes(':') ? `[${policy.listen.host}]` : policy.listen.host}:${policy.listen.port}`,
    dataDir: policy.dataDir,
    caDir: policy.caDir,
    cache: { maxSize: formatSize(policy.cache.maxSize), minFree: formatSize(policy.cache.minFree), readCheckTtl: formatDuration(policy.cache.readCheckTtlMs), prefetch: policy.cache.prefetch },
    manifests: manifests(policy.manifests),
    defaults,
    registries,
    tunnel: {
      allow: policy.tunnel.allow,
      deny: policy.tunnel.deny,
      timeouts: { connect: formatDuration(policy.tunnel.connectTimeoutMs), idle: formatDuration(policy.tunnel.idleTimeoutMs) },
    },
    // No token: state-changing admin actions are accepted from loopback clients only.
    admin: { ...(policy.admin.token ? { token: MASK } : {}), ...(policy.admin.tokenFile ? { tokenFile: policy.admin.tokenFile } : {}) },
    ...(policy.mirror ? { mirror: mirrorDescription(policy.mirror) } : {}),
    ...(policy.cluster
      ? {
          cluster: {
            peers: policy.cluster.peers.map(formatPeer),
            self: formatPeer(policy.cluster.self),
            listen: formatPeer(policy.cluster.listen),
            secret: MASK,
            refresh: formatDuration(policy.cluster.refreshMs),
          },
        }
      : {}),
    users: Object.fromEntries([...policy.users.values()].map((u) => [u.name, { password: MASK, read: u.read }])),
    hosts: Object.fromEntries([...policy.hosts].map(([name, addresses]) => [name, addresses.length === 1 ? addresses[0] : addresses])),
    ipv6: policy.ipv6,
    requestBuffering: policy.requestBuffering,
    workers: policy.workers,
    warm: {
      interval: formatDuration(policy.warm.intervalMs),
      delay: formatDuration(policy.warm.delayMs),
      platforms: policy.warm.platforms,
      images: policy.warm.images.map((i) => (i.platforms ? { image: i.image, platforms: i.platforms } : i.image)),
    },
  };
  const doc = new Document(effective);
  doc.commentBefore = [
    ' pullthrough check-config: the policy as the proxy applies it, every default filled in, the seed\'s and',
    ' PULLTHROUGH_* variables applied, secrets shown as ********. It is a proxy.yaml itself: with the secrets',
    ' put back (or ${VAR}s), it gives the same policy. Each registry inherits defaults: and manifests: and',
    ' shows only what it sets otherwise. What proxy.yaml has no key for is a comment:',
    ...commentOut(doc.contents as YAMLMap),
  ].join('\n');
  return doc.toString({ lineWidth: 0 });
}

/** The entries of `entry` that differ from `base`: key by key inside mappings (as the loader inherits them), lists whole. */
function ownSettings(base: Record<string, unknown>, entry: Record<string, unknown>): Record<string, unknown> {
  const own: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(entry)) {
    const from = base[key];
    if (isRecord(value) && isRecord(from)) {
      const inner = ownSettings(from, value);
      if (Object.keys(inner).length > 0) own[key] = inner;
    } else if (JSON.stringify(value) !== JSON.stringify(from)) {
      own[key] = value;
    }
  }
  return own;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Takes the NOT_KEYS entries out of a mapping and the mappings in it: those of a nested mapping become a
 * comment above its key, the top level's are returned (for the header).
 */
function commentOut(map: YAMLMap): string[] {
  const lines: string[] = [];
  for (const pair of [...map.items]) {
    const key = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
    if (NOT_KEYS.has(key)) {
      map.items.splice(map.items.indexOf(pair), 1);
      const value = isMap(pair.value) || isScalar(pair.value) ? pair.value.toJSON() : pair.value;
      lines.push(` ${key}: ${stringify(value, { collectionStyle: 'flow', flowCollectionPadding: false, lineWidth: 0 }).trimEnd()}`);
    } else if (isMap(pair.value)) {
      const inner = commentOut(pair.value);
      if (inner.length > 0) {
        const keyNode = isScalar(pair.key) ? pair.key : (pair.key = new Scalar(key));
        keyNode.commentBefore = inner.join('\n');
      }
    }
  }
  return lines;
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
    ...(mirror.defaultRegistry ? { default: mirror.defaultRegistry } : {}),
  };
}
