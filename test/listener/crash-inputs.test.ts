// Inputs that ended the process (R12.1): a purge body cut short, a registry request whose handler
// throws (plain HTTP and intercepted), a cache index that cannot write on a hit. Each must be answered
// (or dropped) while the proxy goes on serving. The proxy runs as a child process (`pullthrough start`,
// as users run it): a crash ends it, where in this process it would end the test runner. The error
// path itself (what a throwing handler's client gets, what the operator reads) is checked in process.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import net, { type AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { errors as undiciErrors } from 'undici';
import { parsePolicy } from '../../config/load.ts';
import { CertificateAuthority } from '../../src/ca.ts';
import { createFront, type Front } from '../../src/listener.ts';
import type { AccessEntry, Logger } from '../../src/log.ts';
import type { RegistryHandler } from '../../src/registry/handler.ts';
import { createLookup } from '../../src/resolver.ts';
import { InterceptedSessions } from '../../src/session.ts';
import { fetchThroughProxy } from '../helpers/blob-client.ts';
import { waitFor } from '../helpers/cache-files.ts';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { startFakeRegistry, writeCaFile, type FakeRegistry } from '../helpers/fake-registry.ts';
import { createTestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir, stopChild } from '../helpers/process.ts';
import { startChildProxy, type ChildProxy } from '../helpers/child-proxy.ts';

const SECRET = 'Bearer sekrit-token-1234';


/** Writes raw bytes (then half-closes when `end`), collects everything until the connection closes. */
function exchange(port: number, bytes: string, options: { end?: boolean; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => (options.end ? socket.end(bytes) : socket.write(bytes)));
    const chunks: Buffer[] = [];
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => {}); // a reset after the answer is fine; what was answered is checked
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no close within ${options.timeoutMs ?? 5000} ms; got: ${Buffer.concat(chunks).toString('latin1')}`));
    }, options.timeoutMs ?? 5000);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString('latin1'));
    });
  });
}

function parseResponse(text: string): { status: number; headers: Record<string, string>; body: string } {
  const end = text.indexOf('\r\n\r\n');
  const head = text.slice(0, end).split('\r\n');
  const headers: Record<string, string> = {};
  for (const line of head.slice(1)) headers[line.slice(0, line.indexOf(':')).toLowerCase()] = line.slice(line.indexOf(':') + 1).trim();
  return { status: Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0), headers, body: text.slice(end + 4) };
}

/** A registry-style error body: {"errors":[{"code","message"}]}. */
function registryError(body: string): { code: string; message: string } {
  const parsed = JSON.parse(body) as { errors: Array<{ code: string; message: string }> };
  assert.ok(Array.isArray(parsed.errors) && parsed.errors.length === 1, body);
  return parsed.errors[0]!;
}

/** An upstream answer that announces `announced` bytes, sends a few, and cuts the connection. */
function cutBody(res: ServerResponse, announced = 1000): void {
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': announced, 'Docker-Distribution-API-Version': 'registry/2.0' });
  res.write('{"schemaVersion":');
  setTimeout(() => res.socket?.destroy(), 20);
}

describe('inputs that ended the process: the proxy (a child process) answers and lives on', () => {
  let work: string;
  let configFile: string;
  let proxy: ChildProxy;
  let plain: http.Server;
  let plainPort: number;
  let registry: FakeRegistry;
  let caPem: string;

  before(async () => {
    work = makeTempDir('crash-inputs');
    // A plain-HTTP registry (http: true) whose every answer is cut after a few bytes.
    plain = http.createServer((_req, res) => cutBody(res));
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    plainPort = (plain.address() as AddressInfo).port;
    const ca = createTestCa('crash-inputs upstream CA');
    registry = await startFakeRegistry('registry.test', ca);
    registry.behave = (_req, res, seen) => {
      if (seen.path !== '/v2/' && !seen.path.includes('/manifests/')) return false;
      cutBody(res);
      return true;
    };
    configFile = path.join(work, 'proxy.yaml');
    writeFileSync(
      configFile,
      `listen: 127.0.0.1:0
