// `pullthrough warm IMAGE…`: pre-fills the cache by pulling through the running proxy exactly as a
// client would (CONNECT, the proxy's CA, manifests, then every blob), one progress bar per layer.
import { MultiBar, Presets } from 'cli-progress';
import { ProxyAgent, request, type Dispatcher } from 'undici';
import { humanBytes } from '../../config/units.ts';
import { parseImageReference, type ImageReference } from './image-reference.ts';

const MANIFEST_TYPES = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
].join(', ');
const PARALLEL_BLOBS = 3;

interface Descriptor {
  digest: string;
  size: number;
  mediaType?: string;
  platform?: { os: string; architecture: string; variant?: string };
}

interface Manifest {
  mediaType?: string;
  manifests?: Descriptor[];
  config?: Descriptor;
  layers?: Descriptor[];
}

export interface WarmOptions {
  proxyUrl: string;
  /** "os/arch[/variant]"; all platforms of an index when absent. */
  platform?: string;
  /** Progress bars on stderr (off when not a terminal, and in tests). */
  progress: boolean;
  out: (line: string) => void;
}

export interface WarmSummary {
  image: string;
  manifests: number;
  blobs: number;
  bytes: number;
  cache: Record<string, number>;
}

export async function warm(images: string[], options: WarmOptions): Promise<WarmSummary[]> {
  const caPem = await (await request(`${options.proxyUrl}/ca.crt`)).body.text();
  if (!caPem.includes('BEGIN CERTIFICATE')) throw new Error(`${options.proxyUrl}/ca.crt did not return a certificate: is the proxy running there?`);
  const agent = new ProxyAgent({ uri: options.proxyUrl, requestTls: { ca: caPem } });
  const bars = options.progress ? new MultiBar({ format: ' {bar} {percentage}% | {name} | {value}/{total} bytes', hideCursor: true, clearOnComplete: false }, Presets.shades_classic) : undefined;
  try {
    const summaries: WarmSummary[] = [];
    for (const image of images) summaries.push(await warmImage(parseImageReference(image), image, agent, options, bars));
    return summaries;
  } finally {
    bars?.stop();
    await agent.close();
  }
}

async function warmImage(ref: ImageReference, image: string, agent: Dispatcher, options: WarmOptions, bars: MultiBar | undefined): Promise<WarmSummary> {
  const client = new RegistryClient(ref, agent);
  const summary: WarmSummary = { image, manifests: 0, blobs: 0, bytes: 0, cache: {} };
  const top = await client.manifest(ref.reference);
  summary.manifests++;
  const images: Manifest[] = [];
  if (top.manifests) {
    const wanted = top.manifests.filter((m) => matchesPlatform(m, options.platform));
    if (wanted.length === 0) throw new Error(`${image} has no manifest for platform ${options.platform}`);
    for (const entry of wanted) {
      images.push(await client.manifest(entry.digest));
      summary.manifests++;
    }
  } else {
    images.push(top);
  }
  const blobs = new Map<string, Descriptor>();
  for (const manifest of images) for (const blob of [manifest.config, ...(manifest.layers ?? [])]) if (blob) blobs.set(blob.digest, blob);
  const queue = [...blobs.values()];
  await Promise.all(
    Array.from({ length: Math.min(PARALLEL_BLOBS, queue.length) }, async () => {
      for (let blob = queue.shift(); blob; blob = queue.shift()) {
        const bar = bars?.create(blob.size, 0, { name: blob.digest.slice(7, 19) });
        const { bytes, cache } = await client.blob(blob.digest, (n) => bar?.increment(n));
        bar?.stop();
        summary.blobs++;
        summary.bytes += bytes;
        summary.cache[cache] = (summary.cache[cache] ?? 0) + 1;
      }
    }),
  );
  options.out(`${image}: ${summary.manifests} manifests, ${summary.blobs} blobs, ${humanBytes(summary.bytes)} (${Object.entries(summary.cache).map(([k, v]) => `${v} ${k}`).join(', ')})`);
  return summary;
}

function matchesPlatform(descriptor: Descriptor, platform: string | undefined): boolean {
  if (!platform) return true;
  const [os, architecture, variant] = platform.split('/');
  const p = descriptor.platform;
  return !!p && p.os === os && p.architecture === architecture && (variant === undefined || p.variant === variant);
}

/** The few registry calls warm needs, with an anonymous token when the registry asks for one. */
class RegistryClient {
  private token: string | undefined;
  private readonly ref: ImageReference;
  private readonly agent: Dispatcher;

  constructor(ref: ImageReference, agent: Dispatcher) {
    this.ref = ref;
    this.agent = agent;
  }

  async manifest(reference: string): Promise<Manifest> {
    const response = await this.get(`/v2/${this.ref.repository}/manifests/${reference}`, { accept: MANIFEST_TYPES });
    return (await response.body.json()) as Manifest;
  }

  async blob(digest: string, progress: (bytes: number) => void): Promise<{ bytes: number; cache: string }> {
    const response = await this.get(`/v2/${this.ref.repository}/blobs/${digest}`, {});
    let bytes = 0;
    for await (const chunk of response.body as AsyncIterable<Buffer>) {
      bytes += chunk.length;
      progress(chunk.length);
    }
    return { bytes, cache: String(response.headers['x-cache'] ?? 'unknown') };
  }

  private async get(path: string, headers: Record<string, string>, retried = false): Promise<Dispatcher.ResponseData<unknown>> {
    const response = await request(`https://${this.ref.registry}${path}`, {
      dispatcher: this.agent,
      headers: { ...headers, ...(this.token ? { authorization: `Bearer ${this.token}` } : {}) },
      maxRedirections: 0,
    } as Parameters<typeof request>[1]);
    if (response.statusCode === 401 && !retried) {
      const challenge = String(response.headers['www-authenticate'] ?? '');
      await response.body.dump();
      if (/^Bearer /i.test(challenge)) {
        this.token = await this.anonymousToken(challenge);
        return this.get(path, headers, true);
      }
    }
    if (response.statusCode !== 200) {
      const body = await response.body.text();
      throw new Error(`GET ${this.ref.registry}${path}: ${response.statusCode} ${body.slice(0, 300)}`);
    }
    return response;
  }

  private async anonymousToken(challenge: string): Promise<string> {
    const params = Object.fromEntries([...challenge.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1]!, m[2]!]));
    if (!params.realm) throw new Error(`${this.ref.registry} asked for a token without a realm`);
    const url = new URL(params.realm);
    if (params.service) url.searchParams.set('service', params.service);
    url.searchParams.set('scope', params.scope ?? `repository:${this.ref.repository}:pull`);
    const response = await request(url, { dispatcher: this.agent });
    const body = (await response.body.json()) as { token?: string; access_token?: string };
    const token = body.token ?? body.access_token;
    if (!token) throw new Error(`the token service ${url.host} gave no token (${response.statusCode})`);
    return token;
  }
}
