// GET and HEAD of /v2/<name>/blobs/<digest>: from the cache (HIT), by joining the fill in flight
// (JOINED), or by starting the one fill every later client joins (MISS). One pipeline for GET, HEAD
// and Range: HEAD is the same answer without the body. Whatever the source, an answer never ends cleanly
// with bytes that are not verified: a fill's last byte waits for its digest, and a blob served straight
// from upstream (BYPASS: no room, or the cache cannot write) is hashed on the way.
import { createHash, type Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { trace, type Context, type Span } from '@opentelemetry/api';
import type { Dispatcher } from 'undici';
import type { ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import type { Access, BlobStore, CacheLimits } from '../cache/blob-store.ts';
import { drained, pumpFile, type PumpResult } from '../cache/blob-reader.ts';
import type { FillOutcome } from '../cache/fill-protocol.ts';
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
import { clientAuthorization, credentialHash, type AuthDecision, type UpstreamAuth, type UpstreamTarget } from './upstream-auth.ts';
import type { LayerPrefetch } from './prefetch.ts';
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
  /** Fetches an image's other layers once a client asks for one of them (absent: nothing ahead). */
  prefetch?: LayerPrefetch;
}

export type BlobHandler = (req: IncomingMessage, res: ServerResponse, blob: BlobRequest) => Promise<BlobResult>;

/** Statuses of upstream that are about the rights of the credentials asked with (not shared with other credentials). */
const REFUSALS = new Set([401, 403, 404]);
/** Fills refused to others' credentials that a client waits out before it asks upstream for itself. */
const MAX_FOREIGN_REFUSALS = 2;

export function createBlobHandler(deps: BlobDeps): BlobHandler {
  return async (req, res, blob) => {
    const dispatcher = deps.upstreams.for(blob.upstream);
    const head = req.method === 'HEAD';
    const identity = identityOf(req);
    // Decided once, when first needed: a hit or a joiner of a fill that succeeds never waits for it.
    let decided: Promise<AuthDecision> | undefined;
    let decision: AuthDecision | undefined;
    const decide = async () => (decision ??= await (decided ??= deps.auth.decide(req, targetOf(blob))));
    const authorization = async () => (await decide()).authorization;
    let roomMade = false;
    let retried401 = false;
    let foreignRefusals = 0;
    if (!head) deps.prefetch?.layerRequested(req, blob);

    for (;;) {
      // Both the index and the in-flight map are looked at after the last await, and a fill starts in the
      // same turn as the look that found neither: a fill that committed (or started) while this client
      // waited for its token or for room is found, so clients around a commit never fetch twice.
      const entry = deps.store.lookup(blob.digest);
      if (entry) {
        const refused = await refuseUnlessReadable(deps, { access: entry.access, origin: { registry: entry.registry, repository: entry.repository }, size: entry.size }, req, res, blob);
        if (refused) return refused;
        const opened = head ? undefined : await deps.store.open(blob.digest);
        if (head || opened) {
          if (!head) deps.store.touch(blob.digest, entry);
          return serveFile(req, res, blob, { size: entry.size, mediaType: entry.mediaType, handle: opened?.handle, cache: 'HIT' });
        }
        continue; // evicted between the lookup and the open (and forgotten): a miss after all
      }
      let fill = deps.fills.get(blob.digest);
      if (!fill && head) return headFromUpstream(req, res, dispatcher, blob, deps.auth, await decide());
      if (!fill && !decision) {
        await decide();
        continue;
      }
      if (!fill && !roomMade) {
        roomMade = true;
        if (!(await deps.store.makeRoom(0, deps.limits).catch(() => false))) {
          deps.log.warn('the cache has no room (cache.minFree); serving from upstream without caching', { digest: blob.digest });
          return fromUpstream(req, res, dispatcher, blob, 'BYPASS', await authorization());
        }
        continue;
      }
      if (head) return headFromUpstream(req, res, dispatcher, blob, deps.auth, await decide());
      let cache: CacheStatus = 'JOINED';
      if (fill) {
        fill.joined++;
        // The request's span points at the fill that serves it (a child of another client's request).
        if (fill.spanContext) trace.getActiveSpan()?.addLink({ context: fill.spanContext, attributes: { 'pullthrough.link': 'joined-fill' } });
        const refused = await refuseUnlessReadable(deps, { access: fill.access, origin: fill.origin, size: fill.size }, req, res, blob);
        if (refused) return refused;
      } else {
        fill = startFill(deps, req, blob, decision!);
        cache = 'MISS';
      }
      await fill.responseReady();
      const outcome = fill.outcome;
      if (!fill.responded && outcome?.kind === 'upstream-status') {
        if (fill.identity !== identity && REFUSALS.has(outcome.status)) {
          // A refusal of someone else's credentials (or of the proxy's, to a client with its own): not
          // this client's answer. It fills (or joins a fill) with its own; after a few such refusals in a
          // row it asks upstream for itself, verified, without the cache.
          if (++foreignRefusals > MAX_FOREIGN_REFUSALS) return fromUpstream(req, res, dispatcher, blob, 'BYPASS', await authorization());
          continue;
        }
        // A token the proxy chose and the registry refused (expired, or a new challenge): once more.
        const own = await decide();
        if (!retried401 && outcome.status === 401 && own.byProxy) {
          retried401 = true;
          const next = await deps.auth.retryAfter401(targetOf(blob), own, outcome.headers['www-authenticate']);
          if (next) {
            decision = next;
            continue;
          }
        }
      }
      return joinFill(req, res, dispatcher, blob, fill, cache, authorization);
    }
  };
}

/**
 * The fill of a blob that the client of `req` is about to ask for (the next layers of an image it pulls):
 * started as its own request would start it, with the Authorization decided for it, unless the blob is
 * cached or in flight, or the cache has no room. Resolves once that fill ended.
 */
export function fillAheadWith(deps: BlobDeps): (req: IncomingMessage, blob: BlobRequest) => Promise<void> {
  return async (req, blob) => {
    // Looked at again after each await, and the fill starts in the same turn as the last look: never a
    // second fill of a blob a client started meanwhile.
    const taken = () => cachedOrFilling(deps, blob.digest);
    if (taken()) return;
    const decision = await deps.auth.decide(req, targetOf(blob));
    if (taken() || !(await deps.store.makeRoom(0, deps.limits).catch(() => false)) || taken()) return;
    await startFill(deps, req, blob, decision).ended();
  };
}

/** Whether the blob is in the cache or a fill of it is under way. */
export function cachedOrFilling(deps: Pick<BlobDeps, 'store' | 'fills'>, digest: string): boolean {
  return deps.store.holds(digest) || deps.fills.get(digest) !== undefined;
}

/** The one fill of a blob that is neither cached nor in flight, on the Authorization decided for `req`. */
function startFill(deps: BlobDeps, req: IncomingMessage, blob: BlobRequest, asked: AuthDecision): Fill {
  const fill = deps.fills.start({
    digest: blob.digest,
    upstream: blob.upstream,
    path: `/v2/${blob.name}/blobs/${blob.digest}`,
    headers: fillHeaders(req, asked.authorization),
    access: asked.access,
    identity: asked.byProxy || asked.authorization === undefined ? '' : credentialHash(asked.authorization),
    registry: blob.upstream.key,
    repository: blob.name,
    freshAuthorization: freshAuthorizations(deps.auth, targetOf(blob), asked),
  });
  if (fill.access === 'client') relabelIfPublic(deps, blob, fill);
  return fill;
}

async function joinFill(
  req: IncomingMessage,
  res: ServerResponse,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  fill: Fill,
  cache: CacheStatus,
  authorization: () => Promise<string | undefined>,
): Promise<BlobResult> {
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
    if (outcome?.kind === 'failed' && outcome.writeError) return fromUpstream(req, res, dispatcher, blob, 'BYPASS', await authorization());
    const reason = outcome?.kind === 'failed' ? outcome.reason : 'the fill ended without an answer';
    sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${reason}`);
    return { status: 502, bytes: 0, cache, error: reason };
  }
  let handle = await openGrowingFile(fill);
  if (!handle && !fill.outcome) {
    // Neither the .part nor the blob, and no outcome yet: the task removed its .part (the digest did not
    // match, upstream failed for good) or renamed it, and its last message is on the way. What it says
    // decides; never around it to upstream unverified.
    await fill.ended();
    if (outcomeOf(fill)?.kind === 'committed') handle = await open(fill.blobPath, 'r').catch(() => undefined);
  }
  if (!handle) {
    const ended = outcomeOf(fill);
    const failed = ended?.kind === 'failed' && !ended.writeError ? ended.reason : ended?.kind === 'upstream-status' ? `upstream answered ${ended.status}` : undefined;
    // The cache could not keep it (a write error, or evicted the moment it committed): verified from upstream.
    if (!failed) return fromUpstream(req, res, dispatcher, blob, 'BYPASS', await authorization());
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
  authorization?: () => Promise<string | undefined>;
}

/** Status line and headers, then the bytes (none for HEAD), for a cached or growing blob. */
async function serveFile(req: IncomingMessage, res: ServerResponse, blob: BlobRequest, source: FileSource): Promise<BlobResult> {
  const { handle, cache } = source;
  try {
    const answer = writeBlobHead(req, res, blob, source.size, source.mediaType, cache);
    if (answer.status === 416 || req.method === 'HEAD' || !handle) {
      res.end();
      return { status: answer.status, bytes: 0, cache };
    }
    // A fill's client has the status now, whatever its bytes wait for (a Range's last byte, the digest).
    if (source.fill) res.flushHeaders();
    const pumped = await pumpFile(res, handle, answer.start, answer.end, source.fill);
    return await finishPump(req, res, blob, source, answer.status, answer.end, pumped);
  } finally {
    await handle?.close().catch(() => {});
  }
}

/**
 * The status line and headers of a blob's bytes for the client's Range: 200, 206 with Content-Range, or
 * 416 (nothing more to send). The same for a hit, a fill and a download straight from upstream.
 */
function writeBlobHead(req: IncomingMessage, res: ServerResponse, blob: BlobRequest, size: number | undefined, mediaType: string | undefined, cache: CacheStatus): { status: number; start: number; end: number | undefined } {
  const headers: Record<string, string | number> = {
    'Content-Type': mediaType ?? 'application/octet-stream',
    'Docker-Content-Digest': blob.digest,
    'Docker-Distribution-API-Version': 'registry/2.0',
    ETag: `"${blob.digest}"`,
    'Accept-Ranges': 'bytes',
    'X-Cache': cache,
  };
  const range = size === undefined ? { kind: 'full' as const } : parseRange(req.headers.range, size);
  if (range.kind === 'unsatisfiable') {
    res.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}`, 'Content-Length': 0 });
    return { status: 416, start: 0, end: 0 };
  }
  const start = range.kind === 'partial' ? range.start : 0;
  const end = range.kind === 'partial' ? range.end : size;
  if (end !== undefined) headers['Content-Length'] = end - start;
  if (range.kind === 'partial') headers['Content-Range'] = `bytes ${start}-${end! - 1}/${size}`;
  const status = range.kind === 'partial' ? 206 : 200;
  res.writeHead(status, headers);
  return { status, start, end };
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
      const more = await continueFromUpstream(req, res, blob, source, pumped.position, end);
      return { ...result, bytes: pumped.bytes + more.bytes, cache: 'BYPASS', ...(more.error ? { error: more.error } : {}) };
    }
  }
}

