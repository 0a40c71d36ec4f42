// Sends a blob's bytes from a file to a client: a cached blob, or the growing .part file of a fill, in
// which case it follows the fill's published offset. Until the fill's digest verifies, the last byte
// is held back, so a client can never complete a download of bytes that turn out to be wrong.
import type { FileHandle } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import type { Fill } from './fills.ts';

/** Reads of this size (64 KiB streams doubled the CPU per GiB). */
const READ_SIZE = 256 * 1024;

export type PumpResult =
  | { kind: 'complete'; bytes: number }
  /** The client left. */
  | { kind: 'gone'; bytes: number }
  /** The fill failed before this position and the client must be cut (mismatch, truncation, crash). */
  | { kind: 'cut'; bytes: number; reason: string }
  /** The fill could not write the cache: the client continues from upstream at `position`. */
  | { kind: 'continue-upstream'; bytes: number; position: number };

/**
 * Writes bytes [start, end) of the file to `res` (end undefined: up to the fill's verified size). With
 * a fill, waits for bytes to be published. Never ends `res`: the caller decides how the response ends.
 */
export async function pumpFile(res: ServerResponse, handle: FileHandle, start: number, end: number | undefined, fill?: Fill): Promise<PumpResult> {
  let position = start;
  const buffers = new ReadBuffers();
  let gone = res.destroyed;
  const onClose = () => (gone = true);
  res.once('close', onClose);
  try {
    for (;;) {
      if (gone || res.destroyed) return { kind: 'gone', bytes: position - start };
      const target = end ?? (fill ? (fill.verified ? fill.size : undefined) : undefined);
      if (target !== undefined && position >= target) return { kind: 'complete', bytes: position - start };
      const available = fill ? fill.published - (fill.verified ? 0 : 1) : Number.POSITIVE_INFINITY;
      const limit = Math.min(available, target ?? Number.POSITIVE_INFINITY);
      if (position < limit) {
        const length = Math.min(READ_SIZE, limit - position);
        const buffer = await buffers.next();
        const { bytesRead } = await handle.read(buffer, 0, length, position);
        if (bytesRead === 0) return { kind: 'cut', bytes: position - start, reason: 'the file is shorter than its index entry' };
        position += bytesRead;
        if (!buffers.write(res, buffer.subarray(0, bytesRead))) await drained(res);
        continue;
      }
      const outcome = fill?.outcome;
      if (outcome && outcome.kind !== 'committed' && !(outcome.kind === 'failed' && outcome.verified)) {
        if (outcome.kind === 'failed' && outcome.writeError) return { kind: 'continue-upstream', bytes: position - start, position };
        return { kind: 'cut', bytes: position - start, reason: outcome.kind === 'failed' ? outcome.reason : `upstream answered ${outcome.status}` };
      }
      if (!fill) return { kind: 'complete', bytes: position - start };
      await changed(fill, res);
    }
  } finally {
    res.off('close', onClose);
  }
}

/**
 * Two read buffers per client, each reused once the response has let go of it (its write callback):
 * a fresh 1 MiB buffer per read became garbage at once, and the allocator and the GC made that the
 * largest part of the memory and ~0.3 CPU-s per GiB served.
 */
class ReadBuffers {
  private readonly buffers = [Buffer.allocUnsafeSlow(READ_SIZE), Buffer.allocUnsafeSlow(READ_SIZE)];
  private readonly released: Array<Promise<void>> = [Promise.resolve(), Promise.resolve()];
  private turn = 0;

  /** The next buffer, once the write that last used it has completed. */
  async next(): Promise<Buffer> {
    this.turn ^= 1;
    await this.released[this.turn];
    return this.buffers[this.turn]!;
  }

  /** Writes part of the current buffer; returns what res.write returned (false: wait for drain). */
  write(res: ServerResponse, chunk: Buffer): boolean {
    let release!: () => void;
    this.released[this.turn] = new Promise((resolve) => (release = resolve));
    // A destroyed response calls back with an error, or not at all: then nothing holds the buffer.
    if (res.destroyed) release();
    else res.once('close', release);
    return res.write(chunk, () => {
      res.off('close', release);
      release();
    });
  }
}

/** Resolves when `res` can take more, or is gone (a client that left never drains). */
export function drained(res: ServerResponse): Promise<void> {
  // Gone already (it closed while a read was under way): 'close' has fired and will not again.
  if (res.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done).off('close', done);
      resolve();
    };
    res.on('drain', done).on('close', done);
  });
}

function changed(fill: Fill, res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      fill.off('update', done);
      res.off('close', done);
      resolve();
    };
    fill.once('update', done);
    res.once('close', done);
  });
}
