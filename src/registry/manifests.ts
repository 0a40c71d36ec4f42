// GET and HEAD of /v2/<name>/manifests/<reference>. A digest is served from the cache for ever; a tag
// while its TTL tier says it is fresh, then revalidated with a HEAD upstream (which Docker Hub does not
// count against the pull limit) and fetched with GET only when its digest changed. When upstream fails
// (network, TLS, timeout, 429, 5xx, a token service that is down) a cached manifest is served stale,
// up to maxStale.
//
// One upstream request per tag, whatever the client: every request that needs upstream joins the one
// flight of its tag (or digest) in progress, and is answered from what it brought. A tag is cached once,
// with its media type, and served to any client whose Accept admits that type, so docker, containerd
// and podman share it. containerd resolves a tag with HEAD and then GETs the digest: an uncached tag's
// HEAD is answered by fetching the manifest once (GET), so the GET that follows is a hit and Docker
// Hub counts one pull, as without the proxy. Redirects (registry.k8s.io sends manifests to a regional
// host) are followed here, and what they lead to is cached under the name the client asked for.
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { ManifestPolicy, ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import { baseMediaType, normaliseAccept, type ManifestStore, type StoredManifest, type TagEntry } from '../cache/manifest-store.ts';
import type { CacheStatus, Logger } from '../log.ts';
import { SingleFlight } from '../single-flight.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { describeUpstreamError, responseHeadersForClient, type ForwardResult } from '../upstream/forward.ts';
import type { RateLimits } from '../upstream/rate-limits.ts';
import { requestFollowingRedirects } from '../upstream/redirects.ts';
import { endSpan, startUpstreamSpan } from '../tracing.ts';
import { readAtMost } from '../upstream/body.ts';
import { sendRegistryError } from './errors.ts';
import type { ReadAccess, ReadVerdict } from './read-access.ts';
import type { LayerPrefetch } from './prefetch.ts';
import { parseDigest, type RepositoryName } from './route.ts';
import { clientAuthorization, credentialHash, type AuthDecision, type UpstreamAuth, type UpstreamTarget } from './upstream-auth.ts';

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

/** What a manifest (or referrers) request came to: a forward's figures, and where the answer came from. */
export type ManifestResult = ForwardResult & { cache: CacheStatus };

export interface ManifestDeps {
  store: ManifestStore;
  upstreams: UpstreamAgents;
  rateLimits: RateLimits;
  auth: UpstreamAuth;
  readAccess: ReadAccess;
  log: Logger;
  /** Told of a manifest whose bytes did not match its digest (the metrics count them). */
  digestMismatch?: (registry: string) => void;
  /** Told of every image manifest a GET was answered with: its layers may be fetched ahead (src/registry/prefetch.ts). */
  prefetch?: LayerPrefetch;
}

export type ManifestHandler = (req: IncomingMessage, res: ServerResponse, manifest: ManifestRequest) => Promise<ManifestResult>;

/** One client's request, with what it needs to ask upstream on its own behalf. */
interface Asking {
  req: IncomingMessage;
  request: ManifestRequest;
  /** Normalised Accept set. */
  accept: string;
  dispatcher: Dispatcher;
  deps: ManifestDeps;
}

/** What the cache holds for a request: the manifest, and for a tag the variant that names it. */
interface Cached {
  stored: StoredManifest;
  tag?: TagEntry;
}

/** What one flight to upstream ended with; every client that joined it is answered from this. */
type FlightOutcome =
  /** Upstream gave (or confirmed) this manifest; it is in the cache. */
  | { kind: 'manifest'; manifest: StoredManifest; cache: 'MISS' | 'REVALIDATED'; accept: string; upstreamStatus?: number; upstreamMs?: number }
  /** Upstream failed (network, TLS, timeout, 429, 5xx, its token service): a stale copy may be served. */
  | { kind: 'failed'; error: string; status?: number; headers?: Record<string, string | string[]>; body?: Buffer; upstreamMs?: number }
  /** Upstream said no (401, 403, 404…) to these credentials; `identity`: whose. */
  | { kind: 'refused'; status: number; headers: Record<string, string | string[]>; body: Buffer; identity: string; upstreamMs?: number }
  /** An uncached digest's HEAD, relayed as upstream answered it (a HEAD of a digest never costs a GET). */
  | { kind: 'head'; status: number; headers: Record<string, string | string[]>; upstreamMs?: number }
  /** Nothing that should reach a client (a lie about a digest, an oversized body): answered as is. */
  | { kind: 'invalid'; status: number; code: string; message: string; upstreamStatus?: number; upstreamMs?: number };

export function createManifestHandler(deps: ManifestDeps): ManifestHandler {
  const flights = new SingleFlight<FlightOutcome>();

  /** `joinable`: may join a flight in progress (not after a refusal of someone else's credentials). */
  const handle = async (asking: Asking, res: ServerResponse, joinable: boolean, round = 0): Promise<ManifestResult> => {
    const { request } = asking;
    const cached = lookup(asking);
    if (cached && isFresh(asking, cached)) {
      return (await refuseUnlessReadable(asking, res, cached.tag?.access ?? cached.stored.access, cached)) ?? send(asking, res, cached.stored, 'HIT');
    }
    const key = `${request.registry.key}/${request.name}${request.byDigest ? '@' : ':'}${request.reference}`;
    const work = () => lead(asking, cached).catch((err: unknown): FlightOutcome => ({ kind: 'failed', error: describeUpstreamError(err as Error) }));
    // After two flights that did not fit, this client asks for itself rather than wait on a third.
    const { value: outcome, led } = joinable && round < 2 ? await flights.run(key, work) : { value: await work(), led: true };
    if (led) return answer(asking, res, outcome, cached, true);
    // Joined another client's flight: its answer fits this client unless the type or the rights differ.
    const fits =
      !(outcome.kind === 'manifest' && !request.byDigest && !admits(asking.accept, outcome)) &&
      !(outcome.kind === 'refused' && outcome.identity !== identityOf(asking.req)) &&
      !(outcome.kind === 'head' && asking.req.method !== 'HEAD');
    if (!fits) return handle(asking, res, outcome.kind !== 'refused', round + 1);
    return answer(asking, res, outcome, lookup(asking) ?? cached, false);
  };

  return (req, res, request) => handle({ req, request, accept: normaliseAccept(req.headers.accept), dispatcher: deps.upstreams.for(request.upstream), deps }, res, true);
}

/** The manifest and variant the cache would serve this client, fresh or not. */
function lookup({ deps, request, accept }: Asking): Cached | undefined {
  const { registry, name, reference } = request;
  if (request.byDigest) {
    const stored = deps.store.body(registry.key, name, reference);
    return stored ? { stored } : undefined;
  }
  const tag = deps.store.tag(registry.key, name, reference, accept);
  const stored = tag ? deps.store.body(registry.key, name, tag.digest) : undefined;
  return tag && stored ? { stored, tag } : undefined;
}

function isFresh({ request }: Asking, cached: Cached): boolean {
  if (!cached.tag) return true; // a digest never expires
  return Date.now() - cached.tag.validatedAt < ttlFor(request.registry.manifests, request.reference);
}

/** The one request (or HEAD, then GET) upstream for everyone asking for this reference now. */
async function lead(asking: Asking, cached: Cached | undefined): Promise<FlightOutcome> {
  if (!cached?.tag) return fetchAndStore(asking, asking.request.byDigest && asking.req.method === 'HEAD' ? 'HEAD' : 'GET');
  const { deps, request } = asking;
  const { registry, name, reference } = request;
  const tag = cached.tag;
  const confirmed = await confirm(asking, tag.digest);
  switch (confirmed.kind) {
    case 'same':
      await deps.store.putTag(registry.key, name, reference, { ...tag, validatedAt: Date.now() });
      return { kind: 'manifest', manifest: cached.stored, cache: 'REVALIDATED', accept: tag.accept, upstreamStatus: 200, upstreamMs: confirmed.upstreamMs };
    case 'changed': {
      // The tag moved. Its new manifest may be cached already (a tag moved back, or the same image
      // pulled by digest): content-addressed, so the HEAD that named it is all the GET would tell.
      const known = confirmed.digest ? deps.store.body(registry.key, name, confirmed.digest) : undefined;
      if (known) {
        await deps.store.putTag(registry.key, name, reference, { accept: asking.accept, digest: known.digest, mediaType: known.mediaType, size: known.body.length, validatedAt: Date.now(), access: confirmed.access });
        return { kind: 'manifest', manifest: known, cache: 'REVALIDATED', accept: asking.accept, upstreamStatus: 200, upstreamMs: confirmed.upstreamMs };
      }
      return fetchAndStore(asking, 'GET');
    }
    default:
      return confirmed;
  }
}

/** How a flight's outcome reaches one of its clients (`led`: the client whose request went upstream). */
async function answer(asking: Asking, res: ServerResponse, outcome: FlightOutcome, cached: Cached | undefined, led: boolean): Promise<ManifestResult> {
  const { req, request, deps } = asking;
  const timing = 'upstreamMs' in outcome && outcome.upstreamMs !== undefined ? { upstreamMs: outcome.upstreamMs } : {};
  switch (outcome.kind) {
    case 'manifest': {
      if (led) return { ...send(asking, res, outcome.manifest, outcome.cache, outcome.upstreamMs), ...(outcome.upstreamStatus ? { upstreamStatus: outcome.upstreamStatus } : {}) };
      // Fetched with another client's credentials: this one must be allowed to read it too.
      return (await refuseUnlessReadable(asking, res, outcome.manifest.access, { stored: outcome.manifest })) ?? send(asking, res, outcome.manifest, 'JOINED');
    }
    case 'failed': {
      const stale = cached?.tag && staleAllowed(asking, cached) ? cached : undefined;
      if (stale) {
        deps.log.warn('upstream failed; serving a stale manifest', { registry: request.registry.key, repository: request.name, tag: request.reference, error: outcome.error });
        return { ...send(asking, res, stale.stored, 'STALE', undefined, outcome.error), ...timing, ...(outcome.status !== undefined ? { upstreamStatus: outcome.status } : {}) };
      }
      return { ...relayFailure(req, res, outcome, request), ...timing };
    }
    case 'refused':
      return { ...relayFailure(req, res, outcome, request), ...timing };
    case 'head':
      return { ...relay(req, res, outcome.status, outcome.headers, Buffer.alloc(0), led ? 'MISS' : 'JOINED'), ...timing };
    case 'invalid':
      sendRegistryError(res, outcome.status, outcome.code, outcome.message);
      return { status: outcome.status, bytes: 0, cache: 'MISS', error: outcome.message, ...timing, ...(outcome.upstreamStatus !== undefined ? { upstreamStatus: outcome.upstreamStatus } : {}) };
  }
}

/** A stale tag is served while upstream fails, within maxStale, to a client that needs no upstream proof. */
function staleAllowed({ req, request, deps }: Asking, cached: Cached): boolean {
  const tag = cached.tag!;
  const overdue = Date.now() - tag.validatedAt - ttlFor(request.registry.manifests, request.reference);
  if (overdue > request.registry.manifests.maxStaleMs) return false;
  return deps.readAccess.allowedWithoutUpstream({ access: tag.access, req, path: manifestPath(request), user: request.user, target: targetOf(request) });
}

/** Does this client's Accept admit the manifest a flight brought (or is it the Accept that fetched it)? */
function admits(accept: string, outcome: { manifest: StoredManifest; accept: string }): boolean {
  if (accept === outcome.accept) return true;
  if (accept === '') return false;
  const types = new Set(accept.split(','));
  return types.has('*/*') || types.has(baseMediaType(outcome.manifest.mediaType));
}

/** Whose rights an upstream refusal was about: the client's own credentials, or none (the proxy's). */
function identityOf(req: IncomingMessage): string {
  const own = clientAuthorization(req);
  return own ? credentialHash(own) : '';
}

function targetOf(request: ManifestRequest): UpstreamTarget & { repository: string } {
  return { registry: request.registry, upstream: request.upstream, hostHeader: request.hostHeader, repository: request.name };
}

/** R6 for a cached manifest: undefined when this client may read it, else the refusal it was sent. */
async function refuseUnlessReadable(asking: Asking, res: ServerResponse, access: Access, cached: Cached): Promise<ManifestResult | undefined> {
  const { req, request, deps } = asking;
  const { stored, tag } = cached;
  let verdict: ReadVerdict;
  try {
    verdict = await deps.readAccess.check({
      access,
      req,
      user: request.user,
      target: targetOf(request),
      path: manifestPath(request),
      expected: { digest: stored.digest, size: stored.body.length },
      onPublic: () => deps.store.markPublic(request.registry.key, request.name, stored.digest, tag ? request.reference : undefined),
    });
  } catch (err) {
    const message = `cannot verify read access with ${request.upstream.origin}: ${describeUpstreamError(err as Error)}`;
    sendRegistryError(res, 503, 'UNAVAILABLE', message);
    return { status: 503, bytes: 0, cache: 'HIT', error: message };
  }
  if (verdict.allowed) return undefined;
  const failure = { kind: 'refused' as const, status: verdict.status, headers: verdict.headers, body: Buffer.alloc(0) };
  return { ...relayFailure(req, res, failure, request), cache: 'HIT', error: 'read access refused' };
}

/** The tag's TTL: the first tier whose anchored regex matches, else the default; 0 when disabled. */
export function ttlFor(policy: ManifestPolicy, tag: string): number {
  if (!policy.enabled) return 0;
  return policy.tiers.find((tier) => tier.regex.test(tag))?.ttlMs ?? policy.defaultTtlMs;
}

type Confirmation =
  | { kind: 'same'; upstreamMs: number }
  /** `digest`: what the reference names now, when upstream said. */
  | { kind: 'changed'; digest?: string; upstreamMs: number; access: Access }
  | Extract<FlightOutcome, { kind: 'failed' | 'refused' }>;

/** HEAD upstream with the client's Accept and credentials: does the reference still name `digest`? */
async function confirm(asking: Asking, digest: string): Promise<Confirmation> {
  const { request, deps } = asking;
  const span = startUpstreamSpan('HEAD', () => manifestUrl(request), { 'pullthrough.purpose': 'revalidate' });
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  let decision: AuthDecision;
  try {
    ({ response, decision } = await upstreamRequest(asking, 'HEAD'));
  } catch (err) {
    const error = describeUpstreamError(err as Error);
    endSpan(span, {}, error);
    return { kind: 'failed', error };
  }
  await response.body.dump();
  endSpan(span, { 'http.response.status_code': response.statusCode });
  const upstreamMs = Math.round(performance.now() - started);
  deps.rateLimits.record(request.registry.key, response.headers, decision.access);
  if (response.statusCode === 200) {
    const current = response.headers['docker-content-digest'];
    if (current === digest) return { kind: 'same', upstreamMs };
    return { kind: 'changed', ...(typeof current === 'string' && parseDigest(current) ? { digest: current } : {}), upstreamMs, access: decision.access };
  }
  return notServed(asking, response.statusCode, responseHeadersForClient(response.headers), Buffer.alloc(0), decision, upstreamMs);
}

/** An answer other than 200, sorted: a failure (stale may be served) or a refusal for these credentials. */
function notServed(asking: Asking, status: number, headers: Record<string, string | string[]>, body: Buffer, decision: AuthDecision, upstreamMs: number): Extract<FlightOutcome, { kind: 'failed' | 'refused' }> {
  if (STALE_ON_STATUS.has(status)) return { kind: 'failed', error: `upstream answered ${status}`, status, headers, body, upstreamMs };
  // The token service was down, so the request went without the token it needed: not a refusal.
  if (status === 401 && decision.tokenFailed) return { kind: 'failed', error: 'the token service failed', status, headers, body, upstreamMs };
  return { kind: 'refused', status, headers, body, identity: identityOf(asking.req), upstreamMs };
}

/**
 * GET upstream; a 200 is verified against its digest and stored. A HEAD only for an uncached digest
 * (relayed as it came): a tag's HEAD is a GET, so that the tag is cached for the GET that follows it.
 */
async function fetchAndStore(asking: Asking, method: 'GET' | 'HEAD'): Promise<FlightOutcome> {
  const { request, deps } = asking;
  const span = startUpstreamSpan(method, () => manifestUrl(request), { 'pullthrough.purpose': 'fetch' });
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  let decision: AuthDecision;
  try {
    ({ response, decision } = await upstreamRequest(asking, method));
  } catch (err) {
    const error = describeUpstreamError(err as Error);
    endSpan(span, {}, error);
    return { kind: 'failed', error };
  }
  const upstreamMs = Math.round(performance.now() - started);
  deps.rateLimits.record(request.registry.key, response.headers, decision.access);
  let body: Buffer | undefined;
  try {
    body = await readAtMost(response.body, MAX_MANIFEST_BYTES);
  } catch (err) {
    const error = `the manifest body was cut: ${describeUpstreamError(err as Error)}`;
    endSpan(span, { 'http.response.status_code': response.statusCode }, error);
    return { kind: 'failed', error, upstreamMs };
  }
  endSpan(span, { 'http.response.status_code': response.statusCode, ...(body ? { 'pullthrough.bytes': body.length } : {}) }, body ? undefined : 'the body was too large');
  if (body === undefined) {
    // Never relayed as a 200 with a cut body: the client would take the stub for the manifest.
    const message = `upstream sent a manifest larger than ${MAX_MANIFEST_BYTES} bytes: refused`;
    deps.log.warn(message, { registry: request.registry.key, repository: request.name, reference: request.reference });
    return { kind: 'invalid', status: 502, code: 'MANIFEST_INVALID', message, upstreamStatus: response.statusCode, upstreamMs };
  }
  const headers = responseHeadersForClient(response.headers);
  if (method === 'HEAD' && response.statusCode === 200) return { kind: 'head', status: 200, headers, upstreamMs };
  if (response.statusCode !== 200) return notServed(asking, response.statusCode, headers, body, decision, upstreamMs);
  const announced = response.headers['docker-content-digest'];
  const expected = request.byDigest ? request.reference : typeof announced === 'string' && parseDigest(announced) ? announced : digestOf(body, 'sha256');
  const actual = digestOf(body, expected.startsWith('sha512:') ? 'sha512' : 'sha256');
  if (actual !== expected) {
    deps.digestMismatch?.(request.registry.key);
    const message = `upstream sent a manifest whose digest is ${actual}, not ${expected}: not cached`;
    deps.log.warn(message, { registry: request.registry.key, repository: request.name, reference: request.reference });
    return { kind: 'invalid', status: 502, code: 'MANIFEST_INVALID', message, upstreamStatus: 200, upstreamMs };
  }
  const mediaType = String(response.headers['content-type'] ?? 'application/octet-stream');
  const stored: StoredManifest = { body, mediaType, digest: expected, storedAt: Date.now(), access: decision.access };
  await deps.store.putBody(request.registry.key, request.name, stored);
  if (!request.byDigest) {
    await deps.store.putTag(request.registry.key, request.name, request.reference, { accept: asking.accept, digest: expected, mediaType, size: body.length, validatedAt: Date.now(), access: decision.access });
  }
  if (decision.access === 'client') relabelIfPublic(asking, stored);
  return { kind: 'manifest', manifest: stored, cache: 'MISS', accept: asking.accept, upstreamStatus: 200, upstreamMs };
}

/**
 * Fetched with a client's own token, which the proxy did not see issued (its token service is not
 * intercepted): asked once anonymously, in the background, so that a public image's next pull needs
 * no read check upstream, and survives an outage.
 */
function relabelIfPublic(asking: Asking, stored: StoredManifest): void {
  const { request, deps } = asking;
  const accept = asking.req.headers.accept;
  const object = { target: targetOf(request), path: manifestPath(request), expected: { digest: stored.digest, size: stored.body.length }, ...(accept ? { accept: Array.isArray(accept) ? accept.join(', ') : accept } : {}) };
  deps.readAccess
    .isPublic(object)
    .then((isPublic) => (isPublic ? deps.store.markPublic(request.registry.key, request.name, stored.digest, request.byDigest ? undefined : request.reference) : undefined))
    .catch((err: unknown) => deps.log.warn('could not relabel a public manifest', { registry: request.registry.key, repository: request.name, error: describeUpstreamError(err as Error) }));
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

/**
 * With the client's Accept and the Authorization decided for it, following redirects (the
 * Authorization stays with the registry's host); `decision`: what the answer is labelled, and whether
 * a token exchange failed on the way.
 */
async function upstreamRequest(asking: Asking, method: 'GET' | 'HEAD'): Promise<{ response: Dispatcher.ResponseData; decision: AuthDecision }> {
  const { req, request, deps, dispatcher } = asking;
  const headers: Record<string, string> = { host: request.hostHeader };
  for (const name of ['accept', 'user-agent'] as const) {
    const value = req.headers[name];
    if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  const target = targetOf(request);
  const start = new URL(manifestPath(request), request.upstream.origin);
  return deps.auth.request(target, await deps.auth.decide(req, target), async (authorization) => {
    const { response, hops } = await requestFollowingRedirects(dispatcher, start, { method, headers: { ...headers, ...(authorization ? { authorization } : {}) } });
    return Object.assign(response, { hops });
  });
}

/**
 * The manifest exactly as stored; HEAD gets the same headers without the body. A GET's image manifest
 * is handed to the prefetch, unless it is stale (upstream is failing: nothing to fetch ahead from).
 */
function send({ req, request, deps }: Asking, res: ServerResponse, manifest: StoredManifest, cache: CacheStatus, upstreamMs?: number, staleBecause?: string): ManifestResult {
  if (req.method === 'GET' && !staleBecause) deps.prefetch?.manifestServed(request.registry.key, request.name, manifest);
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

function relayFailure(req: IncomingMessage, res: ServerResponse, failure: { status?: number; error?: string; headers?: Record<string, string | string[]>; body?: Buffer }, request: ManifestRequest): ManifestResult {
  if (failure.status === undefined) {
    const message = `upstream ${request.upstream.origin} failed: ${failure.error ?? ''}`;
    sendRegistryError(res, 502, 'UNAVAILABLE', message);
    return { status: 502, bytes: 0, cache: 'MISS', error: message };
  }
  // An answer to a HEAD has no body; a GET client gets a registry-style one instead of an empty body
  // under upstream's headers (Retry-After, WWW-Authenticate and ratelimit-* are kept).
  let headers = failure.headers ?? {};
  let body = failure.body ?? Buffer.alloc(0);
  if (req.method !== 'HEAD' && body.length === 0) {
    const code = CODE_FOR_STATUS[failure.status] ?? 'UNAVAILABLE';
    body = Buffer.from(JSON.stringify({ errors: [{ code, message: `upstream ${request.upstream.origin} answered ${failure.status} for ${request.name}:${request.reference}` }] }) + '\n');
    headers = { ...headers, 'content-type': 'application/json; charset=utf-8' };
  }
  return relay(req, res, failure.status, headers, body, 'MISS');
}