dataDir: ${path.join(work, 'data')}
registries:
  plain.test:${plainPort}:
    http: true
  ${registry.hostPort}:
    tls: { ca: ${writeCaFile(work, ca)} }
hosts:
  plain.test: 127.0.0.1
  registry.test: 127.0.0.1
`,
    );
    proxy = await startChildProxy(configFile);
    caPem = readFileSync(path.join(work, 'data', 'ca.crt'), 'utf8');
  });

  after(async () => {
    if (proxy) await stopChild(proxy.child);
    plain?.closeAllConnections();
    plain?.close();
    await registry?.close();
    if (work) removeTempDir(work);
  });

  // Each test gets a live proxy, so that one that ends it does not fail the others.
  beforeEach(async () => {
    const healthy = await fetch(`http://127.0.0.1:${proxy.port}/healthz`, { signal: AbortSignal.timeout(2000) }).then((res) => res.ok, () => false);
    if (healthy) return;
    await stopChild(proxy.child);
    proxy = await startChildProxy(configFile);
  });

  const stillServing = async () => {
    await new Promise((resolve) => setTimeout(resolve, 200)); // an unhandled rejection ends the process within a tick or two
    assert.equal(proxy.child.exitCode, null, `the proxy exited: ${proxy.output().slice(-2000)}`);
    const res = await fetch(`http://127.0.0.1:${proxy.port}/healthz`);
    assert.equal(res.status, 200, 'the proxy still serves /healthz');
  };

  test('POST /admin/purge with fewer body bytes than its Content-Length, then a close', async () => {
    // Half-closed (the repro: printf … | nc) and reset.
    await exchange(proxy.port, 'POST /admin/purge HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}', { end: true });
    await stillServing();
    await new Promise<void>((resolve) => {
      const socket = net.connect(proxy.port, '127.0.0.1', () => {
        socket.write('POST /admin/purge HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"registry":', () => setTimeout(() => socket.resetAndDestroy(), 50));
      });
      socket.on('error', () => {});
      socket.once('close', () => resolve());
    });
    await stillServing();
  });

  test('a purge body over the limit is refused with 413, announced or not', async () => {
    const announced = parseResponse(await exchange(proxy.port, `POST /admin/purge HTTP/1.1\r\nHost: x\r\nContent-Length: ${1024 * 1024}\r\n\r\n{"registry":"`));
    assert.equal(announced.status, 413, announced.body);
    const filler = 'a'.repeat(8 * 1024);
    const chunked = parseResponse(
      await exchange(proxy.port, `POST /admin/purge HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n${(filler.length + 13).toString(16)}\r\n{"registry":"${filler}"}\r\n`),
    );
    assert.equal(chunked.status, 413, chunked.body);
    assert.equal(chunked.headers.connection, 'close');
    await stillServing();
  });

  test('plain HTTP: an upstream that cuts its answer gets the client a registry-style error', async () => {
    for (const urlPath of ['/v2/', '/v2/lib/app/manifests/latest']) {
      const text = await exchange(proxy.port, `GET http://plain.test:${plainPort}${urlPath} HTTP/1.1\r\nHost: plain.test:${plainPort}\r\nAuthorization: ${SECRET}\r\nConnection: close\r\n\r\n`);
      const response = parseResponse(text);
      assert.ok(response.status >= 500 && response.status <= 504, `${urlPath}: ${text}`);
      assert.match(registryError(response.body).message, /\S/);
      await stillServing();
    }
    assert.ok(!proxy.output().includes('sekrit-token'), 'no Authorization in any log line');
  });

  test('an intercepted session: the same faults are answered, not reset', async () => {
    for (const urlPath of ['/v2/', '/v2/lib/app/manifests/latest']) {
      const socket = await tlsThroughProxy(proxy.port, registry.host, registry.port, caPem);
      const response = await httpOverSocket(socket, 'GET', urlPath, registry.hostPort, { Authorization: SECRET });
      assert.ok(response.status >= 500 && response.status <= 504, `${urlPath}: ${response.status} ${response.body.toString()}`);
      assert.match(registryError(response.body.toString()).message, /\S/);
      await stillServing();
    }
    assert.ok(!proxy.output().includes('sekrit-token'), 'no Authorization in any log line');
  });
});

