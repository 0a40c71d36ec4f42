// One task = one blob: upstream (following redirects) → .part file in ≥ 1 MiB writes while hashing →
// verify the digest → rename into the store. Progress goes to the primary over the task's MessagePort,
// where every client of the blob reads the growing file up to the published offset.
//
// The fill belongs to the cache, not to a client: nothing here knows about clients.
import { createHash, type Hash } from 'node:crypto';
import { mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MessagePort } from 'node:worker_threads';
import type { Span } from '@opentelemetry/api';
import type { Dispatcher } from 'undici';
import { contextFrom, contextWith, endSpan, flushTracing, startTracing, startUpstreamSpan, tracingEnabled } from '../src/tracing.ts';
import { preloadTrust, UpstreamAgents, type UpstreamConfig } from '../src/upstream/agents.ts';
import { BACKOFF_CAP_MS, backoffMs, discard, guard, MAX_ATTEMPTS, positionAt, readable, retryAfterMs } from '../src/upstream/body.ts';
import { requestFollowingRedirects, TooManyRedirectsError, urlForLog } from '../src/upstream/redirects.ts';
import type { FillMessage, FillOutcome, FillReply, FillTask, PeerSource } from '../src/cache/fill-protocol.ts';

/** Writes of at least this size (64 KiB writes doubled the CPU per GiB). */
const WRITE_BATCH = 1024 * 1024;
/** The first write of a fill, smaller: clients wait for it before they see their first byte. */
const FIRST_WRITE = 64 * 1024;
/** A batch smaller than WRITE_BATCH is written once no new chunk came for this long (first byte latency). */
const FLUSH_AFTER_MS = 2;
/** How long a fill waits for the primary's answer to a request for a fresh Authorization. */
const AUTHORIZATION_ANSWER_MS = 30_000;
/** An upstream error body kept for the client (a registry's JSON error). */
const MAX_ERROR_BODY = 64 * 1024;

const agents = new UpstreamAgents();

// Each worker thread has its own SDK (the environment is the primary's): its spans are children of the
// fill's span in the primary, whose context comes with the task.
const tracing = tracingEnabled();
if (tracing) await startTracing('pullthrough');

export default async function fill(task: FillTask | 'warm-up'): Promise<void> {
  // Run once per worker at start: the module, undici and the CA stores are loaded before a client waits.
  if (task === 'warm-up') return preloadTrust();
  const port = task.port;
  const send = (message: FillMessage) => port.postMessage(message);
  const attempts = { count: 0 };
  let outcome: FillOutcome;
  try {
    outcome = await runFill(task, send, attempts);
  } catch (err) {
    outcome = { kind: 'failed', reason: (err as Error).message, offset: 0 };
  }
  // The outcome travels on the same port as the progress, so it can never overtake it.
  send({ type: 'end', outcome, resumes: Math.max(0, attempts.count - 1) });
  // Each fill's spans go out before its task ends: between tasks Piscina pauses the thread (Atomics.wait,
  // so no export timer runs), and its close terminates workers without a shutdown. The clients do not
  // wait for this: the outcome is sent already.
  if (tracing) await flushTracing();
}

/** Why an attempt failed, and what the next one needs. */
interface Retry {
  reason: string;
  /** What upstream asked for with Retry-After. */
  retryAfter?: number;
  /** The registry refused the Authorization (401): ask the primary for a fresh one, with this challenge. */
  refused?: { wwwAuthenticate: string | string[] | undefined };
}

/**
 * Attempts until the blob is in the file, at most MAX_ATTEMPTS, each from the last written byte (Range)
 * after a backoff. Before the first byte reached anyone (no 'response' sent yet), the registry's own
 * refusals (404, a 401 or 403 it answered itself…) go to the client as they came, and so does the last
 * 5xx or 429 when every attempt got one.
 */