/**
 * The rest of a blob straight from upstream, after the response has started (the cache could not
 * write): bytes from `position` to `end` go to the client, and every byte of the blob is hashed (those
 * the file holds from it, the rest from upstream), so the last byte goes out only once the digest matched.
 */
async function continueFromUpstream(req: IncomingMessage, res: ServerResponse, blob: BlobRequest, source: FileSource, position: number, end: number | undefined): Promise<{ bytes: number; error?: string }> {
  const known = await hashFromFile(blob.digest, source.handle!, Math.min(position, source.fill?.published ?? 0));
  const relay = new VerifyingRelay(res, blob.digest, known.hash, known.bytes, position, end ?? Number.POSITIVE_INFINITY, source.size);
  return relayVerified(req, res, source.dispatcher!, blob, relay, undefined, await source.authorization?.());
}

/** A hash of the file's first `length` bytes (what the fill wrote and verified as it went); from 0 if the file cannot be read. */
async function hashFromFile(digest: Digest, handle: FileHandle, length: number): Promise<{ hash: Hash; bytes: number }> {
  const hash = createHash(algorithmOf(digest));
  const buffer = Buffer.allocUnsafe(Math.min(length, 1024 * 1024));
  try {
    for (let at = 0; at < length; ) {
      const { bytesRead } = await handle.read(buffer, 0, Math.min(buffer.length, length - at), at);
      if (bytesRead === 0) throw new Error('short read');
      hash.update(buffer.subarray(0, bytesRead));
      at += bytesRead;
    }
    return { hash, bytes: length };
  } catch {
    return { hash: createHash(algorithmOf(digest)), bytes: 0 };
  }
}

