// Runs the benchmarks in perf/, one after the other, each in its own process (so that one benchmark's
// heap, JIT state and leftovers cannot colour the next one's figures): blob-cold, blob-hit, blob-rss
// (the blob cache: cold fills, hits, memory), manifest-hit (a cached tag at fixed request rates, beside
// nginx), manifest-rollout (N clients pulling a new tag at once: what reaches the registry),
// passthrough (a blob forwarded without caching) and mirror (cache hits through the registry-mirror
// front beside the intercepting one).
//
//   node perf/run.ts                         every benchmark, default settings
//   node perf/run.ts passthrough             only those named
//   node perf/run.ts passthrough --size 256MiB --repeat 1
//
// Leading arguments that do not start with "-" name benchmarks; everything from the first option on is
// passed to every benchmark run (--size and --repeat are understood by all of them — manifest-hit and
// manifest-rollout accept --size and ignore it —; --clients means a list in blob-hit, passthrough and mirror,
// one count in blob-cold, blob-rss and manifest-rollout, and is ignored by manifest-hit). A benchmark
// is any perf/<name>.ts other than this file: a new file is registered by being there.
//
// cluster: clusters of 1, 2 and 3 replicas — a hit relayed by a replica that is not the blob's owner
// against a local one (CPU per GiB of every replica, throughput), a cold blob through a non-owner against
// through its owner (time to first byte), and what a 30-client rollout spread over the replicas sends
// upstream; there --clients is a list, as in blob-hit.
//
// event-loop: the proxy's event-loop delay (measured in its own process) while a made-up cache of
// 100,000 blobs and 20,000 tags evicts, /healthz is polled every 100 ms and curl clients pull; there
// --clients is one count and --size the size of every blob, made up or pulled.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const PERF_DIR = dirname(fileURLToPath(import.meta.url));

function availableBenchmarks(): string[] {
  return readdirSync(PERF_DIR)
    .filter((file) => file.endsWith('.ts') && file !== 'run.ts')
    .map((file) => file.slice(0, -'.ts'.length))
    .sort();
}

function parseCommandLine(argv: readonly string[], available: readonly string[]): { names: string[]; forwarded: string[] } {
  const firstOption = argv.findIndex((arg) => arg.startsWith('-'));
  const names = firstOption < 0 ? [...argv] : argv.slice(0, firstOption);
  const forwarded = firstOption < 0 ? [] : argv.slice(firstOption);
  const unknown = names.filter((name) => !available.includes(name));
  if (unknown.length > 0) {
    throw new Error(`no such benchmark: ${unknown.join(', ')} (available: ${available.join(', ')})`);
  }
  return { names: names.length > 0 ? names : [...available], forwarded };
}

/** Runs one benchmark with the terminal as its stdout/stderr; resolves with its exit code (128+n for signal n). */
function runBenchmark(name: string, args: readonly string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    // process.execPath: the same Node that runs this file (the repo's Node 24 under `npm run perf`).
    const child = spawn(process.execPath, [join(PERF_DIR, `${name}.ts`), ...args], { stdio: 'inherit' });
    // Ctrl-C reaches the benchmark directly (same process group); a signal sent to this process alone is
    // passed on, so that the benchmark can stop its servers and remove its temp files before we exit.
    const forward = (signal: NodeJS.Signals) => child.kill(signal);
    const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
    for (const signal of signals) process.on(signal, forward);
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      for (const s of signals) process.off(s, forward);
      resolve(code ?? 128 + (signal ? signalNumber(signal) : 0));
    });
  });
}

function signalNumber(signal: NodeJS.Signals): number {
  return { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 }[signal as string] ?? 0;
}

async function main(): Promise<number> {
  const available = availableBenchmarks();
  const argv = process.argv.slice(2);
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`usage: node perf/run.ts [benchmark …] [options passed to each]\nbenchmarks: ${available.join(', ')}\n` +
      'each benchmark lists its options with: node perf/<benchmark>.ts --help\n');
    return 0;
  }
  const { names, forwarded } = parseCommandLine(argv, available);
  const failed: string[] = [];
  for (const name of names) {
    process.stderr.write(`== ${name} ${forwarded.join(' ')}\n`);
    const code = await runBenchmark(name, forwarded);
    if (code > 128) return code; // killed by a signal (Ctrl-C, most likely): do not start the next one
    if (code !== 0) failed.push(`${name} (exit ${code})`);
  }
  if (failed.length > 0) process.stderr.write(`failed: ${failed.join(', ')}\n`);
  return failed.length > 0 ? 1 : 0;
}

try {
  process.exitCode = await main();
} catch (err) {
  process.stderr.write(`perf/run.ts: ${(err as Error).message}\n`);
  process.exitCode = 2;
}
