// Every process and temp dir a benchmark creates is registered here and removed when the benchmark
// ends, however it ends: normally, by an exception, or by SIGINT/SIGTERM/SIGHUP. A leaked nginx would
// hold its port and keep a core busy; a leaked temp dir holds a GiB-sized blob.
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Synchronous cleanup steps, run last-registered-first (processes die before their dirs go). */
const steps: Array<() => void> = [];
let hooksInstalled = false;
let hasSetpriv: boolean | undefined;

/**
 * Registers a synchronous cleanup step. The returned function unregisters it without running it: for
 * when the thing it would clean up is already gone (a child that exited, a server stopped in order).
 */
export function addCleanup(step: () => void): () => void {
  installHooks();
  steps.push(step);
  return () => {
    const at = steps.indexOf(step);
    if (at >= 0) steps.splice(at, 1);
  };
}

const TEMP_PREFIX = 'pullthrough-perf-';
/** In each temp dir: the pid of the benchmark that owns it. */
const OWNER_FILE = '.owner-pid';
let sweptStaleDirs = false;

/** A fresh temp dir under $TMPDIR, removed at exit. */
export function makeTempDir(name: string): string {
  if (!sweptStaleDirs) {
    sweptStaleDirs = true;
    removeStaleTempDirs();
  }
  const dir = mkdtempSync(join(tmpdir(), `${TEMP_PREFIX}${name}-`));
  writeFileSync(join(dir, OWNER_FILE), String(process.pid));
  addCleanup(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A SIGKILLed benchmark cannot clean up, and its temp dir holds a GiB-sized blob: remove the dirs
 * whose owner is no longer running. (A dir whose pid was reused by another process is left alone.)
 */
function removeStaleTempDirs(): void {
  for (const entry of readdirSync(tmpdir())) {
    if (!entry.startsWith(TEMP_PREFIX)) continue;
    const dir = join(tmpdir(), entry);
    let owner: number;
    try {
      owner = Number(readFileSync(join(dir, OWNER_FILE), 'utf8'));
    } catch {
      continue; // not ours, or still being created
    }
    if (owner > 0 && !isAlive(owner)) {
      process.stderr.write(`removing ${dir}, left behind by benchmark process ${owner}\n`);
      rmSync(dir, { recursive: true, force: true });
    }
  }
}

/**
 * Spawns a child that is SIGKILLed at exit. Through util-linux's setpriv (which execs, so the pid is
 * the command's own) the child also gets PR_SET_PDEATHSIG: it receives `deathSignal` even if this
 * process is SIGKILLed. nginx wants SIGTERM there: its master then stops its workers, whereas a
 * SIGKILLed master leaves them running (they are not our children, and they hold the port).
 */
export function spawnTracked(command: string, args: string[], options: SpawnOptions, deathSignal: 'KILL' | 'TERM' = 'KILL'): ChildProcess {
  hasSetpriv ??= spawnSync('sh', ['-c', 'command -v setpriv'], { stdio: 'ignore' }).status === 0;
  const child = hasSetpriv ? spawn('setpriv', ['--pdeathsig', deathSignal, '--', command, ...args], options) : spawn(command, args, options);
  const unregister = addCleanup(() => {
    if (isRunning(child)) child.kill('SIGKILL');
  });
  // Once it has exited there is nothing left to kill: drop the step, so that hundreds of curl
  // clients do not pile up in the list.
  child.once('exit', unregister);
  child.once('error', unregister);
  return child;
}

/** Sends `signal`, SIGKILLs after graceMs, and resolves once the child has exited. */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM', graceMs = 5000): Promise<void> {
  if (!isRunning(child)) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

export function isRunning(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

/** Runs every registered step now (the benchmark's normal end). */
export function cleanupAll(): void {
  while (steps.length > 0) {
    const step = steps.pop()!;
    try {
      step();
    } catch (err) {
      process.stderr.write(`cleanup step failed: ${(err as Error).message}\n`);
    }
  }
}

/** Running, as opposed to gone or a zombie (a killed process whose parent has not reaped it yet). */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function installHooks(): void {
  if (hooksInstalled) return;
  hooksInstalled = true;
  // 'exit' handlers must be synchronous: kill() and rmSync() are.
  process.once('exit', cleanupAll);
  // A signal would otherwise end the process without 'exit'. Clean up, then die of the same signal so
  // that the parent (a shell, perf/run.ts) sees the usual outcome.
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const onSignal = (): void => {
      process.stderr.write(`\n${signal}: stopping the benchmark's processes and removing its temp files\n`);
      cleanupAll();
      process.removeListener(signal, onSignal);
      process.kill(process.pid, signal);
    };
    process.on(signal, onSignal);
  }
}

/** Runs a benchmark's main: a failure is reported and sets the exit code; cleanup runs however it ends. */
export async function runBenchmark(main: () => Promise<void>, progress: (message: string) => void): Promise<void> {
  try {
    await main();
  } catch (err) {
    progress(`failed: ${(err as Error).stack ?? String(err)}`);
    process.exitCode = 1;
  } finally {
    cleanupAll();
  }
}
