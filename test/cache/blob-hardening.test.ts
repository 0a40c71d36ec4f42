// The blob path's guarantees where timing is against it: one upstream GET when a client's wait for its
// token spans the commit of a fill; no clean end for bytes that are not verified (a bounded Range while
// the blob fills, a client that finds the fill's .part gone before its outcome, a download served
// straight from upstream); a joiner's answer depends on its own credentials, not the first client's;
// the fills in flight count against cache.maxSize.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, beforeEach, describe, test } from 'node:test';
import { hasBlobFile, partFiles, waitFor } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { sendError, serveBlob, writeFlushed, type FakeBlob, type FakeRegistry } from '../helpers/fake-registry.ts';

/** A promise and the function that settles it. */
function gate(): { opened: Promise<void>; open: () => void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { opened, open };
}

/** The same length as the blob, other bytes: an origin that lies about a digest. */
function lieAbout(blob: FakeBlob): FakeBlob {
  return { ...blob, bytes: randomBytes(blob.bytes.length) };
}

/**
 * The first GET of `blob` answered with `bytes` (its own, or a lie of the same length): 2 MiB at once,
 * the rest once `upstream.open()` is called. Later GETs of it get `later` at once, when given.
 */
function sendHalfThenHold(registry: FakeRegistry, blob: FakeBlob, bytes: Buffer, later?: FakeBlob): { upstream: ReturnType<typeof gate>; sentFirstPart: () => boolean } {
  const upstream = gate();
  let sent = false;
  registry.behave = async (req, res, seen) => {
    if (seen.blob !== blob || seen.method !== 'GET') return false;
    if (later && seen.nth > 1) {
      serveBlob(req, res, later);
      return true;
    }
    res.writeHead(200, { 'Content-Length': blob.bytes.length });
    await writeFlushed(res, bytes.subarray(0, 2 * MiB));
    sent = true;
    await upstream.opened;
    res.end(bytes.subarray(2 * MiB));
    return true;
  };
  return { upstream, sentFirstPart: () => sent };
}

