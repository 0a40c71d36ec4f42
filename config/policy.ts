// The effective policy: what proxy.yaml (plus the environment) means once validated. Every other
// module reads these types and never the raw YAML, so each key maps to exactly one place in the code.

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
  };
  manifests: ManifestPolicy;
  defaults: { push: PushMode; timeouts: Timeouts; tlsVerify: boolean };
  /** Keyed by "host:port". */
  registries: Map<string, RegistryPolicy>;
  tunnel: { allow: string[]; deny: string[]; connectTimeoutMs: number; idleTimeoutMs: number };
  users: Map<string, ProxyUser>;
  /** Resolver overrides (name → address), consulted before the system resolver, like curl --resolve. */
  hosts: Map<string, string>;
  /** false: upstream connections use IPv4 only (the seed's DISABLE_IPV6). */
  ipv6: boolean;
  /** The seed's PROXY_REQUEST_BUFFERING: uploads are written whole to dataDir/tmp before they go upstream. */
  requestBuffering: boolean;
  /** Worker threads that run blob fills. */
  workers: number;
}

export function registryKey(host: string, port: number): string {
  const bare = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return bare.includes(':') ? `[${bare}]:${port}` : `${bare}:${port}`;
}
