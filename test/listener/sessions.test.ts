// Intercepted sessions under abuse: a client that makes up TLS server names, and clients that dribble
// their heads (the CONNECT's, the TLS handshake, a request's) to hold a session open.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import type { Database } from 'lmdb';
import { openIndex } from '../../src/cache/index.ts';
import { MAX_REGISTRY_LABELS, createMetrics, type LiveState } from '../../src/metrics.ts';
import type { AccessEntry } from '../../src/log.ts';
import { CertificateAuthority } from '../../src/ca.ts';
import { MAX_RATE_LIMITED_REGISTRIES, RateLimits } from '../../src/upstream/rate-limits.ts';
import { MAX_CACHED_TOKENS, MAX_EXCHANGES_IN_FLIGHT, TokenExchange } from '../../src/upstream/token-exchange.ts';
import { MiB, startCacheRig, type CacheRig } from '../helpers/cache-rig.ts';
import { httpOverSocket, sendConnect } from '../helpers/connect.ts';
import { scrape } from '../helpers/prometheus.ts';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Dispatcher } from 'undici';

/** CONNECT to the registry, then a TLS handshake with this server name; resolves with the session or rejects. */
async function handshake(rig: CacheRig, servername: string | undefined, options: tls.ConnectionOptions = {}): Promise<tls.TLSSocket> {
  const reply = await sendConnect(rig.proxy.port, `${rig.registry.host}:${rig.registry.port}`);
  assert.equal(reply.status, 200, reply.head);
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: reply.socket, ...(servername !== undefined ? { servername } : {}), ca: rig.proxy.caPem, checkServerIdentity: () => undefined, ...options }, () => resolve(secure));
    secure.once('error', reject);
  });
}

/** Resolves with how long after `since` the socket closed; rejects if it is still open after `limitMs`. */
function closedWithin(socket: net.Socket, since: number, limitMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    if (socket.destroyed) return resolve(performance.now() - since);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`still open ${limitMs} ms later`));
    }, limitMs);
    socket.on('error', () => {});
    socket.resume(); // reads what the proxy answers, and so sees its end
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(performance.now() - since);
    });
  });
}

