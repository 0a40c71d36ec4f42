// Single flight: one fill per digest, run as a task in the worker pool, that every client of the blob
// joins. The primary keeps the in-flight map (digest → Fill); a Fill mirrors what its task reports, and
// readers wait on it for bytes to exist in the growing file.
import { EventEmitter } from 'node:events';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import type { Span, SpanContext } from '@opentelemetry/api';
import type { Logger } from '../log.ts';
import type { WorkerPool } from '../pool.ts';
import type { UpstreamConfig } from '../upstream/agents.ts';
import type { Access, BlobStore, CacheLimits } from './blob-store.ts';
import type { FillMessage, FillOutcome, FillReply, FillTask, PeerSource } from './fill-protocol.ts';
import { carrierOf, endSpan, tracer } from '../tracing.ts';

export interface FillRequest {
  digest: string;
  upstream: UpstreamConfig;
  path: string;
  headers: Record<string, string>;
  access: Access;
  /**
   * Whose rights the fill's upstream requests carry: a hash of the client's own credentials, or '' for
   * the proxy's choice (central credentials, a token it got, anonymous). A refusal is about these rights
   * only: a client with other credentials does not take it for its own.
   */
  identity: string;
  registry: string;
  repository: string;
  /**
   * A fresh Authorization after the registry answered 401 (with this WWW-Authenticate) to the fill's:
   * the token exchange lives here, on the primary. Undefined: none better to offer.
   */
  freshAuthorization?: (wwwAuthenticate: string | string[] | undefined) => Promise<string | undefined>;
}

export class Fill extends EventEmitter {
  readonly digest: string;
  readonly partPath: string;
  readonly blobPath: string;
  /** May become 'anonymous' while the fill runs, when the blob turns out to be public. */
  access: Access;
  /** Where the blob is being fetched from (its cached entry will say so too). */
  readonly origin: { registry: string; repository: string };
  /** FillRequest.identity: whose credentials upstream's answer is about. */
  readonly identity: string;
  /** Set when upstream answered 200. */
  responded = false;
  size: number | undefined;
  mediaType: string | undefined;
  /** Bytes in the .part file, written and hashed. */
  published = 0;
  verified = false;
  outcome: FillOutcome | undefined;
  /** Clients that joined after the first. */
  joined = 0;
  /** The fill's span, when tracing: the request spans of the clients that join it link to it. */
  spanContext: SpanContext | undefined;

  constructor(digest: string, partPath: string, blobPath: string, access: Access, origin: { registry: string; repository: string }, identity = '') {
    super();
    this.origin = origin;
    this.identity = identity;
    this.digest = digest;
    this.partPath = partPath;
    this.blobPath = blobPath;
    this.access = access;
    this.setMaxListeners(0); // one listener per waiting client
  }

  /** Resolves once upstream answered or the fill ended. */
  responseReady(): Promise<void> {
    if (this.responded || this.outcome) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (!this.responded && !this.outcome) return;
        this.off('update', check);
        resolve();
      };
      this.on('update', check);
    });
  }

  /** Resolves once the fill ended (its outcome is known). */
  ended(): Promise<void> {
    if (this.outcome) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (!this.outcome) return;
        this.off('update', check);
        resolve();
      };
      this.on('update', check);
    });
  }

  apply(message: FillMessage): void {
    switch (message.type) {
      case 'response':
        this.responded = true;
        this.size = message.size;
        this.mediaType = message.mediaType;
        break;
      case 'progress':
        this.published = message.bytes;
        break;
      case 'verified':
        this.verified = true;
        this.size = message.size;
        break;
      case 'end':
        this.outcome = message.outcome;
        if (message.outcome.kind === 'failed' && message.outcome.verified) this.verified = true;
        break;
    }
    this.emit('update');
  }
}

/** What the metrics and the dashboard hear of fills. */
export interface FillEvents {
  ended(registry: string, outcome: FillOutcome): void;
  retried(registry: string, offset: number): void;
}

/** Cluster mode: replicas that may hold a copy of a blob, asked before upstream (src/cluster/peer-copies.ts). */
export interface PeerCopySources {
  sourcesFor(digest: string): PeerSource[] | undefined;
  /** A fill from a peer's copy did not match its digest. */
  distrust(digest: string): void;
}

export class Fills {
  /** Set in cluster mode, once the members are known. */
  peerCopies: PeerCopySources | undefined;
  private readonly events: FillEvents | undefined;
  private readonly inflight = new Map<string, Fill>();
  private readonly pool: WorkerPool;
  private readonly store: BlobStore;
  private readonly limits: CacheLimits;
  private readonly log: Logger;

  constructor(pool: WorkerPool, store: BlobStore, limits: CacheLimits, log: Logger, events?: FillEvents) {
    this.events = events;
    this.pool = pool;
    this.store = store;
    this.limits = limits;
    this.log = log;
  }

  get(digest: string): Fill | undefined {
    return this.inflight.get(digest);
  }

  get active(): number {
    return this.inflight.size;
  }

