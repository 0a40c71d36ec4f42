// The blob store's bookkeeping, on a real LMDB index in a temp dir: what the index and the running
// totals say after an eviction races a hit's access-time update, what in-flight fills reserve against
// cache.maxSize, and that eviction with a large index does not stall the event loop.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, afterEach, beforeEach, describe, test } from 'node:test';
import { BlobStore, type BlobEntry, type CacheLimits } from '../../src/cache/blob-store.ts';
import { openIndex, type CacheIndex } from '../../src/cache/index.ts';
import type { Logger } from '../../src/log.ts';

const MiB = 1024 * 1024;
const quiet: Logger = { access() {}, info() {}, warn() {}, error() {} };
const noFloor: Omit<CacheLimits, 'maxSize'> = { minFree: 0 };

/** A digest made from a number: sha256:<64 hex digits>. */
function digestOf(n: number): string {
  return `sha256:${n.toString(16).padStart(64, '0')}`;
}

function entry(size: number, lastAccess: number): BlobEntry {
  return { size, firstAccess: lastAccess, lastAccess, hits: 0, registry: 'registry.test:443', repository: 'lib/app', access: 'anonymous' };
}

describe('the blob store', () => {
  let dataDir: string;
  let index: CacheIndex;
  let store: BlobStore;
  const dirs: string[] = [];

  async function openStore(): Promise<BlobStore> {
    index = openIndex(dataDir, quiet);
    store = new BlobStore(dataDir, index.root, quiet);
    await store.start();
    return store;
  }

  /** A blob file of `size` bytes (sparse: no disk used) at its place, recorded in the index. */
  async function addBlob(n: number, size: number, lastAccess = Date.now()): Promise<string> {
    const digest = digestOf(n);
    const file = store.blobPath(digest);
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, '');
    truncateSync(file, size);
    await store.record(digest, entry(size, lastAccess));
    return digest;
  }

  beforeEach(() => {
    dataDir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-blob-store-'));
    dirs.push(dataDir);
  });

  afterEach(async () => {
    await index?.close();
  });

  after(() => {
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  test('a hit recorded after its blob was evicted does not bring the index entry back, and the totals stay right', async () => {
    await openStore();
    const a = await addBlob(1, 10 * MiB, 1000);
    const b = await addBlob(2, 10 * MiB, 2000);
    assert.equal(store.total, 20 * MiB);

    // A hit looked `a` up; before it records the hit, an eviction takes `a` (the least recently used).
    const seen = store.lookup(a)!;
    assert.ok(await store.makeRoom(5 * MiB, { maxSize: 20 * MiB, ...noFloor }));
    store.touch(a, seen);
    await sleep(100); // the index's writes commit

    assert.equal(store.lookup(a), undefined, 'no index entry without its file');
    assert.ok(store.lookup(b));
    assert.equal(store.total, 10 * MiB);
    assert.equal(store.count, 1);

    // A reader that finds `a` gone forgets it once more: nothing is counted out twice.
    assert.equal(await store.open(a), undefined);
    assert.equal(store.total, 10 * MiB);
    assert.equal(store.count, 1);

    // The same after a restart, which counts from the index and the files.
    await index.close();
    await openStore();
    assert.equal(store.lookup(a), undefined);
    assert.equal(store.total, 10 * MiB);
    assert.equal(store.count, 1);
  });

  test('touch, forget and record in any order: the index has an entry exactly for each file, totals match', async () => {
    await openStore();
    const digests: string[] = [];
    for (let i = 0; i < 20; i++) digests.push(await addBlob(100 + i, MiB, 1000 + i));
    const seen = digests.map((d) => store.lookup(d)!);
    // Hits and evictions interleaved, nobody waiting for the hits' writes.
    const evicting = store.makeRoom(0, { maxSize: 10 * MiB, ...noFloor });
    for (const [i, d] of digests.entries()) store.touch(d, seen[i]!);
    assert.ok(await evicting);
    for (const [i, d] of digests.entries()) store.touch(d, seen[i]!);
    await sleep(100);
    const kept = digests.filter((d) => store.lookup(d));
    assert.equal(kept.length, 10);
    assert.equal(store.total, 10 * MiB);
    assert.equal(store.count, 10);
    await index.close();
    await openStore();
    assert.equal(store.total, 10 * MiB, 'the restart counts what the index and the disk say');
    assert.equal(store.count, 10);
  });

  test('fills in flight count against maxSize: room is made for what they announced', async () => {
    await openStore();
    const limits = { maxSize: 48 * MiB, ...noFloor };
    const a = await addBlob(1, 20 * MiB, 1000);
    // Two fills of 20 MiB each announced: 20 + 20 + 20 > 48, so A must go now, not after they commit.
    assert.ok(await store.reserve(digestOf(2), 20 * MiB, limits));
    assert.ok(store.lookup(a), 'one fill fits beside A');
    assert.ok(await store.reserve(digestOf(3), 20 * MiB, limits));
    assert.equal(store.lookup(a), undefined, 'A evicted for the second fill');
    assert.equal(store.total, 0);
    // A new fill is refused room while the two in flight fill the cache (everything else is gone)...
    assert.equal(await store.makeRoom(20 * MiB, limits), false);
    // ...and the reservations turn into blobs when the fills commit.
    await store.record(digestOf(2), entry(20 * MiB, 3000));
    await store.record(digestOf(3), entry(20 * MiB, 3001));
    assert.equal(store.total, 40 * MiB);
    assert.equal(await store.makeRoom(0, limits), true);
    assert.equal(store.total, 40 * MiB, 'nothing evicted: the fills are in the cache, not counted twice');
    // A fill that fails gives its reservation back.
    assert.ok(await store.reserve(digestOf(4), 8 * MiB, limits));
    store.release(digestOf(4));
    assert.equal(await store.makeRoom(8 * MiB, limits), true);
    assert.equal(store.total, 40 * MiB);
  });

  test('a fill announcing more than the whole cache evicts nothing and does not hold other fills back', async () => {
    await openStore();
    const limits = { maxSize: 48 * MiB, ...noFloor };
    const a = await addBlob(1, 20 * MiB, 1000);
    assert.equal(await store.reserve(digestOf(2), 20 * 1024 * MiB, limits), false);
    assert.ok(store.lookup(a), 'nothing evicted for a blob that cannot fit');
    assert.equal(await store.makeRoom(10 * MiB, limits), true, 'other fills still find room');
    store.release(digestOf(2));
  });

  // PULLTHROUGH_EVICTION_BLOBS=100000 measures with more (the figure is printed as a diagnostic).
  test('eviction with 20,000 blobs in the index does not stall the event loop', async (t) => {
    await openStore();
    const blobs = Number(process.env.PULLTHROUGH_EVICTION_BLOBS ?? 20_000);
    const size = MiB;
    const now = Date.now();
    // Recorded straight into the index (no files: eviction removes whatever is there, here nothing).
    await Promise.all(Array.from({ length: blobs }, (_, i) => store.record(digestOf(1_000_000 + i), entry(size, now - blobs + i))));
    assert.equal(store.count, blobs);
    const limits = { maxSize: blobs * size, ...noFloor };
    const delay = monitorEventLoopDelay({ resolution: 5 });
    delay.enable();
    const started = performance.now();
    // 200 fills of 1 MiB into a full cache: each makes room (one blob goes), then commits.
    for (let i = 0; i < 200; i++) {
      assert.ok(await store.makeRoom(size, limits));
      await store.record(digestOf(2_000_000 + i), entry(size, Date.now()));
    }
    delay.disable();
    const took = performance.now() - started;
    const maxMs = delay.max / 1e6;
    t.diagnostic(`${blobs} blobs: 200 evictions in ${took.toFixed(0)} ms, event-loop delay max ${maxMs.toFixed(1)} ms, p99 ${(delay.percentile(99) / 1e6).toFixed(1)} ms`);
    assert.equal(store.count, blobs);
    assert.equal(store.lookup(digestOf(1_000_000)), undefined, 'the least recently used went first');
    assert.ok(store.lookup(digestOf(1_000_000 + 200)));
    assert.ok(maxMs < 100, `event loop stalled for ${maxMs.toFixed(1)} ms (200 evictions took ${took.toFixed(0)} ms)`);
  });
});
