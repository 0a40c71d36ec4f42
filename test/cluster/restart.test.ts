// A replica is known by the id in its data directory, not by its address: a pod recreated with a new IP
// but its volume owns the keys it owned before and finds them in its cache, so a restart sends nothing
// upstream again.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
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
    // Enough blobs that each replica owns some.
    const image = await buildOciImage(join(work, 'layout'), { layers: Array.from({ length: 8 }, () => ({ randomBytes: 64 * 1024 })), tag: '1.0' });
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
});
