// Client configurations that pull through the registry-mirror front, one per runtime, for the
// registries of the policy. Each keeps the upstream as the last resort: containerd tries its hosts in
// order and then `server`; CRI-O and podman try their mirrors and then `location`; dockerd falls back
// to Docker Hub itself. A proxy that is down slows pulls instead of stopping them.
import type { RegistryPolicy } from '../../config/policy.ts';

export interface MirrorClientOptions {
  /** Where nodes reach the mirror: http://proxy:5000, or https://mirror.example:5443. */
  mirrorUrl: URL;
  /** Path on the node of the CA that signed an HTTPS mirror's certificate (the proxy's, installed there). */
  caFile?: string;
}

/** What a client configuration needs of a registry. */
export type MirroredRegistry = Pick<RegistryPolicy, 'host' | 'port' | 'http'>;

export interface ClientFile {
  path: string;
  content: string;
}

/** How clients write a registry: host[:port], Docker Hub as docker.io. */
export function clientName(registry: Pick<RegistryPolicy, 'host' | 'port'>): string {
  if (registry.host === 'registry-1.docker.io' && registry.port === 443) return 'docker.io';
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  return registry.port === 443 ? host : `${host}:${registry.port}`;
}

/** The registry's own URL, containerd's `server`: where a pull goes when the mirror does not answer. */
function upstreamUrl(registry: Pick<RegistryPolicy, 'host' | 'port' | 'http'>): string {
  const name = clientName(registry) === 'docker.io' ? 'registry-1.docker.io' : clientName(registry);
  return `${registry.http ? 'http' : 'https'}://${name}`;
}

/** containerd: /etc/containerd/certs.d/<registry>/hosts.toml (config_path), the mirror first (it adds ?ns=). */
export function containerdHostsFiles(registries: readonly MirroredRegistry[], options: MirrorClientOptions, root = '/etc/containerd/certs.d'): ClientFile[] {
  const mirror = origin(options.mirrorUrl);
  return registries.map((registry) => ({
    path: `${root}/${clientName(registry)}/hosts.toml`,
    content: [
      `# Pull ${clientName(registry)} through pullthrough's mirror; ${upstreamUrl(registry)} itself when the mirror fails.`,
      `server = "${upstreamUrl(registry)}"`,
      '',
      `[host."${mirror}"]`,
      '  capabilities = ["pull", "resolve"]',
      ...(options.mirrorUrl.protocol === 'https:' && options.caFile ? [`  ca = "${options.caFile}"`] : []),
      '',
    ].join('\n'),
  }));
}

/** CRI-O and podman: a registries.conf.d drop-in, a mirror per registry with the registry as path prefix. */
export function registriesConf(registries: readonly MirroredRegistry[], options: MirrorClientOptions): string {
  const mirrorHost = options.mirrorUrl.host;
  const insecure = options.mirrorUrl.protocol === 'http:';
  const blocks = registries.map((registry) => {
    const name = clientName(registry);
    return [
      '[[registry]]',
      `prefix = "${name}"`,
      `location = "${name}"`,
      ...(registry.http ? ['insecure = true'] : []),
      '',
      '[[registry.mirror]]',
      // A location is an image reference, whose path cannot hold the port's colon: host_port.
      `location = "${mirrorHost}/${name.replace(/:(\d+)$/, '_$1')}"`,
      ...(insecure ? ['insecure = true'] : []),
      '',
    ].join('\n');
  });
  return [`# Pull through pullthrough's mirror at ${origin(options.mirrorUrl)}; each registry itself when the mirror fails.`, '', ...blocks].join('\n');
}

/** dockerd: registry-mirrors (Docker Hub only; dockerd pulls Docker Hub itself when the mirror fails). */
export function dockerDaemonMirrors(options: MirrorClientOptions): { 'registry-mirrors': string[] } {
  return { 'registry-mirrors': [origin(options.mirrorUrl)] };
}

function origin(url: URL): string {
  return `${url.protocol}//${url.host}`;
}
