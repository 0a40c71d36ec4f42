// GET and HEAD of /v2/<name>/blobs/<digest>: from the cache (HIT), by joining the fill in flight
// (JOINED), or by starting the one fill every later client joins (MISS). One pipeline for GET, HEAD
// and Range: HEAD is the same answer without the body.
import { open, type FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { trace, type Context } from '@opentelemetry/api';
import type { Dispatcher } from 'undici';
import type { ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import type { Access, BlobStore, CacheLimits } from '../cache/blob-store.ts';
import { drained, pumpFile, type PumpResult } from '../cache/blob-reader.ts';
import type { Fill, Fills } from '../cache/fills.ts';
import type { CacheStatus, Logger } from '../log.ts';
import { backoffMs, discard, guard, MAX_ATTEMPTS, positionAt } from '../upstream/body.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { describeUpstreamError, responseHeadersForClient, upstreamFailed } from '../upstream/forward.ts';
import { requestFollowingRedirects, urlForLog } from '../upstream/redirects.ts';
import { contextWith, endSpan, startUpstreamSpan } from '../tracing.ts';
import { sendRegistryError } from './errors.ts';
import { parseRange } from './range.ts';
import type { ReadAccess } from './read-access.ts';
import type { AuthDecision, UpstreamAuth, UpstreamTarget } from './upstream-auth.ts';
import type { Digest, RepositoryName } from './route.ts';

export interface BlobRequest {
  digest: Digest;
  name: RepositoryName;
  registry: RegistryPolicy;
  upstream: UpstreamConfig;
  /** Host header for upstream: host[:port] as the client named it. */
  hostHeader: string;
  /** The proxy user on the other end, when users are configured. */
  user?: ProxyUser;
}

export interface BlobResult {
  status: number;
  bytes: number;
  cache: CacheStatus;
  upstreamStatus?: number;
  error?: string;
}

export interface BlobDeps {
  store: BlobStore;
  fills: Fills;
  upstreams: UpstreamAgents;
  auth: UpstreamAuth;
  readAccess: ReadAccess;
  limits: CacheLimits;
  log: Logger;
}

export type BlobHandler = (req: IncomingMessage, res: ServerResponse, blob: BlobRequest) => Promise<BlobResult>;

export function createBlobHandler(deps: BlobDeps): BlobHandler {
  return async (req, res, blob) => {
    const dispatcher = deps.upstreams.for(blob.upstream);
    const head = req.method === 'HEAD';

    const entry = deps.store.lookup(blob.digest);
    if (entry) {
      const refused = await refuseUnlessReadable(deps, { access: entry.access, origin: { registry: entry.registry, repository: entry.repository }, size: entry.size }, req, res, blob);
      if (refused) return refused;
      const opened = head ? undefined : await deps.store.open(blob.digest);
      if (head || opened) {
        if (!head) deps.store.touch(blob.digest, entry);
        return serveFile(req, res, blob, { size: entry.size, mediaType: entry.mediaType, handle: opened?.handle, cache: 'HIT' });
      }
      // Evicted between the lookup and the open: a miss after all.
    }

    if (head) return headFromUpstream(req, res, dispatcher, blob, deps.auth, await deps.auth.decide(req, targetOf(blob)));

    let decision = await deps.auth.decide(req, targetOf(blob));
    for (let attempt = 0; ; attempt++) {
      if (!deps.fills.get(blob.digest) && !(await deps.store.makeRoom(0, deps.limits).catch(() => false))) {
        deps.log.warn('the cache has no room (cache.minFree); serving from upstream without caching', { digest: blob.digest });
        return fromUpstream(req, res, dispatcher, blob, 'BYPASS', decision.authorization);
      }
      // Looked up only now, after the last await: clients arriving together must all find the same fill.
      let fill = deps.fills.get(blob.digest);
      let cache: CacheStatus = 'JOINED';
      if (fill) {
        fill.joined++;
        // The request's span points at the fill that serves it (a child of another client's request).
        if (fill.spanContext) trace.getActiveSpan()?.addLink({ context: fill.spanContext, attributes: { 'pullthrough.link': 'joined-fill' } });
        const refused = await refuseUnlessReadable(deps, { access: fill.access, origin: fill.origin, size: fill.size }, req, res, blob);
        if (refused) return refused;
      } else {
        fill = deps.fills.start({
          digest: blob.digest,
          upstream: blob.upstream,
          path: `/v2/${blob.name}/blobs/${blob.digest}`,
          headers: fillHeaders(req, decision.authorization),
          access: decision.access,
          registry: blob.upstream.key,
          repository: blob.name,
          freshAuthorization: freshAuthorizations(deps.auth, targetOf(blob), decision),
        });
        cache = 'MISS';
        if (fill.access === 'client') relabelIfPublic(deps, blob, fill);
      }
      await fill.responseReady();
      // A token the proxy chose and the registry refused (expired, or a new challenge): once more.
      const outcome = fill.outcome;
      if (attempt === 0 && !fill.responded && outcome?.kind === 'upstream-status' && outcome.status === 401 && decision.byProxy) {
        const next = await deps.auth.retryAfter401(targetOf(blob), decision, outcome.headers['www-authenticate']);
        if (next) {
          decision = next;
          continue;
        }
      }
      return joinFill(req, res, dispatcher, blob, fill, cache, decision.authorization);
    }
  };
}

async function joinFill(req: IncomingMessage, res: ServerResponse, dispatcher: Dispatcher, blob: BlobRequest, fill: Fill, cache: CacheStatus, authorization: string | undefined): Promise<BlobResult> {
  await fill.responseReady();
  const outcome = fill.outcome;
  if (!fill.responded) {
    if (outcome?.kind === 'upstream-status') {
      // Upstream's own answer (401 with its challenge, 404, 429…), as it came.
      const body = Buffer.from(outcome.body, 'latin1');
      res.writeHead(outcome.status, { ...responseHeadersForClient(outcome.headers), 'Content-Length': body.length, 'X-Cache': cache });
      res.end(body);
      return { status: outcome.status, bytes: body.length, cache, upstreamStatus: outcome.status };
    }
    if (outcome?.kind === 'failed' && outcome.writeError) return fromUpstream(req, res, dispatcher, blob, 'BYPASS', authorization);
    const reason = outcome?.kind === 'failed' ? outcome.reason : 'the fill ended without an answer';
    sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${reason}`);
    return { status: 502, bytes: 0, cache, error: reason };
  }
  const handle = await openGrowingFile(fill);
  if (!handle) {
    const failed = fill.outcome?.kind === 'failed' && !fill.outcome.writeError ? fill.outcome.reason : undefined;
    if (!failed) return fromUpstream(req, res, dispatcher, blob, 'BYPASS', authorization);
    sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${failed}`);
    return { status: 502, bytes: 0, cache, error: failed };
  }
  return serveFile(req, res, blob, { size: fill.size, mediaType: fill.mediaType, handle, cache, fill, dispatcher, authorization });
}

/** An uncached HEAD stays a HEAD upstream and never downloads a body. */
async function headFromUpstream(req: IncomingMessage, res: ServerResponse, dispatcher: Dispatcher, blob: BlobRequest, auth: UpstreamAuth, decision: AuthDecision): Promise<BlobResult> {
  const span = startUpstreamSpan('HEAD', () => blobUrl(blob));
  try {
    const { response } = await auth.request(targetOf(blob), decision, (authorization) =>
      dispatcher.request({ origin: blob.upstream.origin, path: blobUpstreamUrl(blob).pathname, method: 'HEAD', headers: fillHeaders(req, authorization) }),
    );
    await response.body.dump();
    endSpan(span, { 'http.response.status_code': response.statusCode });
    res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), 'X-Cache': 'MISS' });
    res.end();
    return { status: response.statusCode, bytes: 0, cache: 'MISS', upstreamStatus: response.statusCode };
  } catch (err) {
    const failed = upstreamFailed(res, err as Error, blob.upstream);
    endSpan(span, {}, failed.error);
    return { ...failed, cache: 'MISS' };
  }
}

