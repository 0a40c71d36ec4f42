// GET and HEAD of /v2/<name>/manifests/<reference>. A digest is served from the cache for ever; a tag
// while its TTL tier says it is fresh, then revalidated with a HEAD upstream (which Docker Hub does not
// count against the pull limit) and fetched with GET only when its digest changed. When upstream fails
// (network, TLS, timeout, 429, 5xx) a cached manifest is served stale, up to maxStale.
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { ManifestPolicy, RegistryPolicy } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import { normaliseAccept, type ManifestStore, type StoredManifest } from '../cache/manifest-store.ts';
import type { CacheStatus, Logger } from '../log.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { describeUpstreamError, responseHeadersForClient } from '../upstream/forward.ts';
import type { RateLimits } from '../upstream/rate-limits.ts';
import { sendRegistryError } from './errors.ts';
import type { RepositoryName } from './route.ts';

/** distribution refuses manifests larger than this; so do we, rather than buffer without end. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Upstream answers after which a cached manifest is served stale rather than the error. */
const STALE_ON_STATUS = new Set([429, 500, 502, 503, 504]);

export interface ManifestRequest {
  registry: RegistryPolicy;
  upstream: UpstreamConfig;
  hostHeader: string;
  name: RepositoryName;
  reference: string;
  byDigest: boolean;
}

export interface ManifestResult {
  status: number;
  bytes: number;
  cache: CacheStatus;
  upstreamStatus?: number;
  upstreamMs?: number;
  error?: string;
}

export interface ManifestDeps {
  store: ManifestStore;
  upstreams: UpstreamAgents;
  rateLimits: RateLimits;
  log: Logger;
}

export type ManifestHandler = (req: IncomingMessage, res: ServerResponse, manifest: ManifestRequest) => Promise<ManifestResult>;

interface Upstream {
  dispatcher: Dispatcher;
  request: ManifestRequest;
  req: IncomingMessage;
  deps: ManifestDeps;
}

export function createManifestHandler(deps: ManifestDeps): ManifestHandler {
  return async (req, res, request) => {
    const upstream: Upstream = { dispatcher: deps.upstreams.for(request.upstream), request, req, deps };
    const { registry, name, reference } = request;
    const access: Access = req.headers.authorization ? 'client' : 'anonymous';

    if (request.byDigest) {
      const stored = deps.store.body(registry.key, name, reference);
      if (stored && (stored.access === 'anonymous' || (await confirm(upstream)).kind === 'same')) {
        return send(req, res, stored, 'HIT');
      }
      return fetchAndStore(upstream, res, access, undefined);
    }

    const accept = normaliseAccept(req.headers.accept);
    const tag = deps.store.tag(registry.key, name, reference, accept);
    const stored = tag ? deps.store.body(registry.key, name, tag.digest) : undefined;
    if (!tag || !stored) return fetchAndStore(upstream, res, access, accept);

    const age = Date.now() - tag.validatedAt;
    // Private content is always confirmed with the client's own credentials (that is the access check).
    if (tag.access === 'anonymous' && age < ttlFor(registry.manifests, reference)) return send(req, res, stored, 'HIT');

    const confirmed = await confirm(upstream, tag.digest);
    switch (confirmed.kind) {
      case 'same':
        await deps.store.putTag(registry.key, name, reference, accept, { ...tag, validatedAt: Date.now() });
        return send(req, res, stored, 'REVALIDATED', confirmed.upstreamMs);
      case 'changed':
        return fetchAndStore(upstream, res, access, accept, 'REVALIDATED');
      case 'failed':
        if (age - ttlFor(registry.manifests, reference) <= registry.manifests.maxStaleMs) {
          deps.log.warn('upstream failed; serving a stale manifest', { registry: registry.key, repository: name, tag: reference, error: confirmed.error });
          return send(req, res, stored, 'STALE', undefined, confirmed.error);
        }
        return relayFailure(res, confirmed, request);
      case 'refused':
        if (confirmed.status === 404) await deps.store.forgetTag(registry.key, name, reference);
        return relayFailure(res, confirmed, request);
    }
  };
}

/** The tag's TTL: the first tier whose anchored regex matches, else the default; 0 when disabled. */
export function ttlFor(policy: ManifestPolicy, tag: string): number {
  if (!policy.enabled) return 0;
  return policy.tiers.find((tier) => tier.regex.test(tag))?.ttlMs ?? policy.defaultTtlMs;
}

type Confirmation =
  | { kind: 'same'; upstreamMs: number }
  | { kind: 'changed' }
  /** Network, TLS, timeout, 429, 5xx: a stale copy may be served. */
  | { kind: 'failed'; error: string; status?: number; headers?: Record<string, string | string[]>; body?: Buffer }
  /** Upstream says no (401, 403, 404…): the client gets that answer. */
  | { kind: 'refused'; status: number; headers: Record<string, string | string[]>; body: Buffer };

/** HEAD upstream with the client's Accept and credentials: does the reference still name `digest`? */
async function confirm(upstream: Upstream, digest?: string): Promise<Confirmation> {
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  try {
    response = await upstreamRequest(upstream, 'HEAD');
  } catch (err) {
    return { kind: 'failed', error: describeUpstreamError(err as Error) };
  }
  await response.body.dump();
  upstream.deps.rateLimits.record(upstream.request.registry.key, response.headers);
  if (response.statusCode === 200) {
    const current = response.headers['docker-content-digest'];
    if (digest === undefined || current === digest) return { kind: 'same', upstreamMs: Math.round(performance.now() - started) };
    return { kind: 'changed' };
  }
  const failure = { status: response.statusCode, headers: responseHeadersForClient(response.headers), body: Buffer.alloc(0) };
  if (STALE_ON_STATUS.has(response.statusCode)) return { kind: 'failed', error: `upstream answered ${response.statusCode}`, ...failure };
  return { kind: 'refused', ...failure };
}

