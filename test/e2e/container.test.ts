// The container image without a container engine (there is none here): the Dockerfile's final stage is
// read for its ENV, WORKDIR, USER-less command (ENTRYPOINT + CMD) and HEALTHCHECK, an application
// directory is laid out as the image's /app (dist/ built by src/build.ts in a separate "build stage",
// production packages only, package.json, proxy.yaml, all owned by root and read-only), and that command
// runs as an unprivileged user configured by environment variables alone, as `docker run -e …` would,
// with the CA in a directory of its own as deploy/compose.yaml (a volume) and deploy/kubernetes (a
// read-only Secret) mount it (PULLTHROUGH_CA_DIR). A real registry is then pulled through it with
// skopeo. Its trust store is one bundle file and no certificate directory (SSL_CERT_FILE, a missing SSL_CERT_DIR), as on a base image
// without ca-certificates: the registry is trusted through that file, and the proxy still writes nothing
// but JSON lines.
// test/e2e/image.test.ts builds the real image with podman and runs it; this imitation stays because it
// needs neither root nor podman and takes seconds, so every machine checks the image's command and layout.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { appendFileSync, chownSync, chmodSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { lookup } from 'node:dns/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { buildOciImage, type BuiltImage } from '../helpers/oci-image.ts';
import { createTestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir, run, spawnTracked, stopChild } from '../helpers/process.ts';
import { startRegistry, type RegistryHandle } from '../helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from '../helpers/skopeo.ts';
import { freePort } from '../helpers/ports.ts';

const ROOT = path.join(import.meta.dirname, '../..');
// An unprivileged user that owns nothing else (the image's is 1000, "node"). Only root can switch to it;
// other runs use their own user, whose app directory is then made read-only by its modes instead.
const asRoot = process.getuid?.() === 0;
const USER = asRoot ? { uid: 65534, gid: 65534 } : { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };

interface FinalStage {
  env: Record<string, string>;
  workdir: string;
  command: string[];
  healthcheck: string[];
}

/** What the image runs: the last stage's ENV, WORKDIR, ENTRYPOINT + CMD and HEALTHCHECK (exec forms). */
function readFinalStage(dockerfile: string): FinalStage {
  const lines = dockerfile
    .replace(/\\\r?\n/g, ' ')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line && !line.startsWith('#'));
  const stage = lines.slice(lines.findLastIndex((line) => /^FROM\s/i.test(line)));
  const final: FinalStage = { env: {}, workdir: '/', command: [], healthcheck: [] };
  let entrypoint: string[] = [];
  let cmd: string[] = [];
  for (const line of stage) {
    const [, keyword = '', args = ''] = /^(\w+)\s+(.*)$/.exec(line) ?? [];
    if (keyword === 'ENV') for (const [, key, value] of args.matchAll(/(\w+)=(\S+)/g)) final.env[key!] = value!;
    if (keyword === 'WORKDIR') final.workdir = args;
    if (keyword === 'ENTRYPOINT') entrypoint = JSON.parse(args) as string[];
    if (keyword === 'CMD') cmd = JSON.parse(args) as string[];
    if (keyword === 'HEALTHCHECK') final.healthcheck = JSON.parse(args.slice(args.indexOf('CMD ') + 4)) as string[];
  }
  final.command = [...entrypoint, ...cmd];
  return final;
}

/**
 * The image's /app: the build stage (src/, config/, workers/, package.json → node src/build.ts) in its
 * own directory, then only what the final stage copies. node_modules holds the packages `npm ci
 * --omit=dev` installs (the lockfile's non-dev entries), so a run-time import of a devDependency fails here.
 */
