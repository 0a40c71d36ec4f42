// Reading upstream bodies by hand: wait for data, and skip to an offset when a resumed request
// answered 200 instead of 206.
import type { Readable } from 'node:stream';

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
      body.destroy();
      return undefined;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}
