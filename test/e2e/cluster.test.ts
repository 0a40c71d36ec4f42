// Cluster mode end to end, as it runs in Kubernetes: three `pullthrough start` processes (replica i's
// peer address 127.0.0.(21+i), one peer port, a peer name resolving to all three, one read-only CA
// directory), in front of a Docker-Hub-shaped upstream (token realm intercepted, blobs redirected to a
// CDN), pulled from by the real clients (skopeo, podman, containerd's ctr) spread over the replicas.
// Counts are read from the upstream's own logs; ownership is computed with the proxy's own rendezvous
// ranking. Replicas are killed (-9) mid-fill and restarted one by one while clients pull.
import assert from 'node:assert/strict';
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, test } from 'node:test';
import { blobKey, manifestKey, rankFor } from '../../src/cluster/rendezvous.ts';
import type { AccessEntry } from '../../src/log.ts';
import { hasBlobFile, partFiles, waitFor } from '../helpers/cache-files.ts';
import { startChildProxy, type ChildProxy } from '../helpers/child-proxy.ts';
import { clusterPolicy, freePeerPort, replicaAddress, sharedCaDir, waitForMembers } from '../helpers/cluster.ts';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { ctrUnavailable, startContainerd, type ContainerdHandle } from '../helpers/ctr.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { blobPath, buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { podmanUnavailable } from '../helpers/podman.ts';
import { makeTempDir, removeTempDir, stopChild } from '../helpers/process.ts';
import { freePort } from '../helpers/ports.ts';
import { CLIENT_KINDS, pullAs, type ClientKind, type Pulled } from '../helpers/pull-as.ts';

const KINDS = CLIENT_KINDS;
const REPLICAS = 3;
const PRIVATE_USER = { username: 'hubber', password: 'hub-secret-pw' };
const CLIENT_TIMEOUT_MS = 120_000;
const MiB = 1024 * 1024;
/** The layer killed mid-fill: large enough that its fill is still running when the owner dies. */
const BIG_LAYER_BYTES = 512 * MiB;


/** One replica: its policy file and data directory outlive its process (a restart reuses both). */
interface Replica {
  index: number;
  /** '127.0.0.21:PORT': its peer address (what access entries name as `peer`). */
  address: string;
  /** Its id (kept in its data directory): what the others rank it by. */
  id: string;
  port: number;
  url: string;
  configFile: string;
  dataDir: string;
  proxy: ChildProxy;
}

/** A raw GET through a replica, hashed as it streams (a 512 MiB body is never held). */
interface Streamed {
  status: number;
  received: number;
  /** The announced body arrived whole and the message ended cleanly. */
  complete: boolean;
  /** sha256 of everything hashed into `hash` (this attempt's bytes, after any given earlier ones). */
  digest: string;
  /** sha256 of this attempt's bytes alone. */
  ownDigest: string;
  hash: Hash;
  error?: string;
}

