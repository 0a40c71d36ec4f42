// The parts of cluster mode around the data path: the cluster: keys and their errors, membership from
// a name that resolves to every replica (and what happens when it cannot be resolved), readiness, and
// a replica that would make a CA of its own refusing to start.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import type { LookupFunction } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { request } from 'undici';
import { parsePolicy } from '../../config/load.ts';
import { Membership, replicaId } from '../../src/cluster/membership.ts';
import { createLookup } from '../../src/resolver.ts';
import { CLUSTER_SECRET, clusterPolicy, freePeerPort, PEER_NAME, sharedCaDir } from '../helpers/cluster.ts';
import { startTestProxy } from '../helpers/proxy.ts';

const quiet = { access() {}, info() {}, warn() {}, error() {} };
const dirs: string[] = [];
const tempDir = () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cluster-'));
  dirs.push(dir);
  return dir;
};
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe('cluster: in proxy.yaml', () => {
  const parse = (text: string, env: NodeJS.ProcessEnv = {}) => parsePolicy(text, 'proxy.yaml', env, '/');

  test('a name or a list of peers, self, the secret from the environment; listen defaults to self\'s port', () => {
    const policy = parse('cluster:\n  peers: pullthrough-peers.pullthrough.svc:3129\n  self: ${POD_IP}:3129\n  secret: ${PEER_SECRET}\n', { POD_IP: '10.1.2.3', PEER_SECRET: CLUSTER_SECRET });
    assert.deepEqual(policy.cluster, {
      peers: [{ host: 'pullthrough-peers.pullthrough.svc', port: 3129 }],
      self: { host: '10.1.2.3', port: 3129 },
      listen: { host: '0.0.0.0', port: 3129 },
      secret: CLUSTER_SECRET,
      refreshMs: 5000,
    });
    const listed = parse(`cluster:\n  peers: [10.0.0.1:4000, "[fd00::2]:4000"]\n  self: 10.0.0.1:4000\n  listen: 127.0.0.1:4001\n  secret: ${CLUSTER_SECRET}\n  refresh: 2s\n`);
    assert.deepEqual(listed.cluster?.peers, [{ host: '10.0.0.1', port: 4000 }, { host: 'fd00::2', port: 4000 }]);
    assert.deepEqual(listed.cluster?.listen, { host: '127.0.0.1', port: 4001 });
    assert.equal(listed.cluster?.refreshMs, 2000);
  });

  test('what is missing or wrong is named, with file:line', () => {
    const cases: Array<[string, NodeJS.ProcessEnv, RegExp]> = [
      [`cluster:\n  self: 10.0.0.1:3129\n  secret: ${CLUSTER_SECRET}\n`, {}, /proxy\.yaml:2:\d+: cluster: needs peers/],
      // ${POD_IP} unset: the replica does not know its own address.
      [`cluster:\n  peers: p.test:3129\n  self: \${POD_IP:-}\n  secret: ${CLUSTER_SECRET}\n`, {}, /cluster\.self.*|needs self/],
      ['cluster:\n  peers: p.test:3129\n  self: 10.0.0.1:3129\n', {}, /needs secret/],
      ['cluster:\n  peers: p.test:3129\n  self: 10.0.0.1:3129\n  secret: short\n', {}, /proxy\.yaml:4:\d+: .*at least 16/],
      [`cluster:\n  peers: p.test\n  self: 10.0.0.1:3129\n  secret: ${CLUSTER_SECRET}\n`, {}, /proxy\.yaml:2:\d+: .*"p\.test" is not host:port/],
      [`cluster:\n  peers: p.test:3129\n  self: 10.0.0.1:3129\n  secret: ${CLUSTER_SECRET}\n  members: 3\n`, {}, /members/],
    ];
    for (const [text, env, expected] of cases) assert.throws(() => parse(text, env), expected, text);
  });
});

