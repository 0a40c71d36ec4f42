// GET and HEAD of /v2/<name>/manifests/<reference>. A digest is served from the cache for ever; a tag
// while its TTL tier says it is fresh, then revalidated with a HEAD upstream (which Docker Hub does not
// count against the pull limit) and fetched with GET only when its digest changed. When upstream fails
// (network, TLS, timeout, 429, 5xx) a cached manifest is served stale, up to maxStale.
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { ManifestPolicy, ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import { normaliseAccept, type ManifestStore, type StoredManifest } from '../cache/manifest-store.ts';
import type { CacheStatus, Logger } from '../log.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { describeUpstreamError, responseHeadersForClient } from '../upstream/forward.ts';
import type { RateLimits } from '../upstream/rate-limits.ts';
import { endSpan, startUpstreamSpan } from '../tracing.ts';
import { readAtMost } from '../upstream/body.ts';
import { sendRegistryError } from './errors.ts';
import type { ReadAccess, ReadVerdict } from './read-access.ts';
import { parseDigest, type RepositoryName } from './route.ts';
import type { UpstreamAuth, UpstreamTarget } from './upstream-auth.ts';

/** distribution refuses manifests larger than this; so do we, rather than buffer without end. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Upstream answers after which a cached manifest is served stale rather than the error. */
export const STALE_ON_STATUS: ReadonlySet<number> = new Set([429, 500, 502, 503, 504]);

export interface ManifestRequest {
  registry: RegistryPolicy;
  upstream: UpstreamConfig;
  hostHeader: string;
  name: RepositoryName;
  reference: string;
  byDigest: boolean;
  /** The proxy user on the other end, when users are configured. */
  user?: ProxyUser;
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
  auth: UpstreamAuth;
  readAccess: ReadAccess;
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

    if (request.byDigest) {
      const stored = deps.store.body(registry.key, name, reference);
      if (!stored) return fetchAndStore(upstream, res, undefined);
      // Private content goes only to a client that may read it (never stale: a failing upstream proves nothing).
      return (await refuseUnlessReadable(upstream, res, stored.access)) ?? send(req, res, stored, 'HIT');
    }

    const accept = normaliseAccept(req.headers.accept);
    const tag = deps.store.tag(registry.key, name, reference, accept);
    const stored = tag ? deps.store.body(registry.key, name, tag.digest) : undefined;
    if (!tag || !stored) return fetchAndStore(upstream, res, accept);

    const ttl = ttlFor(registry.manifests, reference);
    const age = Date.now() - tag.validatedAt;
    if (age < ttl) return (await refuseUnlessReadable(upstream, res, tag.access)) ?? send(req, res, stored, 'HIT');

    // A 200 to this HEAD, made with the client's credentials (or the proxy's), is also its read check.
    const confirmed = await confirm(upstream, tag.digest);
    switch (confirmed.kind) {
      case 'same':
        await deps.store.putTag(registry.key, name, reference, accept, { ...tag, validatedAt: Date.now() });
        return send(req, res, stored, 'REVALIDATED', confirmed.upstreamMs);
      case 'changed': {
        // The tag moved. Its new manifest may be cached already (a tag moved back, or the same image
        // pulled by digest): content-addressed, so the HEAD that named it is all the GET would tell.
        const known = confirmed.digest ? deps.store.body(registry.key, name, confirmed.digest) : undefined;
        if (known) {
          await deps.store.putTag(registry.key, name, reference, accept, { digest: known.digest, mediaType: known.mediaType, size: known.body.length, validatedAt: Date.now(), access: confirmed.access });
          return send(req, res, known, 'REVALIDATED', confirmed.upstreamMs);
        }
        // A HEAD has its answer already: the HEAD upstream just gave. Only a GET costs a GET.
        if (req.method === 'HEAD') return relay(req, res, 200, confirmed.headers, Buffer.alloc(0), 'MISS', confirmed.upstreamMs);
        return fetchAndStore(upstream, res, accept);
      }
      case 'failed':
        if (age - ttl <= registry.manifests.maxStaleMs && readableWithoutUpstream(upstream, tag.access)) {
          deps.log.warn('upstream failed; serving a stale manifest', { registry: registry.key, repository: name, tag: reference, error: confirmed.error });
          return send(req, res, stored, 'STALE', undefined, confirmed.error);
        }
        return relayFailure(req, res, confirmed, request);
      case 'refused':
        if (confirmed.status === 404) await deps.store.forgetTag(registry.key, name, reference);
        return relayFailure(req, res, confirmed, request);
    }
  };
}

function targetOf(request: ManifestRequest): UpstreamTarget & { repository: string } {
  return { registry: request.registry, upstream: request.upstream, hostHeader: request.hostHeader, repository: request.name };
}