  /** Starts the fill; its span is a child of the active one (the request of the client that missed). */
  start(request: FillRequest): Fill {
    const fill = new Fill(request.digest, this.store.partPath(request.digest), this.store.blobPath(request.digest), request.access, { registry: request.registry, repository: request.repository }, request.identity);
    this.inflight.set(request.digest, fill);
    const span = tracer.startSpan('fill', { attributes: { 'pullthrough.digest': request.digest, 'pullthrough.registry': request.registry, 'pullthrough.repository': request.repository } });
    if (span.isRecording()) fill.spanContext = span.spanContext();
    const { port1, port2 } = new MessageChannel();
    port1.on('message', (message: FillMessage) => {
      if (message.type === 'need-authorization') {
        void this.answerAuthorization(request, fill, port1, message.id, message.wwwAuthenticate);
        return;
      }
      if (message.type === 'retry') {
        this.events?.retried(request.registry, message.offset);
        // What was tried and why it failed, never a header value (a token, a signed URL's query).
        this.log.warn('a blob fill tries upstream again', {
          digest: request.digest,
          registry: request.registry,
          repository: request.repository,
          attempt: message.attempt,
          of: message.of,
          offset: message.offset,
          reason: message.reason,
          delayMs: message.delayMs,
          ...(message.freshAuthorization !== undefined ? { freshAuthorization: message.freshAuthorization } : {}),
        });
        if (span.isRecording()) span.addEvent('retry', { 'pullthrough.attempt': message.attempt, 'pullthrough.offset': message.offset, 'pullthrough.retry.reason': message.reason, 'pullthrough.retry.delay_ms': message.delayMs });
        return;
      }
      fill.apply(message);
      if (message.type === 'response') {
        if (span.isRecording()) span.setAttributes({ 'pullthrough.upstream.status': 200, 'pullthrough.hops': message.hops, 'pullthrough.upstream.url': message.from, ...(message.size !== undefined ? { 'pullthrough.size': message.size } : {}) });
        // Room for what is coming, while it comes, and counted against maxSize until the fill ends (other
        // fills make room for it too); the fills in flight are never evicted.
        if (message.size !== undefined) void this.store.reserve(request.digest, message.size, this.limits, new Set(this.inflight.keys())).catch(() => {});
      }
      if (message.type === 'end') {
        port1.close(); // only after the task's last message
        this.finish(request, fill, message.outcome, span, message.resumes);
      }
    });
    const trace = carrierOf(span);
    const peerSources = this.peerCopies?.sourcesFor(request.digest);
    const task: FillTask = { digest: request.digest, upstream: request.upstream, path: request.path, headers: request.headers, partPath: fill.partPath, blobPath: fill.blobPath, port: port2, ...(trace ? { trace } : {}), ...(peerSources ? { peerSources } : {}) };
    this.pool.fill(task, [port2]).catch((err: Error) => {
      // The worker died (Piscina replaces it): its clients are cut, the next request fills again.
      if (fill.outcome) return;
      port1.close();
      fill.apply({ type: 'end', outcome: { kind: 'failed', reason: `fill worker failed: ${err.message}`, offset: fill.published } });
      this.finish(request, fill, fill.outcome!, span);
    });
    return fill;
  }

  /** Always answers the task (it waits), with nothing when there is no better Authorization or the exchange failed. */
  private async answerAuthorization(request: FillRequest, fill: Fill, port: MessagePort, id: number, wwwAuthenticate: string | string[] | undefined): Promise<void> {
    let authorization: string | undefined;
    try {
      authorization = await request.freshAuthorization?.(wwwAuthenticate);
    } catch (err) {
      this.log.warn('no fresh Authorization for a blob fill', { digest: request.digest, registry: request.registry, error: (err as Error).message });
    }
    if (fill.outcome) return; // the task ended meanwhile: its port is closed
    const reply: FillReply = { type: 'authorization', id, ...(authorization !== undefined ? { authorization } : {}) };
    port.postMessage(reply);
  }

  private finish(request: FillRequest, fill: Fill, outcome: FillOutcome, span: Span, resumes?: number): void {
    this.events?.ended(request.registry, outcome);
    if (outcome.kind === 'failed' && outcome.mismatch && outcome.fromPeer) {
      this.peerCopies?.distrust(request.digest);
      this.log.warn('a cluster peer\'s copy of a blob did not match its digest; it is fetched from upstream from now on', { digest: request.digest });
    }
    endSpan(
      span,
      {
        'pullthrough.outcome': outcome.kind,
        'pullthrough.bytes': outcome.kind === 'committed' ? outcome.size : outcome.kind === 'failed' ? outcome.offset : 0,
        'pullthrough.joined': fill.joined,
        ...(resumes !== undefined ? { 'pullthrough.resumes': resumes } : {}),
        ...(outcome.kind === 'upstream-status' ? { 'pullthrough.upstream.status': outcome.status } : {}),
      },
      outcome.kind === 'failed' ? outcome.reason : undefined,
    );
    const settled = () => {
      if (this.inflight.get(request.digest) === fill) this.inflight.delete(request.digest);
    };
    const where = { digest: request.digest, registry: request.registry, repository: request.repository };
    if (outcome.kind === 'committed') {
      const now = Date.now();
      // The fill stays joinable (its clients open the committed file) until the index can answer for
      // it; leaving the in-flight map earlier let a client in between start a second fill.
      void this.store.record(request.digest, {
        size: outcome.size,
        ...(fill.mediaType ? { mediaType: fill.mediaType } : {}),
        firstAccess: now,
        lastAccess: now,
        hits: 0,
        registry: request.registry,
        repository: request.repository,
        access: fill.access,
      }).then(settled, (err: Error) => {
        settled();
        this.log.error('cannot record a verified blob in the index', { ...where, error: err.message });
      });
      void this.store.makeRoom(0, this.limits, new Set([request.digest, ...this.inflight.keys()])).catch(() => {});
      return;
    }
    settled();
    this.store.release(request.digest);
    if (outcome.kind === 'failed') {
      if (outcome.writeError) this.log.warn('the cache cannot write; serving from upstream without caching', { ...where, error: outcome.reason });
      else this.log.warn(outcome.mismatch ? 'upstream sent bytes that do not match the digest: not cached, clients cut' : 'a blob fill failed', { ...where, error: outcome.reason });
    }
  }
}