async function runFill(task: FillTask, send: (m: FillMessage) => void, attempts: { count: number }): Promise<FillOutcome> {
  const parent = contextFrom(task.trace);
  const dispatcher = agents.for(task.upstream);
  const algorithm = task.digest.startsWith('sha512:') ? 'sha512' : 'sha256';
  const expectedHex = task.digest.slice(task.digest.indexOf(':') + 1);
  const hash = createHash(algorithm);
  // Opened while the first request is under way (private images among them: the proxy's alone), so that
  // the clients are told of the response without waiting for the file; removed in the end unless renamed.
  const opening = openPart(task.partPath);
  let file: FileHandle | undefined;
  const writer = new BatchWriter(hash, (bytes) => send({ type: 'progress', bytes }));
  let size: number | undefined;
  /** The 'response' message went out: clients are reading, and only bytes (or a cut) can follow. */
  let responded = false;
  /** A fresh Authorization from the primary, after the registry refused the one the fill started with. */
  let authorization: string | undefined;
  let retry: Retry | undefined;
  /** Bytes came from a cluster peer's copy. */
  let fromPeer = false;
  try {
    // Cluster mode: a replica that holds a verified public copy saves the registry a download.
    const copied = task.peerSources ? await copyFromPeers(task.peerSources, writer, opening, send) : undefined;
    if (copied instanceof WriteError) return { kind: 'failed', reason: copied.message, offset: writer.written, writeError: true };
    if (copied) {
      ({ file, size } = copied);
      responded = true;
      fromPeer = true;
    }
    for (let attempt = 1; ; attempt++) {
      // A peer's copy came whole: nothing to ask the registry.
      if (copied && size !== undefined && writer.written >= size) break;
      const offset = writer.written;
      const last = attempt >= MAX_ATTEMPTS;
      attempts.count = attempt;
      if (retry) {
        if (retry.refused) authorization = (await askForAuthorization(task.port, send, retry.refused.wwwAuthenticate)) ?? authorization;
        const delayMs = backoffMs(attempt - 1, retry.retryAfter);
        send({ type: 'retry', attempt, of: MAX_ATTEMPTS, offset, reason: retry.reason, delayMs, ...(retry.refused ? { freshAuthorization: authorization !== undefined } : {}) });
        await sleep(delayMs);
        retry = undefined;
      }
      // One span per upstream request (the first, then each retry), from the request to its last byte.
      const start = new URL(task.path, task.upstream.origin);
      const span = startUpstreamSpan('GET', () => urlForLog(start), { 'pullthrough.digest': task.digest, 'pullthrough.attempt': attempt - 1, ...(offset > 0 ? { 'pullthrough.range.start': offset } : {}) }, parent);
      const spanned = new AttemptSpan(span, writer);
      const failed = (reason: string, extra: Omit<Retry, 'reason'> = {}): FillOutcome | undefined => {
        spanned.error = reason;
        if (last) return { kind: 'failed', reason: `${reason} (attempt ${attempt} of ${MAX_ATTEMPTS})`, offset: writer.written };
        retry = { reason, ...extra };
        return undefined;
      };
      try {
        // Every attempt starts at the registry: a redirect to a CDN is asked for again, with a fresh signature.
        const headers: Record<string, string> = { ...task.headers, ...(authorization !== undefined ? { authorization } : {}), ...(offset > 0 ? { range: `bytes=${offset}-` } : {}) };
        let followed;
        try {
          followed = await requestFollowingRedirects(dispatcher, start, { method: 'GET', headers, trace: contextWith(span, parent) });
        } catch (err) {
          const reason = `upstream unreachable: ${describe(err)}`;
          // Too many redirects, or to a scheme we do not speak: the same chain again would not help.
          if (err instanceof TooManyRedirectsError && !responded) {
            spanned.error = reason;
            return { kind: 'failed', reason, offset };
          }
          const outcome = failed(reason);
          if (outcome) return outcome;
          continue;
        }
        const { response, url, hops } = followed;
        guard(response.body);
        spanned.answered(response.statusCode, url, hops);
        const status = response.statusCode;
        // The Authorization went to the host that answered (redirects drop it when they leave the registry).
        const atRegistry = url.host === start.host;
        if (!responded) {
          if (status !== 200) {
            const retryAfter = retryAfterMs(response.headers['retry-after']);
            // The registry's own refusals go to the client now; so does a 5xx/429 that asks for a long pause.
            if (!retriableBeforeResponse(status, atRegistry) || last || (retryAfter !== undefined && retryAfter > BACKOFF_CAP_MS)) return await upstreamStatus(response);
            discard(response.body);
            failed(`upstream answered ${status}${atRegistry ? '' : ` from ${url.host} after ${hops} redirect${hops === 1 ? '' : 's'}`}`, retryAfter !== undefined ? { retryAfter } : {});
            continue;
          }
          size = contentLength(response.headers);
          // The file exists before anyone is told, so every reader can open it. A retry from byte 0 (cut
          // before the first byte) writes into the same file.
          if (!file) {
            const opened = await opening;
            if (opened instanceof Error) {
              discard(response.body);
              return { kind: 'failed', reason: `cannot create the cache file: ${describe(opened)}`, offset: 0, writeError: true };
            }
            file = opened;
          }
          writer.file = file;
          send({ type: 'response', size, mediaType: headerValue(response.headers['content-type']), hops, from: urlForLog(url) });
          responded = true;
        } else if (!(await positioned(response, offset))) {
          discard(response.body);
          const refused = status === 401 && atRegistry;
          const retryAfter = retryAfterMs(response.headers['retry-after']);
          const reason =
            status === 200 || status === 206
              ? `upstream could not resume at byte ${offset} (${status})`
              : `upstream answered ${status} to the resume at byte ${offset}${atRegistry ? '' : ` from ${url.host} after ${hops} redirect${hops === 1 ? '' : 's'}`}`;
          const outcome = failed(reason, { ...(retryAfter !== undefined ? { retryAfter } : {}), ...(refused ? { refused: { wwwAuthenticate: response.headers['www-authenticate'] } } : {}) });
          if (outcome) return outcome;
          continue;
        }
        try {
          await writer.consume(response.body, size);
          if (!response.body.readableEnded) discard(response.body); // more than announced: ignored
          if (size === undefined || writer.written >= size) break;
          throw new Error(`upstream ended at byte ${writer.written} of ${size}`);
        } catch (err) {
          discard(response.body); // unread, it would hold the upstream connection open for good
          if (err instanceof WriteError) {
            spanned.error = err.message;
            return { kind: 'failed', reason: err.message, offset: writer.written, writeError: true };
          }
          if (size !== undefined && writer.written >= size) break;
          const outcome = failed(`upstream broke off at byte ${writer.written}: ${describe(err)}`);
          if (outcome) return outcome;
        }
      } finally {
        spanned.end();
      }
    }
    if (size !== undefined && writer.written !== size) {
      return { kind: 'failed', reason: `upstream sent ${writer.written} of ${size} bytes`, offset: writer.written };
    }
    const actual = hash.digest('hex');
    if (actual !== expectedHex) {
      return { kind: 'failed', reason: `digest mismatch: ${fromPeer ? 'a cluster peer\'s copy and upstream' : 'upstream'} sent ${algorithm}:${actual} for ${task.digest}`, offset: writer.written, mismatch: true, ...(fromPeer ? { fromPeer } : {}) };
    }
    send({ type: 'verified', size: writer.written });
    try {
      await file!.datasync();
      await file!.close();
      file = undefined;
      await renameInto(task.partPath, task.blobPath);
    } catch (err) {
      return { kind: 'failed', reason: `cannot store the verified blob: ${describe(err)}`, offset: writer.written, writeError: true, verified: true };
    }
    return { kind: 'committed', size: writer.written };
  } finally {
    await file?.close().catch(() => {});
    // Opened early and never used (upstream refused, or failed before its first byte).
    const opened = await opening;
    if (!(opened instanceof Error) && !writer.file) await opened.close().catch(() => {});
    // Whatever did not become a blob goes: never a partial file where a blob could be looked for.
    await rm(task.partPath, { force: true }).catch(() => {});
  }
}

