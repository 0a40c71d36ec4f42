// `pullthrough warm IMAGE…`: pre-fills the cache by pulling through the running proxy exactly as a
// client would (CONNECT, the proxy's CA, manifests, then every blob), one progress bar per layer.
import net from 'node:net';
import tls from 'node:tls';
import { MultiBar, Presets } from 'cli-progress';
import { ProxyAgent, request, type Dispatcher } from 'undici';
import { proxyUrlForDisplay } from '../../config/policy.ts';
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

/** An image and, for a multi-platform one, the platforms to fetch (absent: WarmOptions.platforms). */
export interface WarmTarget {
  image: string;
  platforms?: string[];
}

export interface WarmOptions {
  /** The proxy, e.g. http://127.0.0.1:3128 (a proxy user may be in it, or in proxyUser). */
  proxyUrl: string;
  /** "os/arch[/variant]" for images that name none; every platform of an index when absent or empty. */
  platforms?: string[];
  /** The proxy user to authenticate as (kept out of proxyUrl so that no message can show the password). */
  proxyUser?: { name: string; password: string };
  /** The proxy's CA, when the caller has it (else it is read from the proxy's /ca.crt). */
  caPem?: string;
  /** Progress bars on stderr (off when not a terminal, and in tests). */
  progress: boolean;
  out: (line: string) => void;
  /** Called for each image warmed, as it ends. */
  warmed?: (summary: WarmSummary) => void;
  /**
   * Called for each image that fails, after which the others go on; without it the first failure
   * throws (the CLI's way).
   */
  failed?: (image: string, err: Error) => void;
  /** Stops the warm-up: what is in flight is cut, no further image starts. */
  signal?: AbortSignal;
}

export interface WarmSummary {
  image: string;
  /** The platforms fetched ("os/arch[/variant]"); empty for a single-platform image. */
  platforms: string[];
  /** Platforms asked for that the index does not have. */
  missing: string[];
  manifests: number;
  blobs: number;
  bytes: number;
  /** Blobs by the proxy's X-Cache status (MISS, HIT, JOINED…). */
  cache: Record<string, number>;
}

export async function warm(images: Array<string | WarmTarget>, options: WarmOptions): Promise<WarmSummary[]> {
  const shown = proxyUrlForDisplay(options.proxyUrl, '');
  const caPem = options.caPem ?? (await fetchCa(options.proxyUrl, shown));
  const targets = images.map((target) => (typeof target === 'string' ? { image: target } : target));
  const refs: Array<WarmTarget & { ref: ImageReference }> = [];
  for (const target of targets) {
    try {
      refs.push({ ...target, ref: parseImageReference(target.image) });
    } catch (err) {
      if (!options.failed) throw err;
      options.failed(target.image, err as Error);
    }
  }
  const authorization = proxyAuthorization(options);
  // Before anything is pulled: a registry the proxy does not intercept would be pulled past the cache.
  const refused = new Map<string, Error>();
  for (const registry of new Set(refs.map(({ ref }) => ref.registry))) {
    try {
      await checkIntercepted(options.proxyUrl, registry, caPem, authorization);
    } catch (err) {
      if (!options.failed) throw err;
      refused.set(registry, err as Error);
    }
  }
  const agent = new ProxyAgent({ uri: proxyUrlWithoutUser(options.proxyUrl), requestTls: { ca: caPem }, ...(authorization ? { token: authorization } : {}) });
  const abort = () => void agent.destroy(new Error('the warm-up was stopped')).catch(() => {});
  options.signal?.addEventListener('abort', abort, { once: true });
  const bars = options.progress ? new MultiBar({ format: ' {bar} {percentage}% | {name} | {value}/{total} bytes', hideCursor: true, clearOnComplete: false }, Presets.shades_classic) : undefined;
  try {
    const summaries: WarmSummary[] = [];
    for (const target of refs) {
      if (options.signal?.aborted) throw new Error('the warm-up was stopped');
      try {
        const notIntercepted = refused.get(target.ref.registry);
        if (notIntercepted) throw notIntercepted;
        summaries.push(await warmImage(target.ref, target.image, target.platforms ?? options.platforms ?? [], agent, options, bars));
      } catch (err) {
        if (!options.failed || options.signal?.aborted) throw err;
        options.failed(target.image, err as Error);
      }
    }
    return summaries;
  } finally {
    options.signal?.removeEventListener('abort', abort);
    bars?.stop();
    await agent.close().catch(() => {});
  }
}

