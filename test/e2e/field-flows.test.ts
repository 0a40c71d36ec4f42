// The flows real clusters pull with, end to end, against a Docker-Hub-shaped upstream (test/helpers/
// hub-rig.ts: distribution behind token auth on another host, anonymous tokens, blobs 307-redirected
// to a CDN with signed expiring URLs, manifest GETs rate-limited with 429, HEAD free) and a
// registry.k8s.io-shaped host that redirects to a regional one. The clients are the real ones, with no
// credentials, as most clusters pull: skopeo, podman and containerd's ctr (the kubelet's path: HEAD the
// tag, then GET by digest). Every count is read from the upstream servers' own logs.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { startContainerd, type ContainerdHandle } from '../helpers/ctr.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { CLIENT_KINDS, pullAs, type ClientKind, type Pulled } from '../helpers/pull-as.ts';

const KINDS = CLIENT_KINDS;
const PRIVATE_USER = { username: 'hubber', password: 'hub-secret-pw' };
/** Tags named short-* are fresh this long; every other tag for an hour. */
const SHORT_TTL_MS = 1000;
const CLIENT_TIMEOUT_MS = 180_000;


describe('the flows real clusters use, through the proxy, against a Docker-Hub-shaped upstream', () => {
  let rig: HubRig;
  let proxy: TestProxy;
  let work: string;
  const images = new Map<string, BuiltImage>();

  before(async () => {
    work = makeTempDir('e2e-field-flows');
    rig = await startHubRig({ privateUser: PRIVATE_USER });
    proxy = await startTestProxy(proxyPolicy(rig, { interceptRealm: true }));
  });

  after(async () => {
    await proxy?.close();
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  /** Builds and pushes a small two-layer image (a file and ~300 KiB of random bytes) to the hub registry. */
  async function pushed(repository: string, tag: string, label = `${repository}:${tag}`, layerBytes = 300 * 1024): Promise<{ image: BuiltImage; ref: string }> {
    const image = await buildOciImage(join(work, `layout-${images.size}`), { layers: [{ files: { 'etc/image': `${label}\n` } }, { randomBytes: layerBytes }], tag, labels: { label } });
    images.set(label, image);
    const ref = await rig.pushHub(image.layoutDir, tag, repository);
    return { image, ref };
  }

  /** One pull by one client kind into a store of its own (ctr: a containerd of its own). */
  function pull(kind: ClientKind, ref: string, through: TestProxy = proxy, credentials?: { username: string; password: string }, caFile = through.caFile): Promise<Pulled> {
    return pullAs(kind, ref, { proxyUrl: through.url, caFile, timeoutMs: CLIENT_TIMEOUT_MS, ...(credentials ? { credentials } : {}) });
  }

  /** The same with ctr, through a containerd that keeps running. */
  function ctrPull(containerd: ContainerdHandle, ref: string, through: TestProxy): Promise<Pulled> {
    return pullAs('ctr', ref, { proxyUrl: through.url, caFile: through.caFile, timeoutMs: CLIENT_TIMEOUT_MS, containerd });
  }

  /** Manifest and blob requests the hub registry and its CDN answered, for messages. */
  const upstreamSummary = () => rig.describeRequests((r) => r.host !== 'auth');
  const manifestAndBlobRequests = () => rig.count((r) => (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob')) || r.host === 'cdn');

  test('a warm pull of a public image within its TTL sends nothing upstream for manifests and blobs, for every client kind', async () => {
    for (const kind of KINDS) {
      const { image, ref } = await pushed(`library/warm-${kind}`, '1.0');
      rig.resetCounts();
      const cold = await pull(kind, ref);
      assert.ok(cold.ok, `${kind} cold pull failed:\n${cold.detail}`);
      assert.equal(cold.digest, image.manifestDigest, `${kind} stored the registry's manifest digest`);
      // The client fetched its own anonymous token from the realm, as docker, podman and containerd do.
      assert.ok(rig.count({ host: 'auth', kind: 'token' }) >= 1, `${kind} asked the realm for a token`);
      // One counted pull, as without the proxy (a 401 the proxy met learning the registry's challenge aside).
      assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET', reference: '1.0', status: 200 }), 1, `${kind}: ${upstreamSummary()}`);
      // The proxy saw the realm issue that token to a request without credentials: public, no check needed.
      assert.equal(rig.count({ host: 'registry', method: 'HEAD' }), 0, `${kind}: no read or public checks: ${upstreamSummary()}`);

      rig.resetCounts();
      const warm = await pull(kind, ref);
      assert.ok(warm.ok, `${kind} warm pull failed:\n${warm.detail}`);
      assert.equal(warm.digest, image.manifestDigest);
      assert.equal(manifestAndBlobRequests(), 0, `${kind} warm pull went upstream: ${upstreamSummary()}`);
    }
  });

  test('the same with a token service the proxy does not intercept: public content is recognised by asking once, anonymously', async () => {
    const tunnelled = await startTestProxy(proxyPolicy(rig, { interceptRealm: false }));
    // The clients reach the realm itself through the tunnel: they trust its CA too, as a client trusts
    // the public roots beside the proxy's CA.
    const bothCas = join(work, 'proxy-and-realm-ca.pem');
    writeFileSync(bothCas, readFileSync(tunnelled.caFile, 'utf8') + rig.caPem);
    try {
      for (const kind of KINDS.filter((k) => k !== 'podman')) {
        const { image, ref } = await pushed(`library/tunnelled-${kind}`, '1.0');
        const cold = await pull(kind, ref, tunnelled, undefined, bothCas);
        assert.ok(cold.ok, `${kind} cold pull failed:\n${cold.detail}`);
        await sleep(200); // the anonymous checks run beside the pull
        rig.resetCounts();
        const warm = await pull(kind, ref, tunnelled, undefined, bothCas);
        assert.ok(warm.ok, `${kind} warm pull failed:\n${warm.detail}`);
        assert.equal(warm.digest, image.manifestDigest);
        assert.equal(manifestAndBlobRequests(), 0, `${kind} warm pull went upstream: ${upstreamSummary()}`);
      }
      const atRealm = tunnelled.access.filter((e) => e.host === rig.endpoints.auth.hostPort);
      assert.ok(atRealm.length > 0 && atRealm.every((e) => e.cache === 'TUNNEL'), 'the realm was tunnelled, not intercepted');
    } finally {
      await tunnelled.close();
    }
  });

  test('registry and token service down: every client kind pulls the cached public image (stale tag), and nothing private', async () => {
    const { image, ref } = await pushed('library/outage', 'short-1');
    const secret = await pushed('private/app', '1.0');
    assert.ok((await pull('skopeo', ref)).ok);
    const privatePull = await pull('skopeo', secret.ref, proxy, PRIVATE_USER);
    assert.ok(privatePull.ok, privatePull.detail);
    assert.equal((await pull('skopeo', secret.ref)).ok, false, 'an anonymous client does not get the private image while upstream is up');
    await sleep(SHORT_TTL_MS + 200); // the tag is past its TTL: served STALE from here on

    await rig.down(['registry', 'auth']);
    rig.resetCounts();
    try {
      for (const kind of KINDS) {
        const during = await pull(kind, ref);
        assert.ok(during.ok, `${kind} failed during the outage:\n${during.detail}`);
        assert.equal(during.digest, image.manifestDigest);
        const refused = await pull(kind, secret.ref);
        assert.equal(refused.ok, false, `${kind} got the private image anonymously during the outage`);
      }
      // What a Docker-style client does after a 401 ping: a token request to the realm, which the proxy
      // answers itself; the placeholder it gets counts as no credentials, and the public tag is served.
      const realm = new URL(rig.realm);
      const tokenSocket = await tlsThroughProxy(proxy.port, realm.hostname, Number(realm.port), proxy.caPem);
      const token = await httpOverSocket(tokenSocket, 'GET', `${realm.pathname}?scope=repository:library/outage:pull&service=${rig.service}`, realm.host);
      assert.equal(token.status, 200, 'a token answer while the token service is down');
      const placeholder = (JSON.parse(token.body.toString()) as { token: string }).token;
      const { hostname, port } = new URL(`https://${rig.hubHostPort}`);
      const withToken = await httpOverSocket(await tlsThroughProxy(proxy.port, hostname, Number(port), proxy.caPem), 'GET', '/v2/library/outage/manifests/short-1', rig.hubHostPort, {
        Accept: 'application/vnd.oci.image.manifest.v1+json',
        Authorization: `Bearer ${placeholder}`,
      });
      assert.deepEqual([withToken.status, withToken.headers['docker-content-digest'], withToken.headers['x-cache']], [200, image.manifestDigest, 'STALE']);
      const secretWithToken = await httpOverSocket(await tlsThroughProxy(proxy.port, hostname, Number(port), proxy.caPem), 'GET', '/v2/private/app/manifests/1.0', rig.hubHostPort, {
        Accept: 'application/vnd.oci.image.manifest.v1+json',
        Authorization: `Bearer ${placeholder}`,
      });
      assert.notEqual(secretWithToken.status, 200, 'the placeholder opens nothing private');

      const stale = proxy.access.filter((e) => e.path === '/v2/library/outage/manifests/short-1' && e.cache === 'STALE');
      assert.ok(stale.length >= KINDS.length, 'the tag was served stale');
      assert.equal(rig.count({ host: 'registry' }), 0, 'nothing reached the registry');
    } finally {
      await rig.up(['registry', 'auth']);
    }
  });

  test('every manifest GET answered 429: every client kind pulls a cached image, even one whose tag moved; nothing private, nothing uncached', async () => {
    const before = await pushed('library/limited', 'short-2', 'limited-before');
    const secret = await pushed('private/limited', '1.0');
    assert.ok((await pull('skopeo', before.ref)).ok);
    assert.ok((await pull('skopeo', secret.ref, proxy, PRIVATE_USER)).ok);
    await pushed('library/never-pulled', '1.0');
    // The tag moves upstream and its TTL passes: the HEAD says so, the GET of the new one gets 429.
    await pushed('library/limited', 'short-2', 'limited-after');
    await sleep(SHORT_TTL_MS + 200);
    rig.manifestGets = '429';
    try {
      for (const kind of KINDS) {
        const limited = await pull(kind, before.ref);
        assert.ok(limited.ok, `${kind} failed while manifest GETs answer 429:\n${limited.detail}`);
        assert.equal(limited.digest, before.image.manifestDigest, `${kind} got the cached image`);
        assert.equal((await pull(kind, secret.ref)).ok, false, `${kind} got the private image anonymously`);
      }
      // An image never pulled fails with the 429 (asked raw: skopeo itself would back off for 30 s).
      const { hostname, port } = new URL(`https://${rig.hubHostPort}`);
      const socket = await tlsThroughProxy(proxy.port, hostname, Number(port), proxy.caPem);
      const uncached = await httpOverSocket(socket, 'GET', `/v2/library/never-pulled/manifests/1.0`, rig.hubHostPort, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
      assert.equal(uncached.status, 429, 'an image never pulled: the 429 itself');
      assert.ok(rig.count({ host: 'registry', kind: 'manifest', status: 429 }) >= 1);
    } finally {
      rig.manifestGets = 'ok';
    }
  });

  test('a rollout: 20 clients (skopeo, podman and ctr mixed) pull a new tag at once: 1 upstream manifest GET, 1 GET per blob', async () => {
    const { image, ref } = await pushed('library/rollout', '2.0', 'rollout', 1024 * 1024);
    const plan: ClientKind[] = [];
    for (let i = 0; i < 20; i++) plan.push(KINDS[i % KINDS.length]!);
    const daemons = await Promise.all(plan.filter((k) => k === 'ctr').map(() => startContainerd()));
    rig.resetCounts();
    try {
      let daemon = 0;
      const results = await Promise.all(plan.map((kind) => (kind === 'ctr' ? ctrPull(daemons[daemon++]!, ref, proxy) : pull(kind, ref))));
      for (const [i, result] of results.entries()) {
        assert.ok(result.ok, `client ${i} (${plan[i]}) failed:\n${result.detail}`);
        assert.equal(result.digest, image.manifestDigest, `client ${i} (${plan[i]})`);
      }
    } finally {
      await Promise.all(daemons.map((d) => d.stop()));
    }
    const summary = upstreamSummary();
    assert.equal(rig.count({ host: 'registry', kind: 'manifest', method: 'GET' }), 1, `one manifest GET: ${summary}`);
    for (const digest of [image.configDigest, ...image.layerDigests]) {
      assert.equal(rig.count({ host: 'registry', kind: 'blob', method: 'GET', reference: digest }), 1, `one GET of ${digest}: ${summary}`);
      assert.equal(rig.count({ host: 'cdn', kind: 'download', reference: digest }), 1, `one CDN download of ${digest}: ${summary}`);
    }
  });

  test('registry.k8s.io-shaped: manifests and blobs redirected to a regional host are followed and cached; the second pull is all hits', async () => {
    const image = await buildOciImage(join(work, 'layout-k8s'), { layers: [{ files: { 'pause': 'pause\n' } }, { randomBytes: 200 * 1024 }], tag: '3.10' });
    const ref = await rig.pushK8s(image.layoutDir, '3.10', 'pause');
    for (const kind of KINDS) {
      rig.resetCounts();
      const result = await pull(kind, ref);
      assert.ok(result.ok, `${kind}:\n${result.detail}`);
      assert.equal(result.digest, image.manifestDigest);
      if (kind === KINDS[0]) {
        assert.ok(rig.count({ host: 'regional' }) > 0, 'the first pull went to the regional host');
        assert.ok(!proxy.access.some((e) => e.host === rig.endpoints.regional.hostPort), 'the proxy followed the redirects itself: the client never went there');
      } else {
        // The /v2/ ping goes through while upstream is up; manifests and blobs do not.
        assert.equal(rig.count((r) => (r.host === 'k8s' || r.host === 'regional') && r.kind !== 'base'), 0, `${kind} went upstream: ${rig.describeRequests()}`);
      }
    }
    const manifests = proxy.access.filter((e) => e.host === rig.k8sHostPort && e.path.startsWith('/v2/pause/manifests/'));
    assert.ok(manifests.some((e) => e.cache === 'HIT'), 'manifests are hits after the first pull');
  });

  test('a layer cut mid-transfer whose first resume gets 401, then 503: the client gets verified bytes and the blob is cached', async () => {
    const { image, ref } = await pushed('library/flaky', '1.0', 'flaky', 2 * 1024 * 1024);
    const layer = image.layerDigests.at(-1)!;
    rig.failNext('cdn', [{ cutAfter: 512 * 1024 }, 401, 503], { digest: layer });
    rig.resetCounts();
    const result = await pull('skopeo', ref);
    assert.ok(result.ok, result.detail);
    assert.equal(result.digest, image.manifestDigest);
    const downloads = rig.requests({ host: 'cdn', kind: 'download', reference: layer });
    assert.deepEqual(downloads.map((d) => d.status).slice(0, 3), [200, 401, 503], rig.describeRequests({ host: 'cdn' }));
    assert.equal(downloads.at(-1)!.complete, true);
    rig.resetCounts();
    const again = await pull(KINDS.at(-1)!, ref);
    assert.ok(again.ok, again.detail);
    assert.equal(rig.count({ host: 'cdn' }), 0, 'the blob was cached');
  });
});

/**
 * The hub registry (short-* tags fresh for SHORT_TTL_MS) and the k8s-shaped one; the realm host is
 * intercepted (as auth.docker.io is in the default policy) or left to the tunnel.
 */
function proxyPolicy(rig: HubRig, options: { interceptRealm: boolean }): string {
  const tls = `tls: { ca: ${rig.caFile} }`;
  return `
registries:
  ${rig.hubHostPort}:
    ${tls}
    manifests: { tiers: [{ match: "short-.*", ttl: ${SHORT_TTL_MS}ms }], defaultTtl: 1h, maxStale: 1h }
  ${rig.k8sHostPort}:
    ${tls}
${options.interceptRealm ? `  ${rig.endpoints.auth.hostPort}:\n    ${tls}\n` : ''}tunnel:
  # The realm resolves to 127.0.0.1 (hosts: below): an internal destination is tunnelled only when named.
  allow: ["${rig.endpoints.auth.hostPort}"]
hosts:
${rig.hostsYaml()}
`;
}