describe('membership', () => {
  const policy = (peers: string[], self = '127.0.0.21:4000') => parse(`cluster:\n  peers: [${peers.join(', ')}]\n  self: ${self}\n  secret: ${CLUSTER_SECRET}\n  refresh: 100ms\n`);
  const parse = (text: string) => parsePolicy(text, 'proxy.yaml', {}, '/').cluster!;
  const SELF = 'a'.repeat(32);
  /** Replicas answer with an id made of their address's last digit; the listed ones that do not answer are down. */
  const ids = (answering: string[]) => async (address: string) => {
    if (!answering.includes(address)) throw Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
    return address.split(':')[0]!.slice(-1).repeat(32);
  };

  test('every replica the peer name resolves to that answers is a member, by its id; this replica always; ready once resolved', async () => {
    const lookup = createLookup(new Map([[PEER_NAME, ['127.0.0.21', '127.0.0.22', '127.0.0.23', '127.0.0.24']]]), true);
    const membership = new Membership(policy([`${PEER_NAME}:4000`]), SELF, lookup, ids(['127.0.0.22:4000', '127.0.0.23:4000']), quiet);
    assert.match(membership.notReady() ?? '', /not been resolved yet/);
    await membership.start();
    try {
      assert.equal(membership.notReady(), undefined);
      assert.deepEqual(membership.members().sort(), ['2'.repeat(32), '3'.repeat(32), SELF]);
      assert.equal(membership.addressOf('3'.repeat(32)), '127.0.0.23:4000');
      assert.equal(membership.addressOf(SELF), '127.0.0.21:4000');
    } finally {
      membership.close();
    }
  });

  test('a replica back with a new address but its data (its id) is the same member; one that stops answering leaves', async () => {
    const addresses = ['127.0.0.22'];
    const lookup: LookupFunction = (hostname, options, callback) => createLookup(new Map([[PEER_NAME, [...addresses]]]), true)(hostname, options, callback);
    let answering = ['127.0.0.22:4000'];
    const sameData = async (address: string) => {
      if (!answering.includes(address)) throw new Error('refused');
      return 'b'.repeat(32);
    };
    const membership = new Membership(policy([`${PEER_NAME}:4000`]), SELF, lookup, sameData, quiet);
    await membership.start();
    try {
      assert.equal(membership.addressOf('b'.repeat(32)), '127.0.0.22:4000');
      addresses[0] = '127.0.0.29';
      answering = ['127.0.0.29:4000'];
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(membership.members().sort(), [SELF, 'b'.repeat(32)].sort());
      assert.equal(membership.addressOf('b'.repeat(32)), '127.0.0.29:4000');
      answering = [];
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(membership.members(), [SELF]);
    } finally {
      membership.close();
    }
  });

  test('a name that cannot be resolved: not ready, and only this replica serves (a DNS hiccup later keeps the last list)', async () => {
    let answer: string[] | undefined;
    const lookup = createLookup(new Map(), true);
    const flaky: typeof lookup = (hostname, options, callback) => {
      if (hostname !== PEER_NAME) return lookup(hostname, options, callback);
      if (!answer) return (callback as (err: NodeJS.ErrnoException) => void)(Object.assign(new Error('no such name'), { code: 'ENOTFOUND' }));
      return createLookup(new Map([[PEER_NAME, answer]]), true)(hostname, options, callback);
    };
    const membership = new Membership(policy([`${PEER_NAME}:4000`]), SELF, flaky, ids(['127.0.0.22:4000']), quiet);
    await membership.start();
    try {
      assert.match(membership.notReady() ?? '', /ENOTFOUND/);
      assert.deepEqual(membership.members(), [SELF]);
      answer = ['127.0.0.22'];
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(membership.notReady(), undefined);
      assert.deepEqual(membership.members().sort(), ['2'.repeat(32), SELF]);
      answer = undefined;
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(membership.members().sort(), ['2'.repeat(32), SELF], 'a failed resolution kept the members');
    } finally {
      membership.close();
    }
  });

  test('a peer marked down is passed over until the refresh interval has gone by; this replica never is', async () => {
    const membership = new Membership(policy(['127.0.0.22:4000']), SELF, createLookup(new Map(), true), ids(['127.0.0.22:4000']), quiet);
    membership.markDown('2'.repeat(32));
    membership.markDown(SELF);
    assert.equal(membership.isDown('2'.repeat(32)), true);
    assert.equal(membership.isDown(SELF), false);
    await new Promise((resolve) => setTimeout(resolve, 150));
    assert.equal(membership.isDown('2'.repeat(32)), false);
  });

  test('a replica asking with an id it does not know makes it look again at once, at most once a second; a known one does not', async () => {
    let asked = 0;
    const counting = async (address: string) => {
      asked++;
      return ids(['127.0.0.22:4000'])(address);
    };
    const membership = new Membership({ ...policy(['127.0.0.22:4000']), refreshMs: 3_600_000 }, SELF, createLookup(new Map(), true), counting, quiet);
    await membership.start();
    try {
      assert.equal(asked, 1);
      // The peers asking each other for their ids (the known ones, every refresh) start nothing.
      for (let i = 0; i < 50; i++) membership.heardFrom(`${'2'.repeat(32)} 127.0.0.22:4000`);
      membership.heardFrom(undefined);
      membership.heardFrom('not an id');
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(asked, 1, 'known or malformed askers started a refresh');
      // A new one: one refresh now, however often it asks.
      for (let i = 0; i < 50; i++) membership.heardFrom(`${'9'.repeat(32)} 127.0.0.29:4000`);
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(asked, 2);
      // A known one at a new address (back from a restart): looked at again too, once the second is over.
      membership.heardFrom(`${'2'.repeat(32)} 127.0.0.28:4000`);
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(asked, 2, 'not twice within a second');
      await new Promise((resolve) => setTimeout(resolve, 900));
      assert.equal(asked, 3);
    } finally {
      membership.close();
    }
  });

  test('the id is made once in the data directory and read back after a restart', () => {
    const dir = tempDir();
    const id = replicaId(dir);
    assert.match(id, /^[0-9a-f]{32}$/);
    assert.equal(replicaId(dir), id);
    assert.equal(statSync(path.join(dir, 'cluster-id')).mode & 0o777, 0o600);
    assert.notEqual(replicaId(tempDir()), id);
  });
});