/**
 * The first peer that answers 200 with a length streams its copy into the file (the 'response' goes to
 * the primary as for an upstream answer); a copy cut short leaves the file where it is, for the
 * registry to complete with Range. Peers that answer anything else, or not at all, are passed over.
 */
async function copyFromPeers(
  sources: PeerSource[],
  writer: BatchWriter,
  opening: Promise<FileHandle | Error>,
  send: (m: FillMessage) => void,
): Promise<{ file: FileHandle; size: number } | WriteError | undefined> {
  for (const source of sources) {
    let response: Dispatcher.ResponseData;
    try {
      response = await agents.for(source.upstream).request({ origin: source.upstream.origin, path: source.path, method: 'GET', headers: source.headers });
    } catch {
      continue;
    }
    guard(response.body);
    const size = contentLength(response.headers);
    if (response.statusCode !== 200 || size === undefined) {
      discard(response.body);
      continue;
    }
    const file = await opening;
    if (file instanceof Error) {
      discard(response.body);
      return undefined; // the registry's attempt meets the same error and reports it
    }
    writer.file = file;
    send({ type: 'response', size, mediaType: headerValue(response.headers['content-type']), hops: 0, from: `cluster peer ${source.upstream.origin}` });
    try {
      await writer.consume(response.body, size);
    } catch (err) {
      discard(response.body);
      if (err instanceof WriteError) return err;
    }
    return { file, size };
  }
  return undefined;
}

