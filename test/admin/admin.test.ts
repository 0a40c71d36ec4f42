// The admin surface and the plain-HTTP path, on a running proxy.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request } from 'undici';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

describe('admin surface', () => {
  let proxy: TestProxy;
  let plain: http.Server;
  let plainSeen: string[] = [];

  before(async () => {
    plain = http.createServer((req, res) => {
      plainSeen.push(`${req.method} ${req.url} host=${req.headers.host}`);
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end('{"plain":true}');
    });
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    const port = (plain.address() as AddressInfo).port;
    proxy = await startTestProxy(`registries:\n  legacy.test:${port}: { http: true }\nhosts:\n  legacy.test: 127.0.0.1\n`);
  });

  after(async () => {
    await proxy?.close();
    plain?.close();
  });

  test('/ca.crt serves exactly the CA in the data directory', async () => {
    const res = await request(`${proxy.url}/ca.crt`);
    assert.equal(res.statusCode, 200);
    assert.equal(res.headers['content-type'], 'application/x-pem-file');
    const pem = readFileSync(path.join(proxy.dir, 'data', 'ca.crt'), 'utf8');
    assert.equal(await res.body.text(), pem);
    // The access log counts the bytes an admin answer carried.
    for (let i = 0; i < 50 && !proxy.access.some((e) => e.path === '/ca.crt'); i++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(proxy.access.find((e) => e.path === '/ca.crt')?.bytes, Buffer.byteLength(pem));
  });

  test('/setup/<runtime> is a script naming the proxy as the client reached it, with the CA inside', async () => {
    for (const runtime of ['docker', 'containerd', 'podman', 'systemd']) {
      const res = await request(`${proxy.url}/setup/${runtime}`, { headers: { host: 'proxy.corp.example:3128' } });
      assert.equal(res.statusCode, 200, runtime);
      const script = await res.body.text();
      assert.match(script, /^#!\/usr\/bin\/env bash|^#!\/bin\/bash/);
      assert.ok(script.includes('http://proxy.corp.example:3128'), `${runtime} names the proxy`);
      assert.ok(script.includes(proxy.caPem.trim().split('\n')[1]!), `${runtime} embeds the CA`);
    }
    const unknown = await request(`${proxy.url}/setup/windows`);
    assert.equal(unknown.statusCode, 404);
    await unknown.body.dump();
    const hostile = await request(`${proxy.url}/setup/docker`, { headers: { host: '$(reboot):3128' } });
    assert.equal(hostile.statusCode, 400, 'a Host that is no host name gives no script');
    await hostile.body.dump();
  });

  test('/healthz reports the worker pool, and the pool replaces a worker that dies', async () => {
    const res = await request(`${proxy.url}/healthz`);
    assert.equal(res.statusCode, 200);
    assert.equal(((await res.body.json()) as { workers: string }).workers, 'ok');
    const crash = new URL('../fixtures/crash-worker.ts', import.meta.url).href;
    const piscina = proxy.proxy.pool.piscina;
    await assert.rejects(piscina.run(undefined, { filename: crash }));
    const again = await request(`${proxy.url}/healthz`);
    assert.equal(again.statusCode, 200, 'still healthy after a worker died');
    assert.equal(((await again.body.json()) as { workers: string }).workers, 'ok');
  });

  test('other methods and paths are refused plainly', async () => {
    const post = await request(`${proxy.url}/ca.crt`, { method: 'POST', body: 'x' });
    assert.equal(post.statusCode, 405);
    await post.body.dump();
    const missing = await request(`${proxy.url}/nothing-here`);
    assert.equal(missing.statusCode, 404);
    await missing.body.dump();
  });

  test('absolute-form plain HTTP is forwarded to a registry marked http: true', async () => {
    plainSeen = [];
    const port = (plain.address() as AddressInfo).port;
    // What HTTP_PROXY clients send: the absolute URL as the request target.
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: proxy.port, method: 'GET', path: `http://legacy.test:${port}/v2/lib/app/manifests/latest`, headers: { host: `legacy.test:${port}` } }, resolve);
      req.on('error', reject);
      req.end();
    });
    let body = '';
    for await (const chunk of res) body += chunk;
    assert.equal(res.statusCode, 200);
    assert.equal(body, '{"plain":true}');
    // Through the same registry handler as intercepted TLS, so a manifest GET goes via the manifest cache.
    assert.equal(res.headers['x-cache'], 'MISS');
    assert.deepEqual(plainSeen, [`GET /v2/lib/app/manifests/latest host=legacy.test:${port}`]);
  });
});
