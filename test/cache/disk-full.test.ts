// A full disk never breaks the client's stream: with the data directory on a 16 MiB tmpfs, a 40 MiB
// blob is served whole from upstream without caching, the failure is logged, and the proxy goes on.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { blobFiles, hasBlobFile, partFiles, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { serveBlob } from '../helpers/fake-registry.ts';

const isRoot = process.getuid?.() === 0;

describe('a full disk', { skip: !isRoot && 'mounting a small tmpfs as the data directory needs root' }, () => {
  let mountPoint: string;
  let mounted = false;
  let rig: CacheRig;

  before(async () => {
    mountPoint = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-full-disk-'));
    const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', mountPoint], { encoding: 'utf8' });
    assert.equal(mount.status, 0, `mount -t tmpfs: ${mount.stderr}`);
    mounted = true;
    rig = await startCacheRig({ cache: '{ minFree: 0, maxSize: 1GiB }', dataDir: mountPoint });
  });

  after(async () => {
    await rig?.close();
    if (mounted) spawnSync('umount', [mountPoint]);
    rmSync(mountPoint, { recursive: true, force: true });
  });

  test('a 40 MiB blob on a 16 MiB disk: the client gets all of it from upstream, nothing partial stays', async () => {
    const blob = rig.registry.addBlob(40 * MiB);
    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.body.length, blob.bytes.length);
    assert.equal(got.digest, blob.digest);
    // The response started from the cache file (MISS); the rest came straight from upstream.
    assert.equal(got.headers['x-cache'], 'MISS');
    // The access line is written once the handler has finished, a moment after the client's last byte.
    const lines = () => rig.proxy.access.filter((e) => e.type === 'blob' && e.path.endsWith(blob.digest));
    await waitFor('the access log line', () => lines().length > 0);
    assert.deepEqual(lines().map((e) => [e.status, e.cache, e.bytes]), [[200, 'BYPASS', blob.bytes.length]]);

    const warnings = rig.proxy.lines.filter((line) => line.includes('the cache cannot write'));
    assert.equal(warnings.length, 1, warnings.join('\n'));
    assert.match(warnings[0]!, /ENOSPC/);
    assert.match(warnings[0]!, new RegExp(blob.digest));

    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
    assert.deepEqual(partFiles(rig.dataDir), [], 'the partial file is gone, and its space with it');
    // The upstream saw the fill's GET and then one Range request that continued where the disk stopped.
    const gets = rig.registry.seen.filter((s) => s.method === 'GET' && s.blob === blob);
    assert.equal(gets.length, 2);
    assert.match(String(gets[1]!.headers.range), new RegExp(`^bytes=[1-9]\\d*-(${blob.bytes.length - 1})?$`));
  });

  test('a client that leaves while served from upstream is let go, and the upstream request with it', async () => {
    const blob = rig.registry.addBlob(40 * MiB);
    const upstreamClosed: boolean[] = [];
    rig.registry.behave = (req, res, seen) => {
      if (seen.blob !== blob) return false;
      const index = upstreamClosed.push(false) - 1;
      res.once('close', () => (upstreamClosed[index] = true));
      serveBlob(req, res, blob);
      return true;
    };
    const got = await rig.blob(blob.digest, { leaveAfter: 24 * MiB }); // past the 16 MiB the disk holds
    assert.equal(got.complete, false);
    await waitFor('the access-log line of the client that left', () => rig.proxy.access.some((e) => e.path.endsWith(blob.digest)), 5_000);
    const line = rig.proxy.access.find((e) => e.path.endsWith(blob.digest))!;
    assert.equal(line.cache, 'BYPASS');
    assert.equal(line.error, 'the client left');
    await waitFor('upstream responses to close', () => upstreamClosed.length === 2 && upstreamClosed.every(Boolean), 5_000);
    assert.deepEqual(partFiles(rig.dataDir), []);
  });

  test('the proxy goes on serving, and caching what fits', async () => {
    const small = rig.registry.addBlob(2 * MiB);
    const miss = await rig.blob(small.digest);
    assert.equal(miss.complete, true);
    assert.equal(miss.digest, small.digest);
    await rig.waitForHit(small.digest);
    const hit = await rig.blob(small.digest);
    assert.equal(hit.headers['x-cache'], 'HIT');
    assert.equal(hit.digest, small.digest);
    assert.equal(blobFiles(rig.dataDir).length, 1);
  });
});