/** The .part file, created for writing (0600); its directory made only when missing. Never rejects. */
async function openPart(partPath: string): Promise<FileHandle | Error> {
  try {
    return await open(partPath, 'w', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return err as Error;
  }
  try {
    await mkdir(path.dirname(partPath), { recursive: true });
    return await open(partPath, 'w', 0o600);
  } catch (err) {
    return err as Error;
  }
}

/** Renames the verified file into the store, making its directory only when it is missing. */
async function renameInto(partPath: string, blobPath: string): Promise<void> {
  try {
    await rename(partPath, blobPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    await mkdir(path.dirname(blobPath), { recursive: true });
    await rename(partPath, blobPath);
  }
}

/**
 * Before any byte went to a client, which answers are worth another attempt: the registry's trouble
 * (5xx, 429, 408), and a 401/403 from the host a redirect led to (an expired signed URL: the registry
 * hands out a fresh one). A 404, or a 401/403 from the registry itself, is its answer: the client gets it.
 */
function retriableBeforeResponse(status: number, atRegistry: boolean): boolean {
  if (status >= 500 || status === 429 || status === 408) return true;
  return !atRegistry && (status === 401 || status === 403);
}

let authorizationRequests = 0;

/**
 * A fresh Authorization from the primary (the token exchange lives there), after the registry refused
 * the fill's: asked on the task's port, answered on it; undefined when the primary has none to offer.
 */
function askForAuthorization(port: MessagePort, send: (m: FillMessage) => void, wwwAuthenticate: string | string[] | undefined): Promise<string | undefined> {
  const id = ++authorizationRequests;
  return new Promise((resolve) => {
    const done = (authorization: string | undefined) => {
      clearTimeout(timer);
      port.off('message', onMessage);
      resolve(authorization);
    };
    const onMessage = (message: FillReply) => {
      if (message?.type === 'authorization' && message.id === id) done(message.authorization);
    };
    // The primary always answers; should it not (it is shutting down), the fill goes on without.
    const timer = setTimeout(() => done(undefined), AUTHORIZATION_ANSWER_MS);
    port.on('message', onMessage);
    send({ type: 'need-authorization', id, ...(wwwAuthenticate !== undefined ? { wwwAuthenticate } : {}) });
  });
}

class WriteError extends Error {}

/** The span of one upstream request of a fill: its answer, and the bytes it brought into the file. */
class AttemptSpan {
  error: string | undefined;
  private readonly span: Span;
  private readonly writer: BatchWriter;
  private readonly from: number;

  constructor(span: Span, writer: BatchWriter) {
    this.span = span;
    this.writer = writer;
    this.from = writer.written;
  }

  answered(status: number, url: URL, hops: number): void {
    if (this.span.isRecording()) this.span.setAttributes({ 'http.response.status_code': status, 'pullthrough.upstream.url': urlForLog(url), 'pullthrough.hops': hops });
  }

  end(): void {
    endSpan(this.span, { 'pullthrough.bytes': this.writer.written - this.from }, this.error);
  }
}

/** Collects upstream chunks into ≥ 1 MiB writes, hashing each byte once, and publishes each write. */
class BatchWriter {
  file: FileHandle | undefined;
  written = 0;
  /** Reused for every write (each write completes before the next copy into it). */
  private readonly batch = Buffer.allocUnsafeSlow(WRITE_BATCH);
  private readonly hash: Hash;
  private readonly published: (bytes: number) => void;

  constructor(hash: Hash, published: (bytes: number) => void) {
    this.hash = hash;
    this.published = published;
  }

  async consume(body: Readable, size: number | undefined): Promise<void> {
    let pendingBytes = 0;
    const flush = async () => {
      if (pendingBytes === 0) return;
      const length = pendingBytes;
      pendingBytes = 0;
      await this.write(this.batch.subarray(0, length));
    };
    try {
      for (;;) {
        const chunk = body.read() as Buffer | null;
        if (chunk !== null) {
          const room = size === undefined ? chunk.length : size - this.written - pendingBytes;
          if (room <= 0) break; // more than Content-Length: never write past the announced size
          const piece = room < chunk.length ? chunk.subarray(0, room) : chunk;
          this.hash.update(piece);
          // Copied into the one batch buffer: no Buffer.concat garbage per MiB.
          for (let copied = 0; copied < piece.length; ) {
            const n = piece.copy(this.batch, pendingBytes, copied);
            copied += n;
            pendingBytes += n;
            if (pendingBytes === this.batch.length) await flush();
          }
          // The first bytes go out early: every waiting client's first byte waits for this write.
          if (this.written === 0 && pendingBytes >= FIRST_WRITE) await flush();
          continue;
        }
        if (body.readableEnded) break;
        // Big batches while data streams; a small one as soon as the stream pauses (first bytes fast).
        if (pendingBytes > 0 && !(await readable(body, FLUSH_AFTER_MS))) await flush();
        else if (pendingBytes === 0) await readable(body);
      }
    } finally {
      await flush();
    }
  }

  private async write(batch: Buffer): Promise<void> {
    try {
      let done = 0;
      while (done < batch.length) {
        const { bytesWritten } = await this.file!.write(batch, done, batch.length - done, this.written + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw new WriteError(`cannot write the cache file: ${describe(err)}`);
    }
    this.written += batch.length;
    this.published(this.written);
  }
}

/** The resumed response continues at `offset`; a cut while skipping a 200's first bytes is one more break, not the end. */
async function positioned(response: Dispatcher.ResponseData, offset: number): Promise<boolean> {
  try {
    return await positionAt(response.statusCode, response.headers, response.body, offset);
  } catch {
    return false;
  }
}

async function upstreamStatus(response: Dispatcher.ResponseData): Promise<FillOutcome> {
  const chunks: Buffer[] = [];
  let kept = 0;
  for await (const chunk of response.body as AsyncIterable<Buffer>) {
    if (kept < MAX_ERROR_BODY) chunks.push(chunk.subarray(0, MAX_ERROR_BODY - kept));
    kept += chunk.length;
  }
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(response.headers)) {
    if (value !== undefined && !['connection', 'keep-alive', 'transfer-encoding', 'content-length'].includes(name)) headers[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  return { kind: 'upstream-status', status: response.statusCode, headers, body: Buffer.concat(chunks).toString('latin1') };
}

function contentLength(headers: Dispatcher.ResponseData['headers']): number | undefined {
  const value = headerValue(headers['content-length']);
  return value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}

function describe(err: unknown): string {
  const e = err as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
  return e.cause?.code ?? e.code ?? e.message;
}