/**
 * A blob's bytes from upstream to a client, verified: every byte from `at` on is hashed (the hash holds
 * bytes [0, at) already), the client is sent those in [from, to), and the last piece it is sent waits
 * until the whole blob's digest matched — so an answer never ends cleanly with bytes that are wrong,
 * a Range included. The bytes may come in several bodies: each continues at `at`.
 */
class VerifyingRelay {
  /** Bytes of the blob hashed so far: where the next upstream body must start. */
  at: number;
  /** Bytes written to the client. */
  sent = 0;
  private held: Buffer | undefined;
  private readonly res: ServerResponse;
  private readonly digest: Digest;
  private readonly hash: Hash;
  private readonly from: number;
  private readonly to: number;
  private readonly size: number | undefined;

  constructor(res: ServerResponse, digest: Digest, hash: Hash, at: number, from: number, to: number, size: number | undefined) {
    this.res = res;
    this.digest = digest;
    this.hash = hash;
    this.at = at;
    this.from = from;
    this.to = to;
    this.size = size;
  }

  /**
   * Relays one upstream body: 'complete' once every byte of the blob is in (its announced size, or the
   * body's end when none was announced), 'short' when the body ended before that, 'left' when the client
   * has gone; throws on an upstream error.
   */
  async consume(body: AsyncIterable<Buffer>): Promise<'complete' | 'short' | 'left'> {
    for await (const chunk of body) {
      const piece = this.size !== undefined && this.at + chunk.length > this.size ? chunk.subarray(0, this.size - this.at) : chunk;
      const base = this.at;
      this.hash.update(piece);
      this.at += piece.length;
      const first = Math.max(base, this.from);
      const last = Math.min(this.at, this.to);
      if (first < last) {
        // Held until the next piece comes: the newest piece may hold the answer's last byte.
        const previous = this.held;
        this.held = piece.subarray(first - base, last - base);
        if (previous && !this.write(previous)) await drained(this.res);
      }
      if (this.res.destroyed) return 'left';
      if (this.size !== undefined && this.at >= this.size) return 'complete';
    }
    return this.size === undefined ? 'complete' : 'short';
  }

