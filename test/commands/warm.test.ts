// `pullthrough warm` against a running proxy and a real registry: after it, a skopeo pull of the same
// image makes zero upstream blob requests; a registry the proxy does not intercept is named as such
// before anything is pulled.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { warm } from '../../src/commands/warm.ts';
import { parseImageReference } from '../../src/commands/image-reference.ts';
import { buildMultiArchIndex, type Architecture, type BuiltIndex } from '../helpers/oci-image.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { envWithoutProxies, makeTempDir, removeTempDir, run } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

describe('pullthrough warm', () => {
  let registry: RegistryHandle;
  let proxy: TestProxy;
  let index: BuiltIndex;
  /** amd64, arm64 and s390x. */
  let three: BuiltIndex;
  let work: string;

  before(async () => {
    const ca = createTestCa('warm test CA');
    work = makeTempDir('warm');
    registry = await startRegistry({ host: 'registry.test', ca });
    index = await buildMultiArchIndex(join(work, 'layout'), { layers: [{ randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(index.layoutDir, 'v1', registry, { repository: 'warm/app', all: true });
    // A third platform the helper has no name for: its descriptor says linux/s390x all the same.
    three = await buildMultiArchIndex(join(work, 'three'), { layers: [{ randomBytes: 256 * 1024 }], architectures: ['amd64', 'arm64', 's390x' as Architecture], tag: 'v1' });
    await pushImage(three.layoutDir, 'v1', registry, { repository: 'warm/three', all: true });
    proxy = await startTestProxy(`registries:\n  ${registry.hostPort}:\n    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }\nhosts:\n  registry.test: 127.0.0.1\n`);
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  test('warms one platform, then a pull of it needs no upstream blob request', async () => {
    const lines: string[] = [];
    const [summary] = await warm([`${registry.hostPort}/warm/app:v1`], { proxyUrl: proxy.url, platforms: ['linux/amd64'], progress: false, out: (l) => lines.push(l) });
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

  test('--platform linux/amd64,linux/arm64 on a 3-platform index fetches exactly those two, not the third', async () => {
    const [amd64, arm64, s390x] = three.images;
    const blobsOf = (img: typeof amd64) => [img!.configDigest, ...img!.layerDigests];
    registry.resetCounts();
    const cli = (...args: string[]) => run(process.execPath, [join(import.meta.dirname, '../../src/cli.ts'), 'warm', `${registry.hostPort}/warm/three:v1`, '--proxy', proxy.url, ...args], { env: envWithoutProxies(), timeoutMs: 120_000 });
    const two = new Set([...blobsOf(amd64), ...blobsOf(arm64)]).size;
    const first = await cli('--platform', 'linux/amd64,linux/arm64');
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, new RegExp(`warm/three:v1: 3 manifests, ${two} blobs, .* \\(${two} MISS\\)`));
    await registry.settle();
    const served = registry.requests().filter((r) => r.repository === 'warm/three');
    const manifests = served.filter((r) => r.kind === 'manifest' && r.method === 'GET').map((r) => r.reference).sort();
    assert.deepEqual(manifests, ['v1', amd64!.manifestDigest, arm64!.manifestDigest].sort(), JSON.stringify(served));
    const blobs = served.filter((r) => r.kind === 'blob' && r.method === 'GET').map((r) => r.reference).sort();
    assert.deepEqual(blobs, [...blobsOf(amd64), ...blobsOf(arm64)].sort(), 'each blob of the two platforms, once');
    for (const digest of [s390x!.manifestDigest, ...blobsOf(s390x)]) assert.ok(!served.some((r) => r.reference === digest), `nothing of linux/s390x: ${digest}`);

    // The option repeated means the same; the two platforms are cached now.
    registry.resetCounts();
    const again = await cli('--platform', 'linux/amd64', '--platform', 'linux/arm64');
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, new RegExp(`3 manifests, ${two} blobs, .* \\(${two} HIT\\)`));
    await registry.settle();
    assert.equal(registry.count({ kind: 'blob' }), 0);

    // A platform the index lacks is said; one that is not a platform is a usage error.
    const partial = await warm([{ image: `${registry.hostPort}/warm/three:v1`, platforms: ['linux/arm64', 'windows/amd64'] }], { proxyUrl: proxy.url, progress: false, out: () => {} });
    assert.deepEqual(partial[0]!.platforms, ['linux/arm64/v8']);
    assert.deepEqual(partial[0]!.missing, ['windows/amd64']);
    const wrong = await cli('--platform', 'linux');
    assert.equal(wrong.code, 2);
    assert.match(wrong.stderr, /--platform: "linux" is not a platform: expected os\/arch/);
  });

  test('with failed: a failing image is reported and the others go on', async () => {
    const failed: string[] = [];
    const summaries = await warm([`${registry.hostPort}/warm/nothing:v1`, `${registry.hostPort}/warm/app:v1`, 'registry.test:1/warm/app:v1'], {
      proxyUrl: proxy.url,
      progress: false,
      out: () => {},
      failed: (image, err) => failed.push(`${image} ${err.message}`),
    });
    assert.deepEqual(summaries.map((s) => s.image), [`${registry.hostPort}/warm/app:v1`]);
    assert.equal(failed.length, 2);
    assert.match(failed[0]!, /warm\/nothing:v1 .*404/);
    assert.match(failed[1]!, /^registry\.test:1\/warm\/app:v1 registry\.test:1 is not intercepted/);
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