describe('blob path hardening', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig({ cache: '{ maxSize: 1GiB, minFree: 0 }' });
  });

  beforeEach(() => {
    rig.registry.reset();
  });

  after(async () => {
    await rig?.close();
  });

  const gets = (blob: FakeBlob) => rig.registry.count({ method: 'GET', digest: blob.digest });

  test('a fill that starts and commits while a client waits for its token: that client finds it cached, one upstream GET', async () => {
    const { registry } = rig;
    const warm = registry.addBlob(64 * 1024);
    const blob = registry.addBlob(1 * MiB);
    const challenge = `Bearer realm="https://${registry.hostPort}/token",service="registry.test"`;
    let tokenDelayMs = 0;
    let onTokenRequest: (() => void) | undefined;
    let issued = 0;
    registry.behave = async (req, res, seen) => {
      if (seen.path === '/token') {
        issued++;
        const hook = onTokenRequest;
        onTokenRequest = undefined;
        hook?.();
        await sleep(tokenDelayMs);
        res.writeHead(200, { 'Content-Type': 'application/json' });
        // Valid for 0.9 s (the proxy keeps a token until a tenth of its life before expiry).
        res.end(JSON.stringify({ token: `token-${issued}`, expires_in: 1 }));
        return true;
      }
      if (!req.headers.authorization?.startsWith('Bearer token-')) {
        sendError(res, 401, 'UNAUTHORIZED', { 'WWW-Authenticate': challenge });
        return true;
      }
      return false; // served
    };

    // The proxy learns the registry's challenge; then its token expires.
    assert.equal((await rig.blob(warm.digest)).digest, warm.digest);
    await sleep(1000);
    tokenDelayMs = 500;
    // A client without credentials looks the blob up (neither cached nor being fetched) and waits for
    // the proxy's new token. Meanwhile a client with a token of its own fetches the blob, and the fill
    // commits.
    let withOwnToken: ReturnType<CacheRig['blob']> | undefined;
    onTokenRequest = () => {
      withOwnToken = rig.blob(blob.digest, { headers: { Authorization: 'Bearer token-of-its-own' } });
    };
    const waited = await rig.blob(blob.digest);
    const own = await withOwnToken!;
    assert.equal(own.headers['x-cache'], 'MISS');
    assert.equal(own.digest, blob.digest);
    assert.equal(waited.complete, true);
    assert.equal(waited.digest, blob.digest);
    assert.equal(waited.headers['x-cache'], 'HIT', 'cached by the time its token came');
    assert.equal(gets(blob), 1, 'exactly one upstream GET');
  });

  test('a bounded Range while the blob fills from a lying origin: the range is cut, never ended cleanly', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(4 * MiB);
    const lie = lieAbout(blob);
    const { upstream, sentFirstPart } = sendHalfThenHold(registry, blob, lie.bytes);
    const first = rig.blob(blob.digest);
    try {
      await waitFor('the first 2 MiB upstream', sentFirstPart);
      let received = 0;
      const ranged = rig.blob(blob.digest, { headers: { Range: 'bytes=1000-1048575' }, onData: (bytes) => void (received = bytes) });
      await waitFor('the bytes of the range', () => received >= 1048576 - 1000 - 1);
      await sleep(200);
      assert.equal(received, 1048576 - 1000 - 1, 'all but the last byte, until the digest is known');
      upstream.open();
      const got = await ranged;
      assert.equal(got.status, 206);
      assert.equal(got.headers['x-cache'], 'JOINED');
      assert.equal(got.complete, false, 'no clean end: the bytes turned out wrong');
      assert.ok(got.body.length < 1048576 - 1000);
    } finally {
      upstream.open();
    }
    // The first client may get a clean error (an answer that is not the blob), never a clean 200.
    const firstGot = await first;
    assert.ok(!(firstGot.complete && firstGot.status === 200), `first client: a clean ${firstGot.status} (${String(firstGot.headers['x-cache'])}, ${firstGot.body.length} bytes)`);
    assert.notEqual(firstGot.digest, lie.digest, 'not the wrong blob whole');
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
  });

  test('a bounded Range while the blob fills from an honest origin: its bytes come at once, its end once the blob verified', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(4 * MiB);
    const { upstream, sentFirstPart } = sendHalfThenHold(registry, blob, blob.bytes);
    const first = rig.blob(blob.digest);
    try {
      await waitFor('the first 2 MiB upstream', sentFirstPart);
      let received = 0;
      let ended = false;
      const ranged = rig.blob(blob.digest, { headers: { Range: 'bytes=1000-1048575' }, onData: (bytes) => void (received = bytes) }).finally(() => (ended = true));
      await waitFor('the bytes of the range, before the fill ends', () => received >= 1048576 - 1000 - 1);
      await sleep(200);
      assert.equal(received, 1048576 - 1000 - 1, 'all but the last byte');
      assert.equal(ended, false, 'the last byte waits for the digest');
      upstream.open();
      const got = await ranged;
      assert.equal(got.status, 206);
      assert.equal(got.headers['content-range'], `bytes 1000-1048575/${blob.bytes.length}`);
      assert.equal(got.complete, true);
      assert.ok(got.body.equals(blob.bytes.subarray(1000, 1048576)));
    } finally {
      upstream.open();
    }
    const whole = await first;
    assert.equal(whole.complete, true);
    assert.equal(whole.digest, blob.digest);
    assert.equal(gets(blob), 1);
  });

  test("a client that finds the fill's .part gone before the fill's outcome never gets a clean wrong blob", async () => {
    const { registry } = rig;
    const blob = registry.addBlob(4 * MiB);
    const lie = lieAbout(blob);
    // Any other request gets the lie at once.
    const { upstream, sentFirstPart } = sendHalfThenHold(registry, blob, lie.bytes, lie);
    const first = rig.blob(blob.digest);
    try {
      await waitFor('the first 2 MiB upstream', sentFirstPart);
      // What a client meets between the fill's task removing its .part (the digest did not match) and
      // the outcome reaching the primary: no .part, no blob file, no outcome yet.
      const tmp = path.join(rig.dataDir, 'tmp');
      for (const name of readdirSync(tmp)) rmSync(path.join(tmp, name), { force: true });
      const late = rig.blob(blob.digest);
      await sleep(300);
      upstream.open();
      const got = await late;
      assert.ok(!(got.complete && got.status === 200), `a clean ${got.status} (${String(got.headers['x-cache'])}, ${got.body.length} bytes): never for unverified bytes`);
      assert.notEqual(got.digest, lie.digest, 'not the wrong blob whole');
    } finally {
      upstream.open();
    }
    // The first client may get a clean error (an answer that is not the blob), never a clean 200.
    const firstGot = await first;
    assert.ok(!(firstGot.complete && firstGot.status === 200), `first client: a clean ${firstGot.status} (${String(firstGot.headers['x-cache'])}, ${firstGot.body.length} bytes)`);
    assert.notEqual(firstGot.digest, lie.digest, 'not the wrong blob whole');
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
  });

  test("a joiner with good credentials on a fill whose first client's credentials were refused gets the blob", async () => {
    const { registry } = rig;
    const blob = registry.addBlob(1 * MiB);
    const challenge = `Bearer realm="https://${registry.hostPort}/token",service="registry.test"`;
    registry.behave = async (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      if (seen.headers.authorization !== 'Bearer good') {
        await sleep(400); // the joiner arrives meanwhile
        sendError(res, 401, 'UNAUTHORIZED', { 'WWW-Authenticate': challenge });
        return true;
      }
      return false; // served
    };
    const refused = rig.blob(blob.digest, { headers: { Authorization: 'Bearer bad' } });
    await waitFor('the first GET upstream', () => gets(blob) === 1);
    const joiner = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer good' } });
    assert.equal(joiner.status, 200, `the joiner: ${joiner.status} ${joiner.body.toString().slice(0, 200)}`);
    assert.equal(joiner.complete, true);
    assert.equal(joiner.digest, blob.digest);
    const first = await refused;
    assert.equal(first.status, 401, 'the first client gets its own refusal');
    assert.equal(first.headers['www-authenticate'], challenge);
  });

  test('clients with the same credentials share a refusal: one upstream GET', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(1 * MiB);
    registry.behave = async (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      await sleep(300);
      sendError(res, 403, 'DENIED');
      return true;
    };
    const results = await Promise.all([0, 50, 100].map((ms) => sleep(ms).then(() => rig.blob(blob.digest, { headers: { Authorization: 'Bearer same' } }))));
    assert.deepEqual(results.map((r) => r.status), [403, 403, 403]);
    assert.equal(gets(blob), 1);
  });
});

