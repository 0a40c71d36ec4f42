// Eviction under cache.maxSize: least recently used first, and never disturbing a reader that has the
// evicted file open.
import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';
import { digestOfBlobFile, hasBlobFile, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';

describe('eviction', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig({ cache: '{ maxSize: 48MiB, minFree: 0 }' });
  });

  beforeEach(() => {
    rig.registry.reset();
  });

  after(async () => {
    await rig?.close();
  });

  test('4 slow readers of a blob evicted under them still receive all of it intact', async () => {
    const a = rig.registry.addBlob(32 * MiB);
    const b = rig.registry.addBlob(32 * MiB);
    assert.equal((await rig.blob(a.digest)).digest, a.digest);
    await rig.waitForHit(a.digest);

    // Readers that read a little, then hold still until released: the proxy cannot have sent them
    // 32 MiB (socket buffers hold a few MiB), so each is still reading the file when it is evicted.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const received = [0, 0, 0, 0];
    const readers = received.map((_, i) =>
      rig.blob(a.digest, {
        onData: (bytes) => {
          received[i] = bytes;
          return bytes >= 1 * MiB ? released : undefined;
        },
      }),
    );
    try {
      await waitFor('4 readers under way', () => received.every((bytes) => bytes >= 1 * MiB));

      const got = await rig.blob(b.digest);
      assert.equal(got.headers['x-cache'], 'MISS');
      assert.equal(got.digest, b.digest);
      await waitFor("A's file to be evicted", () => !hasBlobFile(rig.dataDir, a.digest));
      assert.ok(received.every((bytes) => bytes < a.bytes.length), `readers were mid-blob at the eviction: ${received.join(', ')}`);
    } finally {
      release();
    }

    for (const [i, got] of (await Promise.all(readers)).entries()) {
      assert.equal(got.headers['x-cache'], 'HIT', `reader ${i}`);
      assert.equal(got.complete, true, `reader ${i} ended cleanly`);
      assert.equal(got.body.length, a.bytes.length, `reader ${i}`);
      assert.equal(got.digest, a.digest, `reader ${i} got A intact`);
    }

    await rig.waitForHit(b.digest);
    assert.equal(digestOfBlobFile(rig.dataDir, b.digest), b.digest, 'B stays');
    const again = await rig.blob(a.digest);
    assert.equal(again.headers['x-cache'], 'MISS', 'A was evicted from the index too');
    assert.equal(again.digest, a.digest);
    assert.equal(rig.registry.count({ method: 'GET', digest: a.digest }), 2);
  });

  test('the least recently used blob goes first', async () => {
    // Start from a known cache: the earlier test leaves A (32 MiB) in it; filling three 15 MiB blobs
    // evicts it (45 MiB fit in 48).
    const [x, y, z] = [rig.registry.addBlob(15 * MiB), rig.registry.addBlob(15 * MiB), rig.registry.addBlob(15 * MiB)];
    for (const blob of [x, y, z]) {
      assert.equal((await rig.blob(blob.digest)).digest, blob.digest);
      await rig.waitForHit(blob.digest);
    }
    // x is used again, so y is now the least recently used.
    assert.equal((await rig.blob(x.digest)).headers['x-cache'], 'HIT');
    const w = rig.registry.addBlob(15 * MiB);
    assert.equal((await rig.blob(w.digest)).digest, w.digest);
    await rig.waitForHit(w.digest);
    await waitFor("y's file to be evicted", () => !hasBlobFile(rig.dataDir, y.digest));
    assert.deepEqual(
      [x, z, w].map((blob) => hasBlobFile(rig.dataDir, blob.digest)),
      [true, true, true],
      'only the least recently used blob went',
    );
  });
});