interface FileSource {
  size: number | undefined;
  mediaType: string | undefined;
  handle: FileHandle | undefined;
  cache: CacheStatus;
  fill?: Fill;
  dispatcher?: Dispatcher;
  /** What the client's request sends upstream, should the rest of the blob have to come from there. */
  authorization?: string | undefined;
}

/** Status line and headers, then the bytes (none for HEAD), for a cached or growing blob. */
async function serveFile(req: IncomingMessage, res: ServerResponse, blob: BlobRequest, source: FileSource): Promise<BlobResult> {
  const { size, handle, cache } = source;
  try {
    const headers: Record<string, string | number> = {
      'Content-Type': source.mediaType ?? 'application/octet-stream',
      'Docker-Content-Digest': blob.digest,
      'Docker-Distribution-API-Version': 'registry/2.0',
      ETag: `"${blob.digest}"`,
      'Accept-Ranges': 'bytes',
      'X-Cache': cache,
    };
    const range = size === undefined ? { kind: 'full' as const } : parseRange(req.headers.range, size);
    if (range.kind === 'unsatisfiable') {
      res.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}`, 'Content-Length': 0 });
      res.end();
      return { status: 416, bytes: 0, cache };
    }
    const start = range.kind === 'partial' ? range.start : 0;
    const end = range.kind === 'partial' ? range.end : size;
    if (end !== undefined) headers['Content-Length'] = end - start;
    if (range.kind === 'partial') headers['Content-Range'] = `bytes ${start}-${end! - 1}/${size}`;
    const status = range.kind === 'partial' ? 206 : 200;
    res.writeHead(status, headers);
    if (req.method === 'HEAD' || !handle) {
      res.end();
      return { status, bytes: 0, cache };
    }
    const pumped = await pumpFile(res, handle, start, end, source.fill);
    return finishPump(req, res, blob, source, status, end, pumped);
  } finally {
    await handle?.close().catch(() => {});
  }
}

async function finishPump(req: IncomingMessage, res: ServerResponse, blob: BlobRequest, source: FileSource, status: number, end: number | undefined, pumped: PumpResult): Promise<BlobResult> {
  const result = { status, bytes: pumped.bytes, cache: source.cache };
  switch (pumped.kind) {
    case 'complete':
      res.end();
      return result;
    case 'gone':
      return { ...result, error: 'the client left' };
    case 'cut':
      // No clean end: the client must not take these bytes for the blob.
      res.destroy();
      return { ...result, error: pumped.reason };
    case 'continue-upstream': {
      const more = await continueFromUpstream(req, res, source.dispatcher!, blob, pumped.position, end, source.authorization);
      return { ...result, bytes: pumped.bytes + more.bytes, cache: 'BYPASS', ...(more.error ? { error: more.error } : {}) };
    }
  }
}

/**
 * The rest of a blob straight from upstream, after the response has started (the cache could not
 * write): from `position`, tried again from where it stopped (backoff, MAX_ATTEMPTS in all) when
 * upstream breaks off or answers anything but the range; the client is cut only when every attempt failed.
 */
async function continueFromUpstream(
  req: IncomingMessage,
  res: ServerResponse,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  position: number,
  end: number | undefined,
  authorization: string | undefined,
): Promise<{ bytes: number; error?: string }> {
  let bytes = 0;
  let error = '';
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    if (attempt > 1) await sleep(backoffMs(attempt - 1));
    if (res.destroyed) return { bytes, error: 'the client left' };
    const from = position + bytes;
    const step = await continueOnce(req, res, dispatcher, blob, from, end, authorization);
    bytes += step.bytes;
    if (step.done) return step.error ? { bytes, error: step.error } : { bytes };
    error = step.error ?? 'upstream broke off';
  }
  res.destroy(); // no clean end: the client must not take these bytes for the blob
  return { bytes, error: `${error} (${MAX_ATTEMPTS} attempts)` };
}

/** One upstream request for bytes [from, end) relayed to the client; `done` unless another attempt may help. */
async function continueOnce(
  req: IncomingMessage,
  res: ServerResponse,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  from: number,
  end: number | undefined,
  authorization: string | undefined,
): Promise<{ bytes: number; done: boolean; error?: string }> {
  const span = startUpstreamSpan('GET', () => blobUrl(blob), { 'pullthrough.range.start': from });
  const traced = (result: { bytes: number; done: boolean; error?: string }, status?: number) => {
    endSpan(span, { 'pullthrough.bytes': result.bytes, ...(status !== undefined ? { 'http.response.status_code': status } : {}) }, result.error);
    return result;
  };
  let body: Dispatcher.ResponseData['body'] | undefined;
  const relayed = { bytes: 0 };
  try {
    const range = `bytes=${from}-${end === undefined ? '' : end - 1}`;
    const { response } = await requestFollowingRedirects(dispatcher, blobUpstreamUrl(blob), { method: 'GET', headers: { ...fillHeaders(req, authorization), range }, trace: contextWith(span) });
    body = guard(response.body);
    if (!(await positionAt(response.statusCode, response.headers, response.body, from))) {
      discard(response.body);
      return traced({ bytes: 0, done: false, error: `upstream could not continue at byte ${from} (${response.statusCode})` }, response.statusCode);
    }
    const { left } = await relayBody(response.body, res, end === undefined ? Number.POSITIVE_INFINITY : end - from, relayed);
    return traced(left ? { bytes: relayed.bytes, done: true, error: 'the client left' } : { bytes: relayed.bytes, done: true }, response.statusCode);
  } catch (err) {
    if (body) discard(body);
    return traced({ bytes: relayed.bytes, done: res.destroyed, error: describeUpstreamError(err as Error) });
  }
}

/** The whole answer from upstream, following redirects, without the cache (no room, or no file). */
async function fromUpstream(req: IncomingMessage, res: ServerResponse, dispatcher: Dispatcher, blob: BlobRequest, cache: CacheStatus, authorization: string | undefined): Promise<BlobResult> {
  const span = startUpstreamSpan('GET', () => blobUrl(blob));
  const result = await fromUpstreamTraced(req, res, dispatcher, blob, cache, authorization, contextWith(span));
  endSpan(span, { 'pullthrough.bytes': result.bytes, ...(result.upstreamStatus !== undefined ? { 'http.response.status_code': result.upstreamStatus } : {}) }, result.error);
  return result;
}

async function fromUpstreamTraced(
  req: IncomingMessage,
  res: ServerResponse,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  cache: CacheStatus,
  authorization: string | undefined,
  parent: Context | undefined,
): Promise<BlobResult> {
  try {
    const headers = { ...fillHeaders(req, authorization), ...(req.headers.range ? { range: req.headers.range } : {}) };
    const { response } = await requestFollowingRedirects(dispatcher, blobUpstreamUrl(blob), { method: 'GET', headers, trace: parent });
    res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), 'X-Cache': cache });
    const { bytes, left } = await relayBody(response.body, res);
    return { status: response.statusCode, bytes, cache, upstreamStatus: response.statusCode, ...(left ? { error: 'the client left' } : {}) };
  } catch (err) {
    const message = describeUpstreamError(err as Error);
    sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${message}`);
    return { status: 502, bytes: 0, cache, error: message };
  }
}

