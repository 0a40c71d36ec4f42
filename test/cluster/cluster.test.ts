// Cluster mode with three replicas in this process, in front of a Docker-Hub-shaped upstream (token
// realm on another host, blobs redirected to a CDN), and skopeo clients spread over the replicas: each
// blob and each manifest is fetched upstream once per cluster, a warm pull through any replica sends
// nothing upstream, peer ports refuse whoever lacks the secret, and private content stays private.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { request } from 'node:https';
import { after, before, describe, test } from 'node:test';
import { CLUSTER_SECRET, clusterPolicy, freePeerPort, replicaAddress, sharedCaDir, waitForMembers } from '../helpers/cluster.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { scrape } from '../helpers/prometheus.ts';
import { pushImageThroughProxy, skopeoCopyThroughMirror, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

const REPLICAS = 3;
const PRIVATE_USER = { username: 'hubber', password: 'hub-secret-pw' };

describe('cluster mode: three replicas, one cache', () => {
  let rig: HubRig;
  let work: string;
  let peerPort: number;
  const replicas: TestProxy[] = [];

  before(async () => {
    work = makeTempDir('cluster');
    rig = await startHubRig({ privateUser: PRIVATE_USER, privateUserPushes: true, k8s: false });
    const caDir = sharedCaDir(work);
    peerPort = await freePeerPort(REPLICAS);
    for (let i = 0; i < REPLICAS; i++) {
      const { cluster, hostsEntry } = clusterPolicy(i, REPLICAS, peerPort);
      const tls = `tls: { ca: ${rig.caFile} }`;
      replicas.push(
        await startTestProxy(
          `caDir: ${caDir}\nmirror:\n  listen: 127.0.0.1:0\n${cluster}registries:\n  ${rig.hubHostPort}:\n    ${tls}\n    push: bypass\n  ${rig.endpoints.auth.hostPort}:\n    ${tls}\nhosts:\n${rig.hostsYaml()}${hostsEntry}`,
        ),
      );
    }
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);
  });

  after(async () => {
    await Promise.all(replicas.map((r) => r.close()));
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  async function pushed(repository: string, layers = 3): Promise<{ image: BuiltImage; ref: string }> {
    const image = await buildOciImage(join(work, `layout-${repository.replace(/\W/g, '-')}`), {
      layers: Array.from({ length: layers }, (_, i) => ({ randomBytes: 200 * 1024 * (i + 1) })),
      tag: '1.0',
    });
    return { image, ref: await rig.pushHub(image.layoutDir, '1.0', repository) };
  }

  async function skopeoPull(ref: string, through: TestProxy, credentials?: { username: string; password: string }): Promise<{ ok: boolean; digest?: string; detail: string }> {
    const destDir = makeTempDir('cluster-skopeo');
    try {
      const result = await skopeoCopyThroughProxy({ image: ref, proxyUrl: through.url, caFile: through.caFile, destDir, timeoutMs: 120_000, ...(credentials ? { credentials } : {}) });
      if (result.code !== 0) return { ok: false, detail: result.stderr };
      return { ok: true, digest: (await verifyDirCopy(destDir)).manifestDigest, detail: '' };
    } finally {
      removeTempDir(destDir);
    }
  }

  /** A request to replica i's peer port (its certificate is the cluster CA's; not checked here). */
  const peerGet = (i: number, path: string, headers: Record<string, string>) =>
    new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
      const req = request({ host: replicaAddress(i), port: peerPort, path, headers, rejectUnauthorized: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      });
      req.on('error', reject);
      req.end();
    });

  const summary = () => rig.describeRequests((r) => r.host !== 'auth');

  test('6 concurrent cold skopeo pulls over 3 replicas: 1 manifest GET and 1 download per blob upstream, every digest verified', async () => {
    const { image, ref } = await pushed('library/cold-cluster');
    rig.resetCounts();
    const pulls = await Promise.all(Array.from({ length: 6 }, (_, i) => skopeoPull(ref, replicas[i % REPLICAS]!)));
    for (const [i, pulled] of pulls.entries()) {
      assert.ok(pulled.ok, `pull ${i} failed: ${pulled.detail}`);
      assert.equal(pulled.digest, image.manifestDigest);
    }
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }), 1, summary());
    for (const digest of [image.configDigest, ...image.layerDigests]) {
      assert.equal(rig.count({ host: 'cdn', reference: digest }), 1, `${digest}: ${summary()}`);
    }
    // The owners served the others' clients: some requests went through a peer.
    assert.ok(replicas.some((r) => r.access.some((e) => e.peer !== undefined)), 'no request was relayed to an owner');
  });

  test('a warm pull through every replica sends nothing upstream', async () => {
    const { image, ref } = await pushed('library/warm-cluster');
    const cold = await skopeoPull(ref, replicas[0]!);
    assert.ok(cold.ok, cold.detail);
    for (const replica of replicas) {
      rig.resetCounts();
      const warm = await skopeoPull(ref, replica);
      assert.ok(warm.ok, warm.detail);
      assert.equal(warm.digest, image.manifestDigest);
      // The /v2/ ping is always asked upstream (it is how a client learns the challenge); nothing else is.
      assert.equal(rig.count((r) => r.host === 'cdn' || (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob'))), 0, summary());
    }
  });

  test('with the registry and its token service down, a cached image pulls through every replica', async () => {
    const { image, ref } = await pushed('library/outage-cluster');
    assert.ok((await skopeoPull(ref, replicas[0]!)).ok);
    await rig.down();
    try {
      rig.resetCounts();
      for (const replica of replicas) {
        const pulled = await skopeoPull(ref, replica);
        assert.ok(pulled.ok, pulled.detail);
        assert.equal(pulled.digest, image.manifestDigest);
      }
      assert.equal(rig.count(), 0, summary());
    } finally {
      await rig.up();
    }
  });

  test('the registry-mirror front of every replica serves what the cluster holds, and sends nothing upstream', async () => {
    const { image, ref } = await pushed('library/mirror-cluster');
    assert.ok((await skopeoPull(ref, replicas[0]!)).ok);
    for (const replica of replicas) {
      // The client configuration the replica's own /setup/podman-mirror writes (registries.conf).
      const root = makeTempDir('cluster-mirror-setup');
      const destDir = makeTempDir('cluster-mirror-skopeo');
      try {
        const script = await (await fetch(`${replica.url}/setup/podman-mirror`)).text();
        const ran = spawnSync('bash', [], { input: script, env: { ...process.env, ROOT: root }, encoding: 'utf8' });
        assert.equal(ran.status, 0, ran.stderr);
        const registriesConf = readFileSync(join(root, 'etc/containers/registries.conf.d/pullthrough-mirror.conf'), 'utf8');
        rig.resetCounts();
        const result = await skopeoCopyThroughMirror({ image: ref, registriesConf, destDir, timeoutMs: 120_000 });
        assert.equal(result.code, 0, result.stderr);
        assert.equal((await verifyDirCopy(destDir)).manifestDigest, image.manifestDigest);
        assert.equal(rig.count((r) => r.host === 'cdn' || (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob'))), 0, summary());
      } finally {
        removeTempDir(root);
        removeTempDir(destDir);
      }
    }
  });

  test('private content cached through one replica is refused to an anonymous client on every other', async () => {
    const { image, ref } = await pushed('private/secret-cluster', 1);
    const owner = await skopeoPull(ref, replicas[0]!, PRIVATE_USER);
    assert.ok(owner.ok, owner.detail);
    assert.equal(owner.digest, image.manifestDigest);
    for (const replica of replicas) {
      const anonymous = await skopeoPull(ref, replica);
      assert.equal(anonymous.ok, false, 'an anonymous client pulled a private image');
    }
    const again = await skopeoPull(ref, replicas[2]!, PRIVATE_USER);
    assert.ok(again.ok, again.detail);
    // Nor does any replica hand its private blobs to another (only public copies go between replicas).
    for (const digest of [image.configDigest, ...image.layerDigests]) {
      for (let i = 0; i < REPLICAS; i++) assert.equal((await peerGet(i, `/peer-blob/${digest}`, { 'x-pullthrough-peer-secret': CLUSTER_SECRET })).status, 404, `${digest} from replica ${i}`);
    }
  });

  test('a public blob is handed to a peer whole, with the secret only', async () => {
    const { image, ref } = await pushed('library/copy-cluster', 1);
    assert.ok((await skopeoPull(ref, replicas[0]!)).ok);
    const digest = image.layerDigests[0]!;
    const answers = await Promise.all(replicas.map((_, i) => peerGet(i, `/peer-blob/${digest}`, { 'x-pullthrough-peer-secret': CLUSTER_SECRET })));
    const holders = answers.filter((a) => a.status === 200);
    assert.equal(holders.length, 1, 'the owner alone holds it');
    assert.equal(`sha256:${createHash('sha256').update(holders[0]!.body).digest('hex')}`, digest);
    for (let i = 0; i < REPLICAS; i++) assert.equal((await peerGet(i, `/peer-blob/${digest}`, {})).status, 403);
    assert.equal((await peerGet(0, '/peer-blob/sha256:../../etc/passwd', { 'x-pullthrough-peer-secret': CLUSTER_SECRET })).status, 404);
  });

  test('a tag pushed through one replica is pulled new through every other at once (every replica forgot its copy)', async () => {
    const first = await pushed('library/retag-cluster', 1);
    for (const replica of replicas) assert.equal((await skopeoPull(first.ref, replica)).digest, first.image.manifestDigest);
    const next = await buildOciImage(join(work, 'layout-retag-next'), { layers: [{ randomBytes: 64 * 1024 }], tag: '1.0' });
    // Through a replica that does not own the repository's manifests, so the owner learns of it from a peer.
    const pusher = replicas.find((r) => !r.access.some((e) => e.path.includes('retag-cluster') && e.type === 'manifest' && e.peer === undefined && e.cache === 'MISS'))!;
    const pushedThrough = await pushImageThroughProxy(next.layoutDir, '1.0', { image: first.ref, proxyUrl: pusher.url, caFile: pusher.caFile, credentials: PRIVATE_USER });
    assert.equal(pushedThrough.code, 0, pushedThrough.stderr);
    for (const replica of replicas) assert.equal((await skopeoPull(first.ref, replica)).digest, next.manifestDigest, 'a replica served the old manifest after the push');
  });

  test('a purge asked of one replica purges what every replica holds', async () => {
    const { image, ref } = await pushed('library/purge-cluster');
    assert.ok((await skopeoPull(ref, replicas[0]!)).ok);
    const response = await fetch(`${replicas[1]!.url}/admin/purge`, { method: 'POST', body: JSON.stringify({ registry: rig.hubHostPort, repository: 'library/purge-cluster' }) });
    assert.equal(response.status, 200);
    const purged = (await response.json()) as { blobs: number; manifests: number; unreachable?: string[] };
    assert.equal(purged.blobs, 1 + image.layerDigests.length, 'the config and every layer, wherever their owners are');
    assert.ok(purged.manifests >= 1);
    assert.equal(purged.unreachable, undefined);
    rig.resetCounts();
    const again = await skopeoPull(ref, replicas[2]!);
    assert.equal(again.digest, image.manifestDigest);
    for (const digest of [image.configDigest, ...image.layerDigests]) assert.equal(rig.count({ host: 'cdn', reference: digest }), 1, `${digest} was fetched again: ${summary()}`);
  });

  test('the metrics: each client request counted once, by the replica it reached; what owners served for peers beside it', async () => {
    const scrapes = await Promise.all(replicas.map((r) => scrape(r.url)));
    const total = (name: string, labels: Record<string, string> = {}) => scrapes.reduce((sum, one) => sum + one.sum(name, labels), 0);
    for (const one of scrapes) assert.equal(one.value('pullthrough_cluster_members', { state: 'known' }), REPLICAS);
    const relayed = total('pullthrough_cluster_peer_requests_total', { role: 'relayed' });
    assert.ok(relayed > 0);
    // Every relay has its owner's side (and nothing else is served for peers).
    assert.equal(total('pullthrough_cluster_peer_requests_total', { role: 'served' }), relayed);
    // Client requests: as many as the replicas' own access entries for blobs and manifests, owners' side not counted.
    const clientEntries = replicas.reduce((sum, r) => sum + r.access.filter((e) => (e.type === 'blob' || e.type === 'manifest') && !e.forPeer).length, 0);
    assert.equal(total('pullthrough_requests_total', { type: 'blob' }) + total('pullthrough_requests_total', { type: 'manifest' }), clientEntries);
  });

  test('the peer port refuses requests without the secret, and is no proxy', async () => {
    const ask = (path: string, headers: Record<string, string>) =>
      new Promise<number>((resolve, reject) => {
        const req = request({ host: replicaAddress(0), port: peerPort, path, headers, rejectUnauthorized: false }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on('error', reject);
        req.end();
      });
    const path = `/peer/${encodeURIComponent(rig.hubHostPort)}/v2/library/warm-cluster/manifests/1.0`;
    assert.equal(await ask(path, {}), 403);
    assert.equal(await ask(path, { 'x-pullthrough-peer-secret': 'wrong-secret-0123456789' }), 403);
    assert.equal(await ask(`/peer/${encodeURIComponent('example.com:443')}/v2/x/manifests/1`, { 'x-pullthrough-peer-secret': 'cluster-test-secret-0123456789' }), 404);
    assert.equal(await ask('/v2/', { 'x-pullthrough-peer-secret': 'cluster-test-secret-0123456789' }), 404);
  });
});
