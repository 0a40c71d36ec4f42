// Self-test of the end-to-end harness: a real registry, real images, real skopeo, no proxy under test.
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { buildMultiArchIndex, buildOciImage, digestBytes, type BuiltImage } from './oci-image.ts';
import { createTestCa, writePem, type TestCa } from './pki.ts';
import { makeTempDir, removeTempDir } from './process.ts';
import { parseAccessLogLine, startRegistry, type RegistryHandle } from './registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from './skopeo.ts';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

describe('e2e harness', () => {
  let ca: TestCa;
  let registry: RegistryHandle;
  let image: BuiltImage;
  let workDir: string;

  before(async () => {
    ca = createTestCa('pullthrough harness test CA');
    registry = await startRegistry({ host: 'registry.test', ca });
    workDir = makeTempDir('harness');
    image = await buildOciImage(join(workDir, 'layout'), {
      layers: [{ files: { 'etc/motd': 'hello from a test layer\n' } }, { randomBytes: 5 * 1024 * 1024 }],
      tag: 'v1',
    });
    await pushImage(image.layoutDir, 'v1', registry, { repository: 'harness/app' });
  });

  after(async () => {
    await registry?.stop();
    if (workDir) removeTempDir(workDir);
  });

  test('the pushed image is served with the digests the layout has', async () => {
    registry.resetCounts();
    const manifest = await registry.fetch('/v2/harness/app/manifests/v1', { headers: { accept: OCI_MANIFEST } });
    assert.equal(manifest.status, 200);
    assert.equal(manifest.headers['docker-content-digest'], image.manifestDigest);
    assert.equal(digestBytes(manifest.body), image.manifestDigest);
    const parsed = JSON.parse(manifest.body.toString('utf8')) as { layers: Array<{ digest: string; mediaType: string }> };
    assert.deepEqual(parsed.layers.map((l) => l.digest), image.layerDigests);
    assert.ok(parsed.layers.every((l) => l.mediaType === 'application/vnd.oci.image.layer.v1.tar'));

    const bigLayer = image.layerDigests[1] ?? assert.fail('image has no second layer');
    const blob = await registry.fetch(`/v2/harness/app/blobs/${bigLayer}`);
    assert.equal(blob.status, 200);
    assert.equal(digestBytes(blob.body), bigLayer);
    assert.equal(blob.body.length, image.blobs.get(bigLayer));
    assert.ok(blob.body.length > 5 * 1024 * 1024, 'the layer is a tar holding the 5 MiB file');

    await registry.settle();
    assert.equal(registry.count({ method: 'GET', kind: 'manifest', repository: 'harness/app', reference: 'v1' }), 1);
    assert.equal(registry.count({ method: 'GET', kind: 'blob', reference: bigLayer }), 1);
    assert.equal(registry.count(), 2, `unexpected requests: ${JSON.stringify(registry.requests())}`);
  });

  test('skopeo pulls through a CONNECT proxy, trusting only the given CA', async () => {
    const proxy = await startTunnelProxy(registry);
    try {
      const caFile = writePem(workDir, 'registry-ca.pem', ca.certPem);
      const destDir = join(workDir, 'pulled');
      registry.resetCounts();
      const result = await skopeoCopyThroughProxy({
        image: `${registry.hostPort}/harness/app:v1`,
        proxyUrl: proxy.url,
        caFile,
        destDir,
        timeoutMs: 60_000,
      });
      assert.equal(result.code, 0, result.stderr);
      assert.deepEqual([...new Set(proxy.targets)], [registry.hostPort], 'skopeo connected through the proxy');

      const copy = await verifyDirCopy(destDir);
      assert.equal(copy.manifestDigest, image.manifestDigest);
      assert.deepEqual(copy.blobDigests, [image.configDigest, ...image.layerDigests].sort());

      await registry.settle();
      assert.equal(registry.count({ method: 'GET', kind: 'blob' }), 3, 'two layers and the config');
      assert.ok(registry.requests().every((r) => r.userAgent.startsWith('skopeo/')));

      const otherCa = createTestCa('a CA the registry does not use');
      const refused = await skopeoCopyThroughProxy({
        image: `${registry.hostPort}/harness/app:v1`,
        proxyUrl: proxy.url,
        caFile: writePem(workDir, 'other-ca.pem', otherCa.certPem),
        destDir: join(workDir, 'refused'),
        timeoutMs: 60_000,
      });
      assert.notEqual(refused.code, 0);
      assert.match(refused.stderr, /x509|certificate/);
    } finally {
      await proxy.close();
    }
  });

  test('a multi-arch index is pushed with all platforms', async () => {
    const built = await buildMultiArchIndex(join(workDir, 'multi'), { layers: [{ files: { 'bin/tool': 'tool\n' } }], tag: 'multi' });
    await pushImage(built.layoutDir, 'multi', registry, { repository: 'harness/multi', all: true });
    const index = await registry.fetch('/v2/harness/multi/manifests/multi', { headers: { accept: OCI_INDEX } });
    assert.equal(index.status, 200);
    assert.equal(index.headers['docker-content-digest'], built.indexDigest);
    const parsed = JSON.parse(index.body.toString('utf8')) as { manifests: Array<{ digest: string; platform: { architecture: string } }> };
    assert.deepEqual(parsed.manifests.map((m) => m.platform.architecture), ['amd64', 'arm64']);
    const [amd64, arm64] = built.images;
    assert.notEqual(amd64?.layerDigests[0], arm64?.layerDigests[0], 'platforms have different layers');
    for (const m of parsed.manifests) {
      const res = await registry.fetch(`/v2/harness/multi/manifests/${m.digest}`, { method: 'HEAD', headers: { accept: OCI_MANIFEST } });
      assert.equal(res.status, 200);
    }

    const proxy = await startTunnelProxy(registry);
    try {
      const destDir = join(workDir, 'pulled-multi');
      const result = await skopeoCopyThroughProxy({
        image: `${registry.hostPort}/harness/multi:multi`,
        proxyUrl: proxy.url,
        caFile: writePem(workDir, 'registry-ca.pem', ca.certPem),
        destDir,
        all: true,
      });
      assert.equal(result.code, 0, result.stderr);
      const copy = await verifyDirCopy(destDir);
      assert.equal(copy.manifestDigest, built.indexDigest);
      assert.deepEqual(copy.instanceManifestDigests, built.images.map((i) => i.manifestDigest).sort());
    } finally {
      await proxy.close();
    }
  });

  test('htpasswd registries demand and accept Basic credentials', async () => {
    const locked = await startRegistry({ host: 'private.test', ca, htpasswd: { username: 'alice', password: 's3cret' } });
    try {
      await pushImage(image.layoutDir, 'v1', locked, { repository: 'team/app' });
      const anonymous = await locked.fetch('/v2/team/app/manifests/v1', { auth: false, headers: { accept: OCI_MANIFEST } });
      assert.equal(anonymous.status, 401);
      assert.match(String(anonymous.headers['www-authenticate']), /^Basic realm=/);
      const authed = await locked.fetch('/v2/team/app/manifests/v1', { headers: { accept: OCI_MANIFEST } });
      assert.equal(authed.status, 200);
      assert.equal(authed.headers['docker-content-digest'], image.manifestDigest);
      await locked.settle();
      assert.equal(locked.count({ kind: 'manifest', method: 'GET', status: 401 }), 1, '401s are in the access log too');
    } finally {
      await locked.stop();
    }
  });

  test('access log lines are parsed into requests', () => {
    const line =
      '127.0.0.1 - - [23/Nov/2026:08:21:31 +0000] "HEAD /v2/library/my/app/blobs/sha256:abc HTTP/1.1" 404 157 "" "skopeo/1.9.3"';
    assert.deepEqual(parseAccessLogLine(line), {
      method: 'HEAD',
      path: '/v2/library/my/app/blobs/sha256:abc',
      status: 404,
      bytes: 157,
      userAgent: 'skopeo/1.9.3',
      kind: 'blob',
      repository: 'library/my/app',
      reference: 'sha256:abc',
    });
    assert.equal(parseAccessLogLine('{"level":"info","msg":"listening on 127.0.0.1:5000"}'), undefined);
  });
});

interface TunnelProxy {
  url: string;
  /** CONNECT targets in arrival order. */
  targets: string[];
  close(): Promise<void>;
}

/**
 * A plain tunnelling CONNECT proxy that sends the registry's test name to its loopback address: just
 * enough to check that skopeo honours HTTPS_PROXY and SSL_CERT_FILE.
 */
async function startTunnelProxy(registry: RegistryHandle): Promise<TunnelProxy> {
  const targets: string[] = [];
  const tunnels = new Set<Duplex>();
  const server: Server = createServer((_req, res) => res.writeHead(405).end());
  server.on('connect', (req, client, head) => {
    const target = req.url ?? '';
    targets.push(target);
    if (target !== registry.hostPort) {
      client.end('HTTP/1.1 403 Forbidden\r\n\r\n');
      return;
    }
    const upstream = connect(registry.port, registry.bindAddress, () => {
      tunnels.add(client).add(upstream);
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    targets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of tunnels) socket.destroy();
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
