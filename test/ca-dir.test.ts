// The CA on a directory of its own (caDir / PULLTHROUGH_CA_DIR): a writable volume, where the CA is
// created, or a read-only mount of a CA made elsewhere (a Kubernetes Secret, a `:ro` volume).
//
// "Read-only" is made real rather than simulated. As root, each proxy runs in a mount namespace of its
// own (unshare) in which the CA directory is a read-only bind mount, so writes and chmod fail with
// EROFS as on a Secret, even for root, and the mount ends with the process: nothing to clean up, even
// after a crash. Where that is possible the proxy also runs as an unprivileged user (setpriv), as in
// the image. Without root, the CA directory is mode 0555 and its files 0400/0444: read-only by modes;
// the cases that need a read-only mount (a key too open that cannot be chmod-ed) are skipped there.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { parse } from 'yaml';
import { tlsThroughProxy } from './helpers/connect.ts';
import { createTestCa } from './helpers/pki.ts';
import { makeTempDir, removeTempDir, run, spawnTracked, stopChild } from './helpers/process.ts';
import { startTestProxy } from './helpers/proxy.ts';

const CLI = path.join(import.meta.dirname, '../src/cli.ts');
const asRoot = process.getuid?.() === 0;
/** The proxy's user: an unprivileged one that owns nothing when we are root, else ourselves. */
const USER = asRoot ? { uid: 65534, gid: 65534 } : { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };

/** True when this process can give a child a mount namespace with a read-only bind mount. */
function canMountReadOnly(): boolean {
  if (!asRoot) return false;
  const dir = makeTempDir('ro-probe');
  try {
    const probe = spawnSync('unshare', ['--mount', '--', 'sh', '-c', 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && ! touch "$1/x" 2>/dev/null', 'sh', dir], { stdio: 'ignore' });
    return probe.status === 0;
  } finally {
    removeTempDir(dir);
  }
}
const readOnlyMount = canMountReadOnly();
const noReadOnlyMount = readOnlyMount ? false : 'needs root and mount namespaces: a key owned by the proxy\'s user can always be chmod-ed otherwise';

/** `node src/cli.ts <args>` as the proxy's user, with `caDir` read-only (see the file's head). */
function spawnCli(args: string[], caDir: string, env: NodeJS.ProcessEnv): ChildProcess {
  const node = [process.execPath, CLI, ...args];
  // --pdeathsig again after the user change, which clears the one spawnTracked sets.
  const asUser = asRoot ? ['setpriv', '--reuid', String(USER.uid), '--regid', String(USER.gid), '--clear-groups', '--pdeathsig', 'KILL', '--'] : [];
  const command = readOnlyMount
    ? ['unshare', '--mount', '--', 'sh', '-c', 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"', 'sh', caDir, ...asUser, ...node]
    : [...asUser, ...node];
  return spawnTracked(command[0]!, command.slice(1), { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
}

interface Running {
  port: number;
  output(): string;
  stop(): Promise<void>;
}

/** `pullthrough start`; resolves once it listens, rejects with its output if it exits first. */
async function start(caDir: string, env: NodeJS.ProcessEnv): Promise<Running> {
  const child = spawnCli(['start'], caDir, env);
  let output = '';
  child.stdout!.on('data', (c: Buffer) => (output += c));
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr!.on('data', (c: Buffer) => {
      output += c;
      const match = /"listen":"[^"]*:(\d+)"/.exec(output);
      if (match) resolve(Number(match[1]));
    });
    child.once('exit', (code) => reject(Object.assign(new Error(`the proxy exited with ${code}:\n${output}`), { output })));
  });
  return { port, output: () => output, stop: () => stopChild(child) };
}

/** Runs a short command (check-config, ca rotate) the same way and returns its exit code and output. */
async function runCli(args: string[], caDir: string, env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawnCli(args, caDir, env);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (c: Buffer) => (stdout += c));
  child.stderr!.on('data', (c: Buffer) => (stderr += c));
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  return { code, stdout, stderr };
}

/** What `ls -l` would show of a directory: the fingerprint of "nothing was written or chmod-ed". */
function listing(dir: string): string[] {
  return readdirSync(dir).sort().map((f) => {
    const s = statSync(path.join(dir, f));
    return `${f} ${s.mode.toString(8)} ${s.uid}:${s.gid} ${s.size} ${s.mtimeMs}`;
  });
}

describe('the CA in a directory of its own', () => {
  const work = makeTempDir('ca-dir');
  chmodSync(work, 0o755); // traversable by the proxy's user
  after(() => {
    spawnSync('chmod', ['-R', 'u+w', work]); // the read-only CA directories, when made so by their modes
    removeTempDir(work);
  });
  let count = 0;

  /** A data directory the proxy's user owns, and a policy file (listen, dataDir, one registry). */
  function setup(): { dataDir: string; config: string; env: NodeJS.ProcessEnv } {
    const base = path.join(work, `case-${++count}`);
    mkdirSync(base, { mode: 0o755 });
    const dataDir = path.join(base, 'data');
    mkdirSync(dataDir, { mode: 0o700 });
    chownSync(dataDir, USER.uid, USER.gid);
    const home = path.join(base, 'home');
    mkdirSync(home, { mode: 0o555 });
    const config = path.join(base, 'proxy.yaml');
    writeFileSync(config, `listen: 127.0.0.1:0\ndataDir: ${JSON.stringify(dataDir)}\nregistries:\n  registry.test: {}\nhosts:\n  registry.test: 127.0.0.1\n`, { mode: 0o644 });
    return { dataDir, config, env: { HOME: home, PULLTHROUGH_CONFIG: config } };
  }

  /**
   * A CA made elsewhere, in a directory of its own as a volume would mount it. `owner`: of the files
   * (the directory is root's, or ours without root); `keyMode`/`certMode`: their modes.
   */
  function mountedCa(name: string, files: { owner: { uid: number; gid: number }; keyMode: number; certMode: number }): { caDir: string; certPem: string } {
    const caDir = path.join(work, `${name}-${++count}`);
    mkdirSync(caDir, { mode: 0o755 });
    const own = createTestCa(`${name} CA`);
    for (const [file, pem, mode] of [['ca.crt', own.certPem, files.certMode], ['ca.key', own.keyPem, files.keyMode]] as const) {
      writeFileSync(path.join(caDir, file), pem);
      chownSync(path.join(caDir, file), files.owner.uid, files.owner.gid);
      chmodSync(path.join(caDir, file), mode);
    }
    if (!readOnlyMount) chmodSync(caDir, 0o555);
    return { caDir, certPem: own.certPem };
  }

  /** The proxy starts with the mounted CA, serves it as /ca.crt, and intercepts TLS with leaves it signed. */
  async function assertServesMountedCa(caDir: string, certPem: string, dataDir: string, env: NodeJS.ProcessEnv): Promise<void> {
    const before = listing(caDir);
    const proxy = await start(caDir, env);
    try {
      const served = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      assert.equal(served, new X509Certificate(certPem).toString(), 'GET /ca.crt is the mounted CA');
      const socket = await tlsThroughProxy(proxy.port, 'registry.test', 443, certPem);
      const leaf = new X509Certificate(socket.getPeerX509Certificate()!.raw);
      assert.ok(leaf.checkIssued(new X509Certificate(certPem)), 'the leaf is signed by the mounted CA');
      socket.destroy();
      assert.match(proxy.output(), new RegExp(`"caDir":"${caDir}"`));
    } finally {
      await proxy.stop();
    }
    assert.deepEqual(listing(caDir), before, 'nothing was written to the CA directory, nor chmod-ed');
    assert.equal(statSync(path.join(dataDir, 'leaf.key')).uid, USER.uid, 'leaf.key is in the data directory');
    assert.ok(!existsSync(path.join(dataDir, 'ca.crt')) && !existsSync(path.join(dataDir, 'ca.key')));
  }

  test('writable (caDir in proxy.yaml, relative to it): the CA is created there, not in the data directory', async () => {
    const proxy = await startTestProxy('caDir: ./ca\n');
    try {
      const caDir = path.join(proxy.dir, 'ca');
      assert.equal(proxy.caFile, path.join(caDir, 'ca.crt'));
      assert.equal(await (await fetch(`${proxy.url}/ca.crt`)).text(), readFileSync(path.join(caDir, 'ca.crt'), 'utf8'));
      assert.equal(statSync(path.join(caDir, 'ca.key')).mode & 0o777, 0o600);
      assert.deepEqual(readdirSync(caDir).sort(), ['ca.crt', 'ca.key']);
      assert.ok(!existsSync(path.join(proxy.dataDir, 'ca.crt')) && !existsSync(path.join(proxy.dataDir, 'ca.key')), 'no CA in the data directory');
      assert.ok(existsSync(path.join(proxy.dataDir, 'leaf.key')), 'leaf.key is in the data directory');
      assert.ok(proxy.lines.some((l) => l.includes('created a new CA') && l.includes(`"caDir":"${caDir}"`)));

      const check = await run(process.execPath, [CLI, 'check-config', '--config', path.join(proxy.dir, 'proxy.yaml')]);
      assert.equal(check.code, 0, check.stderr);
      assert.equal((parse(check.stdout) as { caDir: string }).caDir, caDir);
    } finally {
      await proxy.close();
    }
  });

  test('PULLTHROUGH_CA_DIR puts it elsewhere, and overrides caDir', async () => {
    const caDir = path.join(makeTempDir('ca-env'), 'ca');
    const proxy = await startTestProxy('caDir: ./not-here\n', { PULLTHROUGH_CA_DIR: caDir });
    try {
      assert.equal(await (await fetch(`${proxy.url}/ca.crt`)).text(), readFileSync(path.join(caDir, 'ca.crt'), 'utf8'));
      assert.ok(!existsSync(path.join(proxy.dir, 'not-here')));
      const check = await run(process.execPath, [CLI, 'check-config', '--config', path.join(proxy.dir, 'proxy.yaml')], { env: { PATH: process.env.PATH, PULLTHROUGH_CA_DIR: caDir } });
      assert.equal((parse(check.stdout) as { caDir: string }).caDir, caDir);
    } finally {
      await proxy.close();
      removeTempDir(path.dirname(caDir));
    }
  });

  test('read-only, key 0400 owned by the proxy\'s user (a `:ro` volume): used as it is', async () => {
    const { dataDir, env } = setup();
    // Group root, which the proxy is not in: no leniency for its group can hide a chmod attempt.
    const { caDir, certPem } = mountedCa('volume', { owner: { uid: USER.uid, gid: asRoot ? 0 : USER.gid }, keyMode: 0o400, certMode: 0o444 });
    await assertServesMountedCa(caDir, certPem, dataDir, { ...env, PULLTHROUGH_CA_DIR: caDir });

    // A restart keeps leaf.key (and so the leaves stored under the CA's fingerprint stay valid).
    const leafKey = readFileSync(path.join(dataDir, 'leaf.key'), 'utf8');
    await assertServesMountedCa(caDir, certPem, dataDir, { ...env, PULLTHROUGH_CA_DIR: caDir });
    assert.equal(readFileSync(path.join(dataDir, 'leaf.key'), 'utf8'), leafKey);

    const check = await runCli(['check-config'], caDir, { ...env, PULLTHROUGH_CA_DIR: caDir });
    assert.equal(check.code, 0, check.stderr);
    const effective = parse(check.stdout) as { caDir: string; dataDir: string };
    assert.equal(effective.caDir, caDir);
    assert.equal(effective.dataDir, dataDir);
  });

  test('read-only Kubernetes Secret with fsGroup (root-owned, 0440, group of the proxy): used as it is', { skip: !asRoot && 'needs root to make root-owned files' }, async () => {
    const { dataDir, env } = setup();
    const { caDir, certPem } = mountedCa('secret', { owner: { uid: 0, gid: USER.gid }, keyMode: 0o440, certMode: 0o440 });
    await assertServesMountedCa(caDir, certPem, dataDir, { ...env, PULLTHROUGH_CA_DIR: caDir });
  });

  test('read-only with a key readable by others: refused, saying what to fix', { skip: noReadOnlyMount }, async () => {
    const { env } = setup();
    const { caDir } = mountedCa('open', { owner: USER, keyMode: 0o644, certMode: 0o644 });
    const failed = await start(caDir, { ...env, PULLTHROUGH_CA_DIR: caDir }).then(
      async (proxy) => (await proxy.stop(), assert.fail('the proxy started with a key readable by everyone')),
      (err: Error & { output: string }) => err.output,
    );
    assert.match(failed, new RegExp(`${path.join(caDir, 'ca.key')} is readable by other users \\(mode 0644\\) and cannot be made 0600 \\(EROFS\\): give it mode 0600 or 0400 where it comes from`));
  });

  test('read-only and empty: refused, saying what to do', async () => {
    const { env } = setup();
    const caDir = path.join(work, `empty-${++count}`);
    mkdirSync(caDir, { mode: readOnlyMount ? 0o755 : 0o555 });
    const failed = await start(caDir, { ...env, PULLTHROUGH_CA_DIR: caDir }).then(
      async (proxy) => (await proxy.stop(), assert.fail('the proxy started without a CA')),
      (err: Error & { output: string }) => err.output,
    );
    assert.match(failed, /cannot create the CA in .* \((EROFS|EACCES)\): make that directory writable by the proxy, or place your own ca\.crt and ca\.key in it/);
  });

  test('read-only: `ca` prints the mounted CA, `ca rotate` says where to replace it', async () => {
    const { env } = setup();
    const { caDir, certPem } = mountedCa('rotate', { owner: USER, keyMode: 0o400, certMode: 0o444 });
    const shown = await runCli(['ca'], caDir, { ...env, PULLTHROUGH_CA_DIR: caDir });
    assert.equal(shown.code, 0, shown.stderr);
    assert.ok(shown.stdout.includes(`SHA256 ${new X509Certificate(certPem).fingerprint256}`));
    const rotate = await runCli(['ca', 'rotate'], caDir, { ...env, PULLTHROUGH_CA_DIR: caDir });
    assert.equal(rotate.code, 1);
    assert.match(rotate.stderr, /pullthrough ca rotate: cannot rotate the CA in .* \((EROFS|EACCES)\): replace ca\.crt and ca\.key where that directory comes from, then restart the proxy/);
  });
});