/**
 * GET upstream; a 200 is verified against its digest, stored and served; anything else is relayed.
 * A client's HEAD stays a HEAD upstream (relayed, nothing stored): HEAD is free on Docker Hub, GET is not.
 */
async function fetchAndStore(upstream: Upstream, res: ServerResponse, access: Access, accept: string | undefined, cache: CacheStatus = 'MISS'): Promise<ManifestResult> {
  const { req, request, deps } = upstream;
  const method = req.method === 'HEAD' ? 'HEAD' : 'GET';
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  try {
    response = await upstreamRequest(upstream, method);
  } catch (err) {
    const message = describeUpstreamError(err as Error);
    sendRegistryError(res, 502, 'UNAVAILABLE', `upstream ${request.upstream.origin} failed: ${message}`);
    return { status: 502, bytes: 0, cache, error: message };
  }
  const upstreamMs = Math.round(performance.now() - started);
  deps.rateLimits.record(request.registry.key, response.headers);
  const body = await readLimited(response.body);
  if (method === 'HEAD' || response.statusCode !== 200 || body === undefined) {
    // Upstream's own answer, as it came (an uncached request fails fast with upstream's error).
    return relay(req, res, response.statusCode, responseHeadersForClient(response.headers), body ?? Buffer.alloc(0), cache, upstreamMs);
  }
  const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`;
  const announced = response.headers['docker-content-digest'];
  const expected = request.byDigest ? request.reference : typeof announced === 'string' && announced.startsWith('sha256:') ? announced : digest;
  if (expected.startsWith('sha256:') && expected !== digest) {
    const message = `upstream sent a manifest whose sha256 is ${digest}, not ${expected}: not cached`;
    deps.log.warn(message, { registry: request.registry.key, repository: request.name, reference: request.reference });
    sendRegistryError(res, 502, 'MANIFEST_INVALID', message);
    return { status: 502, bytes: 0, cache, upstreamStatus: 200, error: message };
  }
  const mediaType = String(response.headers['content-type'] ?? 'application/octet-stream');
  const stored: StoredManifest = { body, mediaType, digest: expected, storedAt: Date.now(), access };
  await deps.store.putBody(request.registry.key, request.name, stored);
  if (!request.byDigest && accept !== undefined) {
    await deps.store.putTag(request.registry.key, request.name, request.reference, accept, { digest: expected, mediaType, size: body.length, validatedAt: Date.now(), access });
  }
  return { ...send(req, res, stored, cache), upstreamStatus: 200, upstreamMs };
}

function upstreamRequest(upstream: Upstream, method: 'GET' | 'HEAD'): Promise<Dispatcher.ResponseData> {
  const { req, request } = upstream;
  const headers: Record<string, string> = { host: request.hostHeader };
  for (const name of ['accept', 'authorization', 'user-agent'] as const) {
    const value = req.headers[name];
    if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  return upstream.dispatcher.request({ origin: request.upstream.origin, path: `/v2/${request.name}/manifests/${request.reference}`, method, headers });
}

/** The manifest exactly as stored; HEAD gets the same headers without the body. */
function send(req: IncomingMessage, res: ServerResponse, manifest: StoredManifest, cache: CacheStatus, upstreamMs?: number, staleBecause?: string): ManifestResult {
  res.writeHead(200, {
    'Content-Type': manifest.mediaType,
    'Content-Length': manifest.body.length,
    'Docker-Content-Digest': manifest.digest,
    'Docker-Distribution-API-Version': 'registry/2.0',
    ETag: `"${manifest.digest}"`,
    'X-Cache': cache,
    ...(staleBecause ? { Warning: '110 pullthrough "Response is Stale"' } : {}),
  });
  res.end(req.method === 'HEAD' ? undefined : manifest.body);
  return { status: 200, bytes: req.method === 'HEAD' ? 0 : manifest.body.length, cache, ...(upstreamMs !== undefined ? { upstreamMs } : {}), ...(staleBecause ? { error: staleBecause } : {}) };
}

function relay(req: IncomingMessage, res: ServerResponse, status: number, headers: Record<string, string | string[]>, body: Buffer, cache: CacheStatus, upstreamMs?: number): ManifestResult {
  // A HEAD keeps upstream's Content-Length (the size of the body it did not send); a GET gets the body's.
  res.writeHead(status, { ...headers, ...(req.method === 'HEAD' ? {} : { 'content-length': String(body.length) }), 'X-Cache': cache });
  res.end(req.method === 'HEAD' ? undefined : body);
  return { status, bytes: req.method === 'HEAD' ? 0 : body.length, cache, upstreamStatus: status, ...(upstreamMs !== undefined ? { upstreamMs } : {}) };
}

function relayFailure(res: ServerResponse, failure: Extract<Confirmation, { kind: 'failed' | 'refused' }>, request: ManifestRequest): ManifestResult {
  if (failure.status === undefined) {
    const message = `upstream ${request.upstream.origin} failed: ${'error' in failure ? failure.error : ''}`;
    sendRegistryError(res, 502, 'UNAVAILABLE', message);
    return { status: 502, bytes: 0, cache: 'MISS', error: message };
  }
  return relay(res.req, res, failure.status, failure.headers ?? {}, failure.body ?? Buffer.alloc(0), 'MISS');
}

async function readLimited(body: AsyncIterable<Buffer> & { destroy(): void }): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    if (size > MAX_MANIFEST_BYTES) {
      body.destroy();
      return undefined;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}
