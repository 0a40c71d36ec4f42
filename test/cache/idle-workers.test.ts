// A fill worker between tasks: upstream closes its idle keep-alive connections (nginx after 60 s, here
// after 300 ms), and the next fill must not go out on one of them and pay a failed attempt and a backoff
// (a worker whose event loop sleeps between tasks never sees the close).
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { createTestCa } from '../helpers/pki.ts';
import { scrape } from '../helpers/prometheus.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

describe('fill workers between tasks', () => {
  const ca = createTestCa('idle workers CA');
  const blobs = new Map<string, Buffer>();
  let dir: string;
  let upstream: https.Server;
  let proxy: TestProxy;
  let port: number;
  let connections = 0;
  const perSocket = new WeakMap<object, { count: number }>();
  const requestsOn = (socket: object) => {
    let known = perSocket.get(socket);
    if (!known) perSocket.set(socket, (known = { count: 0 }));
    return known;
  };

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-idle-workers-'));
    const leaf = ca.issue(['idle.test']);
    upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      const blob = blobs.get(req.url!.split('/').pop()!);
      if (!blob) return res.writeHead(404).end();
      res.writeHead(200, { 'Content-Length': blob.length, 'Content-Type': 'application/octet-stream' });
      res.end(blob);
      // As nginx does after keepalive_timeout: a connection idle this long is closed (FIN), whatever
      // Keep-Alive hint clients had (none: the clients' own idle limit is longer).
      const socket = req.socket;
      const served = ++requestsOn(socket).count;
      res.once('finish', () => setTimeout(() => requestsOn(socket).count === served && socket.end(), 300).unref());
    });
    upstream.keepAliveTimeout = 60_000;
    upstream.on('connection', () => connections++);
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    port = (upstream.address() as AddressInfo).port;
    writeFileSync(path.join(dir, 'ca.pem'), ca.certPem);
    proxy = await startTestProxy(`workers: 1\nregistries:\n  idle.test:${port}: { tls: { ca: ${path.join(dir, 'ca.pem')} } }\nhosts:\n  idle.test: 127.0.0.1\n`);
  });

  after(async () => {
    await proxy?.close();
    upstream.closeAllConnections();
    upstream.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function fetchNewBlob(): Promise<number> {
    const blob = randomBytes(64 * 1024);
    const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
    blobs.set(digest, blob);
    const started = performance.now();
    const socket = await tlsThroughProxy(proxy.port, 'idle.test', port, proxy.caPem);
    const response = await httpOverSocket(socket, 'GET', `/v2/team/app/blobs/${digest}`, `idle.test:${port}`);
    assert.equal(response.status, 200);
    assert.ok(response.body.equals(blob));
    return performance.now() - started;
  }

  test('a fill after upstream closed the idle connection goes out on a new one, at once', async () => {
    await fetchNewBlob();
    await sleep(3_000); // upstream closes the connection the worker kept
    const before = connections;
    await fetchNewBlob();
    assert.equal(connections, before + 1, 'a new connection');
    const metrics = await scrape(proxy.url);
    assert.equal(metrics.sum('pullthrough_fill_retries_total'), 0, 'no fill had to try again');
  });
});
