// The machine's own podman, for building and running the project's image (test/e2e/image.test.ts): its
// storage is kept between runs, so base images and build layers are cached. Unlike test/helpers/podman.ts
// (throw-away clients in a sandbox), this is podman as a user of the machine runs it, and whether it can
// run containers here is found out, not assumed: a first `podman run` shows what it lacks, and the two
// known gaps are fixed in a containers.conf of the test's own.
//   - default limits above the hard limits: podman asks for RLIMIT_NOFILE and RLIMIT_NPROC of 1048576,
//     which fails where the hard limits are lower (sandboxes, CI runners) with "setrlimit ... Operation
//     not permitted"; default_ulimits within them is what an administrator would write.
//   - crun on hybrid cgroups (v1 controllers plus a v2 mount): "cgroups in hybrid mode not supported";
//     runc runs there.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { makeTempDir, run, type RunOptions, type RunResult } from './process.ts';

const PODMAN_BIN = '/usr/bin/podman';

export interface PodmanEngine {
  /** The environment for every podman command: CONTAINERS_CONF when the machine's defaults do not run. */
  env: NodeJS.ProcessEnv;
  /** What had to be changed for containers to run here, in words; empty when nothing. */
  adjustments: string[];
}

/** Why podman cannot be used at all (before any container is tried), or undefined. */
export function podmanMissing(): string | undefined {
  if (!existsSync(PODMAN_BIN)) return `${PODMAN_BIN} not found: apt-get install podman`;
  // Rootless podman would need newuidmap and /etc/subuid ranges, and keeps a storage of its own.
  if (process.getuid?.() !== 0) return 'the image is built and run with rootful podman, which needs root';
  return undefined;
}

/** The machine's environment without what would point podman at another configuration or host. */
function baseEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^(CONTAINERS_|CONTAINER_HOST$|CONTAINER_CONNECTION$|PODMAN_|BUILDAH_|STORAGE_DRIVER$|STORAGE_OPTS$)/.test(key)) env[key] = value;
  }
  return env;
}

/** Podman with the machine's configuration as it is: enough for commands that run no container. */
export function machinePodman(): PodmanEngine {
  return { env: baseEnv(), adjustments: [] };
}

export function podman(engine: PodmanEngine, args: string[], options: Omit<RunOptions, 'env'> = {}): Promise<RunResult> {
  return run(PODMAN_BIN, args, { ...options, env: engine.env });
}

/** A hard limit of this process: the most the containers it starts may have. */
function hardLimit(name: 'Max open files' | 'Max processes'): number | undefined {
  const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith(name));
  const hard = line?.slice(name.length).trim().split(/\s+/)[1];
  return hard === undefined || hard === 'unlimited' ? undefined : Number(hard);
}

/**
 * Finds out whether `podman run` works here with `image`, and if not, whether a containers.conf with
 * default_ulimits within the hard limits and/or runtime = "runc" makes it work. Returns the engine, or
 * the reason containers cannot run here in podman's own words.
 */
export async function probePodman(image: string): Promise<{ engine: PodmanEngine } | { reason: string }> {
  const missing = podmanMissing();
  if (missing) return { reason: missing };
  const ulimits: string[] = [];
  let runtime: string | undefined;
  const adjustments: string[] = [];
  let engine: PodmanEngine = { env: baseEnv(), adjustments };
  for (let attempt = 0; attempt < 3; attempt++) {
    const probe = await podman(engine, ['run', '--rm', '--network', 'none', image, 'true'], { timeoutMs: 60_000 });
    if (probe.code === 0) return { engine };
    const said = probe.stderr.trim().split('\n').filter((l) => !/level=(warning|info)/.test(l)).join('\n') || `exit ${probe.code}`;
    if (/rlimit/i.test(said) && ulimits.length === 0) {
      // Podman lowers its own RLIMIT_NPROC to kernel.pid_max, so a container can have no more than that.
      const pidMax = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
      const nofile = hardLimit('Max open files') ?? 1048576;
      const nproc = Math.min(hardLimit('Max processes') ?? pidMax, pidMax);
      ulimits.push(`nofile=${nofile}:${nofile}`, `nproc=${nproc}:${nproc}`);
      adjustments.push(`default_ulimits = ${JSON.stringify(ulimits)} (podman's defaults exceed the hard limits here: ${said.split('\n').at(-1)})`);
    } else if (/hybrid mode not supported/.test(said) && runtime === undefined) {
      if (!existsSync('/usr/sbin/runc') && !existsSync('/usr/bin/runc')) {
        return { reason: `crun cannot run containers on this machine's hybrid cgroups, and runc is not installed (apt-get install runc): ${said}` };
      }
      runtime = 'runc';
      adjustments.push(`runtime = "runc" (crun: ${said.split('\n').at(-1)})`);
    } else {
      return { reason: `podman cannot run a container here${adjustments.length ? ` even with ${adjustments.join(' and ')}` : ''}: ${said}` };
    }
    engine = { env: { ...baseEnv(), CONTAINERS_CONF: writeContainersConf(ulimits, runtime) }, adjustments };
  }
  return { reason: `podman cannot run a container here even with ${adjustments.join(' and ')}` };
}

/**
 * A containers.conf with only what the probe found missing. With CONTAINERS_CONF set podman reads this
 * file instead of /etc/containers/containers.conf (built-in defaults fill in the rest).
 */
function writeContainersConf(ulimits: string[], runtime: string | undefined): string {
  const file = path.join(makeTempDir('podman-engine'), 'containers.conf');
  const lines = ['[containers]'];
  if (ulimits.length) lines.push(`default_ulimits = ${JSON.stringify(ulimits)}`);
  lines.push('[engine]');
  if (runtime) lines.push(`runtime = ${JSON.stringify(runtime)}`);
  writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}