/** A cached or filling blob goes only to a client that may read it (R6); others get upstream's refusal. */
async function refuseUnlessReadable(
  deps: BlobDeps,
  object: { access: Access; origin: { registry: string; repository: string }; size: number | undefined },
  req: IncomingMessage,
  res: ServerResponse,
  blob: BlobRequest,
): Promise<BlobResult | undefined> {
  let verdict;
  try {
    verdict = await deps.readAccess.check({
      access: object.access,
      origin: object.origin,
      req,
      user: blob.user,
      target: targetOf(blob),
      path: blobUpstreamUrl(blob).pathname,
      expected: { digest: blob.digest, ...(object.size !== undefined ? { size: object.size } : {}) },
      onPublic: () => deps.store.markPublic(blob.digest),
    });
  } catch (err) {
    const message = `cannot verify read access with ${blob.upstream.origin}: ${describeUpstreamError(err as Error)}`;
    sendRegistryError(res, 503, 'UNAVAILABLE', message);
    return { status: 503, bytes: 0, cache: 'HIT', error: message };
  }
  if (verdict.allowed) return undefined;
  const body = JSON.stringify({ errors: [{ code: verdict.status === 401 ? 'UNAUTHORIZED' : 'DENIED', message: 'access to the requested resource is not authorized' }] }) + '\n';
  res.writeHead(verdict.status, { 'Content-Type': 'application/json', ...verdict.headers, 'Content-Length': Buffer.byteLength(body) });
  res.end(req.method === 'HEAD' ? undefined : body);
  return { status: verdict.status, bytes: 0, cache: 'HIT', upstreamStatus: verdict.status, error: 'read access refused' };
}

