// A checkout as a user has one after `npm ci`: no dist/ yet, Node 24 in node_modules/.bin. `npm start`
// builds dist/ at the first start only and listens soon; `npx pullthrough …` works without a build of
// the user's own; and an older Node is told what it needs instead of failing inside a dependency.
// Everything runs as real processes in a copy of the checkout (node_modules linked), so that the
// builds here do not touch the working tree's dist/.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from 'node:child_process';
import { appendFileSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';

const REPO = path.join(import.meta.dirname, '..');
const work = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-checkout-'));
const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) stopGroup(child, 'SIGKILL');
});
after(() => rmSync(work, { recursive: true, force: true }));

/** The files a clone has (dist/ is not committed), with node_modules as `npm ci` left it. */
function checkout(name: string): string {
  const dir = path.join(work, name);
  for (const entry of ['src', 'config', 'workers', 'bin', 'package.json', 'package-lock.json', 'proxy.yaml']) {
    cpSync(path.join(REPO, entry), path.join(dir, entry), { recursive: true });
  }
  symlinkSync(path.join(REPO, 'node_modules'), path.join(dir, 'node_modules'));
  return dir;
}

/** This process's environment without proxies, tracing, npm's script variables or pullthrough settings, plus `extra`. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^((https?|all|no)_proxy|OTEL_.*|PULLTHROUGH_.*|npm_.*)$/i.test(key)) env[key] = value;
  }
  return { ...env, npm_config_update_notifier: 'false', npm_config_fund: 'false', ...extra };
}

function stopGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
    try {
      process.kill(-child.pid, signal);
    } catch {
      // already gone
    }
  }
}

interface Started {
  /** Milliseconds from spawning `npm start` to the proxy's "listening" line, and to its first /healthz 200. */
  listenMs: number;
  healthyMs: number;
  output: string;
}

/** `npm start` in its own process group; resolves once /healthz answers, then stops it. */
async function npmStart(cwd: string, env: NodeJS.ProcessEnv): Promise<Started> {
  const started = performance.now();
  const child = spawn('npm', ['start'], { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let output = '';
  try {
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`npm start did not listen within 60 s:\n${output}`)), 60_000);
      const read = (chunk: Buffer) => {
        output += chunk.toString();
        const match = /"message":"pullthrough is listening","listen":"127\.0\.0\.1:(\d+)"/.exec(output);
        if (match) {
          clearTimeout(timer);
          resolve(Number(match[1]));
        }
      };
      child.stdout!.on('data', read);
      child.stderr!.on('data', read);
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`npm start exited with ${code}:\n${output}`));
      });
    });
    const listenMs = performance.now() - started;
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${port}/healthz`).then((r) => r.ok, () => false);
      if (ok) break;
      assert.ok(performance.now() - started < 60_000, `/healthz did not answer 200 within 60 s:\n${output}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return { listenMs, healthyMs: performance.now() - started, output };
  } finally {
    const exited = new Promise((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve(undefined) : child.once('exit', resolve)));
    stopGroup(child, 'SIGTERM');
    const timer = setTimeout(() => stopGroup(child, 'SIGKILL'), 15_000);
    await exited;
    clearTimeout(timer);
    running.delete(child);
  }
}

const BUILT = /pullthrough: built \d+ modules into dist\//;

