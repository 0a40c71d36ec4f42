// Pass-through to upstream, edge cases against an in-process fake registry over real TLS.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { createTestCa } from '../helpers/pki.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

interface Seen {
  method: string;
  url: string;
  httpVersion: string;
  headers: IncomingMessage['headers'];
  bodySha256: string;
  bodyBytes: number;
}

describe('pass-through to upstream', () => {
  let upstream: https.Server;
  let port: number;
  let proxy: TestProxy;
  let seen: Seen[] = [];
  let connections = 0;
  let behave: (req: IncomingMessage, res: ServerResponse) => void;

  before(async () => {
    const ca = createTestCa('forward test CA');
    const leaf = ca.issue(['fake.test']);
    upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem, keepAliveTimeout: 30_000 }, (req, res) => {
      const hash = createHash('sha256');
      let bytes = 0;
      req.on('data', (c: Buffer) => {
        hash.update(c);
        bytes += c.length;
      });
      req.on('end', () => {
        seen.push({ method: req.method!, url: req.url!, httpVersion: req.httpVersion, headers: req.headers, bodySha256: hash.digest('hex'), bodyBytes: bytes });
        behave(req, res);
      });
    });
    upstream.on('connection', () => connections++);
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    port = (upstream.address() as AddressInfo).port;
    const caFile = path.join(process.env.TMPDIR ?? '/tmp', `forward-ca-${process.pid}.pem`);
    writeFileSync(caFile, ca.certPem);
    proxy = await startTestProxy(`
registries:
  fake.test:${port}:
    tls: { ca: ${caFile} }
    timeouts: { headers: 1s, idle: 1s }
    push: bypass   # the upload below streams through; denial by default: test/registry/manifests.test.ts
hosts:
  fake.test: 127.0.0.1
`);
  });

  beforeEach(() => {
    seen = [];
    behave = (_req, res) => res.end('{}');
  });

  after(async () => {
    await proxy?.close();
    upstream?.closeAllConnections();
    upstream?.close();
  });

  const request = async (method: string, urlPath: string, headers: Record<string, string> = {}, body?: Buffer) =>
    httpOverSocket(await tlsThroughProxy(proxy.port, 'fake.test', port, proxy.caPem), method, urlPath, `fake.test:${port}`, headers, body);

  const BLOB = '/v2/lib/app/blobs/sha256:' + 'a'.repeat(64);

  // Blob redirects are followed by the proxy (test/cache); other requests' redirects are the client's.
  // A manifest GET goes through the manifest cache, which relays what it cannot store: a MISS.
  test('a redirect on a pass-through request is passed back to the client unchanged (manifests and blobs follow theirs)', async () => {
    behave = (_req, res) => {
      res.writeHead(307, { Location: 'https://cdn.example/blob?X-Amz-Signature=abc' });
      res.end();
    };
    const tags = await request('GET', '/v2/lib/app/tags/list');
    assert.equal(tags.status, 307);
    assert.equal(tags.headers.location, 'https://cdn.example/blob?X-Amz-Signature=abc');
    assert.equal(tags.headers['x-cache'], 'BYPASS');
  });

  test('HEAD stays HEAD upstream, over HTTP/1.1', async () => {
    behave = (_req, res) => {
      res.writeHead(200, { 'Content-Length': '1234', 'Docker-Content-Digest': 'sha256:' + 'a'.repeat(64) });
      res.end();
    };
    const response = await request('HEAD', BLOB);
    assert.equal(response.status, 200);
    assert.equal(response.headers['content-length'], '1234');
    assert.equal(response.body.length, 0);
    assert.deepEqual(seen.map((s) => [s.method, s.httpVersion]), [['HEAD', '1.1']]);
  });

  test("the client's Authorization is forwarded; hop-by-hop and proxy headers are not", async () => {
    await request('GET', '/v2/', { Authorization: 'Bearer client-token', 'Proxy-Authorization': 'Basic eDp5', 'Keep-Alive': 'timeout=5', 'X-Custom': 'kept' });
    const headers = seen[0]!.headers;
    assert.equal(headers.authorization, 'Bearer client-token');
    assert.equal(headers['x-custom'], 'kept');
    assert.equal(headers['proxy-authorization'], undefined);
    assert.equal(headers['keep-alive'], undefined);
    assert.equal(headers.host, `fake.test:${port}`);
    assert.ok(!proxy.lines.join('\n').includes('client-token'), 'the token is not logged');
  });

  test('an upload streams through byte for byte', async () => {
    behave = (_req, res) => {
      res.writeHead(201, { Location: '/v2/lib/app/blobs/sha256:x' });
      res.end();
    };
    const body = randomBytes(8 * 1024 * 1024 + 17);
    const response = await request('PUT', '/v2/lib/app/blobs/uploads/some-uuid?digest=sha256:' + 'b'.repeat(64), { 'Content-Type': 'application/octet-stream' }, body);
    assert.equal(response.status, 201);
    assert.equal(seen[0]!.bodyBytes, body.length);
    assert.equal(seen[0]!.bodySha256, createHash('sha256').update(body).digest('hex'));
  });

  test('Expect: 100-continue (curl and docker on large uploads): the proxy continues, upstream answers, nothing is sent on as Expect', async () => {
    behave = (_req, res) => {
      res.writeHead(201, { Location: '/v2/lib/app/blobs/sha256:x' });
      res.end();
    };
    const body = randomBytes(256 * 1024);
    const socket = await tlsThroughProxy(proxy.port, 'fake.test', port, proxy.caPem);
    let continued = false;
    const status = await new Promise<number>((resolve, reject) => {
      const req = http.request(
        {
          createConnection: () => socket,
          method: 'PUT',
          path: '/v2/lib/app/blobs/uploads/some-uuid?digest=sha256:' + 'c'.repeat(64),
          headers: { Host: `fake.test:${port}`, 'Content-Type': 'application/octet-stream', 'Content-Length': body.length, Expect: '100-continue' },
        },
        (res) => {
          res.resume();
          res.once('end', () => resolve(res.statusCode ?? 0));
        },
      );
      // The body goes only after the 100 Continue, as a client that asked for it does.
      req.once('continue', () => {
        continued = true;
        req.end(body);
      });
      req.once('error', reject);
    });
    socket.destroy();
    assert.equal(continued, true, 'the client was told to continue');
    assert.equal(status, 201, "upstream's answer, not 502");
    assert.equal(seen.length, 1);
    assert.equal(seen[0]!.headers.expect, undefined);
    assert.equal(seen[0]!.bodySha256, createHash('sha256').update(body).digest('hex'));
  });

  test('PROXY_REQUEST_BUFFERING=true: a chunked upload reaches upstream whole, with its Content-Length', async () => {
    const buffering = await startTestProxy(
      `registries:\n  fake.test:${port}: { tls: { ca: ${path.join(process.env.TMPDIR ?? '/tmp', `forward-ca-${process.pid}.pem`)} }, push: bypass }\nhosts:\n  fake.test: 127.0.0.1\n`,
      { PROXY_REQUEST_BUFFERING: 'true' },
    );
    try {
      behave = (_req, res) => {
        res.writeHead(202);
        res.end();
      };
      const body = randomBytes(3 * 1024 * 1024 + 5);
      const socket = await tlsThroughProxy(buffering.port, 'fake.test', port, buffering.caPem);
      const answer = new Promise<string>((resolve) => {
        let text = '';
        socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
        socket.on('end', () => resolve(text));
      });
      socket.write(`PATCH /v2/lib/app/blobs/uploads/u1 HTTP/1.1\r\nHost: fake.test:${port}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n`);
      // Sent in pieces, slowly: upstream must hear nothing before the last one.
      for (let offset = 0; offset < body.length; offset += 1024 * 1024) {
        const piece = body.subarray(offset, offset + 1024 * 1024);
        socket.write(`${piece.length.toString(16)}\r\n`);
        socket.write(piece);
        socket.write('\r\n');
        await new Promise((resolve) => setTimeout(resolve, 50));
        if (offset + piece.length < body.length) assert.equal(seen.length, 0, 'nothing upstream before the upload is complete');
      }
      socket.write('0\r\n\r\n');
      assert.match(await answer, /^HTTP\/1\.1 202/);
      assert.equal(seen.length, 1);
      assert.equal(seen[0]!.headers['content-length'], String(body.length));
      assert.equal(seen[0]!.headers['transfer-encoding'], undefined);
      assert.equal(seen[0]!.bodySha256, createHash('sha256').update(body).digest('hex'));
    } finally {
      await buffering.close();
    }
  });

  test('response heads of 128 KiB are accepted (Google Artifact Registry sends such)', async () => {
    behave = (_req, res) => {
      res.setHeader('X-Large', 'x'.repeat(128 * 1024));
      res.end('{}');
    };
    const response = await request('GET', '/v2/');
    assert.equal(response.status, 200);
    assert.equal(response.headers['x-large']?.length, 128 * 1024);
  });

  test('upstream connections are kept alive and reused', async () => {
    const before = connections;
    for (let i = 0; i < 5; i++) assert.equal((await request('GET', '/v2/')).status, 200);
    assert.ok(connections - before <= 1, `${connections - before} new upstream connections for 5 requests`);
  });

  test('the headers timeout is applied: a silent upstream gives 504 after 1s', async () => {
    behave = () => {}; // never answers
    const started = performance.now();
    const response = await request('GET', '/v2/');
    const took = performance.now() - started;
    assert.equal(response.status, 504);
    assert.match(response.body.toString(), /"code":"UNAVAILABLE".*timed out/);
    assert.ok(took >= 900 && took < 3000, `answered after ${Math.round(took)} ms`);
  });

  // On a blob the fill resumes instead (test/cache); a pass-through body is simply cut.
  test('the idle timeout is applied: a body that stalls is cut, not ended cleanly', async () => {
    behave = (_req, res) => {
      res.writeHead(200, { 'Content-Length': '1000000' });
      res.write(Buffer.alloc(1000));
    };
    const socket = await tlsThroughProxy(proxy.port, 'fake.test', port, proxy.caPem);
    const started = performance.now();
    const response = await httpOverSocket(socket, 'GET', '/v2/lib/app/manifests/latest', `fake.test:${port}`).catch((err: Error) => err);
    const took = performance.now() - started;
    // The proxy cuts the connection: the client sees an error or a short body, never a complete one.
    if (!(response instanceof Error)) assert.ok(response.body.length < 1_000_000, 'short body');
    assert.ok(took >= 900 && took < 3000, `cut after ${Math.round(took)} ms`);
  });

  test('invalid names, digests and ".." are refused with registry-style errors, without asking upstream', async () => {
    const cases: Array<[string, number, string]> = [
      ['/v2/lib/../etc/blobs/sha256:' + 'a'.repeat(64), 400, 'NAME_INVALID'],
      ['/v2/lib/%2e%2e/x/manifests/latest', 400, 'NAME_INVALID'],
      ['/v2/lib/app/blobs/sha256:xyz', 400, 'DIGEST_INVALID'],
      ['/v2/lib/app/manifests/sha256:short', 400, 'DIGEST_INVALID'],
      ['/v2/Upper/app/manifests/latest', 400, 'NAME_INVALID'],
      ['/v2/lib/app/manifests/' + 'x'.repeat(200), 400, 'TAG_INVALID'],
    ];
    for (const [urlPath, status, code] of cases) {
      const response = await request('GET', urlPath);
      assert.equal(response.status, status, urlPath);
      assert.equal((JSON.parse(response.body.toString()) as { errors: Array<{ code: string }> }).errors[0]!.code, code, urlPath);
    }
    assert.equal(seen.length, 0, 'nothing reached upstream');
  });

  test('TLS verification is on unless a registry turns it off', async () => {
    const strict = await startTestProxy(`registries:\n  fake.test:${port}: {}\nhosts:\n  fake.test: 127.0.0.1\n`);
    const lax = await startTestProxy(`registries:\n  fake.test:${port}: { tls: { verify: false } }\nhosts:\n  fake.test: 127.0.0.1\n`);
    try {
      const refused = await httpOverSocket(await tlsThroughProxy(strict.port, 'fake.test', port, strict.caPem), 'GET', '/v2/', `fake.test:${port}`);
      assert.equal(refused.status, 502);
      assert.match(refused.body.toString(), /tls\.ca in proxy\.yaml or NODE_EXTRA_CA_CERTS/);
      const accepted = await httpOverSocket(await tlsThroughProxy(lax.port, 'fake.test', port, lax.caPem), 'GET', '/v2/', `fake.test:${port}`);
      assert.equal(accepted.status, 200);
    } finally {
      await Promise.all([strict.close(), lax.close()]);
    }
  });

  test('an unreachable upstream gives 502 with the reason', async () => {
    const closed = await startTestProxy(`registries:\n  gone.test:1: {}\nhosts:\n  gone.test: 127.0.0.1\n`);
    try {
      const response = await httpOverSocket(await tlsThroughProxy(closed.port, 'gone.test', 1, closed.caPem), 'GET', '/v2/', 'gone.test:1');
      assert.equal(response.status, 502);
      assert.match(response.body.toString(), /ECONNREFUSED/);
    } finally {
      await closed.close();
    }
  });
});
