// The effective policy: what proxy.yaml (plus the environment) means once validated. Every other
// module reads these types and never the raw YAML, so each key maps to exactly one place in the code.

import type { ClusterPolicy } from './cluster.ts';
import type { MirrorPolicy } from './mirror.ts';
import type { WarmPolicy } from './warm.ts';

export interface Timeouts {
  /** TCP + TLS connect to an upstream. */
  connectMs: number;
  /** From sending a request upstream to its response headers. */
  headersMs: number;
  /** Silence on an upstream body (between two chunks). */
  idleMs: number;
  /** Silence from a client on an open session or request body. */
  clientIdleMs: number;
  /** From a client connecting to its complete request head (CONNECT line or request). */
  clientHeaderMs: number;
  /** How long an idle keep-alive connection is kept, to clients and upstream. */
  keepAliveMs: number;
}

export interface TtlTier {
  /** As written by the user; matched anchored (^(?:…)$) against the tag. */
  match: string;
  regex: RegExp;
  ttlMs: number;
}

export interface ManifestPolicy {
  /** false: tags are never served from cache without revalidation upstream. */
  enabled: boolean;
  tiers: TtlTier[];
  defaultTtlMs: number;
  maxStaleMs: number;
}

export interface Credentials {
  /** host[:port] of the token service when it is not the registry itself (auth.docker.io for Docker Hub). */
  realm?: string;
  username: string;
  password: string;
}

export type PushMode = 'deny' | 'bypass';

/**
 * The forward proxy the proxy's own upstream traffic goes through (R2.4): requests to the registry,
 * its token service and the hosts its redirects lead to (CDNs), each host judged by its own name.
 */
export interface UpstreamProxy {
  /** As configured: `none` (direct), `env` (the proxy's own HTTPS_PROXY/HTTP_PROXY/NO_PROXY), or a URL. */
  mode: 'none' | 'env' | 'url';
  /**
   * The forward proxy for https:// origins (a CONNECT tunnel, TLS to the upstream inside it) and for
   * http:// ones (absolute-form requests): "http(s)://[user:password@]host:port", credentials included
   * (proxyUrlForDisplay masks them). Absent: that kind of origin is reached directly.
   */
  https?: string;
  http?: string;
  /** noProxy as written (a registry without its own inherits the defaults'); parseNoProxyPattern reads each. */
  noProxy: string[];
  /** With mode `env`: the entries of NO_PROXY, reached directly too. */
  environmentNoProxy?: string[];
}

export interface RegistryPolicy {
  /** "host:port", the key everything is indexed by (a registry on two ports is two registries). */
  key: string;
  host: string;
  port: number;
  /** Plain-HTTP registry: reached by absolute-form requests (HTTP_PROXY), never intercepted TLS. */
  http: boolean;
  auth?: Credentials;
  /**
   * Registries (keys) whose token service this host is: it is intercepted so that a client's token
   * request without credentials of its own gets theirs. Empty for most registries.
   */
  tokenServiceFor: string[];
  tls: { caFile?: string; caPem?: string; verify: boolean };
  push: PushMode;
  timeouts: Timeouts;
  manifests: ManifestPolicy;
  /**
   * Absent: direct. The loader sets it on every registry (defaults.upstreamProxy unless the registry
   * has its own), those the seed's variables add included.
   */
  upstreamProxy?: UpstreamProxy;
}

export interface ProxyUser {
  name: string;
  password: string;
  /** "registry/repository" globs, e.g. "registry.example.com/team/*". */
  read: string[];
}

export interface Listen {
  host: string;
  port: number;
}