describe('a blob served straight from upstream (no room in the cache)', () => {
  let rig: CacheRig;

  before(async () => {
    // More free disk asked for than any disk has: every download is a BYPASS.
    rig = await startCacheRig({ cache: '{ maxSize: 1GiB, minFree: 1024TiB }' });
  });

  beforeEach(() => {
    rig.registry.reset();
  });

  after(async () => {
    await rig?.close();
  });

  test('bytes that do not match the digest: the client is cut, never ended cleanly', async () => {
    const blob = rig.registry.addBlob(3 * MiB);
    const lie = lieAbout(blob);
    rig.registry.behave = (req, res, seen) => {
      if (seen.blob !== blob) return false;
      serveBlob(req, res, lie);
      return true;
    };
    const got = await rig.blob(blob.digest);
    assert.equal(got.headers['x-cache'], 'BYPASS');
    assert.equal(got.complete, false, 'cut');
    assert.ok(got.body.length < blob.bytes.length);
    const ranged = await rig.blob(blob.digest, { headers: { Range: 'bytes=0-99' } });
    assert.equal(ranged.complete, false, 'a range of a blob that does not verify is cut too');
  });

  test('the right bytes: 200 verified, and a Range answered 206 from the verified blob', async () => {
    const blob = rig.registry.addBlob(3 * MiB + 17);
    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.headers['x-cache'], 'BYPASS');
    assert.equal(got.complete, true);
    assert.equal(got.digest, blob.digest);
    assert.equal(got.headers['docker-content-digest'], blob.digest);
    const ranged = await rig.blob(blob.digest, { headers: { Range: 'bytes=1000-1999' } });
    assert.equal(ranged.status, 206);
    assert.equal(ranged.headers['content-range'], `bytes 1000-1999/${blob.bytes.length}`);
    assert.equal(ranged.complete, true);
    assert.ok(ranged.body.equals(blob.bytes.subarray(1000, 2000)));
    assert.deepEqual(partFiles(rig.dataDir), []);
  });

  test("upstream's refusal passes through as it came", async () => {
    const blob = rig.registry.addBlob(1024);
    rig.registry.behave = (_req, res, seen) => {
      if (seen.blob !== blob) return false;
      sendError(res, 403, 'DENIED');
      return true;
    };
    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 403);
    assert.match(got.body.toString(), /DENIED/);
  });
});

describe('fills in flight count against cache.maxSize', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig({ cache: '{ maxSize: 48MiB, minFree: 0 }' });
  });

  after(async () => {
    await rig?.close();
  });

  test('two 20 MiB fills under way beside a cached 20 MiB blob: it is evicted before they commit', async () => {
    const { registry } = rig;
    const a = registry.addBlob(20 * MiB);
    assert.equal((await rig.blob(a.digest)).digest, a.digest);
    await rig.waitForHit(a.digest);

    const [b, c] = [registry.addBlob(20 * MiB), registry.addBlob(20 * MiB)];
    const upstream = gate();
    const started = new Set<string>();
    registry.behave = async (_req, res, seen) => {
      if ((seen.blob !== b && seen.blob !== c) || seen.method !== 'GET') return false;
      res.writeHead(200, { 'Content-Length': seen.blob.bytes.length });
      await writeFlushed(res, seen.blob.bytes.subarray(0, MiB));
      started.add(seen.blob.digest);
      await upstream.opened;
      res.end(seen.blob.bytes.subarray(MiB));
      return true;
    };
    const fills = [rig.blob(b.digest), rig.blob(c.digest)];
    try {
      await waitFor('both fills under way', () => started.size === 2);
      await waitFor("A's file to be evicted while both fills are under way", () => !hasBlobFile(rig.dataDir, a.digest), 3000);
    } finally {
      upstream.open();
    }
    for (const [i, got] of (await Promise.all(fills)).entries()) {
      assert.equal(got.complete, true, `fill ${i}`);
      assert.equal(got.digest, [b, c][i]!.digest);
    }
    await rig.waitForHit(b.digest);
    await rig.waitForHit(c.digest);
    assert.equal((await rig.blob(a.digest, { method: 'HEAD' })).headers['x-cache'], 'MISS', 'A left the index too');
  });
});
