// The content-addressed blob store: verified blobs at blobs/<alg>/<ab>/<hex>, in-progress fills at
// tmp/<hex>.<random>.part, metadata in LMDB. A file is in blobs/ only once its digest verified (the fill
// renames it there), and an index entry is written only after that, so a crash at any moment leaves at
// worst an orphan file or a stale .part, both removed at the next start.
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
  private totalBytes = 0;
  private entryCount = 0;
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
    let total = 0;
    const indexed = new Set<string>();
    for (const { key, value } of this.db.getRange()) {
      const size = await stat(this.blobPath(key)).then((s) => s.size, () => -1);
      if (size !== value.size) {
        await this.db.remove(key);
        this.log.warn('dropped an index entry whose blob file is missing or has the wrong size', { digest: key });
        continue;
      }
      indexed.add(key);
      total += size;
    }
    let orphans = 0;
    for (const file of await listFiles(this.root)) {
      const digest = digestOfPath(this.root, file);
      if (!digest || !indexed.has(digest)) {
        await rm(file, { force: true });
        orphans++;
      }
    }
    if (orphans > 0) this.log.info('removed blob files the index does not know (left by a crash)', { files: orphans });
    this.totalBytes = total;
    this.entryCount = indexed.size;
  }

  get count(): number {
    return this.entryCount;
  }

  get total(): number {
    return this.totalBytes;
  }

  blobPath(digest: string): string {
    const [algorithm, hex] = digest.split(':') as [string, string];
    return path.join(this.root, algorithm, hex.slice(0, 2), hex);
  }

  partPath(digest: string): string {
    const hex = digest.slice(digest.indexOf(':') + 1);
    return path.join(this.tmp, `${hex}.${randomBytes(6).toString('hex')}.part`);
  }

  lookup(digest: string): BlobEntry | undefined {
    return this.db.get(digest);
  }

  /** Opens a cached blob for reading; a file gone from under the index (evicted) is a miss. */
  async open(digest: string): Promise<{ entry: BlobEntry; handle: FileHandle } | undefined> {
    const entry = this.db.get(digest);
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
    if (!this.db.get(digest)) {
      this.totalBytes += entry.size;
      this.entryCount++;
    }
    await this.db.put(digest, entry);
  }

  /**
   * Records a hit; nobody waits for it. A write that fails (disk or map full) is logged by the index
   * (cache/index.ts) and costs only this hit's count and access time: the hit is served all the same.
   */
  touch(digest: string, entry: BlobEntry): void {
    this.db.put(digest, { ...entry, hits: entry.hits + 1, lastAccess: Date.now() }).catch(() => {});
  }

  /** The blob turned out to be readable by anyone: no client needs a read check for it any more. */
  async markPublic(digest: string): Promise<void> {
    await this.db.transaction(() => {
      const entry = this.db.get(digest);
      if (entry && entry.access !== 'anonymous') this.db.put(digest, { ...entry, access: 'anonymous' });
    });
  }

  async forget(digest: string): Promise<void> {
    // Lookups see the entry until its removal commits: a second forget in that time (an eviction, and
    // a reader that found the file gone) must not count the size out twice.
    const pending = this.forgetting.get(digest);
    if (pending) return pending;
    const entry = this.db.get(digest);
    if (!entry) return;
    this.totalBytes -= entry.size;
    this.entryCount--;
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
   * Makes room for `incoming` bytes: least recently used blobs go until the cache fits maxSize and the
   * disk keeps minFree. A reader that has an evicted file open keeps reading it (the inode lives on
   * until closed). Returns false, evicting nothing, when even an empty cache would not make room.
   */
  makeRoom(incoming: number, limits: CacheLimits, keep: ReadonlySet<string> = new Set()): Promise<boolean> {
    // One at a time: two evictions choosing from the same snapshot would both evict for one need.
    const run = this.evicting.then(() => this.evict(incoming, limits, keep));
    this.evicting = run.catch(() => {});
    return run;
  }

  private async evict(incoming: number, limits: CacheLimits, keep: ReadonlySet<string>): Promise<boolean> {
    let free = await this.freeBytes();
    const fits = () => this.totalBytes + incoming <= limits.maxSize && free - incoming >= limits.minFree;
    if (fits()) return true;
    const candidates = [...this.db.getRange()]
      .filter(({ key }) => !keep.has(key))
      .sort((a, b) => a.value.lastAccess - b.value.lastAccess);
    // A blob larger than the cache or the disk (20 GiB announced, say) must not empty the cache for
    // nothing: if evicting every candidate would not make room, none goes.
    const evictable = candidates.reduce((sum, { value }) => sum + value.size, 0);
    if (this.totalBytes - evictable + incoming > limits.maxSize || free + evictable - incoming < limits.minFree) return false;
    let evicted = 0;
    for (const { key, value } of candidates) {
      if (fits()) break;
      await rm(this.blobPath(key), { force: true });
      await this.forget(key);
      free += value.size;
      evicted++;
      this.evictions.blobs++;
      this.evictions.bytes += value.size;
    }
    if (evicted > 0) this.log.info('evicted least recently used blobs', { blobs: evicted, cacheBytes: this.totalBytes });
    return fits();
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
