// containerd's request sequence for a pull, in this process (cheaper than N real containerd daemons):
// HEAD the tag with containerd's Accept (remotes/docker/resolver.go), GET the manifest by the digest
// the HEAD named (an index: then the linux/amd64 manifest by digest), then GET the config and every
// layer, 3 at a time (containerd's default max concurrent downloads), each with "<mediaType>, */*".
// Each client has its own connections (an undici Pool of 3, through the proxy or straight to the
// registry), opened within the timed pull as containerd would. Every body is checked against its digest.
import { createHash } from 'node:crypto';
import { openPool, type Route } from './https-clients.ts';
import { CONTAINERD_ACCEPT } from './registry.ts';

const CONCURRENT_DOWNLOADS = 3;
const USER_AGENT = 'containerd/v1.7.24 (pullthrough-perf)';
const TIMEOUT_MS = 60_000;
const INDEX_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string };
}

export interface ContainerdPullResult {
  /** From the start of the pull to the last blob's last byte. */
  seconds: number;
  manifestDigest: string;
  /** Config and layers fetched, by digest. */
  blobs: string[];
  /** X-Cache of each answer through the proxy, in order: HEAD, manifest GET(s), blobs ('' from the registry). */
  cache: string[];
}

export async function pullLikeContainerd(route: Route, repository: string, tag: string): Promise<ContainerdPullResult> {
  const started = performance.now();
  const pool = openPool(route, { connections: CONCURRENT_DOWNLOADS, timeoutMs: TIMEOUT_MS });
  const cache: string[] = [];
  const get = async (method: 'GET' | 'HEAD', path: string, accept: string) => {
    const response = await pool.request({ path, method, headers: { accept, 'user-agent': USER_AGENT } });
    const body = method === 'HEAD' ? (await response.body.dump(), Buffer.alloc(0)) : Buffer.from(await response.body.arrayBuffer());
    cache.push(String(response.headers['x-cache'] ?? ''));
    if (response.statusCode !== 200) throw new Error(`${method} ${path}: HTTP ${response.statusCode} ${body.toString('utf8').slice(0, 200)}`);
    return { headers: response.headers, body };
  };
  const fetchVerified = async (kind: 'manifests' | 'blobs', descriptor: Descriptor) => {
    const { body } = await get('GET', `/v2/${repository}/${kind}/${descriptor.digest}`, `${descriptor.mediaType}, */*`);
    const actual = `sha256:${createHash('sha256').update(body).digest('hex')}`;
    if (actual !== descriptor.digest) throw new Error(`${kind} ${descriptor.digest}: got bytes whose digest is ${actual}`);
    return body;
  };
  try {
    const head = await get('HEAD', `/v2/${repository}/manifests/${tag}`, CONTAINERD_ACCEPT);
    const digest = String(head.headers['docker-content-digest'] ?? '');
    const mediaType = String(head.headers['content-type'] ?? '');
    if (!digest.startsWith('sha256:')) throw new Error(`HEAD of ${repository}:${tag} named no digest`);
    let manifestDescriptor: Descriptor = { mediaType, digest, size: Number(head.headers['content-length'] ?? 0) };
    let manifest = JSON.parse((await fetchVerified('manifests', manifestDescriptor)).toString('utf8')) as { manifests?: Descriptor[]; config?: Descriptor; layers?: Descriptor[] };
    if (INDEX_TYPES.has(mediaType)) {
      const chosen = manifest.manifests?.find((m) => m.platform?.os === 'linux' && m.platform?.architecture === 'amd64');
      if (!chosen) throw new Error(`${repository}:${tag} is an index without linux/amd64`);
      manifestDescriptor = chosen;
      manifest = JSON.parse((await fetchVerified('manifests', chosen)).toString('utf8')) as typeof manifest;
    }
    const blobs = [manifest.config, ...(manifest.layers ?? [])].filter((d): d is Descriptor => d !== undefined);
    let next = 0;
    const worker = async () => {
      while (next < blobs.length) await fetchVerified('blobs', blobs[next++]!);
    };
    await Promise.all(Array.from({ length: Math.min(CONCURRENT_DOWNLOADS, blobs.length) }, worker));
    return { seconds: (performance.now() - started) / 1000, manifestDigest: manifestDescriptor.digest, blobs: blobs.map((b) => b.digest), cache };
  } finally {
    await pool.destroy();
  }
}
