// Crash safety: `kill -9` of the proxy in the middle of 3 fills. The proxy runs as a child process
// (`pullthrough start`, as users run it); the fake upstream in this process sends the blobs slowly.
// After a restart on the same data directory nothing partial or unverified is left or served, and the
// blobs are fetched again whole.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fetchThroughProxy, type Fetched } from '../helpers/blob-client.ts';
import { blobFile, blobFiles, partFiles, waitFor } from '../helpers/cache-files.ts';
import { MiB } from '../helpers/cache-rig.ts';
import { startFakeRegistry, writeCaFile, writeFlushed, type FakeBlob, type FakeRegistry } from '../helpers/fake-registry.ts';
import { createTestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir, stopChild } from '../helpers/process.ts';
import { startChildProxy, type ChildProxy } from '../helpers/child-proxy.ts';



describe('kill -9 in the middle of 3 fills', () => {
  let work: string;
  let registry: FakeRegistry;
  let configFile: string;
  let dataDir: string;
  let proxy: ChildProxy | undefined;
  const blobs: FakeBlob[] = [];
  /** While true, upstream sends 1 MiB of each blob and then nothing more. */
  let slow = true;

  before(async () => {
    work = makeTempDir('crash');
    const ca = createTestCa('pullthrough crash test CA');
    registry = await startFakeRegistry('registry.test', ca);
    for (let i = 0; i < 3; i++) blobs.push(registry.addBlob(8 * MiB));
    registry.behave = async (_req, res, seen) => {
      if (!slow || !seen.blob || seen.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Length': seen.blob.bytes.length });
      await writeFlushed(res, seen.blob.bytes.subarray(0, 1 * MiB));
      await new Promise((resolve) => res.once('close', resolve)); // the rest never comes
      return true;
    };
    dataDir = path.join(work, 'data');
    configFile = path.join(work, 'proxy.yaml');
    writeFileSync(
      configFile,
      `listen: 127.0.0.1:0
dataDir: ${dataDir}
registries:
  ${registry.hostPort}:
    tls: { ca: ${writeCaFile(work, ca)} }
hosts:
  registry.test: 127.0.0.1
`,
    );
  });

  after(async () => {
    if (proxy) await stopChild(proxy.child);
    await registry?.close();
    if (work) removeTempDir(work);
  });

  test('after a restart: no .part left, nothing unverified served, the 3 blobs fetched again whole', async () => {
    proxy = await startChildProxy(configFile);
    const caPem = readFileSync(path.join(dataDir, 'ca.crt'), 'utf8');
    const get = (blob: FakeBlob, port: number, onData?: (bytes: number) => void) =>
      fetchThroughProxy({ proxyPort: port, caPem, host: registry.host, port: registry.port }, `/v2/lib/app/blobs/${blob.digest}`, onData ? { onData } : {});

    const received = blobs.map(() => 0);
    const cut: Array<Promise<Fetched>> = blobs.map((blob, i) => get(blob, proxy!.port, (bytes) => void (received[i] = bytes)));
    await waitFor('3 .part files with 1 MiB each, and bytes at each client', () => {
      const parts = partFiles(dataDir);
      return parts.length === 3 && parts.every((part) => part.size >= 1 * MiB) && received.every((bytes) => bytes > 0);
    });
    // What a crash between a rename and its index entry, or a stray copy, could leave in blobs/: a file
    // the index does not vouch for (here a truncated one).
    const stray = blobFile(dataDir, blobs[0]!.digest);
    mkdirSync(path.dirname(stray), { recursive: true });
    writeFileSync(stray, blobs[0]!.bytes.subarray(0, 1 * MiB));

    proxy.child.kill('SIGKILL');
    await new Promise((resolve) => proxy!.child.once('exit', resolve));
    for (const [i, got] of (await Promise.all(cut)).entries()) {
      assert.equal(got.status, 200, `client ${i}`);
      assert.equal(got.complete, false, `client ${i} was cut, not ended`);
      assert.ok(got.body.length < 8 * MiB, `client ${i}`);
    }
    assert.equal(partFiles(dataDir).length, 3, 'the crash left the .part files');

    slow = false;
    registry.clearSeen();
    proxy = await startChildProxy(configFile);
    assert.deepEqual(partFiles(dataDir), [], 'leftover .part files removed at start');
    assert.deepEqual(blobFiles(dataDir), [], 'nothing in blobs/ that the index does not vouch for');

    for (const blob of blobs) {
      const got = await get(blob, proxy.port);
      assert.equal(got.status, 200);
      assert.equal(got.headers['x-cache'], 'MISS', 'fetched again');
      assert.equal(got.complete, true);
      assert.equal(got.digest, blob.digest);
    }
    assert.deepEqual(
      registry.seen.map((s) => [s.method, s.blob?.digest, s.headers.range]),
      blobs.map((blob) => ['GET', blob.digest, undefined]),
      'one whole GET per blob',
    );
    await stopChild(proxy.child);
    proxy = undefined;
  });
});
