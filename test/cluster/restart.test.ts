// A replica is known by the id in its data directory, not by its address: a pod recreated with a new IP
// but its volume owns the keys it owned before and finds them in its cache, so a restart sends nothing
// upstream again.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { blobKey, rankFor } from '../../src/cluster/rendezvous.ts';
import { clusterPolicy, freePeerPort, sharedCaDir, waitForMembers } from '../helpers/cluster.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

const REPLICAS = 3;

describe('cluster mode: a replica restarted at another address', () => {
  let rig: HubRig;
  let work: string;
  let caDir: string;
  let peerPort: number;
  const replicas: TestProxy[] = [];

  /** Replica `slot` (its data directory) at peer address index `at`. */
  const start = (slot: number, at: number) => {
    const { cluster, hostsEntry } = clusterPolicy(at, REPLICAS, peerPort, { peerAddresses: REPLICAS + 1 });
    const tls = `tls: { ca: ${rig.caFile} }`;
    const dataDir = join(work, `data-${slot}`);
    mkdirSync(dataDir, { recursive: true });
    return startTestProxy(`caDir: ${caDir}\n${cluster}registries:\n  ${rig.hubHostPort}:\n    ${tls}\n  ${rig.endpoints.auth.hostPort}:\n    ${tls}\nhosts:\n${rig.hostsYaml()}${hostsEntry}`, {}, dataDir);
  };

  before(async () => {
    work = makeTempDir('cluster-restart');
    rig = await startHubRig({ k8s: false });
    caDir = sharedCaDir(work);
    peerPort = await freePeerPort(REPLICAS + 1);
    for (let i = 0; i < REPLICAS; i++) replicas.push(await start(i, i));
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);
  });

  after(async () => {
    await Promise.all(replicas.map((r) => r.close()));
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  /**
   * An image of 8 random 64 KiB layers of which replica `slot` owns at least one blob. Blob keys and
   * replica ids are random: with 3 replicas, one owns none of 9 blobs in ~2.6 % of images, so an image
   * that misses is made again rather than failing the test by chance.
   */
  const imageOwnedInPartBy = async (slot: number, name: string) => {
    const ids = replicas.map((r) => readFileSync(join(r.dataDir, 'cluster-id'), 'utf8').trim());
    for (let attempt = 0; ; attempt++) {
      const image = await buildOciImage(join(work, `${name}-${attempt}`), { layers: Array.from({ length: 8 }, () => ({ randomBytes: 64 * 1024 })), tag: '1.0' });
      const blobs = [image.configDigest, ...image.layerDigests];
      const owned = blobs.filter((digest) => rankFor(blobKey(digest), ids)[0] === ids[slot]);
      if (owned.length > 0) return { image, blobs, owned };
      assert.ok(attempt < 10, `replica ${slot} owns no blob of 10 images in a row`);
    }
  };

  const pull = async (ref: string, through: TestProxy) => {
    const destDir = makeTempDir('cluster-restart-skopeo');
    try {
      const result = await skopeoCopyThroughProxy({ image: ref, proxyUrl: through.url, caFile: through.caFile, destDir, timeoutMs: 120_000 });
      assert.equal(result.code, 0, result.stderr);
      return (await verifyDirCopy(destDir)).manifestDigest;
    } finally {
      removeTempDir(destDir);
    }
  };

  test('its keys stay its own: after the restart a pull through every replica sends nothing upstream', async () => {
    const { image } = await imageOwnedInPartBy(2, 'layout');
    const ref = await rig.pushHub(image.layoutDir, '1.0', 'library/restarted');
    assert.equal(await pull(ref, replicas[0]!), image.manifestDigest);
    const servedBy2 = replicas.flatMap((r) => r.access).filter((e) => e.forPeer && e.type === 'blob').length + replicas[2]!.access.filter((e) => e.type === 'blob' && !e.peer).length;
    assert.ok(servedBy2 > 0, 'some blobs are owned by the replica that restarts');

    await replicas[2]!.close();
    replicas[2] = await start(2, REPLICAS); // same data directory, the spare address
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);

    rig.resetCounts();
    for (const replica of replicas) assert.equal(await pull(ref, replica), image.manifestDigest);
    const upstream = rig.count((r) => r.host === 'cdn' || (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob')));
    assert.equal(upstream, 0, rig.describeRequests((r) => r.host !== 'auth'));
  });

  test('what the others fetched while it was away, it copies from them when it is back: still one upstream fetch per blob', async () => {
    const { image, blobs, owned: ownedBy1 } = await imageOwnedInPartBy(1, 'layout-away');
    const ref = await rig.pushHub(image.layoutDir, '1.0', 'library/while-away');

    await replicas[1]!.close();
    rig.resetCounts();
    assert.equal(await pull(ref, replicas[0]!), image.manifestDigest);
    for (const digest of blobs) assert.equal(rig.count({ host: 'cdn', reference: digest }), 1);

    replicas[1] = await start(1, 1);
    await waitForMembers(replicas.map((r) => r.url), REPLICAS);
    rig.resetCounts();
    for (const replica of replicas) assert.equal(await pull(ref, replica), image.manifestDigest);
    assert.equal(rig.count((r) => r.host === 'cdn'), 0, rig.describeRequests((r) => r.host !== 'auth'));
    // Replica 1 holds its blobs again, copied from the replicas that stood in.
    const held = (replica: TestProxy, digest: string) => existsSync(join(replica.dataDir, 'blobs', 'sha256', digest.slice(7, 9), digest.slice(7)));
    for (const digest of ownedBy1) assert.ok(held(replicas[1]!, digest), `${digest} is back on its owner`);
    // A replica that stood in serves its copies itself rather than relaying them from the owner.
    let servedHere = 0;
    for (const replica of [replicas[0]!, replicas[2]!]) {
      for (const digest of ownedBy1.filter((d) => held(replica, d))) {
        const last = replica.access.filter((e) => e.type === 'blob' && e.path.endsWith(digest) && !e.forPeer).at(-1);
        assert.equal(last?.peer, undefined, `${digest} was relayed although the replica holds it`);
        servedHere++;
      }
    }
    assert.ok(servedHere > 0, 'some blob was held by a replica that stood in');
  });
});
