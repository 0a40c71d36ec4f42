// The warm-up list in cluster mode: one replica runs it (its pulls fill every owner), the others pass,
// and each blob of the list is fetched upstream once for the whole cluster.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { clusterPolicy, freePeerPort, waitForMembers, sharedCaDir } from '../helpers/cluster.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

const REPLICAS = 3;

describe('cluster mode: the warm-up list', () => {
  let rig: HubRig;
  let work: string;
  let image: BuiltImage;
  const replicas: TestProxy[] = [];

  before(async () => {
    work = makeTempDir('cluster-warm');
    rig = await startHubRig({ k8s: false });
    image = await buildOciImage(join(work, 'layout'), { layers: [{ randomBytes: 100 * 1024 }, { randomBytes: 150 * 1024 }], tag: '1.0' });
    const ref = await rig.pushHub(image.layoutDir, '1.0', 'library/warmed');
    rig.resetCounts();
    const caDir = sharedCaDir(work);
    const peerPort = await freePeerPort(REPLICAS);
    const tls = `tls: { ca: ${rig.caFile} }`;
    for (let i = 0; i < REPLICAS; i++) {
      const { cluster, hostsEntry } = clusterPolicy(i, REPLICAS, peerPort);
      replicas.push(
        await startTestProxy(
          `caDir: ${caDir}\n${cluster}warm:\n  delay: 3s\n  images: [${ref}]\nregistries:\n  ${rig.hubHostPort}:\n    ${tls}\n  ${rig.endpoints.auth.hostPort}:\n    ${tls}\nhosts:\n${rig.hostsYaml()}${hostsEntry}`,
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

  test('one replica warms, the others pass, and each blob is fetched upstream once', async () => {
    const said = (replica: TestProxy, message: string) => replica.lines.some((line) => line.includes(`"message":"${message}`));
    for (let waited = 0; waited < 30_000 && !replicas.some((r) => said(r, 'warm-up: run finished')); waited += 100) await sleep(100);
    await sleep(500);
    const warmed = replicas.filter((r) => said(r, 'warm-up: run finished'));
    const passed = replicas.filter((r) => said(r, 'warm-up: another replica of the cluster runs it'));
    assert.equal(warmed.length, 1, 'exactly one replica ran the warm-up');
    assert.equal(passed.length, REPLICAS - 1);
    for (const digest of [image.configDigest, ...image.layerDigests]) assert.equal(rig.count({ host: 'cdn', reference: digest }), 1, rig.describeRequests((r) => r.host !== 'auth'));
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', status: 200 }), 1, rig.describeRequests((r) => r.host !== 'auth'));
  });
});
