// Filling the blob cache from upstreams that misbehave: redirect chains, connections cut mid-blob,
// bytes that do not match the digest, a huge announced length that never comes, clients that leave.
// What is asserted is what a user can check: bytes and digests received, clean end or cut, X-Cache,
// what the upstream saw, and the files in the data directory.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, beforeEach, describe, test } from 'node:test';
import { connectThroughProxy } from '../helpers/blob-client.ts';
import { httpOverSocket } from '../helpers/connect.ts';
import { digestOfBlobFile, diskUsage, hasBlobFile, partFiles, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { sendSlowly, serveBlob, sha256, writeFlushed } from '../helpers/fake-registry.ts';

describe('blob fills from misbehaving upstreams', () => {
  let rig: CacheRig;

  before(async () => {
    // A cache far smaller than the 20 GiB one upstream announces below.
    rig = await startCacheRig({ cache: '{ maxSize: 4GiB, minFree: 0 }' });
  });

  beforeEach(() => {
    rig.registry.reset();
    rig.cdn.reset();
  });

  after(async () => {
    await rig?.close();
  });

  test('a 307 → 302 → relative-Location chain: 200 with the right bytes, Authorization only to the registry, cached', async () => {
    const { registry, cdn } = rig;
    const blob = registry.addBlob(2 * MiB + 5);
    const hex = blob.digest.slice('sha256:'.length);
    registry.behave = (_req, res, seen) => {
      if (seen.blob !== blob) return false;
      res.writeHead(307, { Location: `https://${cdn.hostPort}/signed/${hex}?sig=FIRST-SIGNATURE&expires=1` });
      res.end();
      return true;
    };
    cdn.behave = (req, res, seen) => {
      if (seen.path === `/signed/${hex}`) {
        res.writeHead(302, { Location: `/cdn/${hex}?sig=SECOND-SIGNATURE` });
        res.end();
        return true;
      }
      if (seen.path !== `/cdn/${hex}`) return false;
      serveBlob(req, res, blob);
      return true;
    };

    const got = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer client-token' } });
    assert.equal(got.status, 200);
    assert.equal(got.complete, true);
    assert.equal(got.digest, blob.digest);
    assert.equal(got.headers['x-cache'], 'MISS');

    // HEADs aside (the proxy asks anonymously whether the blob is public, and follows the redirects).
    const gets = (seen: typeof registry.seen) => seen.filter((s) => s.method === 'GET');
    assert.deepEqual(gets(registry.seen).map((s) => [s.method, s.path, s.headers.authorization]), [['GET', `/v2/lib/app/blobs/${blob.digest}`, 'Bearer client-token']]);
    assert.ok(registry.seen.every((s) => s.method === 'GET' || s.headers.authorization === undefined), 'the public check is anonymous');
    assert.deepEqual(gets(cdn.seen).map((s) => [s.method, s.url]), [
      ['GET', `/signed/${hex}?sig=FIRST-SIGNATURE&expires=1`],
      ['GET', `/cdn/${hex}?sig=SECOND-SIGNATURE`],
    ]);
    assert.ok(cdn.seen.every((s) => s.headers.authorization === undefined), 'the CDN never sees the Authorization');
    assert.ok(!rig.proxy.lines.some((line) => line.includes('SIGNATURE') || line.includes('client-token')), 'neither signed URLs nor tokens are logged');

    await rig.waitForHit(blob.digest);
    registry.clearSeen();
    cdn.clearSeen();
    const again = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer client-token' } });
    assert.equal(again.status, 200);
    assert.equal(again.complete, true);
    assert.equal(again.digest, blob.digest);
    assert.equal(again.headers['x-cache'], 'HIT');
    assert.equal(gets(cdn.seen).length, 0, 'nothing from the CDN');
    // Fetched with the client's credentials: the hit needs proof (R6.3), a HEAD at most, never a GET.
    assert.equal(gets(registry.seen).length, 0);
    assert.ok(registry.seen.length <= 1);
  });

  test('a connection cut at 3 MiB of 8 MiB is resumed with Range: bytes=3145728-, invisibly to the client', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(8 * MiB);
    const cutAt = 3 * MiB;
    registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': blob.bytes.length });
      await writeFlushed(res, blob.bytes.subarray(0, cutAt));
      await sleep(100); // every byte written has arrived: the cut is exactly at cutAt
      req.socket.destroy();
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.body.length, blob.bytes.length);
    assert.equal(got.digest, blob.digest);
    assert.deepEqual(registry.seen.filter((s) => s.method === 'GET').map((s) => s.headers.range), [undefined, `bytes=${cutAt}-`]);

    await rig.waitForHit(blob.digest);
    assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest, 'the cached file verifies');
    registry.clearSeen();
    const again = await rig.blob(blob.digest);
    assert.equal(again.headers['x-cache'], 'HIT');
    assert.equal(again.digest, blob.digest);
    assert.equal(registry.count({ method: 'GET' }), 0);
  });

  test('a resumed request answered with a full 200 (Range ignored) still gives the right blob', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(8 * MiB);
    const cutAt = 3 * MiB;
    registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      if (seen.nth > 1) {
        serveBlob(req, res, blob, { ignoreRange: true });
        return true;
      }
      res.writeHead(200, { 'Content-Length': blob.bytes.length });
      await writeFlushed(res, blob.bytes.subarray(0, cutAt));
      await sleep(100);
      req.socket.destroy();
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.deepEqual(registry.seen.filter((s) => s.method === 'GET').map((s) => s.headers.range), [undefined, `bytes=${cutAt}-`]);
    await rig.waitForHit(blob.digest);
    assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest);
  });

  test('a resumed 200 that breaks again before reaching the offset is resumed once more', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(8 * MiB);
    const cutAt = 3 * MiB;
    registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth > 2) return false; // the third one is served properly
      res.writeHead(200, { 'Content-Length': blob.bytes.length });
      // First: cut at 3 MiB. Second: Range ignored, and cut at 1 MiB, while the proxy skips what it has.
      await writeFlushed(res, blob.bytes.subarray(0, seen.nth === 1 ? cutAt : 1 * MiB));
      await sleep(100);
      req.socket.destroy();
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.deepEqual(registry.seen.filter((s) => s.method === 'GET').map((s) => s.headers.range), [undefined, `bytes=${cutAt}-`, `bytes=${cutAt}-`]);
    await rig.waitForHit(blob.digest);
    assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest);
  });

  test('a connection cut right after the response head is tried again from byte 0', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(2 * MiB);
    registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      res.writeHead(200, { 'Content-Length': blob.bytes.length });
      res.flushHeaders();
      await sleep(100);
      req.socket.destroy();
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.deepEqual(registry.seen.filter((s) => s.method === 'GET').map((s) => s.headers.range), [undefined, undefined]);
    await rig.waitForHit(blob.digest);
    assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest);
  });

  test('an upstream that lies (right length, wrong bytes): the client is cut, nothing is cached, no .part is left', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(4 * MiB);
    const lie = { ...blob, bytes: randomBytes(blob.bytes.length) };
    registry.behave = (req, res, seen) => {
      if (seen.blob !== blob) return false;
      serveBlob(req, res, lie);
      return true;
    };

    const got = await rig.blob(blob.digest);
    const seen = () => `client: ${got.status} ${String(got.headers['x-cache'])} ${got.body.length} bytes ${got.error ?? ''}; proxy: ${rig.proxy.lines.slice(-3).join(' ')}`;
    assert.equal(got.status, 200, seen());
    assert.equal(got.headers['content-length'], String(blob.bytes.length));
    assert.equal(got.complete, false, `no clean end: ${seen()}`);
    assert.ok(got.body.length < blob.bytes.length, `${got.body.length} bytes of ${blob.bytes.length}: never all of them`);

    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false, 'no file in blobs/');
    assert.deepEqual(partFiles(rig.dataDir), [], 'no .part file left');
    assert.equal(rig.proxy.lines.filter((line) => line.includes('do not match the digest') && line.includes(blob.digest)).length, 1, seen());

    // Not in the index either: the next request is a MISS that goes upstream again (and is cut again).
    const again = await rig.blob(blob.digest);
    assert.equal(again.headers['x-cache'], 'MISS');
    assert.equal(again.complete, false);
    assert.equal(registry.count({ method: 'GET', digest: blob.digest }), 2);
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
  });

  test('Content-Length: 20 GiB that stops after a few MiB: bounded resumes, client cut, nothing kept, nothing evicted', async () => {
    const { registry } = rig;
    const kept = registry.addBlob(1 * MiB);
    assert.equal((await rig.blob(kept.digest)).complete, true);
    await rig.waitForHit(kept.digest);

    const huge = 20 * 1024 * MiB;
    const digest = sha256(randomBytes(32)); // upstream never sends it whole anyway
    registry.behave = async (req, res, seen) => {
      if (!seen.path.endsWith(digest)) return false;
      const start = Number(/^bytes=(\d+)-$/.exec(req.headers.range ?? '')?.[1] ?? 0);
      if (start === 0) res.writeHead(200, { 'Content-Length': huge });
      else res.writeHead(206, { 'Content-Range': `bytes ${start}-${huge - 1}/${huge}`, 'Content-Length': huge - start });
      await writeFlushed(res, randomBytes(start === 0 ? 3 * MiB : 1 * MiB));
      req.socket.end(); // a clean TLS close, long before the announced end
      return true;
    };

    const started = performance.now();
    const got = await rig.blob(digest);
    const took = performance.now() - started;
    assert.ok(took < 15_000, `gave up after ${Math.round(took)} ms`);
    assert.equal(got.status, 200);
    assert.equal(got.headers['content-length'], String(huge));
    assert.equal(got.complete, false, 'cut, not ended');
    const gets = registry.count({ method: 'GET', path: `/v2/lib/app/blobs/${digest}` });
    assert.ok(gets >= 2 && gets <= 6, `${gets} upstream GETs: resumed, but a bounded number of times`);

    assert.equal(hasBlobFile(rig.dataDir, digest), false);
    assert.deepEqual(partFiles(rig.dataDir), []);
    assert.ok(diskUsage(rig.dataDir) < 256 * MiB, `${diskUsage(rig.dataDir)} bytes in the data directory`);

    // A blob that cannot fit in the cache evicts nothing, and the proxy keeps serving.
    const hit = await rig.blob(kept.digest);
    assert.equal(hit.headers['x-cache'], 'HIT');
    assert.equal(hit.digest, kept.digest);
    const next = registry.addBlob(512 * 1024);
    const fresh = await rig.blob(next.digest);
    assert.equal(fresh.complete, true);
    assert.equal(fresh.digest, next.digest);
  });

  test('a client that leaves after 1 MiB does not stop the fill: the blob is cached from one upstream GET', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(16 * MiB);
    registry.behave = async (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Length': blob.bytes.length });
      if (await sendSlowly(res, blob.bytes, 1 * MiB, 25)) res.end();
      return true;
    };

    const got = await rig.blob(blob.digest, { leaveAfter: 1 * MiB });
    assert.equal(got.complete, false);
    assert.ok(got.body.length < blob.bytes.length);

    await waitFor('the blob file', () => hasBlobFile(rig.dataDir, blob.digest), 15_000);
    assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest);
    await rig.waitForHit(blob.digest);
    const again = await rig.blob(blob.digest);
    assert.equal(again.headers['x-cache'], 'HIT');
    assert.equal(again.digest, blob.digest);
    assert.equal(registry.count({ method: 'GET', digest: blob.digest }), 1, 'exactly one upstream GET');
  });

  test('blobs that arrive in many small pieces, faster than the disk: each is filled from one GET, never resumed', async () => {
    const { registry } = rig;
    // Sizes around the fill's write batches (256 KiB) and its first write (64 KiB): the end of the blob
    // arrives while a write is under way, where counting those bytes twice would end the fill early.
    const blobs = [64 * 1024 + 1, 300 * 1024, MiB + 5, 3 * MiB + 7, 5 * MiB].map((size) => registry.addBlob(size));
    registry.behave = async (_req, res, seen) => {
      if (!seen.blob || seen.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Length': seen.blob.bytes.length });
      for (let at = 0; at < seen.blob.bytes.length; at += 16 * 1024) res.write(seen.blob.bytes.subarray(at, at + 16 * 1024));
      res.end();
      return true;
    };
    for (const blob of blobs) {
      const got = await rig.blob(blob.digest);
      assert.equal(got.status, 200);
      assert.equal(got.complete, true);
      assert.equal(got.digest, blob.digest);
      assert.equal(got.headers['x-cache'], 'MISS');
    }
    for (const blob of blobs) {
      await rig.waitForHit(blob.digest);
      assert.equal(digestOfBlobFile(rig.dataDir, blob.digest), blob.digest);
      assert.equal(registry.count({ method: 'GET', digest: blob.digest }), 1, `one upstream GET for ${blob.bytes.length} bytes`);
    }
    assert.deepEqual(registry.seen.filter((s) => s.headers.range !== undefined).map((s) => `${s.path} ${s.headers.range}`), [], 'no fill was resumed');
  });

  test('8 clients asking for a cold blob at the same moment cause one upstream GET (one MISS, 7 JOINED)', async () => {
    const { registry } = rig;
    for (let round = 0; round < 5; round++) {
      const blob = registry.addBlob(2 * MiB + round);
      registry.behave = async (_req, res, seen) => {
        if (seen.blob !== blob || seen.method !== 'GET') return false;
        res.writeHead(200, { 'Content-Length': blob.bytes.length });
        if (await sendSlowly(res, blob.bytes, 256 * 1024, 10)) res.end(); // long enough for all 8 to join
        return true;
      };
      // Sessions first, then the 8 requests written in one go: they reach the proxy together.
      const sockets = await Promise.all(Array.from({ length: 8 }, () => connectThroughProxy(rig.target)));
      const results = await Promise.all(sockets.map((socket) => httpOverSocket(socket, 'GET', `/v2/lib/app/blobs/${blob.digest}`, rig.registry.hostPort)));
      assert.ok(results.every((r) => r.status === 200 && sha256(r.body) === blob.digest), `round ${round}: every client got the blob`);
      const statuses = results.map((r) => r.headers['x-cache']).sort();
      assert.deepEqual(statuses, ['JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'MISS'], `round ${round}`);
      assert.equal(registry.count({ method: 'GET', digest: blob.digest }), 1, `round ${round}: one upstream GET`);
    }
  });

  test('requests arriving while a fill ends are joined or hit, never fetched again', async () => {
    const { registry } = rig;
    for (let round = 0; round < 10; round++) {
      const blob = registry.addBlob(256 * 1024 + round);
      // A stream of clients, 2 ms apart, across the moment the fill commits.
      const clients = Array.from({ length: 25 }, (_, i) => sleep(i * 2).then(() => rig.blob(blob.digest)));
      const results = await Promise.all(clients);
      for (const [i, got] of results.entries()) {
        assert.equal(got.digest, blob.digest, `round ${round}, client ${i}`);
        assert.equal(got.complete, true, `round ${round}, client ${i}`);
      }
      const statuses = results.map((r) => r.headers['x-cache']);
      assert.equal(registry.count({ method: 'GET', digest: blob.digest }), 1, `round ${round}: one upstream GET (${statuses.join(' ')})`);
      assert.equal(statuses.filter((s) => s === 'MISS').length, 1, `round ${round}: ${statuses.join(' ')}`);
    }
  });
});