function layOutApp(work: string): string {
  const build = path.join(work, 'build');
  for (const dir of ['src', 'config', 'workers']) cpSync(path.join(ROOT, dir), path.join(build, dir), { recursive: true });
  cpSync(path.join(ROOT, 'package.json'), path.join(build, 'package.json'));
  const built = spawnSync(process.execPath, ['src/build.ts'], { cwd: build, encoding: 'utf8' });
  assert.equal(built.status, 0, `src/build.ts: ${built.stderr}`);

  const app = path.join(work, 'app');
  cpSync(path.join(build, 'dist'), path.join(app, 'dist'), { recursive: true });
  const lock = JSON.parse(readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  for (const [name, entry] of Object.entries(lock.packages)) {
    // Nested packages come with their parent; optional ones for other platforms are not installed.
    if (!name.startsWith('node_modules/') || name.lastIndexOf('node_modules/') !== 0 || entry.dev) continue;
    if (existsSync(path.join(ROOT, name))) cpSync(path.join(ROOT, name), path.join(app, name), { recursive: true });
  }
  for (const file of ['package.json', 'proxy.yaml']) cpSync(path.join(ROOT, file), path.join(app, file));
  // As COPY leaves it: owned by root, not writable by the proxy's user (nor by anyone, without root).
  assert.equal(spawnSync('chmod', ['-R', 'a-w', app]).status, 0);
  return app;
}

/** Every file and folder under dir with its size, mode and mtime: a fingerprint of "nothing changed". */
function snapshot(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .sort()
    .map((name) => {
      const s = statSync(path.join(dir, name));
      return `${name} ${s.size} ${s.mode.toString(8)} ${s.mtimeMs}`;
    });
}


/** A directory the proxy's user owns, as a volume mounted for it would be. */
function ownedDir(dir: string): string {
  mkdirSync(dir, { mode: 0o700 });
  chownSync(dir, USER.uid, USER.gid);
  return dir;
}

// skopeo (Go) sends no loopback name or address through a proxy, and a container gets no `hosts:`
// override from the environment: the registry needs a name the system resolver maps to loopback. As
// root, this test gives it one in /etc/hosts for its duration. Otherwise it falls back to the machine's
// own name where /etc/hosts maps it to loopback (Debian's 127.0.1.1, sandboxes' 127.0.0.1), and skips
// the suite where it does not.
const TEST_HOST = 'pullthrough-container.test';
const HOSTS_FILE = '/etc/hosts';
const HOSTS_MARK = '# pullthrough container test, pid ';
const hostsLine = `127.0.0.1 ${TEST_HOST} ${HOSTS_MARK}${process.pid}`;

/** Lines of /etc/hosts without this test's entries: its own, and those of runs that died without cleaning up. */
function hostsWithoutOurs(text: string): string[] {
  return text.split('\n').filter((line) => {
    const pid = line.includes(HOSTS_MARK) ? Number(line.slice(line.indexOf(HOSTS_MARK) + HOSTS_MARK.length)) : undefined;
    if (pid === undefined) return true;
    if (pid === process.pid) return false;
    try {
      process.kill(pid, 0); // another run, still going: keep its entry
      return true;
    } catch {
      return false;
    }
  });
}

function removeHostsEntry(): void {
  const text = readFileSync(HOSTS_FILE, 'utf8');
  const kept = hostsWithoutOurs(text).join('\n');
  if (kept !== text) writeFileSync(HOSTS_FILE, kept);
}

/** Adds TEST_HOST → 127.0.0.1, removed again by removeHostsEntry, at exit, or on a signal. */
function addHostsEntry(): void {
  removeHostsEntry();
  const text = readFileSync(HOSTS_FILE, 'utf8');
  appendFileSync(HOSTS_FILE, `${text.endsWith('\n') || text === '' ? '' : '\n'}${hostsLine}\n`);
  process.once('exit', removeHostsEntry);
  // Before test/helpers/process.ts's handlers, which end the process by the same signal (no 'exit').
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.prependOnceListener(signal, removeHostsEntry);
}

const hostname = asRoot ? TEST_HOST : os.hostname();
const hostAddress = asRoot ? '127.0.0.1' : await lookup(hostname, { family: 4 }).then((r) => r.address, () => undefined);
const skip = hostAddress?.startsWith('127.') ? false : `not root (to name the test registry in /etc/hosts), and the host name ${hostname} does not resolve to a loopback address (${hostAddress ?? 'unresolved'})`;

describe('the container image, run as its entrypoint would be', { skip }, () => {
  const stage = readFinalStage(readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8'));
  let work: string;
  let app: string;
  let dataDir: string;
  let caDir: string;
  let tmpDir: string;
  let registry: RegistryHandle;
  let image: BuiltImage;
  let child: ChildProcess;
  let env: NodeJS.ProcessEnv;
  let port: number;
  let appBefore: string[];
  let output = '';
  const access = () => output.split('\n').filter((l) => l.startsWith('{"')).map((l) => JSON.parse(l) as Record<string, unknown>).filter((e) => e.type === 'blob');

  before(async () => {
    work = makeTempDir('container');
    chmodSync(work, 0o755); // traversable by the proxy's user, as / is
    app = layOutApp(work);
    appBefore = snapshot(app);
    dataDir = ownedDir(path.join(work, 'data'));
    caDir = ownedDir(path.join(work, 'ca'));
    tmpDir = ownedDir(path.join(work, 'tmp'));
    const home = path.join(work, 'home'); // the image's /home/node: there, but on the read-only root
    mkdirSync(home, { mode: 0o555 });

    if (asRoot) {
      addHostsEntry();
      assert.equal((await lookup(TEST_HOST, { family: 4 })).address, '127.0.0.1', `${TEST_HOST} resolves through ${HOSTS_FILE}`);
    }
    const ca = createTestCa('pullthrough container test upstream CA');
    registry = await startRegistry({ host: hostname, ca, bindAddress: hostAddress! });
    image = await buildOciImage(path.join(work, 'layout'), { layers: [{ files: { 'etc/motd': 'from the container\n' } }, { randomBytes: 2 * 1024 * 1024 }], tag: 'v1' });
    await pushImage(image.layoutDir, 'v1', registry, { repository: 'team/app' });
    const upstreamCa = path.join(work, 'upstream-ca.pem');
    writeFileSync(upstreamCa, ca.certPem, { mode: 0o644 });

    port = await freePort();
    // Only what `docker run -e` would add to the image's ENV; `node` is found on PATH, as in the image.
    env = {
      PATH: `${path.dirname(process.execPath)}:/usr/bin:/bin`,
      HOME: home,
      TMPDIR: tmpDir,
      ...stage.env,
      PULLTHROUGH_DATA_DIR: dataDir,
      PULLTHROUGH_CA_DIR: caDir,
      PULLTHROUGH_LISTEN: `127.0.0.1:${port}`,
      REGISTRIES: registry.hostPort,
      SSL_CERT_DIR: path.join(work, 'no-ssl-certs'),
      SSL_CERT_FILE: upstreamCa,
    };
    const [command, ...args] = stage.command as [string, ...string[]];
    // --pdeathsig after the user change: a change of credentials clears the one spawnTracked sets.
    child = asRoot
      ? spawnTracked('setpriv', ['--reuid', String(USER.uid), '--regid', String(USER.gid), '--clear-groups', '--pdeathsig', 'KILL', '--', command, ...args], { cwd: app, env, stdio: ['ignore', 'pipe', 'pipe'] })
      : spawnTracked(command, args, { cwd: app, env, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (c: Buffer) => (output += c));
    await new Promise<void>((resolve, reject) => {
      child.stderr!.on('data', (c: Buffer) => {
        output += c;
        if (output.includes(`"listen":"127.0.0.1:${port}"`)) resolve();
      });
      child.once('exit', (code) => reject(new Error(`the proxy exited with ${code}:\n${output}`)));
    });
  });

  after(async () => {
    if (child) await stopChild(child);
    await registry?.stop();
    if (app) spawnSync('chmod', ['-R', 'u+w', app]);
    if (work) removeTempDir(work);
    if (asRoot) removeHostsEntry();
  });

  test('runs as the unprivileged user and keeps the CA (in its own volume) and leaf keys private to it', () => {
    const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
    assert.match(status, new RegExp(`^Uid:\\s+${USER.uid}\\s+${USER.uid}\\s+${USER.uid}\\s+${USER.uid}$`, 'm'));
    if (asRoot) assert.match(status, /^Groups:\s*$/m, 'no supplementary groups');
    assert.deepEqual(readdirSync(caDir).sort(), ['ca.crt', 'ca.key']);
    for (const key of [path.join(caDir, 'ca.key'), path.join(dataDir, 'leaf.key')]) {
      const stat = statSync(key);
      assert.equal(stat.mode & 0o777, 0o600, key);
      assert.equal(stat.uid, USER.uid, key);
    }
    assert.ok(!existsSync(path.join(dataDir, 'ca.key')), 'no CA in the data volume');
  });

  test("/healthz answers, and so does the image's HEALTHCHECK command", async () => {
    const response = await fetch(`http://127.0.0.1:${port}/healthz`);
    assert.equal(response.status, 200);
    assert.equal(((await response.json()) as { status: string }).status, 'ok');
    const [command, ...args] = stage.healthcheck as [string, ...string[]];
    const check = asRoot
      ? await run('setpriv', ['--reuid', String(USER.uid), '--regid', String(USER.gid), '--clear-groups', '--', command, ...args], { cwd: app, env, timeoutMs: 10_000 })
      : await run(command, args, { cwd: app, env, timeoutMs: 10_000 });
    assert.equal(check.code, 0, check.stderr);
  });

  test('an image configured by REGISTRIES alone is pulled intact, then served from the data volume', async () => {
    const caFile = path.join(caDir, 'ca.crt');
    const proxyUrl = `http://127.0.0.1:${port}`;
    const cold = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/app:v1`, proxyUrl, caFile, destDir: path.join(work, 'pull-1') });
    assert.equal(cold.code, 0, cold.stderr);
    const copy = await verifyDirCopy(path.join(work, 'pull-1'));
    assert.equal(copy.manifestDigest, image.manifestDigest);
    assert.deepEqual(copy.blobDigests, [image.configDigest, ...image.layerDigests].sort());
    // The config and the first layer asked for missed; the other layer was fetched ahead (cache.prefetch): joined, or a hit.
    const coldStatuses = access().map((e) => e.cache);
    assert.ok(coldStatuses.length === 3 && coldStatuses.filter((c) => c === 'MISS').length >= 2 && coldStatuses.every((c) => c === 'MISS' || c === 'JOINED' || c === 'HIT'), coldStatuses.join(' '));

    registry.resetCounts();
    const warm = await skopeoCopyThroughProxy({ image: `${registry.hostPort}/team/app:v1`, proxyUrl, caFile, destDir: path.join(work, 'pull-2') });
    assert.equal(warm.code, 0, warm.stderr);
    assert.equal((await verifyDirCopy(path.join(work, 'pull-2'))).manifestDigest, image.manifestDigest);
    await registry.settle();
    assert.equal(registry.count({ kind: 'blob' }), 0, 'no upstream blob requests on the warm pull');
    assert.deepEqual(access().slice(3).map((e) => e.cache), ['HIT', 'HIT', 'HIT']);
  });

  test('writes nothing outside its two volumes, only JSON lines to its logs, and stops cleanly on SIGTERM', async () => {
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    child.kill('SIGTERM');
    assert.equal(await exited, 0, output);
    for (const line of output.split('\n').filter((l) => l !== '')) assert.doesNotThrow(() => JSON.parse(line), `not a JSON line: ${line}`);
    assert.deepEqual(snapshot(app), appBefore, 'the application directory is unchanged');
    assert.deepEqual(readdirSync(tmpDir), [], 'nothing in TMPDIR');
    assert.deepEqual(readdirSync(path.join(work, 'home')), [], 'nothing in HOME');
    for (const dir of [dataDir, caDir]) {
      for (const name of readdirSync(dir, { recursive: true, encoding: 'utf8' })) {
        assert.equal(statSync(path.join(dir, name)).uid, USER.uid, `${name} belongs to the proxy's user`);
      }
    }
    assert.deepEqual(readdirSync(caDir).sort(), ['ca.crt', 'ca.key'], 'only the CA in its volume');
  });
});
