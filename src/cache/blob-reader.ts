// Sends a blob's bytes from a file to a client: a cached blob, or the growing .part file of a fill, in
// which case it follows the fill's published offset. Until the fill's digest verifies, the last byte of
// every answer is held back, whatever part of the blob the answer is (a Range too): a client can never
// complete a download of bytes that turn out to be wrong.
import type { FileHandle } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import type { Fill } from './fills.ts';

/** Reads of at most this size (64 KiB streams doubled the CPU per GiB). */
const READ_SIZE = 256 * 1024;
/** The smallest read buffer (one TLS record): what is left of a small blob, or a read when the budget is spent. */
const MIN_READ = 16 * 1024;
/**
 * What the reads of all clients together may hold at once. Each read is at most this budget's share
 * of one client (a power of two, READ_SIZE … MIN_READ: up to 64 clients at once each reads READ_SIZE,
 * 1,000 read MIN_READ), and smaller still when the reads in flight pass it. A read is in flight until
 * the socket took its bytes: for a client that reads slowly, until the kernel has room.
 *
 * The share matters beyond the read itself: Node's TLS keeps, for every connection, an output buffer
 * as large as the largest write it encrypted, as long as the connection lives. Measured with 1,000
 * clients reading cached 4 MiB blobs (perf/blob-rss.ts --mode many): reads of 256 KiB for the first
 * clients left 256 KiB per connection (~250 MiB); a share of 32 KiB peaked at ~400 MiB RSS, 16 KiB at
 * ~290 MiB, for 4.0 and 5.5 CPU-s/GiB.
 */
const IN_FLIGHT_BUDGET = 16 * 1024 * 1024;
/** Idle buffers kept for the next reads once the pool is quiet, at most this many bytes; the rest is left to the GC. */
const MAX_IDLE = 8 * 1024 * 1024;
/** The pool is quiet when no buffer came back for this long. */
const TRIM_AFTER_MS = 2000;

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
 * a fill, waits for bytes to be published, and sends the last byte only once the blob verified. Never
 * ends `res`: the caller decides how the response ends.
 */
