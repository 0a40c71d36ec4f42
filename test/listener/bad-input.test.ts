// Bad input on the front: each gets a clear HTTP error (or a close after the header timeout) and the
// proxy keeps serving everyone else.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import https from 'node:https';
import { createTestCa, type TestCa } from '../helpers/pki.ts';
import type { AddressInfo } from 'node:net';

/** Writes raw bytes, collects everything until the proxy closes the connection. */
function exchange(port: number, bytes: string | Buffer, timeoutMs = 5000): Promise<{ text: string; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const socket = net.connect(port, '127.0.0.1', () => socket.write(bytes));
    const chunks: Buffer[] = [];
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => {}); // a reset after the answer is fine; what was answered is checked
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ text: Buffer.concat(chunks).toString('latin1'), closedAfterMs: performance.now() - started });
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the proxy did not close the connection within ${timeoutMs} ms; got: ${Buffer.concat(chunks).toString('latin1')}`));
    }, timeoutMs);
  });
}

function statusOf(text: string): number {
  return Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0);
}

describe('bad input on the front', () => {
  let proxy: TestProxy;
  let ca: TestCa;
  let upstream: https.Server;

  before(async () => {
    ca = createTestCa('bad-input upstream CA');
    const leaf = ca.issue(['slow.test']);
    upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('{}'));
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const port = (upstream.address() as AddressInfo).port;
    const caFile = `${process.env.TMPDIR ?? '/tmp'}/bad-input-ca-${process.pid}.pem`;
    (await import('node:fs')).writeFileSync(caFile, ca.certPem);
    proxy = await startTestProxy(`
defaults:
  timeouts: { clientHeader: 1s }
registries:
  slow.test:${port}:
    tls: { ca: ${caFile} }
hosts:
  slow.test: 127.0.0.1
tunnel:
  # 127/8 named explicitly, so that the rule against tunnels into the proxy itself is what refuses 127.0.0.1 below.
  allow: ["*:*", "127.0.0.0/8:*"]
  deny: ["*.internal.test:*", "example.test:25"]
`);
  });

  after(async () => {
    await proxy?.close();
    upstream?.close();
  });

  const stillServing = async () => {
    const res = await fetch(`${proxy.url}/healthz`);
    assert.equal(res.status, 200, 'the proxy still serves /healthz');
  };

  const cases: Array<[string, string, number]> = [
    ['a CONNECT without a port', 'CONNECT registry.test HTTP/1.1\r\nHost: x\r\n\r\n', 400],
    ['a CONNECT without a host', 'CONNECT :443 HTTP/1.1\r\nHost: x\r\n\r\n', 400],
    ['an absurd port', 'CONNECT registry.test:99999 HTTP/1.1\r\nHost: x\r\n\r\n', 400],
    ['port zero', 'CONNECT registry.test:0 HTTP/1.1\r\nHost: x\r\n\r\n', 400],
    ['a host with spaces and junk', 'CONNECT re%20g$try:443 HTTP/1.1\r\nHost: x\r\n\r\n', 400],
    ['a malformed request line', 'CONNECT\r\n\r\n', 400],
    ['binary garbage', '\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n', 400],
    ['a denied destination', 'CONNECT db.internal.test:5432 HTTP/1.1\r\nHost: x\r\n\r\n', 403],
    ['a port not in tunnel.allow', 'CONNECT example.test:25 HTTP/1.1\r\nHost: x\r\n\r\n', 403],
    ['plain HTTP to a host that is not an http registry', 'GET http://example.test/v2/ HTTP/1.1\r\nHost: example.test\r\n\r\n', 403],
  ];
  for (const [name, request, status] of cases) {
    test(`${name} → ${status}`, async () => {
      const { text } = await exchange(proxy.port, request);
      assert.equal(statusOf(text), status, text);
      assert.match(text, /pullthrough: \S/, 'the body says what was wrong');
      await stillServing();
    });
  }

  test('a CONNECT back into the proxy itself → 403 (the admin surface must not see a tunnelled client as local)', async () => {
    for (const host of ['127.0.0.1', 'localhost', '[::1]']) {
      const { text } = await exchange(proxy.port, `CONNECT ${host}:${proxy.port} HTTP/1.1\r\nHost: x\r\n\r\n`);
      assert.equal(statusOf(text), 403, `${host}: ${text}`);
      // The proxy listens on 127.0.0.1; ::1 (localhost may resolve to it too) is loopback that no entry names.
      assert.match(text, host === '127.0.0.1' ? /the proxy itself/ : /the proxy itself|loopback/, host);
    }
    await stillServing();
  });

  test('a 100 KiB header → 431', async () => {
    const { text } = await exchange(proxy.port, `CONNECT slow.test:443 HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(100 * 1024)}\r\n\r\n`);
    assert.equal(statusOf(text), 431, text);
    await stillServing();
  });

  test('a client that connects and says nothing is closed after the header timeout (1s)', async () => {
    const { text, closedAfterMs } = await exchange(proxy.port, '', 6000);
    assert.ok(closedAfterMs >= 900 && closedAfterMs < 3500, `closed after ${Math.round(closedAfterMs)} ms`);
    assert.ok(text === '' || statusOf(text) === 408, text);
    await stillServing();
  });

  test('a client that sends half a request line is closed after the header timeout too', async () => {
    const { closedAfterMs } = await exchange(proxy.port, 'CONNECT slow.te', 6000);
    assert.ok(closedAfterMs >= 900 && closedAfterMs < 3500, `closed after ${Math.round(closedAfterMs)} ms`);
    await stillServing();
  });

  test('an intercepted session idle for longer than the header timeout keeps working', async () => {
    const port = (upstream.address() as AddressInfo).port;
    const socket = await tlsThroughProxy(proxy.port, 'slow.test', port, proxy.caPem);
    await new Promise((resolve) => setTimeout(resolve, 2200));
    const response = await httpOverSocket(socket, 'GET', '/v2/', `slow.test:${port}`);
    assert.equal(response.status, 200);
  });

  test('a client that resets mid-CONNECT does not disturb the proxy', async () => {
    for (let i = 0; i < 20; i++) {
      const socket = net.connect(proxy.port, '127.0.0.1', () => {
        socket.write('CONNECT slow.test:443 HTTP/1.1\r\nHo');
        socket.resetAndDestroy();
      });
      socket.on('error', () => {});
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
    await stillServing();
  });

  test('a TLS handshake that fails (client does not trust the CA) is logged with a hint', async () => {
    const port = (upstream.address() as AddressInfo).port;
    await assert.rejects(tlsThroughProxy(proxy.port, 'slow.test', port, ca.certPem), /certificate/);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(proxy.lines.some((line) => line.includes('does it trust the proxy CA')), 'operator sees the hint');
    await stillServing();
  });
});