  /** Every byte is in: the held piece and a clean end when the digest matches; a cut (and the reason) otherwise. */
  finish(): string | undefined {
    const actual = `${algorithmOf(this.digest)}:${this.hash.digest('hex')}`;
    if (actual !== this.digest) {
      this.res.destroy();
      return `digest mismatch: upstream sent ${actual} for ${this.digest}`;
    }
    if (this.held) this.write(this.held);
    this.held = undefined;
    this.res.end();
    return undefined;
  }

  private write(piece: Buffer): boolean {
    this.sent += piece.length;
    return this.res.write(piece);
  }
}

/**
 * Feeds upstream bodies to a relay until the blob is whole: `body` first (when given), then requests
 * from `relay.at` on (backoff, MAX_ATTEMPTS in all) when upstream breaks off or answers anything but the
 * bytes asked for. The client is cut when every attempt failed or the digest does not match.
 */
async function relayVerified(
  req: IncomingMessage,
  res: ServerResponse,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  relay: VerifyingRelay,
  body: Dispatcher.ResponseData['body'] | undefined,
  authorization: string | undefined,
): Promise<{ bytes: number; error?: string }> {
  let error = 'upstream broke off';
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    if (attempt > 1) await sleep(backoffMs(attempt - 1));
    if (res.destroyed) return { bytes: relay.sent, error: 'the client left' };
    let span: Span | undefined;
    if (!body) {
      const resumed = await requestFrom(req, dispatcher, blob, relay.at, authorization);
      span = resumed.span;
      if ('error' in resumed) {
        error = resumed.error;
        continue;
      }
      body = resumed.body;
    }
    const from = relay.at;
    let step: 'complete' | 'short' | 'left' | undefined;
    try {
      step = await relay.consume(body);
      if (step === 'short') error = `upstream ended at byte ${relay.at}`;
    } catch (err) {
      error = describeUpstreamError(err as Error);
    }
    discard(body);
    body = undefined;
    if (span) endSpan(span, { 'pullthrough.bytes': relay.at - from }, step === 'complete' || step === 'left' ? undefined : error);
    if (step === 'left') return { bytes: relay.sent, error: 'the client left' };
    if (step === 'complete') {
      const mismatch = relay.finish();
      return mismatch ? { bytes: relay.sent, error: mismatch } : { bytes: relay.sent };
    }
  }
  res.destroy(); // no clean end: the client must not take these bytes for the blob
  return { bytes: relay.sent, error: `${error} (${MAX_ATTEMPTS} attempts)` };
}