export async function pumpFile(res: ServerResponse, handle: FileHandle, start: number, end: number | undefined, fill?: Fill): Promise<PumpResult> {
  let position = start;
  const sender = new Sender(res);
  try {
    for (;;) {
      if (sender.gone) return { kind: 'gone', bytes: position - start };
      const verified = !fill || fill.verified;
      const target = end ?? (fill ? (verified ? fill.size : undefined) : undefined);
      if (target !== undefined && position >= target && verified) return { kind: 'complete', bytes: position - start };
      // What may go out now: what the fill has written, except the answer's last byte while unverified.
      let limit = fill ? fill.published : Number.POSITIVE_INFINITY;
      if (target !== undefined) limit = Math.min(limit, verified ? target : target - 1);
      else if (!verified) limit -= 1; // the end is not known yet: any byte could be the last
      if (position < limit) {
        const { buffer, length } = readBuffers.take(limit - position);
        let bytesRead: number;
        try {
          ({ bytesRead } = await handle.read(buffer, 0, length, position));
        } catch (err) {
          readBuffers.give(buffer, length);
          throw err;
        }
        if (bytesRead === 0) {
          readBuffers.give(buffer, length);
          return { kind: 'cut', bytes: position - start, reason: 'the file is shorter than its index entry' };
        }
        position += bytesRead;
        await sender.send(buffer, bytesRead, length);
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
    sender.done();
  }
}

/**
 * One client's writes of pooled buffers. A buffer goes back to the pool once the response has let go of
 * it (its write callback; writes complete in order), or when the response is gone (a destroyed response
 * calls back with an error, or not at all). Listeners and callbacks are made once per client, not per
 * write: with 1,000 slow clients, what each write allocated lived long enough to fill the old heap.
 */
class Sender {
  gone: boolean;
  private readonly res: ServerResponse;
  /** Written, not yet called back: oldest first, with the byte count each holds in the budget. */
  private readonly pending: Array<{ buffer: Buffer; length: number }> = [];
  private wake: (() => void) | undefined;
  private readonly onWritten = () => {
    const written = this.pending.shift();
    if (written) readBuffers.give(written.buffer, written.length);
    if (this.pending.length === 0) this.resume();
  };
  private readonly onClose = () => {
    this.gone = true;
    for (const { buffer, length } of this.pending.splice(0)) readBuffers.give(buffer, length);
    this.resume();
  };

  constructor(res: ServerResponse) {
    this.res = res;
    this.gone = res.destroyed;
    res.once('close', this.onClose);
    readBuffers.senders++;
  }

  /** Writes `bytes` of `buffer` (taken for `length`); resolves when the response can take more (or is gone). */
  send(buffer: Buffer, bytes: number, length: number): Promise<void> | undefined {
    if (this.gone || this.res.destroyed) {
      readBuffers.give(buffer, length);
      return undefined;
    }
    this.pending.push({ buffer, length });
    if (this.res.write(buffer.subarray(0, bytes), this.onWritten)) return undefined;
    // Over the response's high-water mark: on once every write is through (what 'drain' means).
    if (this.pending.length === 0) return undefined;
    return new Promise((resolve) => (this.wake = resolve));
  }

  /** The pump ended: writes still under way give their buffers back when called back, or at the close. */
  done(): void {
    readBuffers.senders--;
    if (this.pending.length === 0) this.res.off('close', this.onClose);
  }

  private resume(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

/**
 * The read buffers of every client, shared and reused: a fresh buffer per read became garbage at once,
 * and the allocator and the GC made that the largest part of the memory and ~0.3 CPU-s per GiB served;
 * two 256 KiB buffers per client (and the encrypted copy of each write) made 1,000 clients cost ~1 GiB.
 * A read is sized to what is left to send (a 4 KiB config blob reads 4 KiB into a 16 KiB buffer), and
 * to the client's share of IN_FLIGHT_BUDGET.
 *
 * While reads are in flight no buffer is let go: one dropped to the GC stays allocated until a
 * collection, and a new one is made for the next read meanwhile (heaptrack, 1,000 clients: 139 MiB of
 * buffers at the peak, for ~48 MiB in flight). What is idle beyond MAX_IDLE is let go once the pool
 * has been quiet for TRIM_AFTER_MS.
 */
class ReadBufferPool {
  /** Bytes read into buffers and not yet taken by their sockets (what IN_FLIGHT_BUDGET bounds). */
  inFlight = 0;
  private idleBytes = 0;
  /** Idle buffers by size (each a power of two from MIN_READ to READ_SIZE). */
  private readonly idle = new Map<number, Buffer[]>();
  private trimTimer: NodeJS.Timeout | undefined;
  /** Clients being sent to now: each read is at most the budget's share of one of them. */
  senders = 0;

  /** A buffer and how much to read into it, for a read of up to `wanted` bytes. */
  take(wanted: number): { buffer: Buffer; length: number } {
    let length = Math.min(wanted, READ_SIZE);
    while (length > MIN_READ && length * this.senders > IN_FLIGHT_BUDGET) length = Math.max(MIN_READ, length >>> 1);
    while (length > MIN_READ && this.inFlight + length > IN_FLIGHT_BUDGET) length = Math.max(MIN_READ, length >>> 1);
    this.inFlight += length;
    // The smallest idle buffer that holds it; a new one only when none does.
    for (let size = classUp(length); size <= READ_SIZE; size *= 2) {
      const buffer = this.idle.get(size)?.pop();
      if (buffer) {
        this.idleBytes -= size;
        return { buffer, length };
      }
    }
    return { buffer: Buffer.allocUnsafeSlow(classUp(length)), length };
  }

  give(buffer: Buffer, length: number): void {
    this.inFlight -= length;
    let list = this.idle.get(buffer.length);
    if (!list) this.idle.set(buffer.length, (list = []));
    list.push(buffer);
    this.idleBytes += buffer.length;
    if (this.idleBytes > MAX_IDLE) this.scheduleTrim();
  }

  private scheduleTrim(): void {
    if (this.trimTimer) this.trimTimer.refresh();
    else this.trimTimer = setTimeout(() => this.trim(), TRIM_AFTER_MS).unref();
  }

  /** Lets the GC have idle buffers beyond MAX_IDLE, the largest first. */
  private trim(): void {
    this.trimTimer = undefined;
    for (let size = READ_SIZE; size >= MIN_READ && this.idleBytes > MAX_IDLE; size >>>= 1) {
      const list = this.idle.get(size);
      while (list?.length && this.idleBytes > MAX_IDLE) {
        list.pop();
        this.idleBytes -= size;
      }
    }
  }
}

/** The smallest buffer size (a power of two, MIN_READ…READ_SIZE) that holds `bytes`. */
function classUp(bytes: number): number {
  let size = MIN_READ;
  while (size < bytes && size < READ_SIZE) size *= 2;
  return size;
}

export const readBuffers = new ReadBufferPool();

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