/** R6 for a cached manifest: undefined when this client may read it, else the refusal it was sent. */
async function refuseUnlessReadable(upstream: Upstream, res: ServerResponse, access: Access): Promise<ManifestResult | undefined> {
  const { req, request, deps } = upstream;
  let verdict: ReadVerdict;
  try {
    verdict = await deps.readAccess.check({ access, req, user: request.user, target: targetOf(request), path: manifestPath(request) });
  } catch (err) {
    const message = `cannot verify read access with ${request.upstream.origin}: ${describeUpstreamError(err as Error)}`;
    sendRegistryError(res, 503, 'UNAVAILABLE', message);
    return { status: 503, bytes: 0, cache: 'HIT', error: message };
  }
  if (verdict.allowed) return undefined;
  const failure = { kind: 'refused' as const, status: verdict.status, headers: verdict.headers, body: Buffer.alloc(0) };
  return { ...relayFailure(req, res, failure, request), cache: 'HIT', error: 'read access refused' };
}

/** While upstream fails, only what needs no upstream proof may be served stale. */
function readableWithoutUpstream(upstream: Upstream, access: Access): boolean {
  return upstream.deps.readAccess.allowedWithoutUpstream({ access, user: upstream.request.user, target: targetOf(upstream.request) });
}

/** The tag's TTL: the first tier whose anchored regex matches, else the default; 0 when disabled. */
export function ttlFor(policy: ManifestPolicy, tag: string): number {
  if (!policy.enabled) return 0;
  return policy.tiers.find((tier) => tier.regex.test(tag))?.ttlMs ?? policy.defaultTtlMs;
}

type Confirmation =
  | { kind: 'same'; upstreamMs: number }
  /** `digest`: what the reference names now, when upstream said; `headers`: its answer, for a HEAD client. */
  | { kind: 'changed'; digest?: string; headers: Record<string, string | string[]>; upstreamMs: number; access: Access }
  /** Network, TLS, timeout, 429, 5xx: a stale copy may be served. */
  | { kind: 'failed'; error: string; status?: number; headers?: Record<string, string | string[]>; body?: Buffer }
  /** Upstream says no (401, 403, 404…): the client gets that answer. */
  | { kind: 'refused'; status: number; headers: Record<string, string | string[]>; body: Buffer };

/** HEAD upstream with the client's Accept and credentials: does the reference still name `digest`? */
async function confirm(upstream: Upstream, digest: string): Promise<Confirmation> {
  const span = startUpstreamSpan('HEAD', () => manifestUrl(upstream.request), { 'pullthrough.purpose': upstream.request.byDigest ? 'read-access' : 'revalidate' });
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  let access: Access;
  try {
    ({ response, access } = await upstreamRequest(upstream, 'HEAD'));
  } catch (err) {
    const error = describeUpstreamError(err as Error);
    endSpan(span, {}, error);
    return { kind: 'failed', error };
  }
  await response.body.dump();
  endSpan(span, { 'http.response.status_code': response.statusCode });
  const upstreamMs = Math.round(performance.now() - started);
  upstream.deps.rateLimits.record(upstream.request.registry.key, response.headers);
  const headers = responseHeadersForClient(response.headers);
  if (response.statusCode === 200) {
    const current = response.headers['docker-content-digest'];
    if (current === digest) return { kind: 'same', upstreamMs };
    return { kind: 'changed', ...(typeof current === 'string' && parseDigest(current) ? { digest: current } : {}), headers, upstreamMs, access };
  }
  const failure = { status: response.statusCode, headers, body: Buffer.alloc(0) };
  if (STALE_ON_STATUS.has(response.statusCode)) return { kind: 'failed', error: `upstream answered ${response.statusCode}`, ...failure };
  return { kind: 'refused', ...failure };
}

/**
 * GET upstream; a 200 is verified against its digest, stored and served; anything else is relayed.
 * A client's HEAD stays a HEAD upstream (relayed, nothing stored): HEAD is free on Docker Hub, GET is not.
 */
