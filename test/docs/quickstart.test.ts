// The README's quickstart, run as written: every line of every `sh` block under "## Quickstart" is
// a command, taken from README.md itself so that the two cannot drift apart. `npm ci` is what .ci/run
// runs before the tests; `npm start` starts the proxy in the background, as the shipped proxy.yaml
// says: on 0.0.0.0:3128, with its data in ./data. Every other command runs in bash with 127.0.0.1 for
// `proxy`, and `| sudo bash` as the setup script's dry run, `| ROOT=<dir> bash`. The commands run in a
// copy of the checkout (node_modules linked), so that `npm start`'s build of dist/ and its ./data do
// not touch the working tree.
//
// Port 3128 is the README's: when something else listens there, the test is skipped and says so.
// PULLTHROUGH_TEST_LOOPBACK_ONLY=1 keeps the proxy on 127.0.0.1:3128 (PULLTHROUGH_LISTEN), for machines
// where a test must not listen on every address.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { codeBlocks, readDoc, REPO, section } from './markdown.ts';

const PROXY = 'http://proxy:3128';
const LOOPBACK_ONLY = process.env.PULLTHROUGH_TEST_LOOPBACK_ONLY === '1';
/** Where the shipped proxy.yaml listens (or, loopback only, the same port on 127.0.0.1). */
const LISTEN = LOOPBACK_ONLY ? '127.0.0.1:3128' : '0.0.0.0:3128';

const work = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-docs-quickstart-'));
let proxy: ChildProcess | undefined;

/** Stops the proxy's whole process group (npm and the node it started), then removes the temp dir. */
function stopProxy(signal: NodeJS.Signals = 'SIGTERM'): void {
  if (proxy?.pid !== undefined && proxy.exitCode === null && proxy.signalCode === null) {
    try {
      process.kill(-proxy.pid, signal);
    } catch {
      // already gone
    }
  }
}
process.once('exit', () => stopProxy('SIGKILL'));
after(async () => {
  if (proxy && proxy.exitCode === null && proxy.signalCode === null) {
    const exited = new Promise((resolve) => proxy!.once('exit', resolve));
    stopProxy();
    const timer = setTimeout(() => stopProxy('SIGKILL'), 15_000);
    await exited;
    clearTimeout(timer);
  }
  rmSync(work, { recursive: true, force: true });
});

function quickstartCommands(): string[] {
  const blocks = codeBlocks(section(readDoc('README.md'), 'Quickstart')).filter((b) => b.lang === 'sh');
  assert.ok(blocks.length > 0, 'README.md has no sh block under "## Quickstart"');
  const commands = blocks.flatMap((b) => b.body.split('\n')).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  for (const c of commands) assert.ok(!c.endsWith('\\'), `"${c}": one command a line, please (the test runs each line)`);
  return commands;
}

/** A checkout as users have one: the sources, package files and proxy.yaml; node_modules linked. */
function checkout(): string {
  const dir = path.join(work, 'pullthrough');
  for (const entry of ['src', 'config', 'workers', 'bin', 'package.json', 'package-lock.json', 'proxy.yaml']) {
    cpSync(path.join(REPO, entry), path.join(dir, entry), { recursive: true });
  }
  symlinkSync(path.join(REPO, 'node_modules'), path.join(dir, 'node_modules'));
  return dir;
}

/** This process's environment without proxies, tracing or pullthrough settings, plus `extra`. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^((https?|all|no)_proxy|OTEL_.*|PULLTHROUGH_.*|npm_.*)$/i.test(key)) env[key] = value;
  }
  return { ...env, ...extra };
}

/** Why the quickstart cannot listen where it says (port 3128 taken, say), or undefined when it can. */
function portTaken(): Promise<string | undefined> {
  const [host, port] = [LISTEN.slice(0, LISTEN.lastIndexOf(':')), Number(LISTEN.slice(LISTEN.lastIndexOf(':') + 1))];
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(`${LISTEN} is not free on this machine (${err.code}): the quickstart runs as written only where the proxy can listen there`));
    probe.listen(port, host, () => probe.close(() => resolve(undefined)));
  });
}