/** One upstream request for the blob from byte `from` on, positioned there (a 206, or a 200 with the first bytes skipped). */
async function requestFrom(
  req: IncomingMessage,
  dispatcher: Dispatcher,
  blob: BlobRequest,
  from: number,
  authorization: string | undefined,
): Promise<{ span: Span; body: Dispatcher.ResponseData['body'] } | { span: Span; error: string }> {
  const span = startUpstreamSpan('GET', () => blobUrl(blob), { 'pullthrough.range.start': from });
  let body: Dispatcher.ResponseData['body'] | undefined;
  try {
    const headers = { ...fillHeaders(req, authorization), ...(from > 0 ? { range: `bytes=${from}-` } : {}) };
    const { response } = await requestFollowingRedirects(dispatcher, blobUpstreamUrl(blob), { method: 'GET', headers, trace: contextWith(span) });
    body = guard(response.body);
    if (span.isRecording()) span.setAttribute('http.response.status_code', response.statusCode);
    if (!(await positionAt(response.statusCode, response.headers, response.body, from))) {
      discard(response.body);
      const error = `upstream could not continue at byte ${from} (${response.statusCode})`;
      endSpan(span, {}, error);
      return { span, error };
    }
    return { span, body: response.body };
  } catch (err) {
    if (body) discard(body);
    const error = describeUpstreamError(err as Error);
    endSpan(span, {}, error);
    return { span, error };
  }
}