async function fetchAndStore(upstream: Upstream, res: ServerResponse, accept: string | undefined): Promise<ManifestResult> {
  const { req, request, deps } = upstream;
  const cache: CacheStatus = 'MISS';
  const method = req.method === 'HEAD' ? 'HEAD' : 'GET';
  const span = startUpstreamSpan(method, () => manifestUrl(request), { 'pullthrough.purpose': 'fetch' });
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  let access: Access;
  try {
    ({ response, access } = await upstreamRequest(upstream, method));
  } catch (err) {
    const message = describeUpstreamError(err as Error);
    endSpan(span, {}, message);
    sendRegistryError(res, 502, 'UNAVAILABLE', `upstream ${request.upstream.origin} failed: ${message}`);
    return { status: 502, bytes: 0, cache, error: message };
  }
  const upstreamMs = Math.round(performance.now() - started);
  deps.rateLimits.record(request.registry.key, response.headers);
  let body: Buffer | undefined;
  try {
    body = await readAtMost(response.body, MAX_MANIFEST_BYTES);
  } finally {
    endSpan(span, { 'http.response.status_code': response.statusCode, ...(body ? { 'pullthrough.bytes': body.length } : {}) }, body ? undefined : 'the body was cut or too large');
  }
  if (body === undefined) {
    // Never relayed as a 200 with a cut body: the client would take the stub for the manifest.
    const message = `upstream sent a manifest larger than ${MAX_MANIFEST_BYTES} bytes: refused`;
    deps.log.warn(message, { registry: request.registry.key, repository: request.name, reference: request.reference });
    sendRegistryError(res, 502, 'MANIFEST_INVALID', message);
    return { status: 502, bytes: 0, cache, upstreamStatus: response.statusCode, upstreamMs, error: message };
  }
  if (method === 'HEAD' || response.statusCode !== 200) {
    // Upstream's own answer, as it came (an uncached request fails fast with upstream's error).
    return relay(req, res, response.statusCode, responseHeadersForClient(response.headers), body, cache, upstreamMs);
  }
  const announced = response.headers['docker-content-digest'];
  const expected = request.byDigest ? request.reference : typeof announced === 'string' && parseDigest(announced) ? announced : digestOf(body, 'sha256');
  const actual = digestOf(body, expected.startsWith('sha512:') ? 'sha512' : 'sha256');
  if (actual !== expected) {
    const message = `upstream sent a manifest whose digest is ${actual}, not ${expected}: not cached`;
    deps.log.warn(message, { registry: request.registry.key, repository: request.name, reference: request.reference });
    sendRegistryError(res, 502, 'MANIFEST_INVALID', message);
    return { status: 502, bytes: 0, cache, upstreamStatus: 200, upstreamMs, error: message };
  }
  const mediaType = String(response.headers['content-type'] ?? 'application/octet-stream');
  const stored: StoredManifest = { body, mediaType, digest: expected, storedAt: Date.now(), access };
  await deps.store.putBody(request.registry.key, request.name, stored);
  if (!request.byDigest && accept !== undefined) {
    await deps.store.putTag(request.registry.key, request.name, request.reference, accept, { digest: expected, mediaType, size: body.length, validatedAt: Date.now(), access });
  }
  return { ...send(req, res, stored, cache), upstreamStatus: 200, upstreamMs };
}

function digestOf(body: Buffer, algorithm: 'sha256' | 'sha512'): string {
  return `${algorithm}:${createHash(algorithm).update(body).digest('hex')}`;
}

function manifestPath(request: ManifestRequest): string {
  return `/v2/${request.name}/manifests/${request.reference}`;
}

/** The manifest's upstream URL, for spans. */
function manifestUrl(request: ManifestRequest): string {
  return `${request.upstream.origin}${manifestPath(request)}`;
}

/** With the client's Accept and the Authorization decided for it; `access`: what the answer is labelled. */
async function upstreamRequest(upstream: Upstream, method: 'GET' | 'HEAD'): Promise<{ response: Dispatcher.ResponseData; access: Access }> {
  const { req, request } = upstream;
  const headers: Record<string, string> = { host: request.hostHeader };
  for (const name of ['accept', 'user-agent'] as const) {
    const value = req.headers[name];
    if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  const target = targetOf(request);
  const { response, decision } = await upstream.deps.auth.request(target, await upstream.deps.auth.decide(req, target), (authorization) =>
    upstream.dispatcher.request({ origin: request.upstream.origin, path: manifestPath(request), method, headers: { ...headers, ...(authorization ? { authorization } : {}) } }),
  );
  return { response, access: decision.access };
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

/** Registry error codes for the statuses a HEAD can answer with, so a GET client can print the reason. */
const CODE_FOR_STATUS: Record<number, string> = { 401: 'UNAUTHORIZED', 403: 'DENIED', 404: 'MANIFEST_UNKNOWN', 429: 'TOOMANYREQUESTS' };

function relayFailure(req: IncomingMessage, res: ServerResponse, failure: Extract<Confirmation, { kind: 'failed' | 'refused' }>, request: ManifestRequest): ManifestResult {
  if (failure.status === undefined) {
    const message = `upstream ${request.upstream.origin} failed: ${'error' in failure ? failure.error : ''}`;
    sendRegistryError(res, 502, 'UNAVAILABLE', message);
    return { status: 502, bytes: 0, cache: 'MISS', error: message };
  }
  // The answer came to our HEAD, which has no body; a GET client gets a registry-style one instead of
  // an empty body under upstream's headers (Retry-After, WWW-Authenticate and ratelimit-* are kept).
  let headers = failure.headers ?? {};
  let body = failure.body ?? Buffer.alloc(0);
  if (req.method !== 'HEAD' && body.length === 0) {
    const code = CODE_FOR_STATUS[failure.status] ?? 'UNAVAILABLE';
    body = Buffer.from(JSON.stringify({ errors: [{ code, message: `upstream ${request.upstream.origin} answered ${failure.status} for ${request.name}:${request.reference}` }] }) + '\n');
    headers = { ...headers, 'content-type': 'application/json; charset=utf-8' };
  }
  return relay(req, res, failure.status, headers, body, 'MISS');
}