describe('npm start in a fresh checkout', () => {
  test('builds dist/ at the first start only, and a restart listens within a second or two', { timeout: 240_000 }, async (t) => {
    const cwd = checkout('start');
    const env = cleanEnv({ PULLTHROUGH_LISTEN: '127.0.0.1:0', PULLTHROUGH_DATA_DIR: path.join(cwd, 'data') });
    assert.ok(!existsSync(path.join(cwd, 'dist')));

    const first = await npmStart(cwd, env);
    assert.match(first.output, BUILT, 'the first start builds dist/');
    assert.match(first.output, /created a new CA/);
    t.diagnostic(`first start (build, new CA): listening after ${Math.round(first.listenMs)} ms, /healthz 200 after ${Math.round(first.healthyMs)} ms`);

    const restarts: Started[] = [];
    for (let i = 0; i < 3; i++) restarts.push(await npmStart(cwd, env));
    for (const restart of restarts) {
      assert.doesNotMatch(restart.output, BUILT, 'dist/ is up to date: no build');
      assert.match(restart.output, /using the CA in caDir/);
    }
    const fastest = Math.min(...restarts.map((r) => r.listenMs));
    t.diagnostic(`restarts: listening after ${restarts.map((r) => Math.round(r.listenMs)).join(', ')} ms; /healthz 200 after ${restarts.map((r) => Math.round(r.healthyMs)).join(', ')} ms`);
    // ~0.5 s on an idle 2-core machine (npm ~0.15 s, the up-to-date check ~0.08 s, the proxy ~0.25 s);
    // the bound leaves room for a machine busy with other tests.
    assert.ok(fastest < 2_500, `the fastest of 3 restarts listened after ${Math.round(fastest)} ms`);

    // A source that changed since the build is built again.
    appendFileSync(path.join(cwd, 'src', 'log.ts'), '\n// changed after the first build\n');
    const edited = await npmStart(cwd, env);
    assert.match(edited.output, BUILT, 'a changed source rebuilds dist/');
  });
});

describe('npx pullthrough in a fresh checkout', () => {
  test('works without a build of the user\'s own: dist/ is built on the first use, on stderr', { timeout: 120_000 }, () => {
    const cwd = checkout('npx');
    const env = cleanEnv({});
    const npx = (...args: string[]) => spawnSync('npx', ['pullthrough', ...args], { cwd, env, encoding: 'utf8', timeout: 60_000 });

    const version = npx('--version');
    assert.equal(version.status, 0, version.stderr);
    assert.equal(version.stdout, `${(JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string }).version}\n`);
    assert.match(version.stderr, BUILT);

    const check = npx('check-config');
    assert.equal(check.status, 0, check.stderr);
    assert.doesNotMatch(check.stderr, BUILT, 'built once');
    assert.match(check.stdout, /^# pullthrough check-config/, 'stdout is the policy alone');
    assert.match(check.stdout, /^listen: 0\.0\.0\.0:3128$/m);
  });
});

/** A node older than 24 on this machine (Debian's, say), or undefined. */
function oldNode(): { path: string; version: string } | undefined {
  const candidates = spawnSync('sh', ['-c', 'which -a node nodejs; ls /usr/bin/node /usr/local/bin/node 2>/dev/null'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
  for (const candidate of new Set(candidates)) {
    const version = spawnSync(candidate, ['--version'], { encoding: 'utf8' }).stdout?.trim() ?? '';
    const major = Number(/^v(\d+)\./.exec(version)?.[1]);
    if (major && major < 24) return { path: candidate, version };
  }
  return undefined;
}

describe('an older Node', () => {
  test('is told what pullthrough needs, with exit code 1, before anything is loaded', { timeout: 120_000 }, (t) => {
    const old = oldNode();
    if (!old) {
      t.skip('no Node older than 24 on this machine (which -a node)');
      return;
    }
    const cwd = checkout('old-node');
    const build = spawnSync(process.execPath, ['src/build.ts'], { cwd, encoding: 'utf8' });
    assert.equal(build.status, 0, build.stderr);
    const expected = `pullthrough needs Node 24 (found ${old.version}).`;
    // The image's and npm start's entry, the bin of npx and npm link, each with a command that would load undici.
    for (const args of [['dist/src/cli.js', 'start'], ['dist/src/cli.js', 'warm', 'alpine'], ['bin/pullthrough.js', 'check-config'], ['bin/pullthrough.js', '--version']]) {
      const run: SpawnSyncReturns<string> = spawnSync(old.path, args, { cwd, env: cleanEnv({ PULLTHROUGH_LISTEN: '127.0.0.1:0' }), encoding: 'utf8', timeout: 30_000 });
      assert.equal(run.status, 1, `${old.path} ${args.join(' ')}: ${run.stderr}`);
      assert.ok(run.stderr.startsWith(expected), `${args.join(' ')}: ${run.stderr}`);
      assert.equal(run.stderr.split('\n').filter(Boolean).length, 1, `one line, no stack trace: ${run.stderr}`);
      assert.equal(run.stdout, '');
    }
    t.diagnostic(`${old.path} (${old.version}): ${expected}`);
  });
});
