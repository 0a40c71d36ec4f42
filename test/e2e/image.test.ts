// The container image for real: the project's Dockerfile built by podman as the README says, and the
// image run as deploy/compose.yaml runs it (its read-only root, dropped capabilities, no-new-privileges,
// environment and named volumes; the Kubernetes StatefulSet asks for the same), with a real registry
// pulled through it by skopeo. podman's storage is the machine's, so the base image and the build's
// layers are cached between runs: a first run assembles a stand-in for node:24-slim where there is none
// (test/helpers/image-base.ts, about a minute) and builds from scratch; later runs take seconds.
//
// test/e2e/container.test.ts stays beside this one: it imitates the image on the host in a few seconds,
// without root or podman, so a developer's machine still checks the image's command, user and volumes.
//
// Where podman cannot run containers (not root, no podman, a runtime that fails here) every test is
// skipped with podman's own reason; PULLTHROUGH_IMAGE_TEST=require (.ci/run sets it) makes that a failure.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import { parse } from 'yaml';
import { dockerfileBase, ensureNodeBase } from '../helpers/image-base.ts';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa, type TestCa } from '../helpers/pki.ts';
import { machinePodman, podman, podmanMissing, probePodman, type PodmanEngine } from '../helpers/podman-engine.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';
import { freePort } from '../helpers/ports.ts';

const ROOT = path.join(import.meta.dirname, '../..');
const REQUIRED = process.env.PULLTHROUGH_IMAGE_TEST === 'require';
/** The image this test builds; kept between runs so that the next build reuses its layers. */
const TAG = 'localhost/pullthrough:image-test';
const BUILD_STAGE_TAG = 'localhost/pullthrough:image-test-build';
/** The test registry's name: the container resolves it through --add-host, skopeo never resolves it. */
const REGISTRY_HOST = 'pullthrough-image.test';
/** The image's user, by number (the Dockerfile's USER). */
const UID = 1000;
const NAME = `pullthrough-image-test-${process.pid}`;
/** Where the test registry's CA is mounted, as a private registry's CA would be. */
const UPSTREAM_CA = '/etc/pullthrough/upstream-ca.pem';

const dockerfile = readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');

interface ComposeService {
  read_only?: boolean;
  cap_drop?: string[];
  security_opt?: string[];
  volumes?: string[];
  environment?: Record<string, string>;
}

/** The HEALTHCHECK's exec form, as the image config must carry it. */
function dockerfileHealthcheck(): string[] {
  const line = dockerfile.replace(/\\\r?\n/g, ' ').split('\n').find((l) => /^HEALTHCHECK\s/.test(l));
  assert.ok(line, 'the Dockerfile has a HEALTHCHECK');
  return ['CMD', ...(JSON.parse(line.slice(line.indexOf('CMD ') + 4)) as string[])];
}


/** The base64 of a PEM certificate, to compare certificates whatever their line endings. */
const certBody = (pem: string) => pem.replace(/-----[A-Z ]+-----|\s/g, '');
const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/**
 * The CA bundle the build's npm ci is given as the `ca` secret: the machine's own trust (behind a
 * TLS-intercepting proxy, that is what reaches registry.npmjs.org), as the README tells users to.
 */
function machineCaBundle(): string | undefined {
  return [process.env.NODE_EXTRA_CA_CERTS, process.env.SSL_CERT_FILE, '/etc/ssl/certs/ca-certificates.crt'].find((f): f is string => !!f && existsSync(f));
}