async function fetchCa(proxyUrl: string, shown: string): Promise<string> {
  const caPem = await request(`${proxyUrlWithoutUser(proxyUrl)}/ca.crt`).then(
    (response) => response.body.text(),
    (err: NodeJS.ErrnoException) => {
      throw new Error(`cannot reach the proxy at ${shown} (${err.code ?? err.message}): is it running there? Name it with --proxy URL or PULLTHROUGH_PROXY`);
    },
  );
  if (!caPem.includes('BEGIN CERTIFICATE')) throw new Error(`${shown}/ca.crt did not return a certificate: is the proxy running there?`);
  return caPem;
}

function proxyUrlWithoutUser(proxyUrl: string): string {
  const url = new URL(proxyUrl);
  url.username = '';
  url.password = '';
  return url.href.replace(/\/$/, '');
}

/** The Proxy-Authorization value: options.proxyUser, else the user in the proxy URL; undefined for none. */
function proxyAuthorization(options: Pick<WarmOptions, 'proxyUrl' | 'proxyUser'>): string | undefined {
  const url = new URL(options.proxyUrl);
  const user = options.proxyUser ?? (url.username ? { name: decodeURIComponent(url.username), password: decodeURIComponent(url.password) } : undefined);
  return user ? `Basic ${Buffer.from(`${user.name}:${user.password}`).toString('base64')}` : undefined;
}

async function warmImage(ref: ImageReference, image: string, platforms: string[], agent: Dispatcher, options: WarmOptions, bars: MultiBar | undefined): Promise<WarmSummary> {
  const client = new RegistryClient(ref, agent, options.signal);
  const summary: WarmSummary = { image, platforms: [], missing: [], manifests: 0, blobs: 0, bytes: 0, cache: {} };
  const top = await client.manifest(ref.reference);
  summary.manifests++;
  const images: Manifest[] = [];
  if (top.manifests) {
    const wanted = top.manifests.filter((m) => platforms.length === 0 || platforms.some((p) => matchesPlatform(m, p)));
    if (wanted.length === 0) throw new Error(`${image} has no manifest for ${platforms.length > 1 ? 'any of the platforms' : 'platform'} ${platforms.join(', ')} (it has ${platformsOf(top.manifests).join(', ') || 'none named'})`);
    summary.missing = platforms.filter((p) => !top.manifests!.some((m) => matchesPlatform(m, p)));
    summary.platforms = platformsOf(wanted);
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
  const missing = summary.missing.length > 0 ? `; it has no ${summary.missing.join(', ')}` : '';
  options.warmed?.(summary);
  options.out(`${image}: ${summary.manifests} manifests, ${summary.blobs} blobs, ${humanBytes(summary.bytes)} (${Object.entries(summary.cache).map(([k, v]) => `${v} ${k}`).join(', ')})${missing}`);
  return summary;
}

function platformsOf(descriptors: Descriptor[]): string[] {
  return descriptors.flatMap((d) => (d.platform ? [[d.platform.os, d.platform.architecture, d.platform.variant].filter(Boolean).join('/')] : []));
}

/**
 * Whether the proxy intercepts `registry` (host or host:port), asked the way a client finds out: CONNECT
 * through it, then a TLS handshake that trusts the proxy's CA alone. The proxy answers an intercepted
 * registry's CONNECT itself, with a certificate from its CA; any other host it tunnels (the registry's
 * own certificate comes back) or refuses (with its reason). Throws a message that says which and what to do.
 */
export async function checkIntercepted(proxyUrl: string, registry: string, caPem: string, authorization = proxyAuthorization({ proxyUrl })): Promise<void> {
  const { host, port } = hostAndPort(registry);
  const target = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  const remedy = `Add it under registries: in the proxy's proxy.yaml (or to REGISTRIES) and restart the proxy; \`pullthrough check-config\` lists what it intercepts.`;
  const proxy = new URL(proxyUrl);
  const auth = authorization ? `Proxy-Authorization: ${authorization}\r\n` : '';
  proxyUrl = proxyUrlForDisplay(proxyUrl, ''); // for the messages below
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

function matchesPlatform(descriptor: Descriptor, platform: string): boolean {
  const [os, architecture, variant] = platform.split('/');
  const p = descriptor.platform;
  return !!p && p.os === os && p.architecture === architecture && (variant === undefined || p.variant === variant);
}

/** The few registry calls warm needs, with an anonymous token when the registry asks for one. */
class RegistryClient {
  private token: string | undefined;
  private readonly ref: ImageReference;
  private readonly agent: Dispatcher;
  private readonly signal: AbortSignal | undefined;

  constructor(ref: ImageReference, agent: Dispatcher, signal?: AbortSignal) {
    this.ref = ref;
    this.agent = agent;
    this.signal = signal;
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
      ...(this.signal ? { signal: this.signal } : {}),
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
