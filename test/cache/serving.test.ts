// Serving blobs from the cache: Range on a cached blob and on one still being filled, HEAD answered
// from metadata (and, uncached, passed upstream as HEAD), the upstream's Content-Type kept.
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, beforeEach, describe, test } from 'node:test';
import { hasBlobFile, partFiles, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { serveBlob, writeFlushed, type FakeBlob } from '../helpers/fake-registry.ts';

describe('serving cached and filling blobs', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig();
  });

  beforeEach(() => {
    rig.registry.reset();
  });

  after(async () => {
    await rig?.close();
  });

  /** Fetches a blob once so that it is cached, and forgets that upstream request. */
  async function cached(blob: FakeBlob): Promise<void> {
    const got = await rig.blob(blob.digest);
    assert.equal(got.digest, blob.digest);
    await rig.waitForHit(blob.digest);
    rig.registry.clearSeen();
  }

  test('Range on a cached blob: 206 with Content-Range, suffix and open ranges, 416 beyond the end', async () => {
    const blob = rig.registry.addBlob(3 * MiB + 123);
    const size = blob.bytes.length;
    await cached(blob);

    const cases: Array<[string, number, number]> = [
      ['bytes=1000-2999', 1000, 3000],
      ['bytes=-100', size - 100, size],
      [`bytes=${2 * MiB}-`, 2 * MiB, size],
      [`bytes=${size - 1}-${size + 5000}`, size - 1, size],
    ];
    for (const [range, start, end] of cases) {
      const got = await rig.blob(blob.digest, { headers: { Range: range } });
      assert.equal(got.status, 206, range);
      assert.equal(got.headers['content-range'], `bytes ${start}-${end - 1}/${size}`, range);
      assert.equal(got.headers['content-length'], String(end - start), range);
      assert.equal(got.headers['x-cache'], 'HIT', range);
      assert.equal(got.complete, true, range);
      assert.ok(got.body.equals(blob.bytes.subarray(start, end)), `${range}: the right bytes`);
    }

    const beyond = await rig.blob(blob.digest, { headers: { Range: `bytes=${size}-` } });
    assert.equal(beyond.status, 416);
    assert.equal(beyond.headers['content-range'], `bytes */${size}`);
    assert.equal(beyond.body.length, 0);
    assert.equal(rig.registry.seen.length, 0, 'all from the cache');
  });

  test('Range on a blob still being filled: its bytes go out as soon as they exist, its last byte once the blob verified', async () => {
    const blob = rig.registry.addBlob(4 * MiB);
    const firstPart = 2 * MiB;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let sentFirstPart = false;
    rig.registry.behave = async (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Length': blob.bytes.length });
      await writeFlushed(res, blob.bytes.subarray(0, firstPart));
      sentFirstPart = true;
      await released;
      res.end(blob.bytes.subarray(firstPart));
      return true;
    };

    const first = rig.blob(blob.digest);
    try {
      await waitFor('the first 2 MiB upstream', () => sentFirstPart);
      // Bytes the fill has: sent now, while upstream still holds back the rest, all but the last one,
      // which waits for the digest (R12.4: no clean end with bytes not verified).
      let earlyBytes = 0;
      let earlyDone = false;
      const earlyGot = rig.blob(blob.digest, { headers: { Range: 'bytes=1000-1048575' }, onData: (bytes) => void (earlyBytes = bytes) }).finally(() => (earlyDone = true));
      await waitFor('the range but its last byte', () => earlyBytes >= 1048576 - 1000 - 1);
      await sleep(200);
      assert.equal(earlyBytes, 1048576 - 1000 - 1, 'all but the last byte before the fill ends');
      assert.equal(earlyDone, false, 'no end before the blob verified');

      // Bytes that do not exist yet: the range waits for them.
      let lateDone = false;
      const late = rig.blob(blob.digest, { headers: { Range: `bytes=${3 * MiB}-${3 * MiB + 99}` } }).finally(() => (lateDone = true));
      await sleep(300);
      assert.equal(lateDone, false, 'a range beyond the bytes received waits');
      release();
      const early = await earlyGot;
      assert.equal(early.status, 206);
      assert.equal(early.headers['x-cache'], 'JOINED');
      assert.equal(early.headers['content-range'], `bytes 1000-1048575/${blob.bytes.length}`);
      assert.equal(early.complete, true);
      assert.ok(early.body.equals(blob.bytes.subarray(1000, 1048576)));
      const lateGot = await late;
      assert.equal(lateGot.status, 206);
      assert.equal(lateGot.headers['content-range'], `bytes ${3 * MiB}-${3 * MiB + 99}/${blob.bytes.length}`);
      assert.ok(lateGot.body.equals(blob.bytes.subarray(3 * MiB, 3 * MiB + 100)));
    } finally {
      release();
    }
    const whole = await first;
    assert.equal(whole.headers['x-cache'], 'MISS');
    assert.equal(whole.complete, true);
    assert.equal(whole.digest, blob.digest);
    assert.equal(rig.registry.count({ method: 'GET', digest: blob.digest }), 1);
  });

  test('HEAD of a cached blob is answered from metadata: the GET headers, no upstream request', async () => {
    const blob = rig.registry.addBlob(1 * MiB + 7, 'application/vnd.oci.image.layer.v1.tar+gzip');
    await cached(blob);
    const get = await rig.blob(blob.digest);
    const head = await rig.blob(blob.digest, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers['x-cache'], 'HIT');
    assert.equal(head.body.length, 0);
    for (const name of ['content-length', 'docker-content-digest', 'content-type']) {
      assert.equal(head.headers[name], get.headers[name], name);
    }
    assert.equal(head.headers['content-length'], String(blob.bytes.length));
    assert.equal(head.headers['docker-content-digest'], blob.digest);
    assert.equal(head.headers['content-type'], 'application/vnd.oci.image.layer.v1.tar+gzip');
    assert.equal(rig.registry.seen.length, 0);
  });

  test('HEAD of an uncached blob goes upstream as HEAD and never downloads or caches a body', async () => {
    const blob = rig.registry.addBlob(2 * MiB);
    const head = await rig.blob(blob.digest, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers['x-cache'], 'MISS');
    assert.equal(head.headers['content-length'], String(blob.bytes.length));
    assert.equal(head.headers['docker-content-digest'], blob.digest);
    assert.deepEqual(rig.registry.seen.map((s) => s.method), ['HEAD']);

    await sleep(200);
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
    assert.deepEqual(partFiles(rig.dataDir), []);
    assert.deepEqual(rig.registry.seen.map((s) => s.method), ['HEAD'], 'no GET behind the client’s back');
    const get = await rig.blob(blob.digest);
    assert.equal(get.headers['x-cache'], 'MISS', 'the HEAD cached nothing');
    assert.equal(get.digest, blob.digest);
  });

  test('clients that leave a cached blob mid-way are let go: every request ends and is logged', async () => {
    const blob = rig.registry.addBlob(16 * MiB);
    await cached(blob);
    const before = rig.proxy.access.length;
    const leaving = Array.from({ length: 12 }, (_, i) => rig.blob(blob.digest, { leaveAfter: (i + 1) * 512 * 1024 }));
    for (const got of await Promise.all(leaving)) assert.equal(got.complete, false);
    await waitFor('an access-log line for each client that left', () => rig.proxy.access.length - before >= 12, 5_000);
    const lines = rig.proxy.access.slice(before);
    assert.ok(lines.every((e) => e.cache === 'HIT' && e.error === 'the client left'), JSON.stringify(lines));
  });

  test("a blob keeps upstream's Content-Type on MISS and HIT", async () => {
    const mediaType = 'application/vnd.oci.image.manifest.v1+json';
    const blob = rig.registry.addBlob(Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType, layers: [] })), mediaType);
    rig.registry.behave = (req, res, seen) => {
      if (seen.blob !== blob) return false;
      serveBlob(req, res, blob);
      return true;
    };
    const miss = await rig.blob(blob.digest);
    assert.equal(miss.headers['x-cache'], 'MISS');
    assert.equal(miss.headers['content-type'], mediaType);
    assert.equal(miss.digest, blob.digest);
    await rig.waitForHit(blob.digest);
    const hit = await rig.blob(blob.digest);
    assert.equal(hit.headers['x-cache'], 'HIT');
    assert.equal(hit.headers['content-type'], mediaType);
    assert.equal(hit.digest, blob.digest);
  });
});
