// The content-addressed blob store: verified blobs at blobs/<alg>/<ab>/<hex>, in-progress fills at
// tmp/<hex>.<random>.part, metadata in LMDB. A file is in blobs/ only once its digest verified (the fill
// renames it there), and an index entry is written only after that, so a crash at any moment leaves at
// worst an orphan file or a stale .part, both removed at the next start.
//
// What eviction needs is kept in memory, built once at start: every indexed blob's size in least-
// recently-used order, and the sizes the fills in flight announced. A hit, a new blob or an eviction
// updates it in O(1); nothing a request does scans or sorts the index.
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rm, stat, statfs, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Database, RootDatabase } from 'lmdb';
import type { Logger } from '../log.ts';

/** How a blob was obtained: who may read it from the cache depends on it. */
export type Access = 'anonymous' | 'client' | 'central';

export interface BlobEntry {
  size: number;
  mediaType?: string;
  /** Epoch milliseconds. */
  firstAccess: number;
  lastAccess: number;
  hits: number;
  /** Where it was first fetched from: "host:port" and repository. */
  registry: string;
  repository: string;
  access: Access;
}

export interface CacheLimits {
  maxSize: number;
  minFree: number;
}

export class BlobStore {
  readonly root: string;
  readonly tmp: string;
  private readonly db: Database<BlobEntry, string>;
  private readonly log: Logger;
  /** Bytes of the blobs in `lru`. */
  private totalBytes = 0;
  /**
   * Digest → size of every indexed blob, least recently used first: a Map iterates in insertion order,
   * and a hit moves its blob to the end (delete, set). The source of truth for what is cached: an entry
   * leaves it (synchronously) before its index record is removed, so no later write can bring it back.
   */
  private readonly lru = new Map<string, number>();
  /** Digest → bytes announced by a fill in flight that were made room for: counted against maxSize until it commits or fails. */
  private readonly reservations = new Map<string, number>();
  private reservedBytes = 0;
  /** Fills whose reservation is waiting for its turn to evict: release() before that cancels it. */
  private readonly pendingReservations = new Map<string, object>();
  /** Since start, for the metrics. */
  readonly evictions = { blobs: 0, bytes: 0 };
  private readonly forgetting = new Map<string, Promise<void>>();
  private readonly readers = new Map<string, number>();
  /** The eviction under way: evictions run one at a time. */
  private evicting: Promise<unknown> = Promise.resolve();

  constructor(dataDir: string, index: RootDatabase, log: Logger) {
    this.root = path.join(dataDir, 'blobs');
    this.tmp = path.join(dataDir, 'tmp');
    this.db = index.openDB<BlobEntry, string>({ name: 'blobs', encoding: 'msgpack' });
    this.log = log;
  }

  /** Removes what a crash can leave (stale .part files, orphans, entries without files); sums the size. */
  async start(): Promise<void> {
    await rm(this.tmp, { recursive: true, force: true });
    await mkdir(this.tmp, { recursive: true });
    await mkdir(this.root, { recursive: true });
    const indexed: Array<{ digest: string; size: number; lastAccess: number }> = [];
    // Keys only first: a read transaction is never held across the stat()s (it would pin a snapshot).
    for (const key of [...this.db.getKeys()]) {
      const value = this.db.get(key);
      if (!value) continue;
      const size = await stat(this.blobPath(key)).then((s) => s.size, () => -1);
      if (size !== value.size) {
        await this.db.remove(key);
        this.log.warn('dropped an index entry whose blob file is missing or has the wrong size', { digest: key });
        continue;
      }
      indexed.push({ digest: key, size, lastAccess: value.lastAccess });
    }
    const known = new Set(indexed.map((e) => e.digest));
    let orphans = 0;
    for (const file of await listFiles(this.root)) {
      const digest = digestOfPath(this.root, file);
      if (!digest || !known.has(digest)) {
        await rm(file, { force: true });
        orphans++;
      }
    }
    if (orphans > 0) this.log.info('removed blob files the index does not know (left by a crash)', { files: orphans });
    // The one sort: from here on the order is kept up to date one blob at a time.
    indexed.sort((a, b) => a.lastAccess - b.lastAccess);
    this.lru.clear();
    this.totalBytes = 0;
    for (const { digest, size } of indexed) {
      this.lru.set(digest, size);
      this.totalBytes += size;
    }
  }

  get count(): number {
    return this.lru.size;
  }

  get total(): number {
    return this.totalBytes;
  }

  /** Bytes the fills in flight announced and were given room for (not in `total` until they commit). */
  get reserved(): number {
    return this.reservedBytes;
  }

