// Cluster mode, the fill task itself: a replica that holds a public copy of the blob is asked before the
// registry, and whatever it sends is hashed like an upstream answer. A whole copy spares the registry;
// a copy cut short is completed at the registry with Range; a copy that does not match its digest fails
// the fill (and says it came from a peer); a peer without it costs one 404.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { MessageChannel } from 'node:worker_threads';
import { after, before, describe, test } from 'node:test';
import fill from '../../workers/fill.ts';
import type { FillMessage, FillOutcome, FillTask } from '../../src/cache/fill-protocol.ts';
import { DEFAULT_TIMEOUTS } from '../../config/defaults.ts';
import { createTestCa } from '../helpers/pki.ts';

type PeerMode = 'whole' | 'cut' | 'wrong' | 'missing';

describe('a fill that asks cluster peers first', () => {
  const blob = randomBytes(3 * 1024 * 1024 + 17);
  const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
  const ca = createTestCa('peer test CA');
  let dir: string;
  let peer: https.Server;
  let registry: https.Server;
  let peerMode: PeerMode = 'whole';
  let registryRequests: Array<string | undefined> = [];
  let peerPort = 0;
  let registryPort = 0;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-fill-peer-'));
    const peerLeaf = ca.issue(['pullthrough-peer']);
    peer = https.createServer({ cert: peerLeaf.certPem, key: peerLeaf.keyPem }, (req, res) => {
      if (req.headers['x-pullthrough-peer-secret'] !== 'peer-secret-0123456789' || peerMode === 'missing') return res.writeHead(404).end();
      res.writeHead(200, { 'Content-Length': blob.length, 'Content-Type': 'application/octet-stream' });
      if (peerMode === 'cut') return void res.write(blob.subarray(0, 1024 * 1024), () => res.destroy());
      res.end(peerMode === 'wrong' ? Buffer.from(blob).fill(1, 0, 10) : blob);
    });
    const registryLeaf = ca.issue(['registry.test']);
    registry = https.createServer({ cert: registryLeaf.certPem, key: registryLeaf.keyPem }, (req, res) => {
      registryRequests.push(req.headers.range);
      const start = Number(/^bytes=(\d+)-$/.exec(req.headers.range ?? '')?.[1] ?? 0);
      if (start > 0) res.writeHead(206, { 'Content-Length': blob.length - start, 'Content-Range': `bytes ${start}-${blob.length - 1}/${blob.length}` });
      else res.writeHead(200, { 'Content-Length': blob.length });
      res.end(blob.subarray(start));
    });
    for (const server of [peer, registry]) await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    peerPort = (peer.address() as AddressInfo).port;
    registryPort = (registry.address() as AddressInfo).port;
  });

  after(() => {
    for (const server of [peer, registry]) {
      server.closeAllConnections();
      server.close();
    }
    rmSync(dir, { recursive: true, force: true });
  });

  async function run(mode: PeerMode): Promise<{ outcome: FillOutcome; from?: string; stored?: Buffer }> {
    peerMode = mode;
    registryRequests = [];
    const { port1, port2 } = new MessageChannel();
    const messages: FillMessage[] = [];
    port1.on('message', (m: FillMessage) => messages.push(m));
    const blobPath = path.join(dir, `${mode}.blob`);
    const timeouts = { ...DEFAULT_TIMEOUTS };
    const task: FillTask = {
      digest,
      upstream: { key: 'registry.test:443', origin: `https://registry.test:${registryPort}`, caPem: ca.certPem, verify: true, timeouts, hosts: [['registry.test', ['127.0.0.1']]], ipv6: true },
      path: `/v2/app/blobs/${digest}`,
      headers: {},
      partPath: path.join(dir, `${mode}.part`),
      blobPath,
      port: port2,
      peerSources: [
        {
          upstream: { key: `peer-${mode}`, origin: `https://127.0.0.1:${peerPort}`, caPem: ca.certPem, verify: true, timeouts, hosts: [], ipv6: true, peerName: 'pullthrough-peer' },
          path: `/peer-blob/${digest}`,
          headers: { 'x-pullthrough-peer-secret': 'peer-secret-0123456789' },
        },
      ],
    };
    await fill(task);
    await new Promise((resolve) => setTimeout(resolve, 20));
    port1.close();
    const end = messages.find((m) => m.type === 'end') as Extract<FillMessage, { type: 'end' }>;
    const response = messages.find((m) => m.type === 'response') as Extract<FillMessage, { type: 'response' }> | undefined;
    return { outcome: end.outcome, ...(response ? { from: response.from } : {}), ...(existsSync(blobPath) ? { stored: readFileSync(blobPath) } : {}) };
  }

  test('a whole copy: committed, the registry not asked', async () => {
    const { outcome, from, stored } = await run('whole');
    assert.deepEqual(outcome, { kind: 'committed', size: blob.length });
    assert.match(from ?? '', /cluster peer/);
    assert.ok(stored?.equals(blob));
    assert.deepEqual(registryRequests, []);
  });

  test('a copy cut short: the registry completes it from the cut, with Range', async () => {
    const { outcome, stored } = await run('cut');
    assert.deepEqual(outcome, { kind: 'committed', size: blob.length });
    assert.ok(stored?.equals(blob));
    assert.equal(registryRequests.length, 1);
    assert.match(registryRequests[0] ?? '', /^bytes=\d+-$/);
    assert.ok(Number(/\d+/.exec(registryRequests[0]!)![0]) >= 1024 * 1024 - 64 * 1024, registryRequests[0]);
  });

  test('a copy that does not match: the fill fails as a mismatch from a peer, nothing stored', async () => {
    const { outcome, stored } = await run('wrong');
    assert.equal(outcome.kind, 'failed');
    assert.ok(outcome.kind === 'failed' && outcome.mismatch && outcome.fromPeer, JSON.stringify(outcome));
    assert.equal(stored, undefined);
  });

  test('a peer without it: one 404, then the registry', async () => {
    const { outcome, from, stored } = await run('missing');
    assert.deepEqual(outcome, { kind: 'committed', size: blob.length });
    assert.doesNotMatch(from ?? '', /cluster peer/);
    assert.ok(stored?.equals(blob));
    assert.deepEqual(registryRequests, [undefined]);
  });
});
