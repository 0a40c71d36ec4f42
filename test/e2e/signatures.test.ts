// Signatures through the cache with a real registry (distribution 2.8, which has no referrers API):
// cosign's tag schema — a signature manifest pushed under sha256-<hex of the image>.sig — is pulled
// through the proxy like any tag and cached like one; the referrers API's 404 is passed on, so clients
// fall back to that schema. Counts are the registry's own.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { buildOciImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

describe("signatures in cosign's tag schema, through the cache", () => {
  let ca: TestCa;
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let work: string;

  before(async () => {
    ca = createTestCa('signatures upstream CA');
    work = makeTempDir('e2e-signatures');
    registry = await startRegistry({ host: 'registry.test', ca });
    proxy = await startTestProxy(`
registries:
  ${registry.hostPort}:
    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }
hosts:
  registry.test: 127.0.0.1
`);
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  test('a signature pushed as sha256-<hex>.sig is pulled through the proxy once, then from the cache; the referrers API 404 is passed on', async () => {
    const image = await buildOciImage(join(work, 'image'), { layers: [{ files: { 'etc/app': 'signed app\n' } }], tag: '1.0' });
    await pushImage(image.layoutDir, '1.0', registry, { repository: 'lib/signed' });
    const signatureTag = `sha256-${image.manifestDigest.slice('sha256:'.length)}.sig`;
    const payload = JSON.stringify({ critical: { image: { 'docker-manifest-digest': image.manifestDigest }, type: 'cosign container image signature' } });
    const signature = await buildOciImage(join(work, 'signature'), { layers: [{ files: { 'payload.json': payload } }], tag: signatureTag, labels: { signs: image.manifestDigest } });
    await pushImage(signature.layoutDir, signatureTag, registry, { repository: 'lib/signed' });

    registry.resetCounts();
    for (const round of [1, 2]) {
      const destDir = makeTempDir(`signature-${round}`);
      try {
        const pulled = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/lib/signed:${signatureTag}`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir });
        assert.equal(pulled.code, 0, pulled.stderr);
        assert.equal((await verifyDirCopy(destDir)).manifestDigest, signature.manifestDigest, `round ${round}`);
      } finally {
        removeTempDir(destDir);
      }
    }
    await registry.settle();
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', reference: signatureTag }), 1, 'the signature tag was fetched once');
    for (const digest of signature.layerDigests) assert.equal(registry.count({ method: 'GET', kind: 'blob', reference: digest }), 1);
    const tagEntries = proxy.access.filter((e) => e.path === `/v2/lib/signed/manifests/${signatureTag}`);
    assert.deepEqual(tagEntries.map((e) => e.cache), ['MISS', 'HIT']);

    const socket = await tlsThroughProxy(proxy.port, 'registry.test', registry.port, proxy.caPem);
    const referrers = await httpOverSocket(socket, 'GET', `/v2/lib/signed/referrers/${image.manifestDigest}`, registry.hostPort, { Accept: 'application/vnd.oci.image.index.v1+json' });
    assert.equal(referrers.status, 404, 'distribution 2.8 has no referrers API: the client falls back to the tag schema');
  });
});