export interface Policy {
  /** Where the policy came from, for messages: a file path or "(built-in default)". */
  source: string;
  listen: Listen;
  dataDir: string;
  /**
   * Where the CA lives (ca.crt, ca.key): the data directory unless proxy.yaml's caDir or
   * PULLTHROUGH_CA_DIR says otherwise, so that it can be a volume of its own, or a read-only mount of
   * a CA the operator made. leaf.key stays in dataDir, beside the leaves it is certified in.
   */
  caDir: string;
  cache: {
    maxSize: number;
    minFree: number;
    /** How long "these credentials may read this private cached object" is believed, per credential. */
    readCheckTtlMs: number;
    /** Once a client asks for a layer of an image, fetch the image's other layers ahead of it (src/registry/prefetch.ts). */
    prefetch: boolean;
  };
  manifests: ManifestPolicy;
  defaults: { push: PushMode; timeouts: Timeouts; tlsVerify: boolean; upstreamProxy: UpstreamProxy };
  /** Keyed by "host:port". */
  registries: Map<string, RegistryPolicy>;
  /** Patterns as written (check-config prints them); src/connect.ts compiles them with parseTunnelPattern. */
  tunnel: { allow: string[]; deny: string[]; connectTimeoutMs: number; idleTimeoutMs: number };
  /**
   * State-changing admin actions (POST /admin/purge): with a token, only requests that carry it as
   * `Authorization: Bearer`, from any address; without one, only loopback clients (the default).
   */
  admin: {
    /** admin.token, or PULLTHROUGH_ADMIN_TOKEN which overrides it. */
    token?: string;
    /** A file holding a token (read at start and at each use: config/load.ts readAdminTokenFile). */
    tokenFile?: string;
  };
  users: Map<string, ProxyUser>;
  /** Resolver overrides (name → addresses), consulted before the system resolver, like curl --resolve. */
  hosts: Map<string, string[]>;
  /** false: upstream connections use IPv4 only (the seed's DISABLE_IPV6). */
  ipv6: boolean;
  /** The seed's PROXY_REQUEST_BUFFERING: uploads are written whole to dataDir/tmp before they go upstream. */
  requestBuffering: boolean;
  /** Worker threads that run blob fills. */
  workers: number;
  /** The registry-mirror front, when configured. */
  mirror?: MirrorPolicy;
  /** The images the running proxy keeps warm (none by default). */
  warm: WarmPolicy;
  /** Cluster mode: several replicas, one cache (off when absent). */
  cluster?: ClusterPolicy;
}

export function registryKey(host: string, port: number): string {
  const bare = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return bare.includes(':') ? `[${bare}]:${port}` : `${bare}:${port}`;
}

/**
 * One tunnel.allow / tunnel.deny entry, "host:port":
 * - host: a name glob (`*` matches any characters; `*` alone matches every host), an IP address
 *   (`10.0.0.5`, `[fd00::5]`; any IPv4 spelling is read as the address it means), or a CIDR block
 *   (`10.0.0.0/8`, `[fd00::/8]`);
 * - port: a number or `*`.
 * A name without `*` and every address or block names its destination explicitly: only such an entry
 * opens an internal address (loopback, private, link-local…) to tunnels.
 */
export type TunnelPattern = {
  text: string;
  port: number | '*';
  host: { kind: 'name'; glob: string; exact: boolean } | { kind: 'address'; address: string; prefix: number; family: 4 | 6 };
};

const NAME_GLOB = /^[a-z0-9_*]([a-z0-9_*-]*)(\.[a-z0-9_*]([a-z0-9_*-]*))*\.?$/;