describe('a replica in cluster mode', () => {
  test('refuses to start without the shared CA, saying what to mount', async () => {
    const dir = tempDir();
    const port = await freePeerPort(1);
    const { cluster, hostsEntry } = clusterPolicy(0, 1, port);
    await assert.rejects(startTestProxy(`caDir: ${path.join(dir, 'empty-ca')}\n${cluster}hosts:\n${hostsEntry}`), /cluster mode needs one CA for all replicas.*mount the same Secret/);
  });

  test('answers /readyz 200 once it knows its peers, 503 with the reason while it cannot resolve them', async () => {
    const dir = tempDir();
    const caDir = sharedCaDir(dir);
    const port = await freePeerPort(2);
    const { cluster, hostsEntry } = clusterPolicy(0, 2, port);
    const ready = await startTestProxy(`caDir: ${caDir}\n${cluster}hosts:\n${hostsEntry}`);
    try {
      const res = await request(`${ready.url}/readyz`);
      assert.equal(res.statusCode, 200);
      assert.deepEqual(await res.body.json(), { status: 'ready' });
      assert.equal((await request(`${ready.url}/healthz`)).statusCode, 200);
    } finally {
      await ready.close();
    }
    const lost = await startTestProxy(`caDir: ${caDir}\ncluster:\n  peers: peers.not-resolvable.invalid:${port}\n  self: 127.0.0.21:${port}\n  listen: 127.0.0.21:${port}\n  secret: ${CLUSTER_SECRET}\n`);
    try {
      const res = await request(`${lost.url}/readyz`);
      assert.equal(res.statusCode, 503);
      const body = (await res.body.json()) as { status: string; reason: string };
      assert.equal(body.status, 'not ready');
      assert.match(body.reason, /peers\.not-resolvable\.invalid.*not been resolved/);
      // Alive all the same: liveness is another question.
      assert.equal((await request(`${lost.url}/healthz`)).statusCode, 200);
    } finally {
      await lost.close();
    }
  });

  test('a proxy without cluster: is ready as soon as its workers answer', async () => {
    const single = await startTestProxy('');
    try {
      assert.equal((await request(`${single.url}/readyz`)).statusCode, 200);
    } finally {
      await single.close();
    }
  });
});
