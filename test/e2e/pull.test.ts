// End to end: a real registry (distribution 2.8) behind the proxy, pulled by real skopeo that trusts
// only the proxy's CA; and a CONNECT to a host outside the policy that must reach the real server.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { tlsThroughProxy, httpOverSocket } from '../helpers/connect.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

const canBind443 = process.getuid?.() === 0;

describe('pulling through the proxy with skopeo', () => {
  let ca: TestCa;
  let registry: RegistryHandle;
  let registry443: RegistryHandle | undefined;
  let privateRegistry: RegistryHandle;
  let proxy: TestProxy;
  let image: BuiltImage;
  let privateImage: BuiltImage;
  let crowdImage: BuiltImage;
  let work: string;
  let outside: https.Server;
  let outsideCert: string;
  let outsideCaPem: string;

  before(async () => {
    ca = createTestCa('pullthrough e2e upstream CA');
    work = makeTempDir('e2e-pull');
    registry = await startRegistry({ host: 'registry.test', ca });
    privateRegistry = await startRegistry({ host: 'private.test', ca, htpasswd: { username: 'alice', password: 'wonder-land-42' } });
    if (canBind443) registry443 = await startRegistry({ host: 'registry443.test', ca, bindAddress: '127.0.0.2', port: 443 });
    image = await buildOciImage(join(work, 'layout'), {
      layers: [{ files: { 'etc/motd': 'pulled through pullthrough\n' } }, { randomBytes: 3 * 1024 * 1024 }],
      tag: 'v1',
    });
    privateImage = await buildOciImage(join(work, 'private-layout'), { layers: [{ randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    crowdImage = await buildOciImage(join(work, 'crowd-layout'), { layers: [{ randomBytes: 24 * 1024 * 1024 }, { randomBytes: 8 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(image.layoutDir, 'v1', registry, { repository: 'team/app' });
    await pushImage(crowdImage.layoutDir, 'v1', registry, { repository: 'team/crowd' });
    await pushImage(privateImage.layoutDir, 'v1', privateRegistry, { repository: 'secret/app' });
    if (registry443) await pushImage(image.layoutDir, 'v1', registry443, { repository: 'team/app' });

    // A TLS server outside the policy, with a certificate from a CA the proxy knows nothing about.
    const outsideCa = createTestCa('outside CA');
    const leaf = outsideCa.issue(['outside.test']);
    outsideCert = leaf.certPem;
    outsideCaPem = outsideCa.certPem;
    outside = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('the real outside server\n'));
    await new Promise<void>((resolve) => outside.listen(0, '127.0.0.1', resolve));

    const caFile = writePem(work, 'upstream-ca.pem', ca.certPem);
    proxy = await startTestProxy(`
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
  ${privateRegistry.hostPort}:
    tls: { ca: ${caFile} }
  registry443.test:
    tls: { ca: ${caFile} }
hosts:
  registry.test: 127.0.0.1
  private.test: 127.0.0.1
  registry443.test: 127.0.0.2
  outside.test: 127.0.0.1
tunnel:
  allow: ["*:443", "outside.test:*"]
`);
  });

  after(async () => {
    await proxy?.close();
    await Promise.all([registry?.stop(), registry443?.stop(), privateRegistry?.stop()]);
    outside?.close();
    if (work) removeTempDir(work);
  });

  test('a pull on a non-443 port arrives at the same port and every blob digest verifies', async () => {
    registry.resetCounts();
    const dest = join(work, 'pull-nonstandard-port');
    const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/app:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest });
    assert.equal(result.code, 0, result.stderr);
    const copy = await verifyDirCopy(dest);
    assert.equal(copy.manifestDigest, image.manifestDigest);
    assert.deepEqual(copy.blobDigests, [image.configDigest, ...image.layerDigests].sort());

    // Every blob came from the registry once, through the proxy, which cached it.
    await registry.settle();
    for (const digest of image.layerDigests) {
      assert.equal(registry.count({ method: 'GET', kind: 'blob', reference: digest }), 1, `one upstream GET of ${digest}`);
    }
    const blobLines = proxy.access.filter((e) => e.host === registry.hostPort && e.type === 'blob');
    assert.equal(blobLines.length, 3, 'config + 2 layers logged by the proxy');
    // The config and the first layer missed; the next layer was fetched ahead (cache.prefetch): joined or hit.
    assert.ok(blobLines.every((e) => (e.cache === 'MISS' || e.cache === 'JOINED' || e.cache === 'HIT') && e.status === 200), JSON.stringify(blobLines));
    assert.equal(blobLines.reduce((sum, e) => sum + e.bytes, 0), [...image.blobs.values()].reduce((a, b) => a + b, 0) - image.manifestSize);
  });

  test('a warm pull is served from the cache with zero upstream blob requests', async () => {
    registry.resetCounts();
    const before = proxy.access.length;
    const dest = join(work, 'pull-warm');
    const result = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/app:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(dest)).manifestDigest, image.manifestDigest);
    await registry.settle();
    assert.equal(registry.count({ kind: 'blob' }), 0, `upstream blob requests: ${JSON.stringify(registry.requests())}`);
    const blobLines = proxy.access.slice(before).filter((e) => e.type === 'blob');
    assert.deepEqual(blobLines.map((e) => e.cache), ['HIT', 'HIT', 'HIT']);
  });

  test('8 clients pulling the same cold image at once cause exactly one upstream GET per blob', async () => {
    registry.resetCounts();
    const before = proxy.access.length;
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/crowd:v1`, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, `crowd-${i}`) }),
      ),
    );
    for (const [i, result] of results.entries()) {
      assert.equal(result.code, 0, `client ${i}: ${result.stderr}`);
      const copy = await verifyDirCopy(join(work, `crowd-${i}`));
      assert.deepEqual(copy.blobDigests, [crowdImage.configDigest, ...crowdImage.layerDigests].sort(), `client ${i} got every blob intact`);
    }
    await registry.settle();
    for (const digest of [crowdImage.configDigest, ...crowdImage.layerDigests]) {
      assert.equal(registry.count({ method: 'GET', kind: 'blob', reference: digest }), 1, `one upstream GET of ${digest}`);
    }
    const statuses = proxy.access.slice(before).filter((e) => e.type === 'blob').map((e) => e.cache);
    assert.equal(statuses.length, 24);
    // One leader per blob at most: a client's MISS, or none for a layer fetched ahead of the clients (cache.prefetch).
    const misses = proxy.access.slice(before).filter((e) => e.type === 'blob' && e.cache === 'MISS').map((e) => e.path);
    assert.equal(new Set(misses).size, misses.length, `one leader per blob: ${statuses.join(' ')}`);
    assert.ok(misses.length >= 2, `the config and the first layer asked for missed: ${statuses.join(' ')}`);
  });

  test('a registry on 443 is intercepted under its bare host name', { skip: !canBind443 && 'binding 127.0.0.2:443 needs root' }, async () => {
    const dest = join(work, 'pull-443');
    const result = await skopeoCopyThroughProxy({ image: 'registry443.test/team/app:v1', proxyUrl: proxy.url, caFile: proxy.caFile, destDir: dest });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await verifyDirCopy(dest)).manifestDigest, image.manifestDigest);
    assert.ok(proxy.access.some((e) => e.host === 'registry443.test:443' && e.type === 'manifest'));
  });

  test("private content: the client's credentials are forwarded, never logged, and its cached blobs are not served to others", async () => {
    const image = `${privateRegistry.hostPort}/secret/app:v1`;
    const alice = { username: 'alice', password: 'wonder-land-42' };
    const anonymous = await skopeoCopyThroughProxy({ image, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, 'anon') });
    assert.notEqual(anonymous.code, 0, 'an anonymous pull of a private image fails');
    assert.match(anonymous.stderr, /unauthorized|authentication required|401/i);

    const first = await skopeoCopyThroughProxy({ image, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, 'private'), credentials: alice });
    assert.equal(first.code, 0, first.stderr);
    assert.equal((await verifyDirCopy(join(work, 'private'))).manifestDigest, privateImage.manifestDigest);

    // Cached now, but a client without credentials still gets the registry's 401, not the bytes.
    const layer = privateImage.layerDigests[0]!;
    const socket = await tlsThroughProxy(proxy.port, 'private.test', privateRegistry.port, proxy.caPem);
    const stolen = await httpOverSocket(socket, 'GET', `/v2/secret/app/blobs/${layer}`, privateRegistry.hostPort);
    assert.equal(stolen.status, 401);
    assert.ok(stolen.body.length < 1000, 'no blob bytes');
    assert.match(stolen.headers['www-authenticate'] ?? '', /Basic/);

    // A client with valid credentials is served from the cache: no upstream blob bytes, only a HEAD.
    privateRegistry.resetCounts();
    const second = await skopeoCopyThroughProxy({ image, proxyUrl: proxy.url, caFile: proxy.caFile, destDir: join(work, 'private-2'), credentials: alice });
    assert.equal(second.code, 0, second.stderr);
    await privateRegistry.settle();
    assert.equal(privateRegistry.count({ method: 'GET', kind: 'blob' }), 0, JSON.stringify(privateRegistry.requests()));

    const basic = Buffer.from('alice:wonder-land-42').toString('base64');
    const everything = proxy.lines.join('\n');
    assert.ok(!everything.includes('wonder-land-42') && !everything.includes(basic), 'no credential in the logs');
  });

  test('a CONNECT outside the policy reaches the real server with its real certificate', async () => {
    const port = (outside.address() as AddressInfo).port;
    const socket = await tlsThroughProxy(proxy.port, 'outside.test', port, outsideCaPem);
    const presented = new X509Certificate(socket.getPeerX509Certificate()!.raw);
    assert.equal(presented.fingerprint256, new X509Certificate(outsideCert).fingerprint256);
    const response = await httpOverSocket(socket, 'GET', '/', 'outside.test');
    assert.equal(response.status, 200);
    assert.equal(response.body.toString(), 'the real outside server\n');
    socket.destroy();
    // The tunnel is logged when it closes, with the bytes it carried.
    for (let i = 0; i < 50 && !proxy.access.some((e) => e.cache === 'TUNNEL'); i++) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.ok(proxy.access.some((e) => e.method === 'CONNECT' && e.host === `outside.test:${port}` && e.cache === 'TUNNEL' && e.status === 200));
  });

  test('an intercepted registry presents a leaf from the proxy CA for the name asked', async () => {
    const socket = await tlsThroughProxy(proxy.port, 'registry.test', registry.port, proxy.caPem);
    const leaf = new X509Certificate(socket.getPeerX509Certificate()!.raw);
    assert.ok(leaf.checkIssued(new X509Certificate(proxy.caPem)));
    assert.equal(leaf.subjectAltName, 'DNS:registry.test');
    const response = await httpOverSocket(socket, 'GET', '/v2/', `registry.test:${registry.port}`);
    assert.equal(response.status, 200);
    assert.equal(response.headers['x-cache'], 'BYPASS');
  });
});