describe('cluster mode end to end: three replica processes, real clients, one cache', () => {
  let rig: HubRig;
  let work: string;
  let caDir: string;
  let caFile: string;
  let caPem: string;
  let peerPort: number;
  const replicas: Replica[] = [];

  before(async () => {
    work = makeTempDir('e2e-cluster');
    rig = await startHubRig({ privateUser: PRIVATE_USER, k8s: false });
    caDir = sharedCaDir(work);
    caFile = join(caDir, 'ca.crt');
    peerPort = await freePeerPort(REPLICAS);
    const tls = `tls: { ca: ${rig.caFile} }`;
    const configs = await Promise.all(
      Array.from({ length: REPLICAS }, async (_, i) => {
        const { cluster, hostsEntry } = clusterPolicy(i, REPLICAS, peerPort);
        const port = await freePort();
        const dataDir = join(work, `data-${i}`);
        const configFile = join(work, `proxy-${i}.yaml`);
        writeFileSync(
          configFile,
          `listen: 127.0.0.1:${port}\ndataDir: ${dataDir}\ncaDir: ${caDir}\n${cluster}registries:\n  ${rig.hubHostPort}:\n    ${tls}\n  ${rig.endpoints.auth.hostPort}:\n    ${tls}\nhosts:\n${rig.hostsYaml()}${hostsEntry}`,
        );
        return { index: i, address: `${replicaAddress(i)}:${peerPort}`, port, url: `http://127.0.0.1:${port}`, configFile, dataDir };
      }),
    );
    const started = await Promise.all(configs.map((c) => startReplica(c.configFile, c.port)));
    for (const [i, c] of configs.entries()) replicas.push({ ...c, id: readFileSync(join(c.dataDir, 'cluster-id'), 'utf8').trim(), proxy: started[i]! });
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);
    caPem = readFileSync(caFile, 'utf8');
  });

  after(async () => {
    await Promise.all(replicas.map((r) => stopChild(r.proxy.child)));
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  // ---- replicas ------------------------------------------------------------------------------

  /** Starts `pullthrough start` and waits until its peer port listens and /readyz answers 200. */
  async function startReplica(configFile: string, port: number): Promise<ChildProxy> {
    const proxy = await startChildProxy(configFile, { peer: true });
    assert.equal(proxy.port, port);
    let ready = false;
    await waitFor(`/readyz 200 on 127.0.0.1:${port}`, () => ready, 15_000, async () => {
      ready = await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.status === 200, () => false);
    });
    return proxy;
  }

  /** Starts the replica again with its policy and data directory, and waits until every replica knows every other. */
  async function restart(replica: Replica): Promise<void> {
    replica.proxy = await startReplica(replica.configFile, replica.port);
    assert.equal(readFileSync(join(replica.dataDir, 'cluster-id'), 'utf8').trim(), replica.id, 'the same id after a restart');
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);
  }

  /** The exit of a replica's process (code or signal). */
  function exited(replica: Replica): Promise<string> {
    const child = replica.proxy.child;
    if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(String(child.exitCode ?? child.signalCode));
    return new Promise((resolve) => child.once('exit', (code, signal) => resolve(String(code ?? signal))));
  }

  /** The replicas in the proxy's own rendezvous order for a key, owner first. */
  const ranked = (key: string): Replica[] => rankFor(key, replicas.map((r) => r.id)).map((id) => replicas.find((r) => r.id === id)!);
  const ownerOf = (key: string): Replica => ranked(key)[0]!;

  /** The replica's access log (its stdout), this process of it only. */
  function accessLog(replica: Replica): AccessEntry[] {
    return replica.proxy
      .output()
      .split('\n')
      .filter((line) => line.startsWith('{"time"') && line.includes('"method"'))
      .map((line) => JSON.parse(line) as AccessEntry);
  }

  // ---- upstream content --------------------------------------------------------------------

  async function pushed(repository: string, layers: number[], label = repository): Promise<{ image: BuiltImage; ref: string }> {
    const image = await buildOciImage(join(work, `layout-${label.replace(/\W/g, '-')}`), {
      layers: [{ files: { 'etc/image': `${label}\n` } }, ...layers.map((bytes) => ({ randomBytes: bytes }))],
      tag: '1.0',
      labels: { label },
    });
    return { image, ref: await rig.pushHub(image.layoutDir, '1.0', repository) };
  }

  const blobsOf = (image: BuiltImage) => [image.configDigest, ...image.layerDigests];
  const upstreamSummary = () => rig.describeRequests((r) => r.host !== 'auth');
  /** Manifest and blob requests at the registry, and CDN downloads: the /v2/ ping and tokens aside. */
  const manifestAndBlobRequests = () => rig.count((r) => r.host === 'cdn' || (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob')));

  // ---- clients -----------------------------------------------------------------------------

  function pull(kind: ClientKind, ref: string, through: Replica, credentials?: { username: string; password: string }, containerd?: ContainerdHandle): Promise<Pulled> {
    return pullAs(kind, ref, { proxyUrl: through.url, caFile, timeoutMs: CLIENT_TIMEOUT_MS, ...(credentials ? { credentials } : {}), ...(containerd ? { containerd } : {}) });
  }

  /** An anonymous pull token from the realm, asked through the replica (which intercepts the realm). */
  async function anonymousToken(through: Replica, repository: string): Promise<string> {
    const realm = new URL(rig.realm);
    const socket = await tlsThroughProxy(through.port, realm.hostname, Number(realm.port), caPem);
    const answer = await httpOverSocket(socket, 'GET', `${realm.pathname}?service=${encodeURIComponent(rig.service)}&scope=repository:${repository}:pull`, realm.host);
    assert.equal(answer.status, 200, `token: ${answer.body.toString()}`);
    const body = JSON.parse(answer.body.toString()) as { token?: string; access_token?: string };
    return (body.token ?? body.access_token)!;
  }

  /** GET of a blob or manifest path through the replica; never rejects (a cut is a result). */
  async function streamThrough(through: Replica, path: string, options: { token?: string; from?: number; hash?: Hash; onData?: (received: number) => void } = {}): Promise<Streamed> {
    const hash = options.hash ?? createHash('sha256');
    const own = createHash('sha256');
    const { hostname, port } = new URL(`https://${rig.hubHostPort}`);
    let socket;
    try {
      socket = await tlsThroughProxy(through.port, hostname, Number(port), caPem);
    } catch (err) {
      return { status: 0, received: 0, complete: false, digest: `sha256:${hash.copy().digest('hex')}`, ownDigest: `sha256:${own.digest('hex')}`, hash, error: (err as Error).message };
    }
    return new Promise((resolve) => {
      let received = 0;
      let status = 0;
      let error: string | undefined;
      let complete = false;
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        socket.destroy();
        resolve({ status, received, complete: complete && error === undefined, digest: `sha256:${hash.copy().digest('hex')}`, ownDigest: `sha256:${own.digest('hex')}`, hash, ...(error !== undefined ? { error } : {}) });
      };
      const req = http.request({
        createConnection: () => socket,
        method: 'GET',
        path,
        headers: {
          host: rig.hubHostPort,
          accept: 'application/vnd.oci.image.manifest.v1+json',
          ...(options.token ? { authorization: `Bearer ${options.token}` } : {}),
          ...(options.from ? { range: `bytes=${options.from}-` } : {}),
        },
      });
      req.once('error', (err) => {
        error ??= err.message;
        finish();
      });
      req.once('response', (res) => {
        status = res.statusCode ?? 0;
        res.on('data', (chunk: Buffer) => {
          if (status === 200 || status === 206) hash.update(chunk);
          own.update(chunk);
          received += chunk.length;
          options.onData?.(received);
        });
        res.once('error', (err) => (error ??= err.message));
        res.once('end', () => (complete = res.complete));
        res.once('close', finish);
      });
      req.end();
    });
  }

  /** sha256 of bytes [start, start+length) of a file. */
  async function digestOfRange(file: string, start: number, length: number): Promise<string> {
    const hash = createHash('sha256');
    if (length > 0) await pipeline(createReadStream(file, { start, end: start + length - 1 }), hash);
    return `sha256:${hash.digest('hex')}`;
  }

  // ---- the tests ---------------------------------------------------------------------------

  test('12 concurrent cold clients (skopeo, podman, ctr) over 3 replicas: 1 upstream manifest GET, 1 CDN download per blob, every digest verified', { timeout: 180_000 }, async (t) => {
    if (KINDS.length < 3) t.diagnostic(`clients: ${KINDS.join(', ')} (podman: ${podmanUnavailable() ?? 'runs'}; ctr: ${ctrUnavailable() ?? 'runs'})`);
    const repository = 'library/cold-e2e';
    const { image, ref } = await pushed(repository, [256 * 1024, 512 * 1024, 1024 * 1024]);
    // Client i: kind i mod 3 and replica (i + ⌊i/3⌋) mod 3: every kind on every replica, 4 clients each.
    const plan = Array.from({ length: 12 }, (_, i) => ({ kind: KINDS[i % KINDS.length]!, replica: replicas[(i + Math.floor(i / 3)) % REPLICAS]! }));
    const daemons = await Promise.all(plan.filter((p) => p.kind === 'ctr').map(() => startContainerd()));
    rig.resetCounts();
    let results: Pulled[];
    try {
      let daemon = 0;
      results = await Promise.all(plan.map((p) => pull(p.kind, ref, p.replica, undefined, p.kind === 'ctr' ? daemons[daemon++] : undefined)));
    } finally {
      await Promise.all(daemons.map((d) => d.stop()));
    }
    for (const [i, result] of results.entries()) {
      assert.ok(result.ok, `client ${i} (${plan[i]!.kind} through replica ${plan[i]!.replica.index}) failed:\n${result.detail}`);
      assert.equal(result.digest, image.manifestDigest, `client ${i} (${plan[i]!.kind} through replica ${plan[i]!.replica.index})`);
    }
    const summary = upstreamSummary();
    // (A 401 an owner meets before it has the registry's token is no pull: Docker Hub counts 200s.)
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', reference: '1.0', status: 200 }), 1, `one manifest GET of the tag: ${summary}`);
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }), 1, `no other manifest GET (by digest): ${summary}`);
    for (const digest of blobsOf(image)) {
      assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET', reference: digest, status: 307 }), 1, `one registry GET of ${digest} sent to the CDN: ${summary}`);
      assert.equal(rig.count({ host: 'cdn', kind: 'download', reference: digest }), 1, `one CDN download of ${digest}: ${summary}`);
      // The owner keeps it (its verified file lands as the last byte goes out); the replicas that relayed it keep no copy.
      const owner = ownerOf(blobKey(digest));
      await waitFor(`${digest} cached on its owner, replica ${owner.index}`, () => hasBlobFile(owner.dataDir, digest), 5_000);
      for (const replica of replicas) assert.equal(hasBlobFile(replica.dataDir, digest), replica === owner, `${digest} cached on replica ${replica.index} (owner: ${owner.index})`);
    }
    if (KINDS.includes('ctr')) {
      // containerd's way: HEAD of the tag, then GET by digest, both answered by the manifests' owner.
      const clientEntries = replicas.flatMap(accessLog).filter((e) => e.forPeer !== true);
      assert.ok(clientEntries.some((e) => e.method === 'HEAD' && e.path === `/v2/${repository}/manifests/1.0` && e.status === 200), 'ctr HEADs the tag');
      assert.ok(clientEntries.some((e) => e.method === 'GET' && e.path === `/v2/${repository}/manifests/${image.manifestDigest}` && e.status === 200), 'ctr GETs the manifest by digest');
    }
    // Each replica's clients were served, and what the replica did not own came from its owner.
    for (const replica of replicas) {
      const entries = accessLog(replica).filter((e) => e.path.startsWith(`/v2/${repository}/`) && e.forPeer !== true);
      assert.ok(entries.length > 0, `replica ${replica.index} had clients`);
      for (const entry of entries.filter((e) => e.type === 'blob' && e.method === 'GET')) {
        const digest = entry.path.slice(entry.path.lastIndexOf('/') + 1);
        const owner = ownerOf(blobKey(digest));
        assert.equal(entry.peer, owner === replica ? undefined : owner.address, `replica ${replica.index}: ${JSON.stringify(entry)}`);
      }
    }
  });

  test('a warm pull through a replica that owns neither the manifests nor any blob of the image sends nothing upstream, for every client kind', { timeout: 180_000 }, async () => {
    // An image whose keys all belong to the other two replicas (a few tries of fresh content find one).
    let found: { image: BuiltImage; ref: string; repository: string; bystander: Replica } | undefined;
    for (let attempt = 0; attempt < 40 && !found; attempt++) {
      const repository = `library/warm-e2e-${attempt}`;
      const image = await buildOciImage(join(work, `layout-warm-${attempt}`), { layers: [{ files: { 'etc/image': `${attempt}\n` } }, { randomBytes: 300 * 1024 }], tag: '1.0', labels: { attempt: String(attempt) } });
      const owners = new Set([manifestKey(rig.hubHostPort, repository), ...blobsOf(image).map(blobKey)].map((key) => ownerOf(key)));
      const bystander = replicas.find((r) => !owners.has(r));
      if (bystander) found = { image, repository, bystander, ref: await rig.pushHub(image.layoutDir, '1.0', repository) };
    }
    assert.ok(found, 'no image found whose keys skip a replica');
    const { image, ref, repository, bystander } = found;
    const other = replicas.find((r) => r !== bystander)!;
    const cold = await pull('skopeo', ref, other);
    assert.ok(cold.ok, cold.detail);
    for (const kind of KINDS) {
      rig.resetCounts();
      const warm = await pull(kind, ref, bystander);
      assert.ok(warm.ok, `${kind} warm pull through replica ${bystander.index} failed:\n${warm.detail}`);
      assert.equal(warm.digest, image.manifestDigest, kind);
      assert.equal(manifestAndBlobRequests(), 0, `${kind} warm pull through the non-owner went upstream: ${upstreamSummary()}`);
    }
    // Everything came from the owners, and the bystander keeps no copy.
    const entries = accessLog(bystander).filter((e) => e.path.startsWith(`/v2/${repository}/`) && (e.type === 'blob' || e.type === 'manifest'));
    assert.ok(entries.length >= KINDS.length * 2, JSON.stringify(entries));
    for (const entry of entries) assert.ok(entry.peer !== undefined && entry.peer !== bystander.address, `served by an owner: ${JSON.stringify(entry)}`);
    for (const digest of blobsOf(image)) assert.equal(hasBlobFile(bystander.dataDir, digest), false, `${digest} copied on the bystander`);
  });

  test(`kill -9 of the owner in the middle of a ${BIG_LAYER_BYTES / MiB} MiB fill: clients on the other replicas get no wrong byte, their retries complete, and the blob stays cached`, { timeout: 180_000 }, async (t) => {
    const repository = 'library/big-e2e';
    const built = performance.now();
    const { image } = await pushed(repository, [BIG_LAYER_BYTES]);
    t.diagnostic(`built and pushed the ${BIG_LAYER_BYTES / MiB} MiB layer in ${Math.round(performance.now() - built)} ms`);
    const digest = image.layerDigests.at(-1)!;
    const size = image.blobs.get(digest)!;
    const source = blobPath(image.layoutDir, digest);
    const path = `/v2/${repository}/blobs/${digest}`;
    const [owner, next] = ranked(blobKey(digest)) as [Replica, Replica, Replica];
    const others = replicas.filter((r) => r !== owner);
    // A client on each of the two other replicas: one resumes with a Range from what it had (as
    // containerd does), the other starts over (as skopeo does).
    const clients = others.map((replica, n) => ({ replica, resume: n === 0, received: 0 }));
    const tokens = await Promise.all(clients.map((c) => anonymousToken(c.replica, repository)));
    rig.resetCounts();
    const started = performance.now();
    const first = clients.map((c, i) => streamThrough(c.replica, path, { token: tokens[i]!, onData: (n) => (c.received = n) }));

    const filled = () => partFiles(owner.dataDir).reduce((max, part) => Math.max(max, part.size), 0);
    await waitFor('64 MiB in the owner\'s .part and bytes at every client', () => filled() >= 64 * MiB && clients.every((c) => c.received > 0), 60_000).catch((err: Error) => {
      throw new Error(`${err.message}: .part ${filled()} bytes, clients ${clients.map((c) => c.received).join(', ')}; upstream: ${upstreamSummary()}\n${replicas.map((r) => `replica ${r.index}:\n${r.proxy.output().slice(-3000)}`).join('\n')}`);
    });
    const atKill = { part: filled(), clients: clients.map((c) => c.received) };
    owner.proxy.child.kill('SIGKILL');
    assert.equal(await exited(owner), 'SIGKILL');
    t.diagnostic(`owner (replica ${owner.index}) killed ${Math.round(performance.now() - started)} ms into the fill, its .part at ${(atKill.part / MiB).toFixed(0)} MiB, clients at ${atKill.clients.map((n) => (n / MiB).toFixed(0)).join(', ')} MiB`);
    assert.equal(hasBlobFile(owner.dataDir, digest), false, 'the fill was still running when the owner died');

    const cut = await Promise.all(first);
    for (const [i, got] of cut.entries()) {
      const label = `client ${i} (replica ${clients[i]!.replica.index})`;
      assert.equal(got.status, 200, `${label}: ${got.error}`);
      // No wrong byte: what arrived is the blob's own beginning, whole or cut.
      assert.equal(got.ownDigest, await digestOfRange(source, 0, got.received), `${label} received bytes that are not the blob's`);
      if (got.complete) assert.deepEqual([got.received, got.digest], [size, digest], `${label} ended cleanly: only with the whole blob`);
      else assert.ok(got.received < size, label);
    }
    assert.ok(cut.some((got) => !got.complete), 'some client was cut by the kill');

    // The retries: the dead owner is passed over and the next in rank (replica `next`) fills and serves.
    const retried = await Promise.all(
      cut.map((got, i) => {
        const c = clients[i]!;
        if (got.complete) return got;
        return c.resume && got.received > 0 ? streamThrough(c.replica, path, { token: tokens[i]!, from: got.received, hash: got.hash }) : streamThrough(c.replica, path, { token: tokens[i]! });
      }),
    );
    for (const [i, got] of retried.entries()) {
      const label = `client ${i} (replica ${clients[i]!.replica.index}, ${clients[i]!.resume ? 'resumed' : 'started over'})`;
      assert.ok(got.complete, `${label}'s retry was cut: ${got.error}`);
      assert.ok(got.status === 200 || (clients[i]!.resume && got.status === 206), `${label}: status ${got.status}`);
      assert.equal(got.digest, digest, `${label}: the retry ends with the blob's digest`);
    }
    t.diagnostic(`retries (${retried.map((got) => got.status).join(', ')}) done ${Math.round(performance.now() - started)} ms after the first GETs; CDN: ${rig.describeRequests({ host: 'cdn' })}`);
    // One download cut by the kill, one by the retry's owner: never one per client.
    const downloads = rig.requests({ host: 'cdn', kind: 'download', reference: digest });
    assert.ok(downloads.length <= 2, `CDN downloads: ${rig.describeRequests({ host: 'cdn' })}`);
    assert.equal(downloads.filter((d) => d.complete).length, 1, `one complete CDN download: ${rig.describeRequests({ host: 'cdn' })}`);
    await waitFor(`the blob verified on replica ${next.index}`, () => hasBlobFile(next.dataDir, digest), 30_000);

    // Cached: a further GET through each live replica sends nothing to the CDN.
    rig.resetCounts();
    for (const replica of others) {
      const again = await streamThrough(replica, path, { token: await anonymousToken(replica, repository) });
      assert.deepEqual([again.status, again.complete, again.digest], [200, true, digest], `GET through replica ${replica.index}`);
    }
    assert.equal(rig.count({ host: 'cdn' }), 0, `cached once the retry's fill completed: ${upstreamSummary()}`);

    // The owner comes back with the same data directory; its stale .part is gone. It owns the blob
    // again and copies it from the replica that stood in: still nothing more from the CDN.
    await restart(owner);
    assert.deepEqual(partFiles(owner.dataDir), [], 'the killed fill\'s .part removed at start');
    rig.resetCounts();
    // Through the replica that did not stand in (the one that did serves its own copy).
    const asking = others.find((r) => r !== next)!;
    const back = await streamThrough(asking, path, { token: await anonymousToken(asking, repository) });
    assert.deepEqual([back.status, back.complete, back.digest], [200, true, digest], 'GET once the owner is back');
    assert.equal(rig.count({ host: 'cdn' }), 0, `the owner copied the blob from a peer: ${upstreamSummary()}`);
    await waitFor(`the blob verified on the owner again`, () => hasBlobFile(owner.dataDir, digest), 30_000);
  });

  test('a rolling restart of all three replicas during continuous skopeo pulls: every pull verified, no client fails twice in a row', { timeout: 180_000 }, async (t) => {
    const { image, ref } = await pushed('library/rolling-e2e', [300 * 1024, 600 * 1024]);
    interface Attempt {
      replica: number;
      ok: boolean;
      digest?: string;
      detail: string;
      started: number;
      ended: number;
    }
    const LOOPS = 3;
    const loops: Attempt[][] = Array.from({ length: LOOPS }, () => []);
    let stop = false;
    // Loop j pulls through replica j, j+1, j+2, … (mod 3), each pull into a fresh directory.
    const runLoop = async (j: number) => {
      for (let n = j; !stop; n++) {
        const replica = replicas[n % REPLICAS]!;
        const started = performance.now();
        const result = await pull('skopeo', ref, replica);
        loops[j]!.push({ replica: replica.index, ok: result.ok, ...(result.digest ? { digest: result.digest } : {}), detail: result.detail, started, ended: performance.now() });
      }
    };
    /** When each replica was not serving: from its SIGTERM until it was ready again. */
    const restarts = new Map<number, { stopped: number; exited?: number; ready?: number }>();
    const okSince = (since: number, replica?: number) => loops.flat().filter((a) => a.ok && a.started > since && (replica === undefined || a.replica === replica)).length;
    const running = Array.from({ length: LOOPS }, (_, j) => runLoop(j));
    try {
      await waitFor('a pull done by every loop', () => loops.every((l) => l.some((a) => a.ok)), 60_000);
      for (const replica of replicas) {
        const window: { stopped: number; exited?: number; ready?: number } = { stopped: performance.now() };
        restarts.set(replica.index, window);
        const stopping = exited(replica);
        replica.proxy.child.kill('SIGTERM');
        assert.equal(await stopping, '0', `replica ${replica.index} exits cleanly after draining`);
        window.exited = performance.now();
        await restart(replica);
        window.ready = performance.now();
        // Pulls go through the restarted replica (and every loop goes on) before the next one stops.
        await waitFor(`pulls through the restarted replica ${replica.index}`, () => okSince(window.ready!, replica.index) >= 2 && loops.every((l) => l.some((a) => a.ok && a.started > window.ready!)), 60_000);
      }
    } finally {
      stop = true;
      await Promise.all(running);
    }
    for (const [j, loop] of loops.entries()) {
      for (const [n, attempt] of loop.entries()) {
        if (attempt.ok) assert.equal(attempt.digest, image.manifestDigest, `loop ${j}, pull ${n} through replica ${attempt.replica}`);
        else assert.ok(loop[n - 1]?.ok !== false, `loop ${j} failed twice in a row (pulls ${n - 1} and ${n}, through replicas ${loop[n - 1]?.replica} and ${attempt.replica}):\n${loop[n - 1]?.detail}\n${attempt.detail}`);
      }
    }
    // What failed: a pull through the replica that was restarting (its client is pinned to it; behind a
    // Service it would have gone to another), or one through a running replica (a peer's restart showing).
    const all = loops.flat();
    const failed = all.filter((a) => !a.ok);
    const duringOwnRestart = (a: Attempt) => {
      const window = restarts.get(a.replica);
      return window !== undefined && a.started < (window.ready ?? Infinity) && a.ended > window.stopped;
    };
    // skopeo's last line, without the names and ports that differ between runs.
    const reason = (a: Attempt) =>
      (a.detail.split('\n').filter(Boolean).at(-1) ?? '')
        .replace(/^.*msg="/, '')
        .replace(/sha256:[0-9a-f]{64}/g, 'sha256:…')
        .replace(/(\d+\.){3}\d+:\d+|[a-z.]+\.test:\d+/g, '…')
        .replace(/(https:\/\/…)[^\s"\\]*/g, '$1')
        .slice(0, 160);
    const pinned = failed.filter(duringOwnRestart);
    const elsewhere = failed.filter((a) => !duringOwnRestart(a));
    const timing = [...restarts].map(([i, w]) => `replica ${i}: drained and exited in ${Math.round(w.exited! - w.stopped)} ms, ready ${Math.round(w.ready! - w.exited!)} ms later`).join('; ');
    t.diagnostic(`${all.length} pulls, ${failed.length} failed once: ${pinned.length} through the replica being restarted, ${elsewhere.length} through a running one. ${timing}`);
    const reasons = new Map<string, number>();
    for (const a of failed) reasons.set(`${duringOwnRestart(a) ? 'restarting' : 'running'} replica: ${reason(a)}`, (reasons.get(`${duringOwnRestart(a) ? 'restarting' : 'running'} replica: ${reason(a)}`) ?? 0) + 1);
    for (const [what, n] of reasons) t.diagnostic(`${n} × ${what}`);
    // Replicas that kept running served every pull, while each of their peers in turn drained and came back.
    assert.deepEqual(elsewhere.map((a) => `replica ${a.replica}: ${reason(a)}`), [], 'pulls through a running replica failed');
  });

  test('private content pulled with credentials through one replica is refused to anonymous clients on each other replica', { timeout: 120_000 }, async () => {
    const repository = 'private/secret-e2e';
    const { image, ref } = await pushed(repository, [200 * 1024]);
    const [first, ...rest] = replicas as [Replica, Replica, Replica];
    const credentialed = await pull('skopeo', ref, first, PRIVATE_USER);
    assert.ok(credentialed.ok, credentialed.detail);
    assert.equal(credentialed.digest, image.manifestDigest);
    for (const replica of rest) {
      for (const kind of KINDS) {
        const anonymous = await pull(kind, ref, replica);
        assert.equal(anonymous.ok, false, `${kind} pulled the private image anonymously through replica ${replica.index}`);
      }
      // Asked raw, with an anonymous token and with none: neither the manifest nor any blob.
      const token = await anonymousToken(replica, repository);
      for (const path of [`/v2/${repository}/manifests/1.0`, `/v2/${repository}/manifests/${image.manifestDigest}`, ...blobsOf(image).map((d) => `/v2/${repository}/blobs/${d}`)]) {
        for (const auth of [{ token }, {}]) {
          const got = await streamThrough(replica, path, auth);
          assert.ok([401, 403, 404].includes(got.status), `${path} through replica ${replica.index} ${auth.token ? 'with an anonymous token' : 'without a token'}: ${got.status}`);
        }
      }
    }
    const again = await pull('skopeo', ref, rest[1], PRIVATE_USER);
    assert.ok(again.ok, again.detail);
    assert.equal(again.digest, image.manifestDigest);
  });
});

