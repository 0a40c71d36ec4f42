// End to end with the container clients users actually run: podman (daemonless, rootful) and
// containerd's ctr, each pulling from a real registry through the proxy with HTTPS_PROXY and trusting
// only the proxy's CA. Each client pulls its own image (no blob shared with the other client), so the
// registry's counts are the client's own whether or not the proxy caches.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { ctrUnavailable, startContainerd } from '../helpers/ctr.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { podmanPullThroughProxy, podmanUnavailable } from '../helpers/podman.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle, type ServedRequest } from '../helpers/registry.ts';
import { pushImage } from '../helpers/skopeo.ts';

const podmanSkip = podmanUnavailable();
const ctrSkip = ctrUnavailable();

describe('pulling through the proxy with podman and ctr', { skip: podmanSkip && ctrSkip ? `${podmanSkip}; ${ctrSkip}` : false }, () => {
  let ca: TestCa;
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let work: string;

  before(async () => {
    ca = createTestCa('pullthrough clients upstream CA');
    work = makeTempDir('e2e-clients');
    registry = await startRegistry({ host: 'registry.test', ca });
    const caFile = writePem(work, 'upstream-ca.pem', ca.certPem);
    // The client never resolves registry.test (Go would not proxy a loopback address): the proxy does.
    proxy = await startTestProxy(`
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
hosts:
  registry.test: 127.0.0.1
`);
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  /** Two small layers (~1 MiB), pushed as registry.test:PORT/clients/<client>:v1. */
  async function pushClientImage(client: string): Promise<{ image: BuiltImage; repository: string; ref: string }> {
    const repository = `clients/${client}`;
    const image = await buildOciImage(join(work, `layout-${client}`), {
      layers: [{ files: { 'etc/motd': `pulled by ${client} through pullthrough\n` } }, { randomBytes: 1024 * 1024 }],
      tag: 'v1',
      labels: { client },
    });
    await pushImage(image.layoutDir, 'v1', registry, { repository });
    return { image, repository, ref: `${registry.hostPort}/${repository}:v1` };
  }

  /** Asserts one upstream GET of every blob and returns the request summary for the report. */
  async function assertBlobsFetched(t: TestContext, repository: string, image: BuiltImage): Promise<void> {
    await registry.settle();
    const served = registry.requests().filter((r) => r.repository === repository || r.kind === 'base');
    t.diagnostic(`registry saw: ${summarize(served)}`);
    for (const digest of [image.configDigest, ...image.layerDigests]) {
      assert.equal(registry.count({ method: 'GET', kind: 'blob', repository, reference: digest, status: 200 }), 1, `one upstream GET of ${digest}`);
    }
    assert.ok(
      registry.count((r) => r.repository === repository && r.kind === 'manifest' && r.method === 'GET' && r.status === 200) >= 1,
      'the manifest was fetched',
    );
    assert.ok(
      proxy.access.some((e) => e.host === registry.hostPort && e.path.startsWith(`/v2/${repository}/blobs/`)),
      'the blobs went through the proxy',
    );
  }

  test('podman pulls through the proxy and stores the registry\'s digests', { skip: podmanSkip ?? false }, async (t) => {
    const { image, repository, ref } = await pushClientImage('podman');
    registry.resetCounts();
    const result = await podmanPullThroughProxy({ image: ref, proxyUrl: proxy.url, caFile: proxy.caFile });
    assert.equal(result.code, 0, `podman pull failed${result.timedOut ? ' (timed out)' : ''}:\n${result.stderr}`);
    const pulled = result.image;
    assert.ok(pulled);
    assert.equal(pulled.digest, image.manifestDigest);
    assert.deepEqual(pulled.repoDigests, [`${registry.hostPort}/${repository}@${image.manifestDigest}`]);
    assert.equal(`sha256:${pulled.id}`, image.configDigest, 'the image ID is the config digest');
    // Uncompressed layers: the diff IDs podman reports are the layer digests.
    assert.deepEqual(pulled.layers, image.layerDigests);
    assert.equal(pulled.manifestType, 'application/vnd.oci.image.manifest.v1+json');
    await assertBlobsFetched(t, repository, image);
  });

  test('ctr pulls through the proxy and stores the registry\'s digests', { skip: ctrSkip ?? false }, async (t) => {
    const { image, repository, ref } = await pushClientImage('ctr');
    const containerd = await startContainerd();
    try {
      registry.resetCounts();
      const result = await containerd.pull({ image: ref, proxyUrl: proxy.url, caFile: proxy.caFile });
      assert.equal(result.code, 0, `ctr images pull failed${result.timedOut ? ' (timed out)' : ''}:\n${result.stderr}\n${result.stdout.slice(-2000)}`);

      const images = await containerd.images();
      assert.deepEqual(images, [{ ref, type: 'application/vnd.oci.image.manifest.v1+json', digest: image.manifestDigest }]);
      const content = await containerd.content();
      assert.deepEqual(
        content.map((c) => c.digest).sort(),
        [image.manifestDigest, image.configDigest, ...image.layerDigests].sort(),
        'the content store holds exactly the manifest, the config and the layers',
      );
      // The manifest's GC labels name the config and the layers, in order, as ctr read them.
      const manifest = content.find((c) => c.digest === image.manifestDigest);
      assert.equal(manifest?.labels['containerd.io/gc.ref.content.config'], image.configDigest);
      assert.deepEqual(
        image.layerDigests.map((_, i) => manifest?.labels[`containerd.io/gc.ref.content.l.${i}`]),
        image.layerDigests,
      );
      await assertBlobsFetched(t, repository, image);
    } finally {
      await containerd.stop();
    }
  });
});

/** 'GET /v2/ ×1, HEAD manifest v1 ×1, GET blob ×3' in first-seen order. */
function summarize(served: ServedRequest[]): string {
  const counts = new Map<string, number>();
  for (const r of served) {
    const what =
      r.kind === 'base' ? `${r.method} /v2/` :
      r.kind === 'manifest' ? `${r.method} manifest ${r.reference?.startsWith('sha256:') ? 'by digest' : r.reference} ${r.status}` :
      r.kind === 'blob' ? `${r.method} blob ${r.status}` :
      `${r.method} ${r.path} ${r.status}`;
    counts.set(what, (counts.get(what) ?? 0) + 1);
  }
  return [...counts].map(([what, n]) => `${what} ×${n}`).join(', ') || 'nothing';
}