export function parseTunnelPattern(text: string): TunnelPattern | { error: string } {
  const fail = { error: `"${text}" is not a host:port pattern (examples: "*:443", "*.example.com:*", "10.0.0.0/8:443", "[fd00::/8]:*")` };
  // An IPv6 block is written [fd00::/8] or [fd00::]/8.
  const match = /^(?:\[([0-9a-fA-F:.]+)(?:\/(\d{1,3}))?\](?:\/(\d{1,3}))?|([^\s:\[\]/]+)(?:\/(\d{1,2}))?):(\*|\d{1,5})$/.exec(text);
  if (!match || (match[2] !== undefined && match[3] !== undefined)) return fail;
  const port = match[6] === '*' ? '*' : Number(match[6]);
  if (port !== '*' && (port < 1 || port > 65535)) return { error: `"${text}": port ${port} is out of range (1-65535)` };
  const v6 = match[1];
  const prefixText = match[2] ?? match[3] ?? match[5];
  if (v6 !== undefined) {
    const address = canonicalAddress(v6);
    if (!address) return fail;
    const prefix = prefixText === undefined ? 128 : Number(prefixText);
    if (prefix > 128) return { error: `"${text}": an IPv6 prefix is at most /128` };
    if (address.includes(':')) return { text, port, host: { kind: 'address', address, prefix, family: 6 } };
    // IPv4-mapped ([::ffff:10.0.0.0/104]): the IPv4 block it means.
    if (prefix < 96) return { error: `"${text}": an IPv4-mapped block needs a prefix of at least /96` };
    return { text, port, host: { kind: 'address', address, prefix: prefix - 96, family: 4 } };
  }
  const host = match[4]!.toLowerCase();
  if (prefixText !== undefined || !host.includes('*')) {
    const address = canonicalAddress(host);
    if (address && !address.includes(':')) {
      const prefix = prefixText === undefined ? 32 : Number(prefixText);
      if (prefix > 32) return { error: `"${text}": an IPv4 prefix is at most /32` };
      return { text, port, host: { kind: 'address', address, prefix, family: 4 } };
    }
    if (address === null) return { error: `"${text}": "${host}" is not a valid IP address` };
    if (prefixText !== undefined) return { error: `"${text}": a /prefix needs an IP address before it` };
  }
  if (!NAME_GLOB.test(host)) return fail;
  return { text, port, host: { kind: 'name', glob: host.replace(/\.$/, ''), exact: !host.includes('*') } };
}

/**
 * One noProxy entry: a host the proxy's upstream traffic reaches directly, not through upstreamProxy.
 * Written as NO_PROXY entries are everywhere (curl, Go, undici), so `noProxy: ${NO_PROXY}` means what
 * it meant to them, plus globs:
 * - `*`: every host;
 * - a name, `registry.internal.example` (or `.registry.internal.example`): that host and every host
 *   under it;
 * - a name glob, `*.corp.example`, `registry-*.example.com`: `*` matches any characters;
 * - an IP address or CIDR block, `10.0.0.5`, `10.0.0.0/8`, `fd00::/8`, `[fd00::5]`: a host written as
 *   an address (a registry's key, a redirect's Location) in it. Names are not resolved to decide;
 * - any of these with `:port`, `registry.example.com:5000`, `[fd00::5]:443`: that port only.
 */
export type NoProxyPattern = {
  text: string;
  port?: number;
  host:
    | { kind: 'any' }
    | { kind: 'name'; name: string }
    | { kind: 'glob'; glob: string }
    | { kind: 'address'; address: string; prefix: number; family: 4 | 6 };
};