/**
 * A fill with a client's own token, which the proxy did not see issued (its token service is not
 * intercepted): asked once anonymously, meanwhile, whether the blob is public; if so it is cached as
 * such (or relabelled, when the fill finished first), and no later client needs a read check for it.
 */
function relabelIfPublic(deps: BlobDeps, blob: BlobRequest, fill: Fill): void {
  deps.readAccess
    .isPublic({ target: targetOf(blob), path: blobUpstreamUrl(blob).pathname, expected: { digest: blob.digest } })
    .then(async (isPublic) => {
      if (!isPublic) return;
      fill.access = 'anonymous';
      if (fill.outcome) await deps.store.markPublic(blob.digest);
    })
    .catch((err: unknown) => deps.log.warn('could not relabel a public blob', { digest: blob.digest, error: describeUpstreamError(err as Error) }));
}

/**
 * What a fill asks for when the registry refuses its Authorization mid-blob (401): a token the proxy
 * chose is exchanged again for the challenge; a client's own that expired gives way to the proxy's own
 * (central credentials or anonymous). Each answer becomes the one the next refusal replaces.
 */
function freshAuthorizations(auth: UpstreamAuth, target: UpstreamTarget & { repository: string }, started: AuthDecision): (wwwAuthenticate: string | string[] | undefined) => Promise<string | undefined> {
  let current = started;
  return async (wwwAuthenticate) => {
    let next: AuthDecision | undefined;
    if (current.byProxy) next = await auth.retryAfter401(target, current, wwwAuthenticate);
    else {
      const own = await auth.proxyDecision(target);
      next = own.authorization !== undefined && own.authorization !== current.authorization ? own : await auth.retryAfter401(target, own, wwwAuthenticate);
    }
    if (!next?.authorization) return undefined;
    current = next;
    return next.authorization;
  };
}