const isRoot = process.getuid?.() === 0;

describe('a cache index that cannot write (disk full) on a hit', { skip: !isRoot && 'mounting a small tmpfs as the data directory needs root' }, () => {
  let work: string;
  let mountPoint: string;
  let mounted = false;
  let proxy: ChildProxy | undefined;
  let registry: FakeRegistry;

  before(async () => {
    work = makeTempDir('index-full');
    mountPoint = path.join(work, 'data');
    mkdirSync(mountPoint);
    const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mountPoint], { encoding: 'utf8' });
    assert.equal(mount.status, 0, `mount -t tmpfs: ${mount.stderr}`);
    mounted = true;
    const ca = createTestCa('index-full upstream CA');
    registry = await startFakeRegistry('registry.test', ca);
    const configFile = path.join(work, 'proxy.yaml');
    writeFileSync(
      configFile,
      `listen: 127.0.0.1:0
dataDir: ${mountPoint}
cache: { minFree: 0 }
registries:
  ${registry.hostPort}:
    tls: { ca: ${writeCaFile(work, ca)} }
hosts:
  registry.test: 127.0.0.1
`,
    );
    proxy = await startChildProxy(configFile);
  });

  after(async () => {
    if (proxy) await stopChild(proxy.child);
    await registry?.close();
    if (mounted) spawnSync('umount', [mountPoint]);
    if (work) removeTempDir(work);
  });

  test('the hit is served, the failure logged once, and the proxy goes on', async () => {
    const caPem = readFileSync(path.join(mountPoint, 'ca.crt'), 'utf8');
    const blob = registry.addBlob(64 * 1024);
    const get = () => fetchThroughProxy({ proxyPort: proxy!.port, caPem, host: registry.host, port: registry.port }, `/v2/lib/app/blobs/${blob.digest}`);
    const first = await get();
    assert.equal(first.status, 200);
    await waitFor('the blob cached', () => registry.count({ method: 'GET', digest: blob.digest }) === 1);
    let hit = await get();
    for (let i = 0; i < 20 && hit.headers['x-cache'] !== 'HIT'; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      hit = await get();
    }
    assert.equal(hit.headers['x-cache'], 'HIT');

    // Fill the disk: every commit of the index from now on fails with ENOSPC.
    const filler = spawnSync('dd', ['if=/dev/zero', `of=${path.join(mountPoint, 'filler')}`, 'bs=64k'], { encoding: 'utf8' });
    assert.match(filler.stderr, /No space left/);

    for (let i = 0; i < 5; i++) {
      const got = await get();
      assert.equal(got.status, 200);
      assert.equal(got.headers['x-cache'], 'HIT');
      assert.equal(got.complete, true);
      assert.equal(got.digest, blob.digest);
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(proxy!.child.exitCode, null, `the proxy exited: ${proxy!.output().slice(-3000)}`);
    const health = await fetch(`http://127.0.0.1:${proxy!.port}/healthz`);
    assert.equal(health.status, 200);
    const warnings = proxy!.output().split('\n').filter((line) => line.includes('a write to the cache index failed'));
    assert.equal(warnings.length, 1, proxy!.output().slice(-3000));
    assert.match(warnings[0]!, /No space left on device/);
  });
});

