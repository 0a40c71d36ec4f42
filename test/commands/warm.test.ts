// `pullthrough warm` against a running proxy and a real registry: after it, a skopeo pull of the same
// image makes zero upstream blob requests; a registry the proxy does not intercept is named as such
// before anything is pulled.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { warm } from '../../src/commands/warm.ts';
import { parseImageReference } from '../../src/commands/image-reference.ts';
import { buildMultiArchIndex, type BuiltIndex } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { envWithoutProxies, makeTempDir, removeTempDir, run } from '../helpers/process.ts';
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

  test('a registry the proxy refuses to tunnel: named as not intercepted, with the proxy\'s reason and what to do', async () => {
    // Port 1 is no registry of this policy, and tunnel.allow ("*:443") does not take it either.
    const image = `registry.test:1/warm/app:v1`;
    const before = proxy.access.length;
    await assert.rejects(
      warm([`${registry.hostPort}/warm/app:v1`, image], { proxyUrl: proxy.url, progress: false, out: () => {} }),
      (err: Error) => {
        assert.match(err.message, /^registry\.test:1 is not intercepted by the proxy at http:\/\/127\.0\.0\.1:\d+: it answers CONNECT with 403 \(.*tunnel\.allow.*\)/);
        assert.match(err.message, /Add it under registries: in the proxy's proxy\.yaml/);
        return true;
      },
    );
    // Every registry is checked before the first image is pulled.
    assert.deepEqual(proxy.access.slice(before).filter((e) => e.type === 'manifest' || e.type === 'blob'), []);

    const cli = await run(process.execPath, [join(import.meta.dirname, '../../src/cli.ts'), 'warm', image, '--proxy', proxy.url], { env: envWithoutProxies(), timeoutMs: 60_000 });
    assert.equal(cli.code, 1, cli.stderr);
    assert.match(cli.stderr, /^pullthrough warm: registry\.test:1 is not intercepted by the proxy/);
  });

  test('a registry the proxy tunnels: named as not intercepted, with whose certificate came back', async () => {
    // A proxy that intercepts nothing and tunnels to the registry: warm would pull past its cache.
    const tunnelling = await startTestProxy(`tunnel:\n  allow: ["${registry.hostPort}"]\nhosts:\n  registry.test: 127.0.0.1\n`);
    try {
      await assert.rejects(
        warm([`${registry.hostPort}/warm/app:v1`], { proxyUrl: tunnelling.url, progress: false, out: () => {} }),
        (err: Error) => {
          const expected = `${registry.hostPort} is not intercepted by the proxy at ${tunnelling.url}: the proxy tunnels it untouched (its certificate is issued by CN=warm test CA`;
          assert.ok(err.message.startsWith(expected), err.message);
          assert.match(err.message, /not by the proxy's CA\), so a pull through it caches nothing\. Add it under registries:/);
          return true;
        },
      );
      // The tunnel is logged when it closes.
      for (let i = 0; i < 100 && !tunnelling.access.some((e) => e.cache === 'TUNNEL'); i++) await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(tunnelling.access.filter((e) => e.cache === 'TUNNEL').length, 1, 'one tunnel, for the check');
      assert.ok(!tunnelling.access.some((e) => e.type === 'manifest' || e.type === 'blob'), 'nothing pulled');
    } finally {
      await tunnelling.close();
    }
  });

  test('image references are read like docker reads them', () => {
    assert.deepEqual(parseImageReference('alpine'), { registry: 'registry-1.docker.io', repository: 'library/alpine', reference: 'latest' });
    assert.deepEqual(parseImageReference('docker.io/bitnami/redis:7.2'), { registry: 'registry-1.docker.io', repository: 'bitnami/redis', reference: '7.2' });
    assert.deepEqual(parseImageReference('registry.test:5443/team/app@sha256:' + 'a'.repeat(64)), { registry: 'registry.test:5443', repository: 'team/app', reference: 'sha256:' + 'a'.repeat(64) });
    assert.throws(() => parseImageReference('Bad/Name'), /not an image reference/);
  });
});
