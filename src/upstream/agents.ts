// One undici Agent per registry: keep-alive pools per origin (the registry and any host it redirects
// to), SNI from the origin's name, HTTP/1.1 only, the registry's timeouts, and the trust it is due.
// The primary thread and every fill worker build their agents with the same function.
import { existsSync, readFileSync } from 'node:fs';
import tls from 'node:tls';
import { Agent } from 'undici';
import type { RegistryPolicy, Timeouts } from '../../config/policy.ts';
import { createLookup } from '../resolver.ts';

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
  hosts: Array<[string, string]>;
  ipv6: boolean;
}

export function upstreamConfig(registry: RegistryPolicy, hosts: ReadonlyMap<string, string>, ipv6: boolean): UpstreamConfig {
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  return {
    key: registry.key,
    origin: `${registry.http ? 'http' : 'https'}://${host}:${registry.port}`,
    ...(registry.tls.caPem ? { caPem: registry.tls.caPem } : {}),
    verify: registry.tls.verify,
    timeouts: registry.timeouts,
    hosts: [...hosts],
    ipv6,
  };
}

export function createAgent(config: UpstreamConfig): Agent {
  return new Agent({
    connect: {
      ca: [...defaultCas(), ...(config.caPem ? [config.caPem] : [])],
      rejectUnauthorized: config.verify,
      lookup: createLookup(new Map(config.hosts), config.ipv6),
      timeout: config.timeouts.connectMs,
    },
    allowH2: false,
    headersTimeout: config.timeouts.headersMs,
    bodyTimeout: config.timeouts.idleMs,
    keepAliveTimeout: config.timeouts.keepAliveMs,
    maxHeaderSize: MAX_RESPONSE_HEADER_BYTES,
    connections: 64,
    pipelining: 1,
  });
}

let cachedCas: string[] | undefined;

/** Reads the CA stores now rather than on the first upstream connection (~100 ms with the OS store). */
export function preloadTrust(): void {
  defaultCas();
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
  private readonly agents = new Map<string, Agent>();

  for(config: UpstreamConfig): Agent {
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