describe('TLS server names on intercepted sessions', () => {
  let rig: CacheRig;
  /** Ours, so that the index can be read once the proxy has stopped. */
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-sessions-data-'));
  let closed = false;

  before(async () => {
    rig = await startCacheRig({ dataDir });
  });

  after(async () => {
    if (!closed) await rig?.close();
    rmSync(dataDir, { recursive: true, force: true });
  });

  test("the CONNECT target's name is served, in any case and with a trailing dot", async () => {
    for (const name of [rig.registry.host, rig.registry.host.toUpperCase(), `${rig.registry.host}.`]) {
      const socket = await handshake(rig, name);
      assert.ok(socket.getPeerX509Certificate()!.checkHost(rig.registry.host), name);
      const response = await httpOverSocket(socket, 'GET', '/v2/', rig.registry.hostPort);
      assert.ok(response.status > 0);
    }
  });

  test('the leaf is ECDSA for clients that offer it (Go\'s order of preference too), RSA for the others', async () => {
    const leaf = async (options: tls.ConnectionOptions) => {
      const socket = await handshake(rig, rig.registry.host, options);
      const certificate = socket.getPeerX509Certificate()!;
      assert.ok(certificate.checkHost(rig.registry.host));
      const response = await httpOverSocket(socket, 'GET', '/v2/', rig.registry.hostPort);
      assert.ok(response.status > 0, 'the session serves requests');
      return `${certificate.publicKey.asymmetricKeyType} ${socket.getCipher().name}`;
    };
    assert.equal(await leaf({}), 'ec TLS_AES_128_GCM_SHA256');
    // Go's crypto/tls (skopeo, podman, containerd, docker) lists RSA-PSS before ECDSA.
    assert.equal(await leaf({ sigalgs: 'rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256:ed25519:rsa_pss_rsae_sha384:rsa_pkcs1_sha256', ciphers: 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384' }), 'ec TLS_AES_128_GCM_SHA256');
    assert.equal(await leaf({ sigalgs: 'rsa_pss_rsae_sha256:rsa_pkcs1_sha256' }), 'rsa TLS_AES_128_GCM_SHA256');
    // OpenSSL's client through the proxy (s_client -proxy sends the CONNECT).
    const caFile = path.join(dataDir, 'sessions-test-ca.crt');
    writeFileSync(caFile, rig.proxy.caPem);
    for (const [sigalgs, type] of [['ECDSA+SHA256', 'ECDSA'], ['RSA-PSS+SHA256', 'RSA-PSS']] as const) {
      const out = await new Promise<string>((resolve, reject) => {
        const client = execFile(
          'openssl',
          ['s_client', '-proxy', `127.0.0.1:${rig.proxy.port}`, '-connect', rig.registry.hostPort, '-servername', rig.registry.host, '-sigalgs', sigalgs, '-verify_return_error', '-CAfile', caFile],
          { timeout: 10_000 },
          (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout + stderr)),
        );
        client.stdin?.end();
      });
      assert.match(out, new RegExp(`Peer signature type: ${type}\\b`), sigalgs);
      assert.match(out, /Verify return code: 0 \(ok\)/, sigalgs);
    }
  });

  test('another name fails the handshake: no leaf, no context, no metric label, nothing stored', async () => {
    const before = rig.proxy.proxy.ca.leafExpiries().map((l) => l.host);
    assert.deepEqual(before, [rig.registry.host]);
    const names = Array.from({ length: 200 }, () => `${randomBytes(6).toString('hex')}.example.test`);
    for (const name of names) {
      await assert.rejects(handshake(rig, name), (err: NodeJS.ErrnoException) => err.code === 'ECONNRESET' || /disconnected|alert|handshake/i.test(err.message), name);
    }
    assert.deepEqual(rig.proxy.proxy.ca.leafExpiries().map((l) => l.host), [rig.registry.host], 'no context for any of them');
    const metrics = await scrape(rig.proxy.url);
    assert.deepEqual(metrics.select('pullthrough_leaf_expiry_timestamp_seconds').map((s) => s.labels.host), [rig.registry.host]);
    assert.ok(rig.proxy.lines.some((line) => line.includes('another name (TLS SNI)') && line.includes(names[0]!)), 'the operator is told why');
    // The proxy still serves its own name.
    const socket = await handshake(rig, rig.registry.host);
    socket.destroy();
  });

  test('the leaf store in the index holds the intercepted name only', async () => {
    await rig.close();
    closed = true;
    const index = openIndex(dataDir);
    try {
      const leaves: Database<string, string> = index.root.openDB({ name: 'leaf-certificates', encoding: 'string' });
      // "<CA fingerprint>/<host>" (RSA) and "<CA fingerprint>/ecdsa/<host>".
      const names = [...leaves.getKeys()].map((key) => String(key).slice(String(key).indexOf('/') + 1)).sort();
      assert.deepEqual(names, [`ecdsa/${rig.registry.host}`, rig.registry.host]);
    } finally {
      await index.close();
    }
  });
});

describe('heads that never end', () => {
  let rig: CacheRig;

  before(async () => {
    rig = await startCacheRig({ timeouts: '{ headers: 3s, idle: 3s, clientHeader: 1s }' });
  });

  after(async () => {
    await rig?.close();
  });

  test('half a request line, then nothing: the intercepted session is closed after clientHeader (1s)', async () => {
    const socket = await handshake(rig, rig.registry.host);
    const answer: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => answer.push(chunk));
    const sent = performance.now();
    socket.write('GET /v2/ HT');
    const closedAfter = await closedWithin(socket, sent, 6000);
    assert.ok(closedAfter >= 900 && closedAfter < 3500, `closed after ${Math.round(closedAfter)} ms`);
    assert.match(Buffer.concat(answer).toString('latin1'), /^(HTTP\/1\.1 408 |$)/);
  });

  test('a head sent a byte at a time is closed after clientHeader too, however steady', async () => {
    const socket = await handshake(rig, rig.registry.host);
    const head = `GET /v2/ HTTP/1.1\r\nHost: ${rig.registry.hostPort}\r\nX-Slow: ${'a'.repeat(100)}\r\n\r\n`;
    const sent = performance.now();
    const closing = closedWithin(socket, sent, 6000);
    void (async () => {
      for (const byte of head) {
        if (socket.destroyed) return;
        socket.write(byte);
        await sleep(100);
      }
    })();
    const closedAfter = await closing;
    assert.ok(closedAfter >= 900 && closedAfter < 3500, `closed after ${Math.round(closedAfter)} ms`);
  });

  test('the second request of a kept-alive session is held to clientHeader as well; idle time between requests is not', async () => {
    const socket = await handshake(rig, rig.registry.host);
    const chunks: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.write(`GET /v2/ HTTP/1.1\r\nHost: ${rig.registry.hostPort}\r\n\r\n`);
    await sleep(1500); // idle for longer than clientHeader: the session stays
    assert.match(Buffer.concat(chunks).toString('latin1'), /^HTTP\/1\.1 \d{3} /);
    assert.ok(!socket.destroyed, 'an idle kept-alive session is not a slow head');
    const sent = performance.now();
    socket.write('GET /v2/ HTTP/1.1\r\nHo');
    const closedAfter = await closedWithin(socket, sent, 6000);
    assert.ok(closedAfter >= 900 && closedAfter < 3500, `closed after ${Math.round(closedAfter)} ms`);
  });

  test('a CONNECT followed by silence (no TLS handshake) is closed after clientHeader', async () => {
    const reply = await sendConnect(rig.proxy.port, rig.registry.hostPort);
    assert.equal(reply.status, 200);
    const closedAfter = await closedWithin(reply.socket, performance.now(), 6000);
    assert.ok(closedAfter >= 900 && closedAfter < 3500, `closed after ${Math.round(closedAfter)} ms`);
  });

  test('a CONNECT head sent a byte at a time is closed after clientHeader on the listener', async () => {
    // The policy's defaults here leave clientHeader at 60 s on the listener: a proxy of its own.
    const { startTestProxy } = await import('../helpers/proxy.ts');
    const proxy = await startTestProxy('defaults:\n  timeouts: { clientHeader: 1s }\n');
    try {
      const socket = net.connect(proxy.port, '127.0.0.1');
      await new Promise((resolve) => socket.once('connect', resolve));
      const sent = performance.now();
      const closing = closedWithin(socket, sent, 6000);
      void (async () => {
        for (const byte of 'CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n\r\n') {
          if (socket.destroyed) return;
          socket.write(byte);
          await sleep(100);
        }
      })();
      const closedAfter = await closing;
      assert.ok(closedAfter >= 900 && closedAfter < 3500, `closed after ${Math.round(closedAfter)} ms`);
    } finally {
      await proxy.close();
    }
  });

  test('a request that is slow to answer is not cut by the header timeout', async () => {
    const blob = rig.registry.addBlob(MiB);
    rig.registry.behave = async (_req, _res, seen) => {
      if (seen.blob?.digest === blob.digest) await sleep(2000);
      return false;
    };
    try {
      const got = await rig.blob(blob.digest);
      assert.equal(got.status, 200);
      assert.equal(got.digest, blob.digest);
    } finally {
      rig.registry.reset();
    }
  });
});

describe('maps that grow with input are bounded', () => {
  const entry = (host: string): AccessEntry => ({ method: 'GET', host, path: '/v2/', status: 403, bytes: 0, ms: 0, type: 'plain-http', error: 'refused' });
  const live: LiveState = {
    fillsInFlight: () => 0,
    cacheBytes: () => 0,
    cacheEntries: () => 0,
    evictions: () => ({ blobs: 0, bytes: 0 }),
    prefetched: () => 0,
    rateLimits: () => [],
    caNotAfter: () => new Date(),
    leafExpiries: () => [],
  };

  test('metric labels: registries beyond the cap push out the least recently seen, with all their series', async () => {
    const metrics = createMetrics(live);
    metrics.observe({ ...entry('registry.test:443'), type: 'blob', cache: 'HIT', status: 200, bytes: 10 });
    for (let i = 0; i < 1000; i++) {
      metrics.observe(entry(`${randomBytes(4).toString('hex')}.test:${'x'.repeat(i % 3 === 0 ? 40_000 : 1)}`));
      // A registry in use keeps its series.
      if (i % 50 === 0) metrics.observe({ ...entry('registry.test:443'), type: 'blob', cache: 'HIT', status: 200, bytes: 10 });
    }
    const text = await metrics.registry.metrics();
    const registries = new Set([...text.matchAll(/registry="([^"]*)"/g)].map((m) => m[1]));
    assert.ok(registries.size <= MAX_REGISTRY_LABELS, `${registries.size} registries labelled`);
    assert.ok([...registries].every((r) => r!.length <= 253), 'label values are cut');
    assert.match(text, /pullthrough_response_bytes_total\{registry="registry\.test:443",type="blob",cache="HIT"\} 210\n/);
  });

  test('the CA holds a bounded number of contexts', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-sessions-ca-'));
    try {
      const { ca } = CertificateAuthority.loadOrCreate(dir);
      for (let i = 0; i < 300; i++) ca.secureContextFor(`h${i}.test`);
      ca.secureContextFor('h0.test');
      const held = ca.leafExpiries().map((l) => l.host);
      assert.ok(held.length <= 256, `${held.length} contexts`);
      assert.equal(held.at(-1), 'h0.test', 'the most recently used is kept');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('rate limits: a bounded number of registries, the most recently reported kept', () => {
    const limits = new RateLimits();
    for (let i = 0; i < 1000; i++) limits.record(`r${i}.test:443`, { 'ratelimit-remaining': '5' });
    limits.record('r0.test:443', { 'ratelimit-remaining': '7' });
    assert.ok(limits.all().size <= MAX_RATE_LIMITED_REGISTRIES, `${limits.all().size} registries`);
    assert.equal(limits.get('r0.test:443')?.remaining, 7);
    assert.equal(limits.get('r999.test:443')?.remaining, 5);
  });

  /** A token service in a dispatcher: answers each request with a token, or never. */
  function tokenService(answer: boolean): { dispatcher: Dispatcher; asked: () => number } {
    let asked = 0;
    const dispatcher = {
      request: () => {
        asked++;
        if (!answer) return new Promise(() => {});
        const text = JSON.stringify({ token: `t${asked}`, expires_in: 300 });
        return Promise.resolve({ statusCode: 200, headers: {}, body: { destroy() {}, async *[Symbol.asyncIterator]() { yield Buffer.from(text); } } });
      },
    } as unknown as Dispatcher;
    return { dispatcher, asked: () => asked };
  }

  test('tokens: the cache keeps at most its cap, the most recently used among them', async () => {
    const exchange = new TokenExchange();
    const { dispatcher } = tokenService(true);
    const realm = new URL('https://auth.test/token');
    const first = await exchange.token(dispatcher, { realm, scopes: ['repository:r0:pull'] });
    assert.ok(first.ok, JSON.stringify(first));
    for (let i = 1; i < MAX_CACHED_TOKENS + 500; i++) {
      await exchange.token(dispatcher, { realm, scopes: [`repository:r${i}:pull`] });
      if (i % 1000 === 0) await exchange.token(dispatcher, { realm, scopes: ['repository:r0:pull'] }); // in use
    }
    assert.ok(exchange.sizes.cached <= MAX_CACHED_TOKENS, `${exchange.sizes.cached} tokens cached`);
    const again = await exchange.token(dispatcher, { realm, scopes: ['repository:r0:pull'] });
    assert.deepEqual(again, first, 'a token in use is still cached');
  });

  test('tokens: exchanges under way are bounded; beyond the bound a request fails at once', async () => {
    const exchange = new TokenExchange();
    const { dispatcher, asked } = tokenService(false);
    const realm = new URL('https://auth.test/token');
    const results: Array<{ ok: boolean } | undefined> = [];
    for (let i = 0; i < MAX_EXCHANGES_IN_FLIGHT + 100; i++) {
      const at = results.push(undefined) - 1;
      void exchange.token(dispatcher, { realm, scopes: [`repository:r${i}:pull`] }).then((r) => (results[at] = r));
    }
    await sleep(10);
    assert.equal(exchange.sizes.inFlight, MAX_EXCHANGES_IN_FLIGHT);
    assert.equal(asked(), MAX_EXCHANGES_IN_FLIGHT, 'the token service is not asked more than that at once');
    assert.equal(results.filter((r) => r && !r.ok).length, 100, 'the rest fail at once');
  });
});