export function parseNoProxyPattern(text: string): NoProxyPattern | { error: string } {
  const fail = { error: `"${text}" is not a noProxy entry (examples: "*", "registry.internal.example", "*.corp.example", "10.0.0.0/8", "fd00::/8", "registry.example.com:5000")` };
  const entry = text.trim().toLowerCase();
  let hostText: string;
  let portText: string | undefined;
  const bracketed = /^\[([^\]]+)\](?:\/(\d{1,3}))?(?::(\d{1,5}))?$/.exec(entry);
  if (bracketed) {
    // [fd00::5], [fd00::/8], [fd00::]/8, with an optional :port
    hostText = bracketed[2] !== undefined ? `${bracketed[1]}/${bracketed[2]}` : bracketed[1]!;
    portText = bracketed[3];
  } else if ((entry.match(/:/g)?.length ?? 0) >= 2) {
    hostText = entry; // a bare IPv6 address or block: no port
  } else {
    const match = /^([^:]*)(?::(\d{1,5}))?$/.exec(entry);
    if (!match) return fail;
    hostText = match[1]!;
    portText = match[2];
  }
  const port = portText === undefined ? undefined : Number(portText);
  if (port !== undefined && (port < 1 || port > 65535)) return { error: `"${text}": port ${port} is out of range (1-65535)` };
  const withPort = (host: NoProxyPattern['host']): NoProxyPattern => ({ text, ...(port !== undefined ? { port } : {}), host });
  if (hostText === '*') return withPort({ kind: 'any' });
  const block = /^([^/]+)\/(\d{1,3})$/.exec(hostText);
  if (block) {
    const address = canonicalAddress(block[1]!);
    if (!address) return { error: `"${text}": a /prefix needs an IP address before it` };
    const family = address.includes(':') ? 6 : 4;
    const prefix = Number(block[2]);
    if (prefix > (family === 4 ? 32 : 128)) return { error: `"${text}": an IPv${family} prefix is at most /${family === 4 ? 32 : 128}` };
    return withPort({ kind: 'address', address, prefix, family });
  }
  if (!hostText.includes('*')) {
    const address = canonicalAddress(hostText);
    if (address === null) return { error: `"${text}": "${hostText}" is not a valid IP address` };
    if (address) return withPort({ kind: 'address', address, prefix: address.includes(':') ? 128 : 32, family: address.includes(':') ? 6 : 4 });
  }
  const name = hostText.replace(/^\./, '').replace(/\.$/, '');
  if (!name || !NAME_GLOB.test(name)) return fail;
  return withPort(name.includes('*') ? { kind: 'glob', glob: name } : { kind: 'name', name });
}

/**
 * An upstreamProxy URL as check-config and messages show it: the password (if any) masked, or with
 * `mask` '' the whole user info left out.
 */
export function proxyUrlForDisplay(url: string, mask = '********'): string {
  try {
    const parsed = new URL(url);
    const userInfo = mask === '' || !parsed.username ? '' : `${parsed.username}${parsed.password ? `:${mask}` : ''}@`;
    return `${parsed.protocol}//${userInfo}${parsed.host}`;
  } catch {
    // Not a URL (a mistake being reported): whatever sits between "//" and the last "@" is user info.
    return url.replace(/^([a-z][a-z0-9+.-]*:\/\/)?[^/?#]*@/i, (_whole, scheme?: string) => `${scheme ?? ''}${mask ? `${mask}@` : ''}`);
  }
}

/**
 * The one spelling of an IP address: every IPv4 form getaddrinfo accepts (decimal `2130706433`, octal
 * `0177.0.0.1`, hex `0x7f.1`, short `127.1`) as dotted quad, IPv6 compressed and lower-case, and an
 * IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) as the IPv4 address it carries. Undefined for a name
 * (or anything else that is not an address); null for text that looks numeric but is no valid address
 * (`999.1.1.1`), which no decision should take as a name.
 */
export function canonicalAddress(text: string): string | undefined | null {
  const bare = text.replace(/^\[(.*)\]$/, '$1');
  let hostname: string;
  try {
    // The WHATWG host parser reads IPv4 exactly as inet_aton does, and serialises IPv6 canonically.
    hostname = new URL(`http://${bare.includes(':') ? `[${bare}]` : bare}/`).hostname;
  } catch {
    return bare.includes(':') || /(^|\.)(\d+|0x[0-9a-f]*)\.?$/i.test(bare) ? null : undefined;
  }
  if (hostname.startsWith('[')) {
    const v6 = hostname.slice(1, -1);
    const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(v6);
    if (!mapped) return v6;
    const high = parseInt(mapped[1]!, 16);
    const low = parseInt(mapped[2]!, 16);
    return `${high >> 8}.${high & 255}.${low >> 8}.${low & 255}`;
  }
  return /^\d+\.\d+\.\d+\.\d+$/.test(hostname) ? hostname : undefined;
}