  blobPath(digest: string): string {
    const [algorithm, hex] = digest.split(':') as [string, string];
    return path.join(this.root, algorithm, hex.slice(0, 2), hex);
  }

  partPath(digest: string): string {
    const hex = digest.slice(digest.indexOf(':') + 1);
    return path.join(this.tmp, `${hex}.${randomBytes(6).toString('hex')}.part`);
  }

  /** Whether the blob is cached (and not being forgotten): lookup() without reading its entry. */
  holds(digest: string): boolean {
    return this.lru.has(digest);
  }

  /** The blob's entry; undefined once it is being forgotten (evicted, purged), even before the index says so. */
  lookup(digest: string): BlobEntry | undefined {
    return this.lru.has(digest) ? this.db.get(digest) : undefined;
  }

  /** Opens a cached blob for reading; a file gone from under the index (evicted) is a miss. */
  async open(digest: string): Promise<{ entry: BlobEntry; handle: FileHandle } | undefined> {
    const entry = this.lookup(digest);
    if (!entry) return undefined;
    let handle: FileHandle;
    try {
      handle = await open(this.blobPath(digest), 'r');
    } catch {
      await this.forget(digest);
      return undefined;
    }
    // Readers are counted so that a purge can wait for them; closing the handle is the release.
    this.readers.set(digest, (this.readers.get(digest) ?? 0) + 1);
    const close = handle.close.bind(handle);
    let released = false;
    handle.close = () => {
      if (!released) {
        released = true;
        const left = (this.readers.get(digest) ?? 1) - 1;
        if (left > 0) this.readers.set(digest, left);
        else this.readers.delete(digest);
      }
      return close();
    };
    return { entry, handle };
  }

  /** Blobs some client is reading from the cache right now. */
  beingRead(digest: string): boolean {
    return this.readers.has(digest);
  }