/** Runs `npm start` in the background; resolves with the milliseconds it took once the proxy says it listens. */
function npmStart(cwd: string, env: NodeJS.ProcessEnv): Promise<number> {
  // Its own process group, so that the test can stop npm and the proxy it started together.
  const child = spawn('npm', ['start'], { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  proxy = child;
  let output = '';
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`npm start did not listen within 120 s:\n${output}`)), 120_000);
    const read = (chunk: Buffer) => {
      output += chunk.toString();
      if (output.includes(`"message":"pullthrough is listening","listen":"${LISTEN}"`)) {
        clearTimeout(timer);
        resolve(performance.now() - started);
      }
    };
    child.stdout!.on('data', read);
    child.stderr!.on('data', read);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`npm start exited with ${code}:\n${output}`));
    });
  });
}

test("README.md's quickstart: every command runs as written", { timeout: 240_000 }, async (t) => {
  const commands = quickstartCommands();
  const taken = await portTaken();
  if (taken) {
    t.skip(taken);
    return;
  }
  const cwd = checkout();
  const dataDir = path.join(cwd, 'data');
  const env = cleanEnv(LOOPBACK_ONLY ? { PULLTHROUGH_LISTEN: LISTEN } : {});
  const root = path.join(work, 'client-root');
  mkdirSync(root);
  let listening = false;
  const done: string[] = [];

  for (const command of commands) {
    if (command === 'npm ci') {
      assert.match(readFileSync(path.join(REPO, '.ci/run'), 'utf8'), /^npm ci\b/m, '.ci/run does not run npm ci');
      done.push('npm ci');
      continue;
    }
    if (command === 'npm start') {
      const ms = await npmStart(cwd, env);
      t.diagnostic(`npm start listened on ${LISTEN} after ${Math.round(ms)} ms (a first start: it built dist/ and made the CA)`);
      listening = true;
      done.push('npm start');
      continue;
    }
    assert.ok(listening, `"${command}" comes before npm start`);
    const address = 'http://127.0.0.1:3128';
    let line = command.replaceAll(PROXY, address);
    if (/\/setup\//.test(command)) {
      assert.match(command, /\| sudo bash$/, `"${command}": the setup script is expected to be piped to sudo bash`);
      line = line.replace(/\| sudo bash$/, `| ROOT='${root}' bash`);
    }
    const run = spawnSync('bash', ['-o', 'pipefail', '-c', line], { cwd, env, encoding: 'utf8', timeout: 60_000 });
    assert.equal(run.status, 0, `"${command}" failed (${run.status}):\n${run.stdout}\n${run.stderr}`);

    const caPem = readFileSync(path.join(dataDir, 'ca.crt'), 'utf8');
    if (/\/healthz\b/.test(command)) {
      assert.equal((JSON.parse(run.stdout) as { status: string }).status, 'ok');
      done.push('healthz');
    } else if (/\/ca\.crt\b/.test(command)) {
      const file = /-o\s+(\S+)/.exec(command)?.[1];
      assert.equal(file ? readFileSync(path.join(cwd, file), 'utf8') : run.stdout, caPem);
      done.push('ca.crt');
    } else if (/^npm run check-config$/.test(command)) {
      const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      assert.match(run.stdout, new RegExp(`^listen: ${escape(LISTEN)}$`, 'm'));
      assert.match(run.stdout, new RegExp(`^dataDir: ${escape(dataDir)}$`, 'm'));
      assert.match(run.stdout, new RegExp(`^# source: ${escape(path.join(cwd, 'proxy.yaml'))}$`, 'm'));
      done.push('check-config');
    } else if (/\/setup\/(docker|containerd|podman)\b/.test(command)) {
      const runtime = /\/setup\/(\w+)/.exec(command)![1]!;
      const config = {
        docker: 'etc/systemd/system/docker.service.d/http-proxy.conf',
        containerd: 'etc/systemd/system/containerd.service.d/http-proxy.conf',
        podman: 'etc/containers/containers.conf.d/pullthrough-proxy.conf',
      }[runtime]!;
      assert.ok(existsSync(path.join(root, config)), `no ${config} under ROOT:\n${run.stdout}`);
      assert.match(readFileSync(path.join(root, config), 'utf8'), new RegExp(`HTTPS_PROXY=${address}"`));
      assert.equal(readFileSync(path.join(root, 'usr/local/share/ca-certificates/pullthrough-ca.crt'), 'utf8'), caPem);
      assert.match(run.stdout, /would run: systemctl/);
      done.push(`setup/${runtime}`);
    } else {
      assert.fail(`"${command}" is in the quickstart but this test does not know what it should do: teach it`);
    }
  }
  for (const expected of ['npm ci', 'npm start', 'healthz', 'ca.crt', 'check-config', 'setup/docker']) {
    assert.ok(done.includes(expected), `the quickstart has no ${expected} (ran: ${done.join(', ')})`);
  }
});
