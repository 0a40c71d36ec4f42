// The registry-mirror front with real clients and no HTTPS_PROXY: ctr with hosts.toml files (containerd
// adds ?ns=<registry>), skopeo and podman with a registries.conf mirror (the registry as first path
// segment), and dockerd's form (no registry named: the default). The upstream is the Docker-Hub-shaped
// rig (token realm on another host, blobs behind a CDN); every count is read from its own logs. The
// client configurations are the ones src/admin/mirror-config.ts generates for users.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { sendConnect } from '../helpers/connect.ts';
import { ctrUnavailable, startContainerd } from '../helpers/ctr.ts';
import { addEtcHosts, etcHostsUnavailable } from '../helpers/etc-hosts.ts';
import { startHubRig, type HubRig } from '../helpers/hub-rig.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { podmanPullThroughProxy, podmanUnavailable } from '../helpers/podman.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';
import { skopeoCopyThroughMirror, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';

const ctrSkip = ctrUnavailable();
const podmanSkip = podmanUnavailable();
const PRIVATE_USER = { username: 'hubber', password: 'hub-secret-pw' };
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';

describe('the registry-mirror front, with real clients and no HTTPS_PROXY', () => {
  let rig: HubRig;
  let proxy: TestProxy;
  let work: string;
  let mirrorUrl: URL;
  let count = 0;

  before(async () => {
    work = makeTempDir('e2e-mirror');
    rig = await startHubRig({ privateUser: PRIVATE_USER });
    proxy = await startTestProxy(policyWith(rig, `mirror:\n  listen: 127.0.0.1:0\n  default: ${rig.hubHostPort}\n`));
    mirrorUrl = new URL(`http://127.0.0.1:${proxy.proxy.mirrorPort}`);
    podmanConf = readFileSync(join(await runSetup('podman-mirror'), 'etc/containers/registries.conf.d/pullthrough-mirror.conf'), 'utf8');
  });

  after(async () => {
    await proxy?.close();
    await rig?.stop();
    if (work) removeTempDir(work);
  });

  async function pushed(repository: string, tag = '1.0'): Promise<{ image: BuiltImage; ref: string }> {
    const image = await buildOciImage(join(work, `layout-${count++}`), { layers: [{ files: { 'etc/image': `${repository}\n` } }, { randomBytes: 256 * 1024 }], tag, labels: { repository } });
    return { image, ref: await rig.pushHub(image.layoutDir, tag, repository) };
  }

  /** Runs /setup/<script> of `through` as users do (curl | bash), with ROOT: the files land under the returned directory. */
  async function runSetup(script: string, through: TestProxy = proxy): Promise<string> {
    const root = join(work, `root-${count++}`);
    const text = await (await fetch(`http://127.0.0.1:${through.port}/setup/${script}`)).text();
    const ran = spawnSync('bash', [], { input: text, env: { ...process.env, ROOT: root }, encoding: 'utf8' });
    assert.equal(ran.status, 0, `${script}: ${ran.stderr}`);
    return root;
  }

  /** containerd's certs.d as /setup/containerd-mirror writes it; `extraServerLines` go after `server =`. */
  async function hostsDir(extraServerLines: string[] = []): Promise<string> {
    const dir = join(await runSetup('containerd-mirror'), 'etc/containerd/certs.d');
    if (extraServerLines.length > 0) {
      const file = join(dir, rig.hubHostPort, 'hosts.toml');
      writeFileSync(file, readFileSync(file, 'utf8').replace(/^server = .*$/m, (line) => [line, ...extraServerLines].join('\n')));
    }
    return dir;
  }

  let podmanConf: string | undefined;
  /** The registries.conf drop-in /setup/podman-mirror writes. */
  const conf = () => podmanConf!;

  const upstreamManifestsAndBlobs = () => rig.count((r) => (r.host === 'registry' && (r.kind === 'manifest' || r.kind === 'blob')) || r.host === 'cdn');

  async function skopeoViaMirror(ref: string, credentials?: typeof PRIVATE_USER): Promise<{ ok: boolean; digest?: string; detail: string }> {
    const destDir = makeTempDir('mirror-skopeo');
    try {
      const result = await skopeoCopyThroughMirror({ image: ref, registriesConf: conf(), destDir, ...(credentials ? { mirrorCredentials: { ...credentials, host: mirrorUrl.host } } : {}) });
      if (result.code !== 0) return { ok: false, detail: result.stderr };
      return { ok: true, digest: (await verifyDirCopy(destDir)).manifestDigest, detail: '' };
    } finally {
      removeTempDir(destDir);
    }
  }

  test('ctr with the generated hosts.toml (?ns= form): a cold pull, then a warm one that sends nothing upstream', { skip: ctrSkip ?? false }, async () => {
    const { image, ref } = await pushed('library/mirror-ctr');
    const dir = await hostsDir();
    for (const round of ['cold', 'warm']) {
      rig.resetCounts();
      const containerd = await startContainerd();
      try {
        const result = await containerd.pull({ image: ref, hostsDir: dir, timeoutMs: 120_000 });
        assert.equal(result.code, 0, `${round}: ${result.stderr}`);
        assert.equal((await containerd.images()).find((i) => i.ref === ref)?.digest, image.manifestDigest);
      } finally {
        await containerd.stop();
      }
      if (round === 'warm') assert.equal(upstreamManifestsAndBlobs(), 0, rig.describeRequests());
    }
    assert.ok(proxy.access.some((e) => e.host === rig.hubHostPort && e.path === '/v2/library/mirror-ctr/manifests/1.0'), 'served through the mirror');
  });

  test('skopeo and podman with the generated registries.conf mirror; one cache for both fronts, either way round', async () => {
    // Warmed through the intercepting proxy, pulled through the mirror.
    const viaProxy = await pushed('library/front-to-mirror');
    const destDir = makeTempDir('mirror-skopeo-proxy');
    try {
      const warmed = await skopeoCopyThroughProxy({ image: viaProxy.ref, proxyUrl: proxy.url, caFile: proxy.caFile, destDir });
      assert.equal(warmed.code, 0, warmed.stderr);
    } finally {
      removeTempDir(destDir);
    }
    rig.resetCounts();
    const mirrored = await skopeoViaMirror(viaProxy.ref);
    assert.ok(mirrored.ok, mirrored.detail);
    assert.equal(mirrored.digest, viaProxy.image.manifestDigest);
    assert.equal(upstreamManifestsAndBlobs(), 0, `through the mirror after the proxy: ${rig.describeRequests()}`);

    // Pulled through the mirror first (podman), then through the intercepting proxy.
    if (podmanSkip) return;
    const viaMirror = await pushed('library/mirror-to-front');
    const pulled = await podmanPullThroughProxy({ image: viaMirror.ref, registriesConf: conf(), timeoutMs: 120_000 });
    assert.equal(pulled.code, 0, pulled.stderr);
    assert.equal(pulled.image?.digest, viaMirror.image.manifestDigest);
    rig.resetCounts();
    const again = await podmanPullThroughProxy({ image: viaMirror.ref, proxyUrl: proxy.url, caFile: proxy.caFile, timeoutMs: 120_000 });
    assert.equal(again.code, 0, again.stderr);
    assert.equal(rig.count({ host: 'registry', kind: 'blob' }) + rig.count({ host: 'cdn' }), 0, `through the proxy after the mirror: ${rig.describeRequests()}`);
  });

  test("dockerd's form: no registry named means the default one; a private image needs the client's own credentials", async () => {
    const { image } = await pushed('library/dockerform');
    const manifest = await mirrorGet('/v2/library/dockerform/manifests/1.0');
    assert.deepEqual([manifest.status, manifest.headers.get('docker-content-digest')], [200, image.manifestDigest]);

    const secret = await pushed('private/app');
    const anonymous = await mirrorGet(`/v2/${rig.hubHostPort}/private/app/manifests/1.0`);
    assert.equal(anonymous.status, 401);
    // The challenge sends the client to the mirror's own token route, not to the realm.
    const challenge = anonymous.headers.get('www-authenticate') ?? '';
    assert.match(challenge, new RegExp(`^Bearer realm="${mirrorUrl.origin}/token/`));
    assert.match(challenge, /service="registry\.hub\.test"/);
    assert.ok(!challenge.includes(rig.endpoints.auth.name));

    const withCredentials = await skopeoViaMirror(secret.ref, PRIVATE_USER);
    assert.ok(withCredentials.ok, withCredentials.detail);
    assert.equal(withCredentials.digest, secret.image.manifestDigest);
    const without = await skopeoViaMirror(secret.ref);
    assert.equal(without.ok, false, 'the cached private image is refused to a client without credentials');

    // ctr --user through hosts.toml: containerd asks the mirror's token route (OAuth2 POST, then GET).
    if (ctrSkip) return;
    const dir = await hostsDir();
    for (const credentials of [PRIVATE_USER, undefined]) {
      const containerd = await startContainerd();
      try {
        const result = await containerd.pull({ image: secret.ref, hostsDir: dir, timeoutMs: 120_000, ...(credentials ? { credentials } : {}) });
        if (credentials) {
          assert.equal(result.code, 0, result.stderr);
          assert.equal((await containerd.images()).find((i) => i.ref === secret.ref)?.digest, secret.image.manifestDigest);
        } else {
          assert.notEqual(result.code, 0, 'ctr without credentials got the private image');
        }
      } finally {
        await containerd.stop();
      }
    }
  });

  test('proxy users log in to the mirror, and their read rules apply', async () => {
    const open = await pushed('team/open');
    const closed = await pushed('other/closed');
    const guarded = await startTestProxy(policyWith(rig, `mirror:\n  listen: 127.0.0.1:0\nusers:\n  ci:\n    password: ci-pw\n    read: ["${rig.hubHostPort}/team/*"]\n`));
    try {
      const url = new URL(`http://127.0.0.1:${guarded.proxy.mirrorPort}`);
      const guardedConf = readFileSync(join(await runSetup('podman-mirror', guarded), 'etc/containers/registries.conf.d/pullthrough-mirror.conf'), 'utf8');
      const pull = async (ref: string, credentials?: { username: string; password: string }) => {
        const destDir = makeTempDir('mirror-users');
        try {
          return await skopeoCopyThroughMirror({ image: ref, registriesConf: guardedConf, destDir, ...(credentials ? { mirrorCredentials: { ...credentials, host: url.host } } : {}) });
        } finally {
          removeTempDir(destDir);
        }
      };
      assert.equal((await pull(open.ref, { username: 'ci', password: 'ci-pw' })).code, 0);
      assert.notEqual((await pull(open.ref)).code, 0, 'no login: refused');
      assert.notEqual((await pull(open.ref, { username: 'ci', password: 'wrong' })).code, 0, 'wrong password: refused');
      assert.notEqual((await pull(closed.ref, { username: 'ci', password: 'ci-pw' })).code, 0, 'outside the read rules: refused');
      assert.ok(!guarded.lines.some((line) => line.includes('ci-pw')), 'the password is never logged');
    } finally {
      await guarded.close();
    }
  });

  test('the proxy stopped: ctr with the generated hosts.toml pulls from the registry itself', { skip: ctrSkip ?? etcHostsUnavailable() ?? false }, async () => {
    const { image, ref } = await pushed('library/fallback');
    const standalone = await startTestProxy(policyWith(rig, 'mirror:\n  listen: 127.0.0.1:0\n'));
    const dir = join(await runSetup('containerd-mirror', standalone), 'etc/containerd/certs.d');
    await standalone.close();
    // The test registry's CA, which a real registry would not need (its certificate is public).
    const file = join(dir, rig.hubHostPort, 'hosts.toml');
    writeFileSync(file, readFileSync(file, 'utf8').replace(/^server = .*$/m, (line) => `${line}\nca = "${rig.caFile}"`));
    const restore = addEtcHosts(Object.keys(rig.hosts));
    const containerd = await startContainerd();
    try {
      rig.resetCounts();
      const result = await containerd.pull({ image: ref, hostsDir: dir, timeoutMs: 120_000 });
      assert.equal(result.code, 0, result.stderr);
      assert.equal((await containerd.images()).find((i) => i.ref === ref)?.digest, image.manifestDigest);
      assert.ok(rig.count({ host: 'registry', kind: 'manifest' }) >= 1, 'the registry itself answered');
    } finally {
      await containerd.stop();
      restore();
    }
  });

  test('the setup scripts: hosts.toml, registries.conf and daemon.json for every registry, idempotent, the rest of daemon.json kept', async () => {
    const root = await runSetup('containerd-mirror');
    const hosts = readFileSync(join(root, 'etc/containerd/certs.d', rig.hubHostPort, 'hosts.toml'), 'utf8');
    assert.match(hosts, new RegExp(`^server = "https://${rig.hubHostPort}"$`, 'm'), 'the registry itself, last');
    assert.match(hosts, new RegExp(`^\\[host\\."${mirrorUrl.origin}"\\]$`, 'm'));
    assert.ok(existsSync(join(root, 'etc/containerd/certs.d', rig.k8sHostPort, 'hosts.toml')), 'every registry of the policy');
    assert.match(conf(), new RegExp(`location = "${mirrorUrl.host}/registry.hub.test_${rig.endpoints.registry.port}"`));

    // docker: a daemon.json of the user's is kept, the mirror put first; a second run changes nothing.
    const dockerRoot = join(work, `root-${count++}`);
    mkdirSync(join(dockerRoot, 'etc/docker'), { recursive: true });
    writeFileSync(join(dockerRoot, 'etc/docker/daemon.json'), '{"log-driver":"journald","registry-mirrors":["https://other.example"]}');
    const script = await (await fetch(`http://127.0.0.1:${proxy.port}/setup/docker-mirror`)).text();
    for (const round of [1, 2]) {
      const ran = spawnSync('bash', [], { input: script, env: { ...process.env, ROOT: dockerRoot }, encoding: 'utf8' });
      assert.equal(ran.status, 0, ran.stderr);
      if (round === 2) assert.match(ran.stdout, /unchanged: \/etc\/docker\/daemon.json/);
    }
    assert.deepEqual(JSON.parse(readFileSync(join(dockerRoot, 'etc/docker/daemon.json'), 'utf8')), { 'log-driver': 'journald', 'registry-mirrors': [mirrorUrl.origin, 'https://other.example'] });

    // Without a mirror configured the scripts say so.
    const plain = await startTestProxy('');
    try {
      const answer = await fetch(`http://127.0.0.1:${plain.port}/setup/containerd-mirror`);
      assert.equal(answer.status, 404);
      assert.match(await answer.text(), /mirror\.listen/);
    } finally {
      await plain.close();
    }
  });

  test('bad input gets registry-style errors and fetches nothing', async () => {
    rig.resetCounts();
    const cases: Array<[string, number, string]> = [
      ['/v2/library/x/manifests/1.0?ns=unknown.example', 404, 'NAME_UNKNOWN'],
      ['/v2/unknown.example/team/x/manifests/1.0', 404, 'NAME_UNKNOWN'],
      [`/v2/library/x/manifests/1.0?ns=127.0.0.1:${proxy.port}`, 404, 'NAME_UNKNOWN'],
      ['/v2/library/../private/app/manifests/1.0', 400, 'NAME_INVALID'],
      ['/v2/library%2F..%2Fprivate/app/manifests/1.0', 400, 'NAME_INVALID'],
      ['/v2/library/x/manifests/..', 400, 'NAME_INVALID'],
      ['/admin/purge', 404, 'NOT_FOUND'],
    ];
    for (const [path, status, code] of cases) {
      const answer = await mirrorGet(path);
      assert.equal(answer.status, status, path);
      const body = (await answer.json()) as { errors: Array<{ code: string; message: string }> };
      assert.equal(body.errors[0]!.code, code, path);
    }
    // Nor does the proxy tunnel into its own mirror, though this policy names all of loopback.
    const intoMirror = await sendConnect(proxy.port, `127.0.0.1:${proxy.proxy.mirrorPort}`);
    intoMirror.socket.destroy();
    assert.equal(intoMirror.status, 403, intoMirror.head);
    const unknown = (await (await mirrorGet('/v2/unknown.example/team/x/manifests/1.0')).json()) as { errors: Array<{ message: string }> };
    assert.match(unknown.errors[0]!.message, /unknown\.example.*registries:/);
    assert.equal(rig.count(), 0, 'nothing went upstream');
  });

  test('the mirror speaks TLS with a certificate from the proxy CA for the configured names', async () => {
    const tls = await startTestProxy(policyWith(rig, `mirror:\n  listen: 127.0.0.1:0\n  tls: { names: [mirror.hub.test] }\n  default: ${rig.hubHostPort}\n`));
    try {
      const { image } = await pushed('library/over-tls');
      const { Agent, request } = await import('undici');
      const agent = new Agent({ connect: { ca: tls.caPem, servername: 'mirror.hub.test' } });
      const answer = await request(`https://127.0.0.1:${tls.proxy.mirrorPort}/v2/library/over-tls/manifests/1.0`, { dispatcher: agent, headers: { accept: OCI_MANIFEST, host: `mirror.hub.test:${tls.proxy.mirrorPort}` } });
      assert.deepEqual([answer.statusCode, answer.headers['docker-content-digest']], [200, image.manifestDigest]);
      await answer.body.dump();
      await agent.close();
    } finally {
      await tls.close();
    }
  });

  /** A GET with the path exactly as given (fetch would resolve dot segments before sending). */
  function mirrorGet(path: string): Promise<{ status: number; headers: Map<string, string>; json(): Promise<unknown> }> {
    return new Promise((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: Number(mirrorUrl.port), path, headers: { accept: OCI_MANIFEST } }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => {
          const headers = new Map(Object.entries(res.headers).map(([k, v]) => [k, Array.isArray(v) ? v.join(', ') : (v ?? '')]));
          const body = Buffer.concat(chunks).toString();
          resolve({ status: res.statusCode ?? 0, headers, json: async () => JSON.parse(body) });
        });
      });
      req.on('error', reject);
      req.end();
    });
  }
});

/** The rig's registries (the realm intercepted, as auth.docker.io is by default) and `extra` YAML. */
function policyWith(rig: HubRig, extra: string): string {
  const tls = `tls: { ca: ${rig.caFile} }`;
  return `
registries:
  ${rig.hubHostPort}:
    ${tls}
  ${rig.k8sHostPort}:
    ${tls}
  ${rig.endpoints.auth.hostPort}:
    ${tls}
tunnel:
  allow: ["*:443", "127.0.0.0/8:*"]
hosts:
${rig.hostsYaml()}
${extra}`;
}
