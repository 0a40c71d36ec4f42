// `pullthrough warm IMAGE…`: pre-fills the cache by pulling through the running proxy exactly as a
// client would (CONNECT, the proxy's CA, manifests, then every blob), one progress bar per layer.
import net from 'node:net';
import tls from 'node:tls';
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
/** For the check that a registry is intercepted: CONNECT and TLS handshake together. */
const CHECK_TIMEOUT_MS = 15_000;

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
  const caPem = await request(`${options.proxyUrl}/ca.crt`).then(
    (response) => response.body.text(),
    (err: NodeJS.ErrnoException) => {
      throw new Error(`cannot reach the proxy at ${options.proxyUrl} (${err.code ?? err.message}): is it running there? Name it with --proxy URL or PULLTHROUGH_PROXY`);
    },
  );
  if (!caPem.includes('BEGIN CERTIFICATE')) throw new Error(`${options.proxyUrl}/ca.crt did not return a certificate: is the proxy running there?`);
  const refs = images.map((image) => ({ image, ref: parseImageReference(image) }));
  // Before anything is pulled: a registry the proxy does not intercept would be pulled past the cache.
  for (const registry of new Set(refs.map(({ ref }) => ref.registry))) await checkIntercepted(options.proxyUrl, registry, caPem);
  const agent = new ProxyAgent({ uri: options.proxyUrl, requestTls: { ca: caPem } });
  const bars = options.progress ? new MultiBar({ format: ' {bar} {percentage}% | {name} | {value}/{total} bytes', hideCursor: true, clearOnComplete: false }, Presets.shades_classic) : undefined;
  try {
    const summaries: WarmSummary[] = [];
    for (const { image, ref } of refs) summaries.push(await warmImage(ref, image, agent, options, bars));
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

/**
 * Whether the proxy intercepts `registry` (host or host:port), asked the way a client finds out: CONNECT
 * through it, then a TLS handshake that trusts the proxy's CA alone. The proxy answers an intercepted
 * registry's CONNECT itself, with a certificate from its CA; any other host it tunnels (the registry's
 * own certificate comes back) or refuses (with its reason). Throws a message that says which and what to do.
 */
export async function checkIntercepted(proxyUrl: string, registry: string, caPem: string): Promise<void> {
  const { host, port } = hostAndPort(registry);
  const target = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  const remedy = `Add it under registries: in the proxy's proxy.yaml (or to REGISTRIES) and restart the proxy; \`pullthrough check-config\` lists what it intercepts.`;
  const proxy = new URL(proxyUrl);
  const auth = proxy.username ? `Proxy-Authorization: Basic ${Buffer.from(`${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`).toString('base64')}\r\n` : '';
  const socket = net.connect(Number(proxy.port || 80), proxy.hostname.replace(/^\[(.*)\]$/, '$1'));
  socket.setTimeout(CHECK_TIMEOUT_MS, () => socket.destroy(new Error(`no answer within ${CHECK_TIMEOUT_MS / 1000} s`)));
  try {
    const reply = await connectReply(socket, proxyUrl, `CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${auth}\r\n`);
    if (reply.status === 407) throw new Error(`the proxy at ${proxyUrl} wants a proxy user: give --proxy http://USER:PASSWORD@host:port (${reply.reason})`);
    if (reply.status !== 200) throw new Error(`${target} is not intercepted by the proxy at ${proxyUrl}: it answers CONNECT with ${reply.status} (${reply.reason}), so nothing of it can be cached. ${remedy}`);
    const session = tls.connect({ socket, ca: caPem, rejectUnauthorized: false, ...(net.isIP(host) ? {} : { servername: host }) });
    await new Promise<void>((resolve, reject) => {
      session.once('secureConnect', resolve);
      session.once('error', reject);
    });
    const authorized = session.authorized;
    const peer = session.getPeerX509Certificate();
    session.destroy();
    if (!authorized) {
      const issuer = peer ? `its certificate is issued by ${peer.issuer.replace(/\n/g, ', ')}` : 'it presents no certificate';
      throw new Error(`${target} is not intercepted by the proxy at ${proxyUrl}: the proxy tunnels it untouched (${issuer}, not by the proxy's CA), so a pull through it caches nothing. ${remedy}`);
    }
  } finally {
    socket.destroy();
  }
}

/** Sends `head` and resolves with the status of the reply and, for a refusal, its text (the reason). */
function connectReply(socket: net.Socket, proxyUrl: string, head: string): Promise<{ status: number; reason: string }> {
  return new Promise((resolve, reject) => {
    let received = Buffer.alloc(0);
    let status = 0;
    const done = () => {
      socket.off('data', onData);
      const end = received.indexOf('\r\n\r\n');
      const body = end < 0 ? '' : received.subarray(end + 4).toString('utf8');
      resolve({ status, reason: body.trim().replace(/^pullthrough: /, '') || `status ${status}` });
    };
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      const end = received.indexOf('\r\n\r\n');
      if (end < 0) return;
      status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(received.toString('latin1'))?.[1] ?? 0);
      if (status === 200) {
        socket.off('data', onData);
        socket.off('end', done);
        if (received.length > end + 4) socket.unshift(received.subarray(end + 4));
        resolve({ status, reason: '' });
      } else {
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(received.subarray(0, end).toString('latin1'))?.[1] ?? NaN);
        if (received.length >= end + 4 + length) done(); // else: until the proxy closes
      }
    };
    socket.on('data', onData);
    socket.once('end', done);
    socket.once('error', (err) => reject(new Error(`cannot reach the proxy at ${proxyUrl}: ${err.message}`)));
    socket.write(head);
  });
}

function hostAndPort(registry: string): { host: string; port: number } {
  const match = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(registry);
  return { host: (match?.[1] ?? registry).replace(/^\[(.*)\]$/, '$1'), port: Number(match?.[2] ?? 443) };
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
