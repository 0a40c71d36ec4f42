// `pullthrough warm` against a running proxy and a real registry: after it, a skopeo pull of the same
// image makes zero upstream blob requests.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { warm } from '../../src/commands/warm.ts';
import { parseImageReference } from '../../src/commands/image-reference.ts';
import { buildMultiArchIndex, type BuiltIndex } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

describe('pullthrough warm', () => {
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let index: BuiltIndex;
  let work: string;

  before(async () => {
    const ca = createTestCa('warm test CA');
    work = makeTempDir('warm');
    registry = await startRegistry({ host: 'registry.test', ca });
    index = await buildMultiArchIndex(join(work, 'layout'), { layers: [{ randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(index.layoutDir, 'v1', registry, { repository: 'warm/app', all: true });
    proxy = await startTestProxy(`registries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  test('warms one platform, then a pull of it needs no upstream blob request', async () => {
    const lines: string[] = [];
    const [summary] = await warm([`${registry.hostPort}/warm/app:v1`], { proxyUrl: proxy.url, platform: 'linux/amd64', progress: false, out: (l) => lines.push(l) });
    const amd64 = index.images.find((i) => i.architecture === 'amd64')!;
    assert.equal(summary!.manifests, 2, 'the index and the amd64 manifest');
    assert.equal(summary!.blobs, 1 + amd64.layerDigests.length);
    assert.deepEqual(summary!.cache, { MISS: summary!.blobs });
    assert.match(lines[0]!, /warm\/app:v1: 2 manifests, \d+ blobs/);

    registry.resetCounts();
    const dest = join(work, 'pulled');
    const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/warm/app:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest, architecture: 'amd64' });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(dest)).manifestDigest, amd64.manifestDigest, "skopeo keeps the chosen platform's manifest");
    await registry.settle();
    assert.equal(registry.count({ kind: 'blob' }), 0, JSON.stringify(registry.requests()));
  });

  test('warms every platform when none is named; a second warm is all HITs', async () => {
    const [first] = await warm([`${registry.hostPort}/warm/app:v1`], { proxyUrl: proxy.url, progress: false, out: () => {} });
    assert.equal(first!.manifests, 3);
    const [second] = await warm([`${registry.hostPort}/warm/app:v1`], { proxyUrl: proxy.url, progress: false, out: () => {} });
    assert.deepEqual(second!.cache, { HIT: second!.blobs });
  });

  test('a wrong image or a proxy that is not there is a clear error', async () => {
    await assert.rejects(warm([`${registry.hostPort}/warm/nothing:v1`], { proxyUrl: proxy.url, progress: false, out: () => {} }), /404/);
    await assert.rejects(warm(['alpine'], { proxyUrl: 'http://127.0.0.1:1', progress: false, out: () => {} }), /ECONNREFUSED|connect/);
  });

  test('image references are read like docker reads them', () => {
    assert.deepEqual(parseImageReference('alpine'), { registry: 'registry-1.docker.io', repository: 'library/alpine', reference: 'latest' });
    assert.deepEqual(parseImageReference('docker.io/bitnami/redis:7.2'), { registry: 'registry-1.docker.io', repository: 'bitnami/redis', reference: '7.2' });
    assert.deepEqual(parseImageReference('registry.test:5443/team/app@sha256:' + 'a'.repeat(64)), { registry: 'registry.test:5443', repository: 'team/app', reference: 'sha256:' + 'a'.repeat(64) });
    assert.throws(() => parseImageReference('Bad/Name'), /not an image reference/);
  });
});
