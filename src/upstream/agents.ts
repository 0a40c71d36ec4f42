// One undici Agent per registry: keep-alive pools per origin (the registry and any host it redirects
// to), SNI from the origin's name, HTTP/1.1 only, the registry's timeouts, and the trust it is due.
// With a forward proxy (upstreamProxy) the same, through it: src/upstream/forward-proxy.ts.
// The primary thread and every fill worker build their agents with the same function, from the same
// UpstreamConfig, so a fill goes the way the primary's own requests go.
import { existsSync, readFileSync } from 'node:fs';
import tls from 'node:tls';
import { Agent, type Dispatcher } from 'undici';
import type { RegistryPolicy, Timeouts } from '../../config/policy.ts';
import { createLookup } from '../resolver.ts';
import { ForwardProxyDispatcher, type ForwardProxyConfig } from './forward-proxy.ts';

/** Response heads up to this size are accepted: Google Artifact Registry sends very large ones. */
const MAX_RESPONSE_HEADER_BYTES = 256 * 1024;

/** What a thread needs to reach a registry: plain data, so it can be posted to a worker. */
export interface UpstreamConfig {
  key: string;
  /** "https://host:port" or "http://host:port". */
  origin: string;
  caPem?: string;
  verify: boolean;
  timeouts: Timeouts;
  hosts: Array<[string, string[]]>;
  ipv6: boolean;
  /** The forward proxy for this registry's traffic (credentials included: never log this object); absent: direct. */
  forwardProxy?: ForwardProxyConfig;
  /**
   * A cluster peer, reached by address: its certificate is checked for this name, against `caPem` (the
   * cluster's CA) alone.
   */
  peerName?: string;
}

export function upstreamConfig(registry: RegistryPolicy, hosts: ReadonlyMap<string, readonly string[]>, ipv6: boolean): UpstreamConfig {
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  return {
    key: registry.key,
    origin: `${registry.http ? 'http' : 'https'}://${host}:${registry.port}`,
    ...(registry.tls.caPem ? { caPem: registry.tls.caPem } : {}),
    verify: registry.tls.verify,
    timeouts: registry.timeouts,
    hosts: [...hosts].map(([name, addresses]) => [name, [...addresses]]),
    ipv6,
    ...forwardProxyOf(registry),
  };
}

function forwardProxyOf(registry: RegistryPolicy): { forwardProxy?: ForwardProxyConfig } {
  const proxy = registry.upstreamProxy;
  if (!proxy || (!proxy.https && !proxy.http)) return {};
  const noProxy = [...proxy.noProxy, ...(proxy.mode === 'env' ? (proxy.environmentNoProxy ?? []) : [])];
  return { forwardProxy: { ...(proxy.https ? { https: proxy.https } : {}), ...(proxy.http ? { http: proxy.http } : {}), noProxy } };
}

export function createAgent(config: UpstreamConfig): Dispatcher {
  const pool = {
    allowH2: false,
    headersTimeout: config.timeouts.headersMs,
    bodyTimeout: config.timeouts.idleMs,
    keepAliveTimeout: config.timeouts.keepAliveMs,
    maxHeaderSize: MAX_RESPONSE_HEADER_BYTES,
    connections: 64,
    pipelining: 1,
  };
  const upstreamTls = { secureContext: trustContext(config.caPem, config.peerName !== undefined), rejectUnauthorized: config.verify, ...(config.peerName ? { servername: config.peerName } : {}) };
  const lookup = createLookup(new Map(config.hosts), config.ipv6);
  const direct = new Agent({ ...pool, connect: { ...upstreamTls, lookup, timeout: config.timeouts.connectMs } });
  if (!config.forwardProxy) return direct;
  // Through the forward proxy, it resolves the upstream's name; `hosts:` and ipv6 apply to reaching
  // the forward proxy itself (and to the noProxy hosts, direct). TLS to an https:// forward proxy is
  // verified against the default trust, never a registry's tls.ca or tls.verify.
  return new ForwardProxyDispatcher(direct, config.forwardProxy, {
    pool,
    upstreamTls,
    proxyTls: { ca: defaultCas(), rejectUnauthorized: true, lookup },
    connectTimeoutMs: config.timeouts.connectMs,
  });
}

let cachedCas: string[] | undefined;
const trustContexts = new Map<string, tls.SecureContext>();

/**
 * The context every upstream TLS connection of a trust starts from: Node builds a new one for each
 * tls.connect given `ca` (parsing every root, ~11 ms with 271 of them), and undici passes its options on.
 */
function trustContext(caPem: string | undefined, only = false): tls.SecureContext {
  const key = `${only ? 'only:' : ''}${caPem ?? ''}`;
  let context = trustContexts.get(key);
  if (!context) trustContexts.set(key, (context = tls.createSecureContext({ ca: [...(only ? [] : defaultCas()), ...(caPem ? [caPem] : [])] })));
  return context;
}

/** Reads the CA stores now rather than on the first upstream connection (~100 ms with the OS store). */
export function preloadTrust(): void {
  trustContext(undefined);
}

/**
 * Node's bundled roots and NODE_EXTRA_CA_CERTS ("default") plus the operating system's store: passing
 * `ca` replaces the defaults, so they are listed explicitly. Read once per thread, on first use.
 */
function defaultCas(): string[] {
  cachedCas ??= [...new Set([...tls.getCACertificates('default'), ...systemCas()])];
  return cachedCas;
}

/** A certificate in PEM. */
const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----/g;

/**
 * The operating system's store. Elsewhere than macOS and Windows Node reads it as its OpenSSL does: every
 * file in SSL_CERT_DIR (default /etc/ssl/certs) and the bundle SSL_CERT_FILE (default /etc/ssl/cert.pem).
 * Where that directory is missing (an image without ca-certificates) Node prints "Cannot open directory
 * ... to load OpenSSL certificates." on stderr, in plain text, in every thread: the logs would not be JSON
 * lines. Then only the bundle is read, here.
 */
function systemCas(): string[] {
  if (process.platform === 'darwin' || process.platform === 'win32') return tls.getCACertificates('system');
  if (existsSync(process.env.SSL_CERT_DIR || '/etc/ssl/certs')) return tls.getCACertificates('system');
  const bundle = process.env.SSL_CERT_FILE || '/etc/ssl/cert.pem';
  try {
    return readFileSync(bundle, 'latin1').match(PEM_CERTIFICATE) ?? [];
  } catch {
    return []; // no store at all: Node's roots and NODE_EXTRA_CA_CERTS only
  }
}

/** The agents of one thread, by registry. */
export class UpstreamAgents {
  private readonly agents = new Map<string, Dispatcher>();

  for(config: UpstreamConfig): Dispatcher {
    let agent = this.agents.get(config.key);
    if (!agent) {
      agent = createAgent(config);
      this.agents.set(config.key, agent);
    }
    return agent;
  }

  async close(): Promise<void> {
    await Promise.all([...this.agents.values()].map((agent) => agent.close()));
    this.agents.clear();
  }
}