function targetOf(blob: BlobRequest): UpstreamTarget & { repository: string } {
  return { registry: blob.registry, upstream: blob.upstream, hostHeader: blob.hostHeader, repository: blob.name };
}

/** The blob's upstream URL, for spans. */
function blobUpstreamUrl(blob: BlobRequest): URL {
  return new URL(`/v2/${blob.name}/blobs/${blob.digest}`, blob.upstream.origin);
}

function blobUrl(blob: BlobRequest): string {
  return urlForLog(blobUpstreamUrl(blob));
}

/**
 * Copies an upstream body to the client, at most `limit` bytes, then ends the response. Stops early
 * (leaving the loop releases upstream) when the client has gone. `progress.bytes` counts what was
 * written, for a caller that continues after an upstream error.
 */
async function relayBody(body: AsyncIterable<Buffer>, res: ServerResponse, limit = Number.POSITIVE_INFINITY, progress = { bytes: 0 }): Promise<{ bytes: number; left: boolean }> {
  for await (const chunk of body) {
    const piece = chunk.length > limit - progress.bytes ? chunk.subarray(0, limit - progress.bytes) : chunk;
    progress.bytes += piece.length;
    if (!res.write(piece)) await drained(res);
    if (res.destroyed) return { bytes: progress.bytes, left: true };
    if (progress.bytes >= limit) break;
  }
  res.end();
  return { bytes: progress.bytes, left: false };
}

/** What a fill sends upstream on behalf of its first client: the Authorization decided for it. */
function fillHeaders(req: IncomingMessage, authorization: string | undefined): Record<string, string> {
  const headers: Record<string, string> = {};
  if (authorization) headers.authorization = authorization;
  if (req.headers['user-agent']) headers['user-agent'] = req.headers['user-agent'];
  return headers;
}

/** The growing file, or the committed blob when the fill finished in between; undefined if neither. */
async function openGrowingFile(fill: Fill): Promise<FileHandle | undefined> {
  for (const file of [fill.partPath, fill.blobPath]) {
    try {
      return await open(file, 'r');
    } catch {
      // renamed meanwhile, or gone with a failure
    }
  }
  return undefined;
}
