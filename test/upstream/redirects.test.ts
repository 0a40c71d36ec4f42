// Redirects followed for the registry (blobs to CDNs): Authorization stays with the registry's origin.
// One loopback port speaks both TLS and plain HTTP, so that a redirect from https://host:port to
// http://host:port changes the scheme alone.
import assert from 'node:assert/strict';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { Agent } from 'undici';
import { requestFollowingRedirects } from '../../src/upstream/redirects.ts';
import { createTestCa } from '../helpers/pki.ts';

interface Seen {
  scheme: 'https' | 'http';
  port: number;
  path: string;
  authorization: string | undefined;
}

describe('requestFollowingRedirects', () => {
  const seen: Seen[] = [];
  let front: net.Server;
  let other: https.Server;
  let port: number;
  let otherPort: number;
  let agent: Agent;

  /** /to?url=<location> answers 302 to that location; anything else 200 "ok". */
  const answer = (scheme: Seen['scheme'], ownPort: () => number) => (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://x');
    seen.push({ scheme, port: ownPort(), path: url.pathname, authorization: req.headers.authorization });
    const location = url.searchParams.get('url');
    if (url.pathname === '/to' && location) {
      res.writeHead(302, { Location: location, 'Content-Length': 0 });
      res.end();
      return;
    }
    res.end('ok');
  };

  before(async () => {
    const ca = createTestCa('redirects test CA');
    const leaf = ca.issue(['127.0.0.1']);
    const secure = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, answer('https', () => port));
    const plain = http.createServer(answer('http', () => port));
    // The first byte tells them apart: 0x16 opens a TLS handshake.
    front = net.createServer((socket) => {
      socket.once('readable', () => {
        const first = socket.read(1) as Buffer | null;
        if (!first) return socket.destroy();
        socket.unshift(first);
        (first[0] === 0x16 ? secure : plain).emit('connection', socket);
      });
    });
    await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
    port = (front.address() as AddressInfo).port;
    other = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, answer('https', () => otherPort));
    await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve));
    otherPort = (other.address() as AddressInfo).port;
    agent = new Agent({ connect: { ca: ca.certPem } });
  });

  after(async () => {
    await agent?.close();
    front?.close();
    other?.closeAllConnections();
    other?.close();
  });

  const follow = async (location: string) => {
    seen.length = 0;
    const start = new URL(`https://127.0.0.1:${port}/to?url=${encodeURIComponent(location)}`);
    const { response, hops } = await requestFollowingRedirects(agent, start, { method: 'GET', headers: { authorization: 'Bearer registry-token' } });
    assert.equal(response.statusCode, 200);
    assert.equal(await response.body.text(), 'ok');
    assert.equal(hops, 1);
    assert.equal(seen.length, 2);
    assert.equal(seen[0]!.authorization, 'Bearer registry-token', 'the registry itself gets it');
    return seen[1]!;
  };

  test('the same origin (a relative Location) keeps Authorization', async () => {
    const next = await follow('/blob');
    assert.deepEqual(next, { scheme: 'https', port, path: '/blob', authorization: 'Bearer registry-token' });
  });

  test('https → http on the same host and port drops it (anyone on the path would read it)', async () => {
    const next = await follow(`http://127.0.0.1:${port}/blob`);
    assert.deepEqual(next, { scheme: 'http', port, path: '/blob', authorization: undefined });
  });

  test('another port of the same host drops it', async () => {
    const next = await follow(`https://127.0.0.1:${otherPort}/blob`);
    assert.deepEqual(next, { scheme: 'https', port: otherPort, path: '/blob', authorization: undefined });
  });

  test('once dropped it never comes back, not even on a hop back to the registry', async () => {
    seen.length = 0;
    const back = `https://127.0.0.1:${port}/blob`;
    const start = new URL(`https://127.0.0.1:${port}/to?url=${encodeURIComponent(`https://127.0.0.1:${otherPort}/to?url=${encodeURIComponent(back)}`)}`);
    const { response, hops } = await requestFollowingRedirects(agent, start, { method: 'GET', headers: { authorization: 'Bearer registry-token' } });
    await response.body.dump();
    assert.equal(hops, 2);
    assert.deepEqual(seen.map((s) => s.authorization), ['Bearer registry-token', undefined, undefined]);
  });
});
