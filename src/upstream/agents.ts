// One undici Agent per registry: keep-alive pools per origin (the registry and any host it redirects
// to), SNI from the origin's name, HTTP/1.1 only, the registry's timeouts, and the trust it is due.
import tls from 'node:tls';
import type { LookupFunction } from 'node:net';
import { Agent } from 'undici';
import type { RegistryPolicy } from '../../config/policy.ts';

/** Response heads up to this size are accepted: Google Artifact Registry sends very large ones. */
const MAX_RESPONSE_HEADER_BYTES = 256 * 1024;

export class UpstreamAgents {
  private readonly agents = new Map<string, Agent>();
  private readonly lookup: LookupFunction;
  private baseCas: string[] | undefined;

  constructor(lookup: LookupFunction) {
    this.lookup = lookup;
  }

  for(registry: RegistryPolicy): Agent {
    let agent = this.agents.get(registry.key);
    if (!agent) {
      agent = new Agent({
        connect: {
          ca: [...this.defaultCas(), ...(registry.tls.caPem ? [registry.tls.caPem] : [])],
          rejectUnauthorized: registry.tls.verify,
          lookup: this.lookup,
          timeout: registry.timeouts.connectMs,
        },
        allowH2: false,
        headersTimeout: registry.timeouts.headersMs,
        bodyTimeout: registry.timeouts.idleMs,
        keepAliveTimeout: registry.timeouts.keepAliveMs,
        maxHeaderSize: MAX_RESPONSE_HEADER_BYTES,
        connections: 64,
        pipelining: 1,
      });
      this.agents.set(registry.key, agent);
    }
    return agent;
  }

  /**
   * Node's bundled roots and NODE_EXTRA_CA_CERTS ("default") plus the operating system's store: passing
   * `ca` replaces the defaults, so they are listed explicitly. Read once, on first use.
   */
  private defaultCas(): string[] {
    this.baseCas ??= [...new Set([...tls.getCACertificates('default'), ...tls.getCACertificates('system')])];
    return this.baseCas;
  }

  async close(): Promise<void> {
    await Promise.all([...this.agents.values()].map((agent) => agent.close()));
    this.agents.clear();
  }
}
