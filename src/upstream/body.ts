// Reading upstream bodies by hand: wait for data, skip to an offset when a resumed request answered 200
// instead of 206, let go of a body without an error escaping, and space out the attempts of a blob.
import type { Readable } from 'node:stream';

/** Upstream requests per blob transfer: the first and its retries (each resumed from the last byte kept). */
export const MAX_ATTEMPTS = 6;
/** The pause before the first retry, doubled for each next one (with jitter), up to BACKOFF_CAP_MS. */
export const BACKOFF_BASE_MS = 100;
export const BACKOFF_CAP_MS = 2000;

/**
 * The pause before retry number `retry` (1 for the first): 100, 200, 400, 800, 1600 ms, capped at 2 s,
 * each between half and all of that (so fills cut together do not come back together); at least what
 * upstream asked for with Retry-After, within the cap.
 */
export function backoffMs(retry: number, retryAfter?: number): number {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.max(0, retry - 1));
  const jittered = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  return Math.min(BACKOFF_CAP_MS, Math.max(jittered, retryAfter ?? 0));
}

/** Retry-After (delta seconds or an HTTP date) in milliseconds from now; undefined when absent or unreadable. */
export function retryAfterMs(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const text = (Array.isArray(value) ? value[0] : value)?.trim();
  if (!text) return undefined;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

const ignore = () => {};

/**
 * From now on an error of this body is only read (body.errored, readable()'s rejection), never thrown at
 * the thread: a body that errors with no listener (undici's when destroyed unread, or a socket reset
 * between two reads) ends the worker thread or the process.
 */
export function guard<T extends { on(event: 'error', listener: (err: Error) => void): unknown }>(body: T): T {
  body.on('error', ignore);
  return body;
}

/** Lets go of a body that will not be read (it would hold its connection), without an unhandled error. */
export function discard(body: { destroy(): unknown; on?(event: 'error', listener: (err: Error) => void): unknown }): void {
  body.on?.('error', ignore);
  body.destroy();
}

/** Resolves true when the stream has data or has ended, false after `ms`; rejects on its error. */
export function readable(body: Readable, ms = Infinity): Promise<boolean> {
  if (body.errored) return Promise.reject(body.errored);
  if (body.readableLength > 0 || body.readableEnded) return Promise.resolve(true);
  return new Promise((resolve, reject) => {
    const settle = (value: boolean, err?: Error) => {
      clearTimeout(timer);
      body.off('readable', onReady).off('end', onReady).off('error', onError).off('close', onClose);
      if (err) reject(err);
      else resolve(value);
    };
    const onReady = () => settle(true);
    const onError = (err: Error) => settle(false, err);
    // A stream destroyed without an error or an end was cut: that is an error too.
    const onClose = () => settle(false, body.readableEnded ? undefined : new Error('upstream body closed early'));
    const timer = ms === Infinity ? undefined : setTimeout(() => settle(false), ms);
    body.on('readable', onReady).on('end', onReady).on('error', onError).on('close', onClose);
  });
}

/**
 * A response to `Range: bytes=<offset>-` must continue at `offset`: a 206 that says so, or a 200 whose
 * first `offset` bytes are dropped (content-addressed: the same bytes again). False otherwise.
 */
export async function positionAt(statusCode: number, headers: Record<string, string | string[] | undefined>, body: Readable, offset: number): Promise<boolean> {
  if (statusCode === 206) {
    const range = Array.isArray(headers['content-range']) ? headers['content-range'][0] : headers['content-range'];
    return Number(/^bytes (\d+)-/.exec(range ?? '')?.[1]) === offset;
  }
  if (statusCode !== 200) return false;
  let skipped = 0;
  while (skipped < offset) {
    const chunk = body.read() as Buffer | null;
    if (chunk === null) {
      if (body.readableEnded) return false;
      await readable(body);
      continue;
    }
    const need = offset - skipped;
    if (chunk.length > need) body.unshift(chunk.subarray(need));
    skipped += Math.min(chunk.length, need);
  }
  return true;
}

/** The whole body, or undefined (and the body destroyed) once it passes `max` bytes. */
export async function readAtMost(body: AsyncIterable<Buffer> & { destroy(): void }, max: number): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    if (size > max) {
      discard(body);
      return undefined;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}