describe('the error path of a handler that throws (in process: listener and session)', () => {
  let front: Front;
  let port: number;
  let caPem: string;
  let dir: string;
  const lines: string[] = [];
  const access: AccessEntry[] = [];
  let behaviour: RegistryHandler = async () => {};

  before(async () => {
    dir = makeTempDir('error-path');
    const policy = parsePolicy('listen: 127.0.0.1:0\nregistries:\n  plain.test:8080: { http: true }\n  registry.test:443: {}\n', 'proxy.yaml', {}, dir);
    const { ca } = CertificateAuthority.loadOrCreate(dir);
    caPem = ca.certPem;
    const record = (level: string) => (message: string, fields?: Record<string, unknown>) => void lines.push(JSON.stringify({ level, message, ...fields }));
    const log: Logger = { access: (entry) => void access.push(entry), info: record('info'), warn: record('warn'), error: record('error') };
    const handler: RegistryHandler = (req, res, context) => behaviour(req, res, context);
    front = createFront({
      policy,
      log,
      lookup: createLookup(new Map(), true),
      sessions: new InterceptedSessions(ca, handler, log),
      registryHandler: handler,
      admin: async () => {
        throw new Error('the admin surface failed');
      },
    });
    await new Promise<void>((resolve) => front.server.listen(0, '127.0.0.1', resolve));
    port = (front.server.address() as AddressInfo).port;
  });

  after(async () => {
    await front?.close();
    if (dir) removeTempDir(dir);
  });

  const plainGet = (urlPath: string) =>
    exchange(port, `GET http://plain.test:8080${urlPath} HTTP/1.1\r\nHost: plain.test:8080\r\nAuthorization: ${SECRET}\r\nConnection: close\r\n\r\n`);
  const interceptedGet = async (urlPath: string) => httpOverSocket(await tlsThroughProxy(port, 'registry.test', 443, caPem), 'GET', urlPath, 'registry.test', { Authorization: SECRET });

  test('a throw before the answer: 500 {"errors":[{"code":"UNKNOWN"}]}, logged with host and path, never the Authorization', async () => {
    behaviour = async () => {
      throw new Error('Key is larger than maximum key size (1978)');
    };
    lines.length = 0;
    access.length = 0;
    const plain = parseResponse(await plainGet('/v2/lib/app/manifests/latest?secret=query'));
    assert.equal(plain.status, 500);
    assert.equal(plain.headers['content-type'], 'application/json; charset=utf-8');
    assert.equal(registryError(plain.body).code, 'UNKNOWN');
    assert.match(registryError(plain.body).message, /maximum key size/);

    const intercepted = await interceptedGet('/v2/lib/app/manifests/latest');
    assert.equal(intercepted.status, 500);
    assert.equal(registryError(intercepted.body.toString()).code, 'UNKNOWN');

    const errors = lines.filter((line) => line.includes('"level":"error"'));
    assert.equal(errors.length, 2, lines.join('\n'));
    assert.match(errors[0]!, /"host":"plain\.test:8080"/);
    assert.match(errors[0]!, /"path":"\/v2\/lib\/app\/manifests\/latest"/);
    assert.match(errors[1]!, /"host":"registry\.test:443"/);
    assert.ok(!lines.some((line) => line.includes('sekrit') || line.includes('secret=query')), lines.join('\n'));
    assert.deepEqual(access.map((e) => [e.host, e.status]), [['plain.test:8080', 500], ['registry.test:443', 500]]);
  });

  test('an upstream that broke (an undici error): 502', async () => {
    behaviour = async () => {
      throw new undiciErrors.SocketError('other side closed');
    };
    const plain = parseResponse(await plainGet('/v2/'));
    assert.equal(plain.status, 502);
    assert.match(registryError(plain.body).message, /upstream plain\.test:8080 failed: other side closed/);
  });

  test('a throw once the answer is under way: the response is cut, not ended cleanly', async () => {
    behaviour = async (_req: IncomingMessage, res: ServerResponse) => {
      res.writeHead(200, { 'Content-Length': 100 });
      res.write('partial');
      await new Promise((resolve) => setTimeout(resolve, 20));
      throw new Error('the cache file vanished');
    };
    const text = await plainGet('/v2/lib/app/blobs/sha256:' + 'a'.repeat(64));
    const response = parseResponse(text);
    assert.equal(response.status, 200);
    assert.equal(response.body, 'partial', 'the connection closed after the partial body');
  });

  test('the admin surface: a throw is answered 500 and logged', async () => {
    lines.length = 0;
    const response = parseResponse(await exchange(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'));
    assert.equal(response.status, 500);
    assert.equal(registryError(response.body).code, 'UNKNOWN');
    assert.ok(lines.some((line) => line.includes('the admin surface failed')));
  });
});
