// Fills never die of one bad answer: every failed upstream attempt of a blob fill — a reset before the
// first byte, a header timeout, a 401 from an expired token, a 403 from an expired signed CDN URL, a
// 5xx — is tried again with backoff, within a bounded number of attempts, from the last written byte.
// A client sees a cut only when every attempt failed; the registry's own refusals (404, 401 to bad
// credentials, 403) still reach the client at once. What is asserted is what a user can check: bytes
// and digests received, clean end or cut, X-Cache, what the upstream saw, the files on disk, the log.
import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';
import { hasBlobFile, partFiles } from '../helpers/cache-files.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { sendAndCut, sendError, type FakeBlob, type FakeRegistry } from '../helpers/fake-registry.ts';

/** What the proxy tries per fill: the first request and its retries (MAX_ATTEMPTS in src/upstream/body.ts). */
const ATTEMPTS = 6;

describe('blob fills retry failed upstream attempts', () => {
  let rig: CacheRig;

  before(async () => {
    // A short header timeout, so that a stalled first answer costs a second, not the default minute.
    rig = await startCacheRig({ cache: '{ maxSize: 1GiB, minFree: 0 }', timeouts: '{ headers: 1s, idle: 3s }' });
  });

  beforeEach(() => {
    rig.registry.reset();
    rig.cdn.reset();
  });

  after(async () => {
    await rig?.close();
  });

  const gets = (fake: FakeRegistry, blob: FakeBlob) => fake.seen.filter((s) => s.method === 'GET' && s.blob === blob);
  /** The proxy's log lines about retries of this blob's fill. */
  const retryLines = (blob: FakeBlob) =>
    rig.proxy.lines.map((line) => JSON.parse(line) as Record<string, unknown>).filter((entry) => entry.message === 'a blob fill tries upstream again' && entry.digest === blob.digest);
  const noWorkerFailed = () => assert.ok(!rig.proxy.lines.some((line) => /worker thread failed|fill worker failed/.test(line)), 'no fill worker failed');

  /** The blob is cached: a HIT with the right bytes, without an upstream GET, and no .part file is left. */
  async function assertCached(blob: FakeBlob, headers: Record<string, string> = {}): Promise<void> {
    await rig.waitForHit(blob.digest);
    assert.deepEqual(partFiles(rig.dataDir), [], 'no .part file left');
    const before = rig.registry.count({ method: 'GET' }) + rig.cdn.count({ method: 'GET' });
    const again = await rig.blob(blob.digest, { headers });
    assert.equal(again.headers['x-cache'], 'HIT');
    assert.equal(again.complete, true);
    assert.equal(again.digest, blob.digest);
    assert.equal(rig.registry.count({ method: 'GET' }) + rig.cdn.count({ method: 'GET' }), before, 'no upstream GET for a HIT');
  }

  test('a connection reset before the first byte is tried again: verified bytes, 2 upstream GETs', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(2 * MiB + 3);
    registry.behave = (req, _res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      req.socket.destroy(); // before the response head: the request never got an answer
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.equal(got.headers['x-cache'], 'MISS');
    assert.deepEqual(gets(registry, blob).map((s) => s.headers.range), [undefined, undefined]);
    const retries = retryLines(blob);
    assert.equal(retries.length, 1, 'one retry logged');
    assert.equal(retries[0]!.attempt, 2);
    assert.match(String(retries[0]!.reason), /unreachable|reset|closed|socket/i);
    noWorkerFailed();
    await assertCached(blob);
  });

  test('a header timeout on the first attempt (timeouts.headers: 1s) is tried again', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(1 * MiB + 11);
    registry.behave = async (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      await new Promise((resolve) => res.once('close', resolve)); // no answer until the proxy gives up
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.equal(gets(registry, blob).length, 2);
    const retries = retryLines(blob);
    assert.equal(retries.length, 1);
    assert.match(String(retries[0]!.reason), /timeout/i);
    noWorkerFailed();
    await assertCached(blob);
  });

  test('cut at 3 MiB, the resume answered 401 (token expired), then 503, then 206: a fresh token, verified bytes', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(6 * MiB);
    const cutAt = 3 * MiB;
    const challenge = `Bearer realm="https://${registry.hostPort}/token",service="registry.test",scope="repository:lib/app:pull"`;
    let issued = 0;
    registry.behave = async (req, res, seen) => {
      if (seen.path === '/token') {
        issued++;
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ token: `fresh-token-${issued}`, expires_in: 300 }));
        return true;
      }
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      if (seen.nth === 1) await sendAndCut(req, res, blob, cutAt);
      else if (seen.nth === 2) sendError(res, 401, 'UNAUTHORIZED', { 'WWW-Authenticate': challenge }); // the client's token has expired
      else if (seen.nth === 3) sendError(res, 503, 'UNAVAILABLE');
      else return false; // served: 206 for the Range
      return true;
    };

    const got = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer client-token' } });
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.body.length, blob.bytes.length);
    assert.equal(got.digest, blob.digest);

    const seen = gets(registry, blob);
    assert.deepEqual(seen.map((s) => s.headers.range), [undefined, `bytes=${cutAt}-`, `bytes=${cutAt}-`, `bytes=${cutAt}-`]);
    assert.deepEqual(seen.map((s) => s.headers.authorization), ['Bearer client-token', 'Bearer client-token', 'Bearer fresh-token-1', 'Bearer fresh-token-1']);
    const tokenRequests = registry.seen.filter((s) => s.path === '/token');
    assert.equal(tokenRequests.length, 1, 'one token exchange');
    assert.equal(tokenRequests[0]!.headers.authorization, undefined, 'the proxy asked for its own (anonymous) token');
    assert.match(tokenRequests[0]!.url, /scope=repository%3Alib%2Fapp%3Apull|scope=repository:lib\/app:pull/);

    assert.deepEqual(retryLines(blob).map((entry) => [entry.attempt, entry.offset]), [[2, cutAt], [3, cutAt], [4, cutAt]]);
    assert.ok(!rig.proxy.lines.some((line) => line.includes('client-token') || line.includes('fresh-token')), 'no token in the log');
    noWorkerFailed();
    await assertCached(blob, { Authorization: 'Bearer client-token' });
  });

  test('a signed CDN URL that expired on the resume (403): back to the registry for a fresh redirect; the CDN never sees Authorization', async () => {
    const { registry, cdn } = rig;
    const blob = registry.addBlob(6 * MiB);
    const hex = blob.digest.slice('sha256:'.length);
    const cutAt = 2 * MiB;
    registry.behave = (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      res.writeHead(307, { Location: `https://${cdn.hostPort}/storage/${hex}?sig=SIGNATURE-${seen.nth}&expires=1` });
      res.end();
      return true;
    };
    cdn.behave = async (req, res, seen) => {
      if (seen.path !== `/storage/${hex}`) return false;
      if (seen.nth === 1) await sendAndCut(req, res, blob, cutAt);
      else if (seen.nth === 2) {
        res.writeHead(403, { 'Content-Type': 'application/xml' });
        res.end('<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>');
      } else {
        const start = Number(/^bytes=(\d+)-$/.exec(req.headers.range ?? '')?.[1] ?? 0);
        res.writeHead(206, { 'Content-Range': `bytes ${start}-${blob.bytes.length - 1}/${blob.bytes.length}`, 'Content-Length': blob.bytes.length - start });
        res.end(blob.bytes.subarray(start));
      }
      return true;
    };

    const got = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer client-token' } });
    assert.equal(got.status, 200);
    assert.equal(got.complete, true, `clean end (${got.error ?? ''})`);
    assert.equal(got.digest, blob.digest);
    assert.equal(got.headers['x-cache'], 'MISS');

    // Each attempt starts at the registry (with the client's Authorization), which hands out a new URL.
    assert.deepEqual(gets(registry, blob).map((s) => [s.headers.authorization, s.headers.range]), [
      ['Bearer client-token', undefined],
      ['Bearer client-token', `bytes=${cutAt}-`],
      ['Bearer client-token', `bytes=${cutAt}-`],
    ]);
    assert.deepEqual(cdn.seen.map((s) => [s.url, s.headers.range]), [
      [`/storage/${hex}?sig=SIGNATURE-1&expires=1`, undefined],
      [`/storage/${hex}?sig=SIGNATURE-2&expires=1`, `bytes=${cutAt}-`],
      [`/storage/${hex}?sig=SIGNATURE-3&expires=1`, `bytes=${cutAt}-`],
    ]);
    assert.ok(cdn.seen.every((s) => s.headers.authorization === undefined), 'the CDN never sees the Authorization');
    assert.match(String(retryLines(blob)[1]?.reason), /403/);
    assert.ok(!rig.proxy.lines.some((line) => line.includes('SIGNATURE') || line.includes('client-token')), 'neither signed URLs nor tokens are logged');
    noWorkerFailed();
    await assertCached(blob, { Authorization: 'Bearer client-token' });
  });

  test('a 503 on the very first request, then 200: the client gets the blob, not the 503', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(512 * 1024);
    registry.behave = (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET' || seen.nth !== 1) return false;
      sendError(res, 503, 'UNAVAILABLE');
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 200);
    assert.equal(got.complete, true);
    assert.equal(got.digest, blob.digest);
    assert.equal(gets(registry, blob).length, 2);
    noWorkerFailed();
    await assertCached(blob);
  });

  test('every attempt after a cut fails (503): the client is cut, nothing is cached, the next request fills again', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(4 * MiB);
    const cutAt = 1 * MiB;
    registry.behave = async (req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      if (seen.nth === 1) await sendAndCut(req, res, blob, cutAt);
      else sendError(res, 503, 'UNAVAILABLE');
      return true;
    };

    const started = performance.now();
    const got = await rig.blob(blob.digest);
    const took = performance.now() - started;
    assert.equal(got.status, 200);
    assert.equal(got.complete, false, 'cut, not ended');
    assert.ok(got.body.length <= cutAt, `${got.body.length} bytes: never more than upstream sent`);
    assert.deepEqual(
      gets(registry, blob).map((s) => s.headers.range),
      [undefined, ...Array.from({ length: ATTEMPTS - 1 }, () => `bytes=${cutAt}-`)],
      'every attempt was made, and no more',
    );
    assert.ok(took > 500, `${Math.round(took)} ms: the attempts were spaced out (backoff), not a hot loop`);
    assert.deepEqual(retryLines(blob).map((entry) => entry.attempt), [2, 3, 4, 5, 6]);
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false, 'nothing cached');
    assert.deepEqual(partFiles(rig.dataDir), [], 'no .part file left');
    assert.ok(rig.proxy.lines.some((line) => line.includes('a blob fill failed') && line.includes(blob.digest)));
    noWorkerFailed();

    // The process is up, and the blob is not remembered as failed: the next request fills it.
    registry.behave = undefined;
    const again = await rig.blob(blob.digest);
    assert.equal(again.headers['x-cache'], 'MISS');
    assert.equal(again.complete, true);
    assert.equal(again.digest, blob.digest);
    await assertCached(blob);
  });

  test('503 on every attempt before any byte: the client gets the registry 503 after the last attempt', async () => {
    const { registry } = rig;
    const blob = registry.addBlob(64 * 1024);
    registry.behave = (_req, res, seen) => {
      if (seen.blob !== blob || seen.method !== 'GET') return false;
      sendError(res, 503, 'UNAVAILABLE', { 'Retry-After': '0' });
      return true;
    };

    const got = await rig.blob(blob.digest);
    assert.equal(got.status, 503);
    assert.equal(got.complete, true);
    assert.match(got.body.toString(), /UNAVAILABLE/);
    assert.equal(gets(registry, blob).length, ATTEMPTS);
    assert.deepEqual(partFiles(rig.dataDir), []);
    noWorkerFailed();
  });

  test("the registry's own refusals on the first request (404, 401 to bad credentials, 403) reach the client at once", async () => {
    const { registry } = rig;
    const blob = registry.addBlob(64 * 1024);
    const denied = registry.addBlob(64 * 1024);
    const challenge = `Bearer realm="https://${registry.hostPort}/token",service="registry.test",scope="repository:lib/app:pull"`;
    const unknown = 'sha256:' + '0'.repeat(64);
    registry.behave = (req, res, seen) => {
      if (seen.path === '/token') {
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ token: 'never-used', expires_in: 300 }));
        return true;
      }
      if (seen.blob === blob && req.headers.authorization === 'Bearer wrong') {
        sendError(res, 401, 'UNAUTHORIZED', { 'WWW-Authenticate': challenge });
        return true;
      }
      if (seen.blob === denied) {
        sendError(res, 403, 'DENIED');
        return true;
      }
      return false;
    };

    const missing = await rig.blob(unknown);
    assert.equal(missing.status, 404);
    assert.match(missing.body.toString(), /BLOB_UNKNOWN/);
    assert.equal(registry.count({ method: 'GET', path: `/v2/lib/app/blobs/${unknown}` }), 1, 'one GET for a 404');

    const tokensBefore = registry.count({ path: '/token' });
    const refused = await rig.blob(blob.digest, { headers: { Authorization: 'Bearer wrong' } });
    assert.equal(refused.status, 401);
    assert.equal(refused.headers['www-authenticate'], challenge, 'the challenge, so the client can log in');
    assert.equal(gets(registry, blob).length, 1, 'one GET for a 401 to the client');
    assert.equal(registry.count({ path: '/token' }), tokensBefore, "the client's own credentials are not replaced by the proxy's");

    const forbidden = await rig.blob(denied.digest);
    assert.equal(forbidden.status, 403);
    assert.equal(gets(registry, denied).length, 1, 'one GET for a 403 from the registry');

    assert.deepEqual(partFiles(rig.dataDir), []);
    assert.equal(hasBlobFile(rig.dataDir, blob.digest), false);
    noWorkerFailed();
  });
});