describe('the container image, built from the Dockerfile and run by podman', () => {
  let unavailable = podmanMissing();
  let engine: PodmanEngine = machinePodman();
  const timings: Array<[string, number]> = [];
  let work: string | undefined;
  /** How far the image got: each test needs the step before it to have succeeded. */
  const reached = new Set<'base' | 'built' | 'running'>();
  let testCa: (TestCa & { file: string }) | undefined;
  let registry: RegistryHandle | undefined;
  let image: BuiltImage;
  let port: number;
  const volumes = { data: `${NAME}-data`, ca: `${NAME}-ca` };

  /**
   * Skips the test where podman cannot run containers (or fails it, where it is required to), or where
   * the step it needs failed (that test failed already).
   */
  function cannotRun(t: TestContext, needs?: 'base' | 'built' | 'running'): boolean {
    if (unavailable) {
      if (REQUIRED) assert.fail(`PULLTHROUGH_IMAGE_TEST=require, but ${unavailable}`);
      t.skip(unavailable);
      return true;
    }
    if (needs && !reached.has(needs)) {
      t.skip({ base: 'no base image', built: 'the image was not built', running: 'the container is not running' }[needs]);
      return true;
    }
    return false;
  }

  const workDir = () => (work ??= makeTempDir('image'));
  /** The test registry's CA (a private registry's, to the proxy), and a PEM file of it to mount. */
  const upstreamCa = () => {
    if (!testCa) {
      const ca = createTestCa('pullthrough image test upstream CA');
      const file = path.join(workDir(), 'upstream-ca.pem');
      writeFileSync(file, ca.certPem, { mode: 0o644 });
      testCa = { ...ca, file };
    }
    return testCa;
  };

  const logs = async () => {
    const result = await podman(engine, ['logs', NAME]);
    return { stdout: result.stdout, stderr: result.stderr };
  };

  after(async () => {
    if (!podmanMissing()) {
      await podman(engine, ['rm', '--force', '--time', '0', NAME]);
      await podman(engine, ['volume', 'rm', '--force', volumes.data, volumes.ca]);
    }
    await registry?.stop();
    if (work) removeTempDir(work);
  });

  test(`${dockerfileBase(dockerfile)} is in podman's storage, or a stand-in assembled as it is made`, async (t) => {
    if (cannotRun(t)) return;
    const base = await ensureNodeBase(engine, dockerfileBase(dockerfile));
    if ('reason' in base) {
      unavailable = base.reason;
      cannotRun(t);
      return;
    }
    timings.push([`base (${base.kind})`, base.ms]);
    t.diagnostic(`${base.description}: ${seconds(base.ms)}`);

    // Whether podman runs containers here at all, and with what containers.conf.
    const probe = await probePodman(base.image);
    if ('reason' in probe) {
      unavailable = probe.reason;
      cannotRun(t);
      return;
    }
    engine = probe.engine;
    reached.add('base');
    for (const adjustment of engine.adjustments) t.diagnostic(`podman needs a containers.conf here: ${adjustment}`);
  });

  test('builds with the command the README gives podman users, the HEALTHCHECK kept and no build secret left behind', async (t) => {
    if (cannotRun(t, 'base')) return;
    assert.ok(readme.includes('`podman build --format docker -t pullthrough .`'), 'the README tells podman users to build with --format docker');
    // The build's secrets, as the Dockerfile documents them: the machine's CA bundle for npm ci, and an
    // .npmrc (harmless settings; the mount is what is checked).
    const caBundle = machineCaBundle();
    const npmrc = path.join(workDir(), 'npmrc');
    writeFileSync(npmrc, 'fund=false\naudit=false\n', { mode: 0o600 });
    const secrets = [...(caBundle ? ['--secret', `id=ca,src=${caBundle}`] : []), '--secret', `id=npmrc,src=${npmrc}`];

    const build = async (tag: string, extra: string[]) => {
      const before = await podman(engine, ['image', 'inspect', '--format', '{{.Id}}', tag]);
      // --pull=never: only the base in podman's storage, never Docker Hub (where the stand-in stands in).
      const result = await podman(engine, ['build', '--format', 'docker', '--pull=never', ...secrets, ...extra, '-t', tag, ROOT], { timeoutMs: 600_000 });
      assert.equal(result.code, 0, `podman build failed:\n${result.stdout.slice(-6000)}\n${result.stderr.slice(-3000)}`);
      // The image this tag named before (an earlier run's) is dropped; the layers both use stay.
      const now = await podman(engine, ['image', 'inspect', '--format', '{{.Id}}', tag]);
      if (before.code === 0 && before.stdout.trim() !== now.stdout.trim()) await podman(engine, ['rmi', before.stdout.trim()]);
    };
    const started = performance.now();
    await build(TAG, []);
    const buildMs = performance.now() - started;
    timings.push(['build', buildMs]);
    reached.add('built');

    const [inspected] = JSON.parse((await podman(engine, ['image', 'inspect', TAG])).stdout) as Array<{
      Size: number;
      Config: { User?: string };
      Healthcheck?: { Test?: string[] };
    }>;
    t.diagnostic(`built in ${seconds(buildMs)}${caBundle ? ` (npm ci trusting ${caBundle}, the ca secret)` : ''}; ${(inspected!.Size / 1e6).toFixed(0)} MB`);
    assert.equal(inspected!.Config.User, `${UID}:${UID}`);
    assert.deepEqual(inspected!.Healthcheck?.Test, dockerfileHealthcheck(), 'the HEALTHCHECK is in the image (docker format)');

    // The stage that ran npm ci with the secrets mounted: from the layer cache, so this costs a second.
    await build(BUILD_STAGE_TAG, ['--target', 'build']);
    const secretFiles = '/run/secrets/ca /run/secrets/npmrc /root/.npmrc';
    const left = await podman(engine, ['run', '--rm', '--no-healthcheck', '--network', 'none', '--entrypoint', '/bin/sh', BUILD_STAGE_TAG, '-c', `for f in ${secretFiles}; do [ ! -e "$f" ] || echo "$f"; done`]);
    assert.equal(left.code, 0, left.stderr);
    assert.equal(left.stdout, '', 'no secret in the build stage');
  });

  test('trusts the system store, and a CA mounted into it, with nothing written to stderr', async (t) => {
    if (cannotRun(t, 'built')) return;
    const { certPem, file } = upstreamCa();
    // As a corporate CA is added at run time: one PEM file mounted into /etc/ssl/certs.
    const script = "const tls = require('node:tls'); process.stdout.write(JSON.stringify(tls.getCACertificates('system')))";
    const result = await podman(engine, [
      'run', '--rm', '--no-healthcheck', '--network', 'none', '--read-only', '--read-only-tmpfs=false', '--cap-drop', 'ALL',
      '-v', `${file}:/etc/ssl/certs/corp-ca.pem:ro`,
      '--entrypoint', 'node', TAG, '-e', script,
    ]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, '', 'nothing on stderr (node:24-slim alone has no /etc/ssl/certs, and Node says so there)');
    const system = new Set((JSON.parse(result.stdout) as string[]).map(certBody));
    assert.ok(system.size > 100, `Debian's roots are in the system store (${system.size} certificates)`);
    assert.ok(system.has(certBody(certPem)), 'the mounted CA is in the system store');
  });

  test('starts as deploy/compose.yaml runs it: read-only root, no capabilities, its volumes, uid 1000', async (t) => {
    if (cannotRun(t, 'built')) return;
    const ca = upstreamCa();
    registry = await startRegistry({ host: REGISTRY_HOST, ca, bindAddress: '127.0.0.1' });
    image = await buildOciImage(path.join(workDir(), 'layout'), { layers: [{ files: { 'etc/motd': 'from the image test\n' } }, { randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(image.layoutDir, 'v1', registry, { repository: 'team/app' });

    const compose = (parse(readFileSync(path.join(ROOT, 'deploy/compose.yaml'), 'utf8')) as { services: Record<string, ComposeService> }).services.pullthrough!;
    assert.equal(compose.read_only, true);
    const volumeFlags = (compose.volumes ?? []).flatMap((v) => {
      const [name, target] = v.split(':') as [string, string];
      const volume = volumes[target.slice(1) as keyof typeof volumes];
      assert.ok(volume, `compose mounts ${name} at ${target}: a volume this test knows`);
      return ['-v', `${volume}:${target}`];
    });
    const environment = { ...compose.environment, REGISTRIES: registry.hostPort };
    port = await freePort();
    const flags = [
      // --read-only-tmpfs=false: compose's read_only and Kubernetes' readOnlyRootFilesystem add no tmpfs.
      '--read-only', '--read-only-tmpfs=false',
      ...(compose.cap_drop ?? []).flatMap((c) => ['--cap-drop', c]),
      ...(compose.security_opt ?? []).flatMap((o) => ['--security-opt', o.replace(/:true$/, '')]),
      ...volumeFlags,
      ...Object.entries(environment).flatMap(([k, v]) => ['-e', `${k}=${v}`]),
      // The test registry is on the host's loopback: the host's network, the proxy on a free port of it
      // (compose publishes 3128 instead), and the registry's name and CA as a private registry's would be.
      '--network', 'host', '--add-host', `${REGISTRY_HOST}:127.0.0.1`,
      '-e', `PULLTHROUGH_LISTEN=127.0.0.1:${port}`,
      '-v', `${ca.file}:${UPSTREAM_CA}:ro`, '-e', `NODE_EXTRA_CA_CERTS=${UPSTREAM_CA}`,
    ];
    const started = performance.now();
    const run = await podman(engine, ['run', '--detach', '--name', NAME, ...flags, TAG]);
    assert.equal(run.code, 0, run.stderr);
    // Up when /healthz answers; a container that exits meanwhile fails with its logs.
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(2000) }).then((r) => r.ok, () => false);
      if (ok) break;
      const state = await podman(engine, ['inspect', '--format', '{{.State.Status}}', NAME]);
      assert.equal(state.stdout.trim(), 'running', JSON.stringify(await logs()));
      assert.ok(performance.now() - started < 60_000, `not up within 60 s: ${JSON.stringify(await logs())}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const startMs = performance.now() - started;
    timings.push(['first start', startMs]);
    t.diagnostic(`podman run to /healthz answering: ${seconds(startMs)}`);
    reached.add('running');

    const pid = (await podman(engine, ['inspect', '--format', '{{.State.Pid}}', NAME])).stdout.trim();
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    assert.match(status, new RegExp(`^Uid:\\s+${UID}\\s+${UID}\\s+${UID}\\s+${UID}$`, 'm'));
    assert.match(status, new RegExp(`^Gid:\\s+${UID}\\s+${UID}\\s+${UID}\\s+${UID}$`, 'm'));
    for (const set of ['CapPrm', 'CapEff', 'CapBnd']) assert.match(status, new RegExp(`^${set}:\\s+0+$`, 'm'), `${set}: no capabilities`);
    assert.match(status, /^NoNewPrivs:\s+1$/m);
  });

  test("the image's HEALTHCHECK passes", async (t) => {
    if (cannotRun(t, 'running')) return;
    const check = await podman(engine, ['healthcheck', 'run', NAME], { timeoutMs: 30_000 });
    assert.equal(check.code, 0, `${check.stdout}${check.stderr}`);
    const [state] = JSON.parse((await podman(engine, ['inspect', NAME])).stdout) as Array<{ State: { Health?: { Status: string }; Healthcheck?: { Status: string } } }>;
    assert.equal((state!.State.Health ?? state!.State.Healthcheck)?.Status, 'healthy');
  });

  test('an image is pulled through it intact, MISS then HIT', async (t) => {
    if (cannotRun(t, 'running')) return;
    // As a client is set up: the CA from /ca.crt, which is the one in the CA volume.
    const caFile = path.join(workDir(), 'proxy-ca.pem');
    const served = await fetch(`http://127.0.0.1:${port}/ca.crt`).then((r) => r.text());
    writeFileSync(caFile, served);
    const proxyUrl = `http://127.0.0.1:${port}`;
    const access = async () =>
      (await logs()).stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>).filter((e) => e.type === 'blob');

    let started = performance.now();
    const cold = await skopeoCopyThroughProxy({ image: `${registry!.hostPort}/team/app:v1`, proxyUrl, caFile, destDir: path.join(workDir(), 'pull-1') });
    timings.push(['cold pull', performance.now() - started]);
    assert.equal(cold.code, 0, cold.stderr);
    const copy = await verifyDirCopy(path.join(workDir(), 'pull-1'));
    assert.equal(copy.manifestDigest, image.manifestDigest);
    assert.deepEqual(copy.blobDigests, [image.configDigest, ...image.layerDigests].sort());
    // The config and the first layer asked for missed; the other layer was fetched ahead (cache.prefetch): joined, or a hit.
    const coldStatuses = (await access()).map((e) => e.cache);
    assert.ok(coldStatuses.length === 3 && coldStatuses.filter((c) => c === 'MISS').length >= 2 && coldStatuses.every((c) => c === 'MISS' || c === 'JOINED' || c === 'HIT'), coldStatuses.join(' '));

    registry!.resetCounts();
    started = performance.now();
    const warm = await skopeoCopyThroughProxy({ image: `${registry!.hostPort}/team/app:v1`, proxyUrl, caFile, destDir: path.join(workDir(), 'pull-2') });
    timings.push(['warm pull', performance.now() - started]);
    assert.equal(warm.code, 0, warm.stderr);
    assert.equal((await verifyDirCopy(path.join(workDir(), 'pull-2'))).manifestDigest, image.manifestDigest);
    await registry!.settle();
    assert.equal(registry!.count({ kind: 'blob' }), 0, 'no upstream blob requests on the warm pull');
    assert.deepEqual((await access()).slice(3).map((e) => e.cache), ['HIT', 'HIT', 'HIT']);
    t.diagnostic(`skopeo through the container: cold ${seconds(timings.at(-2)![1])}, warm ${seconds(timings.at(-1)![1])}`);
  });

  test('stops on SIGTERM with exit code 0, having written only to its volumes and only JSON lines', async (t) => {
    if (cannotRun(t, 'running')) return;
    const started = performance.now();
    const kill = await podman(engine, ['kill', '--signal', 'TERM', NAME]);
    assert.equal(kill.code, 0, kill.stderr);
    const exit = await podman(engine, ['wait', NAME], { timeoutMs: 30_000 });
    const stopMs = performance.now() - started;
    timings.push(['SIGTERM to exit', stopMs]);
    reached.delete('running');
    assert.equal(exit.stdout.trim(), '0', `exit code ${exit.stdout.trim()}: ${JSON.stringify(await logs())}`);
    assert.ok(stopMs < 10_000, `exited within the 10 s the proxy allows itself (${seconds(stopMs)})`);

    const { stdout, stderr } = await logs();
    for (const [stream, text] of [['stdout', stdout], ['stderr', stderr]] as const) {
      for (const line of text.split('\n').filter((l) => l !== '')) {
        assert.doesNotThrow(() => JSON.parse(line), `a ${stream} line that is not JSON: ${line}`);
      }
    }
    assert.ok(!/"level":"(warn|error)"/.test(stderr), `no warning or error in the operator log:\n${stderr}`);

    // The root filesystem is read-only: podman diff shows only the mount point made for the CA file.
    const mountPoint = new Set([UPSTREAM_CA, path.dirname(UPSTREAM_CA), path.dirname(path.dirname(UPSTREAM_CA))]);
    const diff = (await podman(engine, ['diff', NAME])).stdout.trim().split('\n').filter(Boolean);
    assert.deepEqual(diff.filter((l) => !mountPoint.has(l.slice(2))), [], 'nothing written outside the volumes');
    const mountpoint = async (volume: string) => (await podman(engine, ['volume', 'inspect', '--format', '{{.Mountpoint}}', volume])).stdout.trim();
    const caDir = await mountpoint(volumes.ca);
    const dataDir = await mountpoint(volumes.data);
    assert.deepEqual(readdirSync(caDir).sort(), ['ca.crt', 'ca.key'], 'only the CA in its volume');
    assert.equal(statSync(path.join(caDir, 'ca.key')).mode & 0o777, 0o600);
    assert.ok(existsSync(path.join(dataDir, 'leaf.key')) && !existsSync(path.join(dataDir, 'ca.key')), 'the leaf key, and no CA, in the data volume');
    for (const dir of [caDir, dataDir]) {
      for (const name of readdirSync(dir, { recursive: true, encoding: 'utf8' })) {
        assert.equal(statSync(path.join(dir, name)).uid, UID, `${name} belongs to the image's user`);
      }
    }
    t.diagnostic(`phases: ${timings.map(([phase, ms]) => `${phase} ${seconds(ms)}`).join(', ')}`);
  });
});
