// pullthrough as users run it — `npm start` builds dist/ and runs `node dist/src/cli.js start` — in its own process, so that
// /proc shows its CPU and memory alone, and the benchmark's own work (spawning curl, sampling /proc)
// is not counted against it.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isRunning, spawnTracked, stopChild } from './cleanup.ts';
import { answers200, freePort, waitFor } from './net.ts';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const CLI = join(REPO, 'dist', 'src', 'cli.js');
/**
 * As package.json's start script: 1 MiB semi-spaces keep Buffer garbage short-lived, a heap that grows
 * by 50% between full collections keeps request garbage from piling up, and two malloc arenas stop
 * every thread (fill worker, libuv pool) from keeping an arena of its own at its peak. (20% took 1,000
 * clients of cached blobs to ~290 MiB against ~300 at 50% and ~318 at V8's 100%, but its full
 * collections doubled the p99 of cached manifests at 2,000/s: ~18 ms against ~12.)
 */
export const START_NODE_ARGS = ['--max-semi-space-size=1', '--heap-growing-percent=50'];
export const START_ENV: Record<string, string> = { MALLOC_ARENA_MAX: '2' };
let built = false;

/** The benchmark measures what `npm start` runs: dist/, built from the current sources once per run. */
function ensureBuilt(): void {
  if (built) return;
  execFileSync(process.execPath, [join(REPO, 'src', 'build.ts')], { stdio: 'ignore' });
  built = true;
}
const READY_TIMEOUT_MS = 20_000;
const START_ATTEMPTS = 3;

export interface ProxyOptions {
  /** Working dir for proxy.yaml, the data dir and the logs (must exist). */
  dir: string;
  /** The policy without `listen` and `dataDir`, which are set here. */
  policy: string;
  /** Extra node options, e.g. ['--cpu-prof', '--cpu-prof-dir=…'] to see where the CPU goes. */
  nodeArgs?: string[];
  /** Extra environment variables (e.g. MALLOC_ARENA_MAX, UV_THREADPOOL_SIZE) on top of the minimal one. */
  env?: Record<string, string>;
  /** Another build of the proxy's cli instead of this repository's dist/src/cli.js. */
  cli?: string;
}

export interface ProxyProcess {
  pid: number;
  port: number;
  /** http://127.0.0.1:<port>, for curl -x. */
  url: string;
  /** The proxy's CA (created at first start), for curl --cacert. */
  caFile: string;
  /** Where its stdout (the access log) and stderr (operator messages) go. */
  stdoutFile: string;
  stderrFile: string;
  stop(): Promise<void>;
}

export async function startProxyProcess(options: ProxyOptions): Promise<ProxyProcess> {
  if (!options.cli) ensureBuilt();
  let lastError: Error | undefined;
  for (let attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
    try {
      return await startOnce(options, await freePort());
    } catch (err) {
      // Most likely the free port was taken before the proxy bound it: try another one.
      lastError = err as Error;
    }
  }
  throw lastError!;
}

async function startOnce(options: ProxyOptions, port: number): Promise<ProxyProcess> {
  const configFile = join(options.dir, 'proxy.yaml');
  const dataDir = join(options.dir, 'data');
  writeFileSync(configFile, `listen: 127.0.0.1:${port}\ndataDir: ${JSON.stringify(dataDir)}\n${options.policy}`);
  const stdoutFile = join(options.dir, 'access.log');
  const stderrFile = join(options.dir, 'proxy.log');
  const out = openSync(stdoutFile, 'a');
  const err = openSync(stderrFile, 'a');
  const child = spawnTracked(process.execPath, [...START_NODE_ARGS, ...(options.nodeArgs ?? []), options.cli ?? CLI, 'start', '--config', configFile], {
    cwd: options.dir,
    env: { ...minimalEnv(), ...START_ENV, ...options.env },
    stdio: ['ignore', out, err],
  });
  closeSync(out);
  closeSync(err);
  const ready = await waitFor(() => answers200(port, '/healthz'), READY_TIMEOUT_MS, () => !isRunning(child));
  if (!ready) {
    await stopChild(child, 'SIGKILL');
    throw new Error(`the proxy did not answer /healthz on 127.0.0.1:${port}; ${stderrFile}:\n${readFileSync(stderrFile, 'utf8').slice(-2000)}`);
  }
  return {
    pid: child.pid!,
    port,
    url: `http://127.0.0.1:${port}`,
    caFile: join(dataDir, 'ca.crt'),
    stdoutFile,
    stderrFile,
    stop: () => stopChild(child, 'SIGTERM', 12_000),
  };
}

/**
 * Only what node needs: no HTTP(S)_PROXY, NODE_OPTIONS, PULLTHROUGH_* overrides or the seed's
 * variables (REGISTRIES, AUTH_REGISTRIES, …) from the caller's shell may change what is measured.
 */
function minimalEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const name of ['PATH', 'HOME', 'TMPDIR', 'LANG']) {
    if (process.env[name] !== undefined) env[name] = process.env[name];
  }
  return env;
}
