// A bounded fuzz run against a running proxy (R12.1): a few thousand generated inputs — CONNECT lines,
// request lines and headers, admin requests with truncated bodies, /v2/ paths, Range values and
// Accept headers through an intercepted session, SNI names, mirror paths — in batches, and after each
// batch the process must be alive, answer /healthz, and have written nothing outside its data
// directory. The generator is seeded (PULLTHROUGH_FUZZ_SEED reproduces a run; the seed is printed).
// The proxy runs as a child process, as users run it: a crash ends it, not the test runner.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import tls from 'node:tls';
import { startFakeRegistry, writeCaFile, type FakeRegistry } from '../helpers/fake-registry.ts';
import { createTestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir, stopChild } from '../helpers/process.ts';
import { startChildProxy } from '../helpers/child-proxy.ts';

const BATCHES = 10;
const PER_BATCH = 250;
const CONCURRENCY = 48;
const EXCHANGE_TIMEOUT_MS = 1000;

/** mulberry32: small, fast, and the same sequence for the same seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('fuzzing a running proxy', () => {
  const seed = Number(process.env.PULLTHROUGH_FUZZ_SEED ?? Date.now() % 1_000_000);
  const random = prng(seed);
  const pick = <T,>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
  const int = (max: number) => Math.floor(random() * max);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256))).toString('latin1');
  const printable = (n: number) => Array.from({ length: n }, () => String.fromCharCode(32 + int(95))).join('');

  let work: string;
  let registry: FakeRegistry;
  let child: ChildProcess;
  let port = 0;
  let mirrorPort = 0;
  let output = () => '';
  let caPem = '';
  let filesBefore: string[] = [];
  let blobDigest = '';

  before(async () => {
    work = makeTempDir('fuzz');
    const ca = createTestCa('fuzz upstream CA');
    registry = await startFakeRegistry('registry.test', ca);
    blobDigest = registry.addBlob(Buffer.from('a blob to range over, '.repeat(200))).digest;
    const configFile = path.join(work, 'proxy.yaml');
    writeFileSync(
      configFile,
      `listen: 127.0.0.1:0
dataDir: ${path.join(work, 'data')}
registries:
  ${registry.hostPort}:
    tls: { ca: ${writeCaFile(work, ca)} }
    push: bypass
mirror:
  listen: 127.0.0.1:0
hosts:
  registry.test: 127.0.0.1
`,
    );
    const started = await startChildProxy(configFile, { cwd: work, mirror: true });
    child = started.child;
    port = started.port;
    mirrorPort = started.mirrorPort!;
    output = () => started.output();
    caPem = readFileSync(path.join(work, 'data', 'ca.crt'), 'utf8');
    filesBefore = filesOutsideData();
  });

  after(async () => {
    if (child) await stopChild(child);
    await registry?.close();
    if (work) removeTempDir(work);
  });

  /** Every file under the work directory but the data directory (the policy, the upstream CA). */
  function filesOutsideData(): string[] {
    const found: string[] = [];
    const walk = (dir: string) => {
      for (const name of readdirSync(dir)) {
        const full = path.join(dir, name);
        if (full === path.join(work, 'data')) continue;
        if (statSync(full).isDirectory()) walk(full);
        else found.push(path.relative(work, full));
      }
    };
    walk(work);
    return found.sort();
  }

  /** Sends raw bytes on a plain connection to `to`; resolves when it closes or times out (never rejects). */
  function raw(to: number, data: string, end: boolean): Promise<void> {
    return new Promise((resolve) => {
      const socket = net.connect(to, '127.0.0.1', () => (end ? socket.end(data, 'latin1') : socket.write(data, 'latin1')));
      socket.on('data', () => {});
      socket.on('error', () => {});
      const timer = setTimeout(() => socket.destroy(), EXCHANGE_TIMEOUT_MS);
      socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** CONNECT to the registry, TLS with `servername`, then `request` inside; never rejects. */
  function intercepted(servername: string, request: string): Promise<void> {
    return new Promise((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => socket.write(`CONNECT ${registry.hostPort} HTTP/1.1\r\nHost: ${registry.hostPort}\r\n\r\n`));
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        socket.destroy();
        resolve();
      };
      const timer = setTimeout(finish, EXCHANGE_TIMEOUT_MS);
      socket.on('error', finish);
      socket.once('data', (head: Buffer) => {
        if (!head.toString('latin1').startsWith('HTTP/1.1 200')) return finish();
        const secure = tls.connect({ socket, servername, ca: caPem, rejectUnauthorized: false }, () => secure.write(request, 'latin1'));
        secure.on('data', () => {});
        secure.on('error', finish);
        secure.on('close', finish);
      });
    });
  }

  const CONNECT_TARGETS = () =>
    pick([
      `${registry.hostPort}`,
      `registry.test:${int(70000)}`,
      `${printable(int(40))}:${int(70000)}`,
      `[${printable(int(20))}]:443`,
      `${int(4294967296)}:${pick([80, 443, port])}`,
      `0x7f.1:${port}`,
      `0177.0.0.1:${port}`,
      `127.1:${mirrorPort}`,
      `[::ffff:7f00:1]:${port}`,
      `localhost:${port}`,
      '',
      ':',
      `${'a'.repeat(int(3000))}:443`,
      `${printable(8)}\r\nX: y:443`,
      bytes(int(60)),
    ]);

  const V2_PATHS = () =>
    pick([
      `/v2/${printable(int(30)).replace(/[ ?#]/g, '')}/manifests/${printable(int(20)).replace(/[ ?#]/g, '')}`,
      `/v2/lib/app/blobs/sha256:${Array.from({ length: int(70) }, () => pick([...'0123456789abcdefg'])).join('')}`,
      `/v2/lib/app/blobs/${blobDigest}`,
      `/v2/../../etc/passwd`,
      `/v2/lib%2f..%2fx/manifests/latest`,
      `/v2/${'a/'.repeat(int(200))}manifests/x`,
      `/v2/_catalog?n=${int(100000)}&last=${printable(5)}`,
      `/v2/lib/app/tags/list?n=-1`,
      `/v2/lib/app/referrers/sha256:${'a'.repeat(64)}?artifactType=${printable(10)}`,
      `/v2/lib/app/blobs/uploads/${printable(10)}?_state=${printable(20)}`,
      `/token?scope=${printable(30)}&service=${printable(5)}&offline_token=true`,
      `/${printable(int(50))}`,
      '*',
      `http://${registry.hostPort}/v2/`,
    ]);

  const HEADERS = () =>
    Array.from({ length: int(5) }, () =>
      pick([
        `Range: bytes=${pick(['', '-', `${int(100000)}-`, `-${int(5000)}`, `${int(5000)}-${int(5000)}`, `0-0,${int(9)}-${int(99)}`, printable(12)])}`,
        `Accept: ${pick(['application/vnd.oci.image.manifest.v1+json', printable(int(100)), 'x/y;q=0'.repeat(int(400)), '*/*'])}`,
        `Authorization: ${pick(['Bearer ', 'Basic Og==', `Basic ${Buffer.from(printable(20)).toString('base64')}`, `Bearer ${printable(int(5000))}`, printable(10)])}`,
        `Content-Length: ${pick([int(100), -1, '1e3', 'abc', '99999999999999999999'])}`,
        `Transfer-Encoding: ${pick(['chunked', 'gzip, chunked', printable(6)])}`,
        `Expect: 100-continue`,
        `Host: ${pick(['', printable(int(30)), registry.hostPort])}`,
        `${printable(int(20)).replace(/[: ]/g, '')}: ${printable(int(200))}`,
        `X-Long: ${'x'.repeat(int(40_000))}`,
      ]),
    ).join('\r\n');

  /** One generated input, sent; never rejects. */
  function oneInput(): Promise<void> {
    switch (int(7)) {
      case 0:
        return raw(port, `CONNECT ${CONNECT_TARGETS()} HTTP/1.${int(3)}\r\n${HEADERS()}\r\n\r\n`, random() < 0.5);
      case 1:
        return raw(port, `${pick(['GET', 'POST', 'HEAD', 'PUT', 'DELETE', 'OPTIONS', 'BREW', printable(5)])} ${pick(['/', '/ca.crt', '/healthz', '/metrics', '/ui/data.json', `/setup/${printable(8)}`, '/setup/containerd-mirror', '/ui/../ca.key', `/${printable(int(80))}`, V2_PATHS()])} HTTP/1.${int(2)}\r\n${HEADERS()}\r\n\r\n`, random() < 0.5);
      case 2: {
        // Admin requests with bodies cut short, too long, or not JSON.
        const body = pick(['{"registry":"x"}', '{', printable(int(300)), '{"digest":"sha256:' + 'a'.repeat(64) + '"}', 'x'.repeat(int(9000))]);
        const announced = pick([body.length, body.length + int(50), Math.max(0, body.length - 3)]);
        return raw(port, `POST /admin/purge HTTP/1.1\r\nHost: x\r\nContent-Length: ${announced}\r\n\r\n${body.slice(0, int(body.length + 1))}`, true);
      }
      case 3:
        return intercepted(pick([registry.host, printable(int(40)), `${printable(10)}.example`, '', 'x'.repeat(300)]), `${pick(['GET', 'HEAD', 'PUT', 'PATCH'])} ${V2_PATHS()} HTTP/1.1\r\nHost: ${registry.hostPort}\r\n${HEADERS()}\r\n\r\n`);
      case 4:
        return raw(mirrorPort, `${pick(['GET', 'HEAD', 'POST'])} ${V2_PATHS()}${pick(['', `?ns=${printable(10)}`, `?ns=127.0.0.1:${port}`, `?ns=${registry.hostPort}`])} HTTP/1.1\r\nHost: m\r\n${HEADERS()}\r\n\r\n`, random() < 0.5);
      case 5:
        return raw(pick([port, mirrorPort]), bytes(int(2000)), random() < 0.5);
      default:
        // A dribbling client: half a request line, then nothing.
        return raw(port, `GET /healthz HT`, false);
    }
  }

  async function healthz(): Promise<number> {
    const answer = await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(10_000) });
    await answer.arrayBuffer();
    return answer.status;
  }

  test(`${BATCHES} batches of ${PER_BATCH} inputs: alive, /healthz 200, nothing written outside dataDir after each`, { timeout: 240_000 }, async (t) => {
    t.diagnostic(`seed ${seed} (PULLTHROUGH_FUZZ_SEED=${seed} reproduces this run)`);
    for (let batch = 0; batch < BATCHES; batch++) {
      let next = 0;
      const runners = Array.from({ length: CONCURRENCY }, async () => {
        while (next < PER_BATCH) {
          next++;
          await oneInput();
        }
      });
      await Promise.all(runners);
      assert.equal(child.exitCode, null, `batch ${batch} (seed ${seed}): the proxy exited: ${output().slice(-3000)}`);
      assert.equal(await healthz(), 200, `batch ${batch} (seed ${seed})`);
      assert.deepEqual(filesOutsideData(), filesBefore, `batch ${batch} (seed ${seed}): files written outside dataDir`);
    }
    // Every line it wrote is a JSON log line (nothing printed by a crash or a library on the way).
    const lines = output().split('\n').filter(Boolean);
    const notJson = lines.filter((line) => {
      try {
        JSON.parse(line);
        return false;
      } catch {
        return true;
      }
    });
    assert.deepEqual(notJson.slice(0, 5), [], `seed ${seed}`);
  });
});
