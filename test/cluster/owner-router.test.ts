// The receiving replica's router against fake owners on loopback (real TLS from the cluster's CA): an
// owner that refuses connections or refuses the secret is passed over for the next in rendezvous
// order, and a stream an owner cuts is cut for the client too, never ended as if whole.
import assert from 'node:assert/strict';
import http from 'node:http';
import https from 'node:https';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parsePolicy } from '../../config/load.ts';
import { CertificateAuthority } from '../../src/ca.ts';
import { Membership } from '../../src/cluster/membership.ts';
import { OwnerRouter } from '../../src/cluster/owner-router.ts';
import { PEER_HEADERS, PEER_REFUSED_HEADER, PEER_TLS_NAME } from '../../src/cluster/peer-protocol.ts';
import { rankFor } from '../../src/cluster/rendezvous.ts';
import { createLookup } from '../../src/resolver.ts';
import { CLUSTER_SECRET } from '../helpers/cluster.ts';

const SELF = '0'.repeat(32);
const quiet = { access() {}, info() {}, warn() {}, error() {} };

type Behaviour = 'serve' | 'refuse-secret' | 'cut' | 'closed' | 'drop-once';

describe('the owner router', () => {
  let dir: string;
  let ca: CertificateAuthority;
  const peers = new Map<string, { server: https.Server; address: string; behaviour: Behaviour; seen: number }>();
  let front: http.Server;
  let router: OwnerRouter;
  let membership: Membership;
  let key = '';

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-owner-router-'));
    CertificateAuthority.create(dir);
    ca = CertificateAuthority.loadOrCreate(dir).ca;
    const body = Buffer.alloc(256 * 1024, 7);
    for (const id of ['1'.repeat(32), '2'.repeat(32), '3'.repeat(32)]) {
      const peer = { server: undefined as unknown as https.Server, address: '', behaviour: 'serve' as Behaviour, seen: 0 };
      peer.server = https.createServer(ca.serverOptionsFor(PEER_TLS_NAME), (req, res) => {
        if (req.url === '/peer-id') return res.end(JSON.stringify({ id }));
        peer.seen++;
        if (req.headers[PEER_HEADERS.secret] !== CLUSTER_SECRET || peer.behaviour === 'refuse-secret') {
          res.writeHead(403, { [PEER_REFUSED_HEADER]: '1' });
          return res.end('no');
        }
        if (peer.behaviour === 'drop-once') {
          // As a kept-alive connection closed just as it is reused: no answer at all, then a good one.
          peer.behaviour = 'serve';
          req.socket.destroy();
          return;
        }
        res.writeHead(200, { 'Content-Length': body.length, 'X-Cache': 'HIT' });
        if (peer.behaviour === 'cut') {
          res.write(body.subarray(0, 1000), () => res.destroy());
          return;
        }
        res.end(body);
      });
      await new Promise<void>((resolve) => peer.server.listen(0, '127.0.0.1', resolve));
      peer.address = `127.0.0.1:${(peer.server.address() as AddressInfo).port}`;
      peers.set(id, peer);
    }
    const cluster = parsePolicy(`cluster:\n  peers: [${[...peers.values()].map((p) => p.address).join(', ')}]\n  self: 127.0.0.1:1\n  secret: ${CLUSTER_SECRET}\n  refresh: 1h\n`, 'proxy.yaml', {}, '/').cluster!;
    membership = new Membership(cluster, SELF, createLookup(new Map(), true), (address) => router.askId(address), quiet);
    router = new OwnerRouter(membership, ca.certPem, CLUSTER_SECRET, quiet);
    await membership.start();
    // A key this replica ranks last: every other member is asked before it serves it itself.
    for (let i = 0; ; i++) {
      key = `blob:sha256:${i}`;
      if (rankFor(key, membership.members()).at(-1) === SELF) break;
    }
    front = http.createServer((req, res) => {
      void router.serve(req, res, { key, registryKey: 'registry.test:443', client: '127.0.0.1' }).then((result) => {
        if (!result) {
          res.writeHead(200, { 'X-Served': 'here' });
          res.end('here');
        }
      });
    });
    await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
  });

  after(async () => {
    membership.close();
    await router.close();
    front.close();
    for (const peer of peers.values()) {
      peer.server.closeAllConnections();
      peer.server.close();
    }
    rmSync(dir, { recursive: true, force: true });
  });

  const ranked = () => rankFor(key, membership.members()).filter((id) => id !== SELF).map((id) => peers.get(id)!);
  const get = () =>
    new Promise<{ status: number; bytes: number; complete: boolean; served?: string }>((resolve) => {
      http.get(`http://127.0.0.1:${(front.address() as AddressInfo).port}/v2/x/blobs/sha256:aa`, (res) => {
        let bytes = 0;
        res.on('data', (chunk: Buffer) => (bytes += chunk.length));
        res.on('end', () => resolve({ status: res.statusCode!, bytes, complete: res.complete, served: res.headers['x-served'] as string | undefined }));
        res.on('error', () => resolve({ status: res.statusCode!, bytes, complete: false }));
        res.on('aborted', () => resolve({ status: res.statusCode!, bytes, complete: false }));
      });
    });

  test('the owner serves: its bytes are relayed whole', async () => {
    const [owner] = ranked();
    const before = owner!.seen;
    const got = await get();
    assert.deepEqual(got, { status: 200, bytes: 256 * 1024, complete: true, served: undefined });
    assert.equal(owner!.seen, before + 1);
  });

  test('an owner that cuts its stream: the client\'s response is cut too, not ended', async () => {
    const [owner] = ranked();
    owner!.behaviour = 'cut';
    try {
      const got = await get();
      assert.equal(got.complete, false);
      assert.ok(got.bytes < 256 * 1024);
    } finally {
      owner!.behaviour = 'serve';
    }
  });

  test('a connection to the owner that closes under the request is tried once more, and the owner kept', async () => {
    const [owner] = ranked();
    owner!.behaviour = 'drop-once';
    const before = owner!.seen;
    const got = await get();
    assert.deepEqual([got.status, got.bytes, got.complete], [200, 256 * 1024, true]);
    assert.equal(owner!.seen, before + 2, 'the owner answered the second try');
    assert.equal(membership.isDown(rankFor(key, membership.members())[0]!), false, 'not taken for gone');
  });

  test('an owner that refuses the secret, then one that is gone: the next in order serves; the gone one is not asked again for a while', async () => {
    const [first, second, third] = ranked();
    first!.behaviour = 'refuse-secret';
    await new Promise<void>((resolve) => second!.server.close(() => resolve()));
    second!.server.closeAllConnections();
    const thirdBefore = third!.seen;
    const failoversBefore = router.failovers;
    const got = await get();
    assert.equal(got.status, 200);
    assert.equal(got.bytes, 256 * 1024);
    assert.equal(third!.seen, thirdBefore + 1);
    assert.equal(router.failovers, failoversBefore + 2, 'two members passed over');
    // Both passed over now: straight to the third.
    const firstSeen = first!.seen;
    await get();
    assert.equal(first!.seen, firstSeen, 'the refusing owner was asked again at once');
    assert.equal(third!.seen, thirdBefore + 2);
    // All gone: this replica serves.
    await new Promise<void>((resolve) => third!.server.close(() => resolve()));
    third!.server.closeAllConnections();
    const here = await get();
    assert.equal(here.served, 'here');
  });
});
