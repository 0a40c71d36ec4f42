// A rollout, as manifest-rollout and cluster run it: N clients of one kind pull one tag of the registry
// at the same moment — skopeo processes behind a start barrier, or containerd's request sequence in this
// process —, each straight to the registry or through the proxy it is given, every one checked against
// the image's digests; and what the proxies' access logs say they answered.
import { mkdirSync, readFileSync } from 'node:fs';
import type { BuiltImage } from '../../test/helpers/oci-image.ts';
import { verifyDirCopy } from '../../test/helpers/skopeo.ts';
import { pullLikeContainerd } from './containerd-pull.ts';
import { directTls, throughProxy } from './https-clients.ts';
import type { ProxyProcess } from './proxy.ts';
import { REGISTRY_HOST, type Upstream } from './registry.ts';
import { runSkopeoClients } from './skopeo.ts';

export type ClientKind = 'skopeo' | 'containerd';

export interface RolloutPull {
  kind: ClientKind;
  upstream: Upstream;
  repository: string;
  tag: string;
  /** What every client must end up with. */
  image: BuiltImage;
  count: number;
  /** skopeo's output dirs go here (created). */
  dir: string;
  /** The proxy client i goes through; without it every client goes straight to the registry. */
  proxyFor?: (client: number) => Pick<ProxyProcess, 'port' | 'url' | 'caFile'>;
  /** Runs at the release of the clients (skopeo: once they are spawned and blocked at the barrier). */
  atStart?: () => void;
}

/** `count` clients of `kind` pull repository:tag at once; every one must get `image`. */
export async function pullAtOnce(options: RolloutPull): Promise<{ wallSeconds: number; clientSeconds: number[] }> {
  const { registry, ca } = options.upstream;
  const { repository, tag, image, proxyFor } = options;
  const via = (client: number) => (proxyFor ? `through the proxy on ${proxyFor(client).url}` : 'direct');
  if (options.kind === 'skopeo') {
    const route = (client: number) => {
      const proxy = proxyFor?.(client);
      return proxy
        ? { image: `${registry.hostPort}/${repository}:${tag}`, proxy: { url: proxy.url, caFile: proxy.caFile } }
        : // Go resolves no test name and never proxies loopback: direct clients use the registry's IP (in its certificate).
          { image: `${registry.address}/${repository}:${tag}`, registryCaPem: ca.certPem };
    };
    mkdirSync(options.dir, { recursive: true });
    const run = await runSkopeoClients(options.count, route, options.dir, options.atStart);
    for (const [i, client] of run.clients.entries()) {
      if (client.code !== 0) throw new Error(`skopeo client ${i} (${via(i)}) failed, exit ${client.code}:\n${client.stderr.slice(-2000)}`);
      const copy = await verifyDirCopy(client.destDir);
      if (copy.manifestDigest !== image.manifestDigest) throw new Error(`skopeo client ${i} got manifest ${copy.manifestDigest}, expected ${image.manifestDigest}`);
    }
    return { wallSeconds: run.wallSeconds, clientSeconds: run.clients.map((c) => c.seconds) };
  }
  const caPems = new Map<string, string>();
  const route = (client: number) => {
    const proxy = proxyFor?.(client);
    if (!proxy) return directTls({ host: REGISTRY_HOST, port: registry.port, caPem: ca.certPem });
    if (!caPems.has(proxy.caFile)) caPems.set(proxy.caFile, readFileSync(proxy.caFile, 'utf8'));
    return throughProxy({ host: REGISTRY_HOST, port: registry.port }, { port: proxy.port, caPem: caPems.get(proxy.caFile)! });
  };
  const routes = Array.from({ length: options.count }, (_, i) => route(i));
  options.atStart?.();
  const started = performance.now();
  const results = await Promise.all(routes.map((r) => pullLikeContainerd(r, repository, tag)));
  const wallSeconds = (performance.now() - started) / 1000;
  for (const [i, r] of results.entries()) {
    if (r.manifestDigest !== image.manifestDigest) throw new Error(`containerd client ${i} (${via(i)}) got manifest ${r.manifestDigest}, expected ${image.manifestDigest}`);
  }
  return { wallSeconds, clientSeconds: results.map((r) => r.seconds) };
}

/** A proxy's answers by request type ("GET manifest") and X-Cache, with counts: { 'GET manifest': { MISS: 1, JOINED: 19 } }. */
export type ProxyAnswers = Record<string, Record<string, number>>;

/**
 * A proxy's access log since `mark`: its answers by request type and X-Cache, and how far apart the
 * clients' requests for `tag` reached it (arrival = the line's time − its duration; ms resolution).
 * In cluster mode an answer relayed from the owner counts as "<X-Cache> relayed", and one the owner
 * served to a peer (`forPeer`, its client "<address> via <peer>") as "<X-Cache> for a peer" — not a client's
 * request, so not among the arrivals.
 */
export function readProxyAnswers(file: string, mark: number, tag: string): { answers: ProxyAnswers; tagArrivalsMs: number[] } {
  const text = readFileSync(file).subarray(mark).toString('utf8');
  const answers: ProxyAnswers = {};
  const tagArrivalsMs: number[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    let entry: { time?: string; ms?: number; type?: string; cache?: string; method?: string; status?: number; path?: string; peer?: string; client?: string; forPeer?: boolean };
    try {
      entry = JSON.parse(line) as typeof entry;
    } catch {
      continue;
    }
    const forPeer = entry.forPeer === true || entry.client?.includes(' via ') === true;
    const type = `${entry.method ?? '?'} ${entry.type ?? 'other'}`;
    const cache = (entry.cache ?? String(entry.status ?? '-')) + (entry.peer ? ' relayed' : forPeer ? ' for a peer' : '');
    answers[type] ??= {};
    answers[type][cache] = (answers[type][cache] ?? 0) + 1;
    // The request that names the tag (skopeo's GET, containerd's HEAD): one per client.
    if (!forPeer && entry.type === 'manifest' && entry.path?.endsWith(`/manifests/${tag}`) && entry.time) tagArrivalsMs.push(Date.parse(entry.time) - (entry.ms ?? 0));
  }
  return { answers, tagArrivalsMs };
}

/** Several proxies' answers added up. */
export function addAnswers(all: readonly ProxyAnswers[]): ProxyAnswers {
  const sum: ProxyAnswers = {};
  for (const answers of all) {
    for (const [type, caches] of Object.entries(answers)) {
      sum[type] ??= {};
      for (const [cache, n] of Object.entries(caches)) sum[type][cache] = (sum[type][cache] ?? 0) + n;
    }
  }
  return sum;
}

/** "GET manifest MISS×1 JOINED×19, GET blob …". */
export function describeAnswers(answers: ProxyAnswers): string {
  return Object.entries(answers)
    .map(([type, caches]) => `${type} ${Object.entries(caches).map(([cache, n]) => `${cache}×${n}`).join(' ')}`)
    .join(', ');
}

/** max − min, ms; NaN without values. */
export function spreadMs(times: readonly number[]): number {
  return times.length > 0 ? Math.max(...times) - Math.min(...times) : Number.NaN;
}