/**
 * The blob from upstream, following redirects, without the cache (no room, or no file): verified like a
 * fill (the last byte waits for the digest, a mismatch cuts the client), a Range answered from the whole
 * blob's bytes. Upstream's refusals and errors pass through as they came.
 */
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
  let response: Dispatcher.ResponseData;
  try {
    // The whole blob, whatever the client's Range: only the whole can be verified.
    ({ response } = await requestFollowingRedirects(dispatcher, blobUpstreamUrl(blob), { method: 'GET', headers: fillHeaders(req, authorization), trace: parent }));
  } catch (err) {
    const message = describeUpstreamError(err as Error);
    sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${message}`);
    return { status: 502, bytes: 0, cache, error: message };
  }
  const upstreamStatus = response.statusCode;
  guard(response.body);
  if (upstreamStatus !== 200) {
    if (upstreamStatus >= 200 && upstreamStatus < 300) {
      discard(response.body);
      const message = `upstream answered ${upstreamStatus} to a request for the whole blob`;
      sendRegistryError(res, 502, 'UNAVAILABLE', `fetching ${blob.digest} from ${blob.upstream.origin} failed: ${message}`);
      return { status: 502, bytes: 0, cache, upstreamStatus, error: message };
    }
    // Not the blob's bytes (a refusal, an error with its JSON body): passed on as it came.
    res.writeHead(upstreamStatus, { ...responseHeadersForClient(response.headers), 'X-Cache': cache });
    try {
      const { bytes, left } = await relayBody(response.body, res);
      return { status: upstreamStatus, bytes, cache, upstreamStatus, ...(left ? { error: 'the client left' } : {}) };
    } catch (err) {
      discard(response.body);
      res.destroy();
      return { status: upstreamStatus, bytes: 0, cache, upstreamStatus, error: describeUpstreamError(err as Error) };
    }
  }
  const size = contentLength(response.headers['content-length']);
  const mediaType = Array.isArray(response.headers['content-type']) ? response.headers['content-type'][0] : response.headers['content-type'];
  const answer = writeBlobHead(req, res, blob, size, mediaType, cache);
  if (answer.status === 416) {
    discard(response.body);
    res.end();
    return { status: 416, bytes: 0, cache, upstreamStatus };
  }
  // The status now: the bytes of a small Range may wait for the whole blob to verify.
  res.flushHeaders();
  const relay = new VerifyingRelay(res, blob.digest, createHash(algorithmOf(blob.digest)), 0, answer.start, answer.end ?? Number.POSITIVE_INFINITY, size);
  const relayed = await relayVerified(req, res, dispatcher, blob, relay, response.body, authorization);
  return { status: answer.status, bytes: relayed.bytes, cache, upstreamStatus, ...(relayed.error ? { error: relayed.error } : {}) };
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

function contentLength(value: string | string[] | undefined): number | undefined {
  const text = Array.isArray(value) ? value[0] : value;
  return text !== undefined && /^\d+$/.test(text) ? Number(text) : undefined;
}

function algorithmOf(digest: Digest): 'sha256' | 'sha512' {
  return digest.startsWith('sha512:') ? 'sha512' : 'sha256';
}

/** Whose rights an upstream refusal would be about: the client's own credentials, or none (the proxy's choice). */
function identityOf(req: IncomingMessage): string {
  const own = clientAuthorization(req);
  return own ? credentialHash(own) : '';
}

/** What a fill sends upstream on behalf of its first client: the Authorization decided for it. */
function fillHeaders(req: IncomingMessage, authorization: string | undefined): Record<string, string> {
  const headers: Record<string, string> = {};
  if (authorization) headers.authorization = authorization;
  if (req.headers['user-agent']) headers['user-agent'] = req.headers['user-agent'];
  return headers;
}

/** What the fill ended with so far (read anew after an await). */
function outcomeOf(fill: Fill): FillOutcome | undefined {
  return fill.outcome;
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