  /**
   * Removes the blobs `select` picks. One that a client is reading is waited for (up to `waitMs`),
   * then skipped and reported: an operator's purge never cuts a download.
   */
  async purge(select: (digest: string, entry: BlobEntry) => boolean, waitMs: number): Promise<{ blobs: number; bytes: number; busy: string[] }> {
    const chosen = [...this.db.getRange()].filter(({ key, value }) => select(key, value));
    const deadline = Date.now() + waitMs;
    while (chosen.some(({ key }) => this.readers.has(key)) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
    let blobs = 0;
    let bytes = 0;
    const busy: string[] = [];
    for (const { key, value } of chosen) {
      if (this.readers.has(key)) {
        busy.push(key);
        continue;
      }
      await rm(this.blobPath(key), { force: true });
      await this.forget(key);
      blobs++;
      bytes += value.size;
    }
    return { blobs, bytes, busy };
  }

  /**
   * Records a blob the fill has renamed into place. Resolves once the entry is committed: LMDB's reads
   * see an asynchronous put only after that.
   */
  async record(digest: string, entry: BlobEntry): Promise<void> {
    // Its reservation (if any) becomes the blob's own bytes.
    this.release(digest);
    const had = this.lru.get(digest);
    if (had !== undefined) {
      this.totalBytes -= had;
      this.lru.delete(digest);
    }
    this.lru.set(digest, entry.size);
    this.totalBytes += entry.size;
    await this.db.put(digest, entry);
  }

  /**
   * Records a hit; nobody waits for it. A blob forgotten meanwhile (evicted, purged) stays forgotten:
   * the entry is rewritten only if it is still in the index when the write runs, which is after any
   * removal issued before (the index's writes run in order). A write that fails (disk or map full) is
   * logged by the index (cache/index.ts) and costs only this hit's count and access time.
   */
  touch(digest: string, _entry?: BlobEntry): void {
    const size = this.lru.get(digest);
    if (size === undefined) return;
    this.lru.delete(digest);
    this.lru.set(digest, size);
    const lastAccess = Date.now();
    this.db
      .transaction(() => {
        const current = this.db.get(digest);
        if (current) this.db.put(digest, { ...current, hits: current.hits + 1, lastAccess });
      })
      .catch(() => {});
  }

  /** The blob turned out to be readable by anyone: no client needs a read check for it any more. */
  async markPublic(digest: string): Promise<void> {
    await this.db.transaction(() => {
      const entry = this.db.get(digest);
      if (entry && entry.access !== 'anonymous') this.db.put(digest, { ...entry, access: 'anonymous' });
    });
  }

  async forget(digest: string): Promise<void> {
    // The blob leaves the in-memory order at once, so a second forget before the removal commits (an
    // eviction, and a reader that found the file gone) counts nothing out twice, and lookups miss.
    const pending = this.forgetting.get(digest);
    if (pending) return pending;
    const size = this.lru.get(digest);
    if (size !== undefined) {
      this.lru.delete(digest);
      this.totalBytes -= size;
    } else if (!this.db.doesExist(digest)) {
      return;
    }
    const removal = this.db.remove(digest).then(() => {});
    this.forgetting.set(digest, removal);
    try {
      await removal;
    } finally {
      this.forgetting.delete(digest);
    }
  }

  async freeBytes(): Promise<number> {
    const fs = await statfs(this.root);
    return fs.bavail * fs.bsize;
  }

  /**
   * Makes room for `incoming` bytes: least recently used blobs go until the cache (with what the fills
   * in flight reserved) fits maxSize and the disk keeps minFree. A reader that has an evicted file open
   * keeps reading it (the inode lives on until closed). Returns false, evicting nothing, when even an
   * empty cache would not make room.
   */
  makeRoom(incoming: number, limits: CacheLimits, keep: ReadonlySet<string> = new Set()): Promise<boolean> {
    return this.inTurn(() => this.evict(incoming, limits, keep));
  }

  /**
   * A fill announced `size` bytes: room is made for them, and they count against maxSize (for every
   * later makeRoom) until record() or release(). False, with nothing evicted or reserved, when they
   * cannot fit even in an empty cache (the fill goes on; what it brings is accounted when it commits).
   */
  reserve(digest: string, size: number, limits: CacheLimits, keep: ReadonlySet<string> = new Set()): Promise<boolean> {
    const ticket = {};
    this.pendingReservations.set(digest, ticket);
    const current = () => this.pendingReservations.get(digest) === ticket;
    return this.inTurn(async () => {
      if (!current()) return false; // the fill ended before its turn came
      const fits = await this.evict(size, limits, keep);
      if (!current()) return fits;
      this.pendingReservations.delete(digest);
      if (fits) {
        this.reservations.set(digest, size);
        this.reservedBytes += size;
      }
      return fits;
    });
  }

  /** The fill ended without a blob (or its bytes were recorded): its reservation no longer counts. */
  release(digest: string): void {
    this.pendingReservations.delete(digest);
    const size = this.reservations.get(digest);
    if (size === undefined) return;
    this.reservations.delete(digest);
    this.reservedBytes -= size;
  }

  /** One eviction at a time: two choosing from the same state would both evict for one need. */
  private inTurn<T>(step: () => Promise<T>): Promise<T> {
    const run = this.evicting.then(step);
    this.evicting = run.catch(() => {});
    return run;
  }

  private async evict(incoming: number, limits: CacheLimits, keep: ReadonlySet<string>): Promise<boolean> {
    let free = await this.freeBytes();
    const used = () => this.totalBytes + this.reservedBytes + incoming;
    const fits = () => used() <= limits.maxSize && free - incoming >= limits.minFree;
    if (fits()) return true;
    // A blob larger than the cache or the disk (20 GiB announced, say) must not empty the cache for
    // nothing: if evicting every candidate would not make room, none goes.
    let kept = 0;
    for (const digest of keep) kept += this.lru.get(digest) ?? 0;
    const evictable = this.totalBytes - kept;
    if (used() - evictable > limits.maxSize || free + evictable - incoming < limits.minFree) return false;
    let evicted = 0;
    while (!fits()) {
      const next = this.leastRecentlyUsed(keep);
      if (!next) break;
      const [digest, size] = next;
      await rm(this.blobPath(digest), { force: true });
      await this.forget(digest);
      free += size;
      evicted++;
      this.evictions.blobs++;
      this.evictions.bytes += size;
    }
    if (evicted > 0) this.log.info('evicted least recently used blobs', { blobs: evicted, cacheBytes: this.totalBytes, reservedBytes: this.reservedBytes });
    return fits();
  }

  /** The first blob in LRU order not in `keep` (a handful: the fills in flight); O(1) otherwise. */
  private leastRecentlyUsed(keep: ReadonlySet<string>): [string, number] | undefined {
    for (const entry of this.lru) if (!keep.has(entry[0])) return entry;
    return undefined;
  }
}

async function listFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isFile()).map((e) => path.join(e.parentPath, e.name));
}

/** blobs/sha256/ab/abcd… → sha256:abcd…, or undefined for anything that is not a blob's place. */
function digestOfPath(root: string, file: string): string | undefined {
  const [algorithm, prefix, hex, ...rest] = path.relative(root, file).split(path.sep);
  if (rest.length > 0 || !algorithm || !hex || !prefix || !hex.startsWith(prefix)) return undefined;
  return `${algorithm}:${hex}`;
}
