// Memory: the proxy's resident set while N clients (default 8) stream one large blob (default 4 GiB),
// cold (a fresh proxy with an empty cache: one fill, N clients reading the growing file) and warm (the
// proxy restarted on that cache: N hits). Goal: peak RSS ≤ 150 MiB.
//
//   node perf/blob-rss.ts [--size 4GiB] [--clients 8] [--repeat 1] [--variant SPEC]…
//
// Per variant: start a proxy on a fresh data dir and read its RSS at idle; release N clients at once
// (X-Cache MISS + JOINED); wait for the commit; stop it; start a proxy again on the same data dir, read
// its idle RSS; release N clients (X-Cache HIT); stop it. VmHWM (the kernel's peak of the process's
// whole life) is read at the end of each run, so each scenario's peak is its own process's; VmRSS,
// RssAnon and RssFile are also sampled every 50 ms.
//
// --variant starts the proxy differently, to find out where the memory goes: a SPEC is a space-
// separated list of node options and environment variables, written with "=" when it starts with a
// dash (--variant=--max-semi-space-size=1, --variant 'MALLOC_ARENA_MAX=2 --max-semi-space-size=1');
// give --variant several times to compare (each runs both scenarios; "default" is the proxy as users
// run it). A token cli=PATH runs another build of the proxy, e.g. one compiled to .js (type stripping
// loads a TypeScript stripper into every thread that imports a .ts file).
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { runBenchmark, makeTempDir } from './lib/cleanup.ts';
import { waitForCacheHit } from './lib/curl.ts';
import { describeEnvironment, environmentLine, GIB, progressTo } from './lib/measure.ts';
import { proxiedBlobRoute, startOrigin, type Origin } from './lib/origin.ts';
import { MemoryKindsSampler, readMemoryKinds, readMemoryStatus, threadNames, type MemoryKinds, type MemoryStatus } from './lib/procfs.ts';
import { fixed, formatTable, round, roundNumbers } from './lib/report.ts';
import { measureClients, proxyDir, startProxyIn, type ClientsRun } from './lib/run-clients.ts';

const NAME = 'blob-rss';
const REPOSITORY = 'bench/blob-rss';
const GOAL_PEAK_MIB = 150;
/** The proxy's RSS "at idle" is read this long after it answers /healthz (its pool threads are up by then). */
const SETTLE_MS = 1000;
const progress = progressTo(NAME);

interface Variant {
  /** The SPEC as given, or "default". */
  label: string;
  nodeArgs: string[];
  env: Record<string, string>;
  /** cli=PATH: run another build of the proxy (e.g. compiled to .js) instead of src/cli.ts. */
  cli?: string;
}

interface Options {
  size: number;
  clients: number;
  /** Each variant's cold + warm pair this many times (peaks are not medians: every pair is listed). */
  repeat: number;
  variants: Variant[];
}

interface Measurement {
  variant: string;
  scenario: 'cold' | 'warm';
  /** Right after start (+ SETTLE_MS), before any request. */
  idle: MemoryStatus;
  idleThreads: Record<string, number>;
  /** The sample with the highest VmRSS during the run. */
  peak: MemoryStatus;
  /** VmHWM at the end of the run: the kernel's own peak, between samples included. */
  hwmMiB: number;
  /** SETTLE_MS after the run: what the proxy gives back once the clients are gone. */
  after: MemoryStatus;
  /** The highest VmRSS in each second of the run, MiB. */
  rssBySecondMiB: number[];
  /** Where the memory is (smaps): at idle, and at the largest of the samples taken every 500 ms in the run. */
  idleKinds: MemoryKinds;
  peakKinds: MemoryKinds;
  run: ClientsRun;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '4GiB' },
      clients: { type: 'string', default: '8' },
      repeat: { type: 'string', default: '1' },
      variant: { type: 'string', multiple: true },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`usage: node perf/${NAME}.ts [--size 4GiB] [--clients 8] [--repeat 1] [--variant='default' | --variant='--node-option… ENV=VALUE…']…\n`);
    process.exit(0);
  }
  const size = parseSize(values.size);
  const clients = Number(values.clients);
  if (size < 1) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  const repeat = Number(values.repeat);
  if (!Number.isInteger(clients) || clients < 1) throw new Error(`--clients ${values.clients}: must be a positive integer`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  const variants = (values.variant ?? ['']).map(parseVariant);
  return { size, clients, repeat, variants };
}

function parseVariant(spec: string): Variant {
  const nodeArgs: string[] = [];
  const env: Record<string, string> = {};
  let cli: string | undefined;
  for (const token of spec.split(/\s+/).filter((t) => t && t !== 'default')) {
    const assignment = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(token);
    if (assignment) env[assignment[1]!] = assignment[2]!;
    else if (token.startsWith('cli=')) cli = token.slice('cli='.length);
    else if (token.startsWith('--')) nodeArgs.push(token);
    else throw new Error(`--variant "${spec}": "${token}" is neither a node option (--…), NAME=value nor cli=PATH`);
  }
  const label = nodeArgs.length + Object.keys(env).length > 0 || cli ? spec.trim() : 'default';
  return { label, nodeArgs, env, ...(cli ? { cli } : {}) };
}

async function measureScenario(origin: Origin, options: Options, variant: Variant, scenario: 'cold' | 'warm', dir: string): Promise<Measurement> {
  const blob = origin.blobs[0]!;
  // warm: the same dir again, so the same cache (and CA).
  const fresh = await startProxyIn({ origin, dir, nodeArgs: variant.nodeArgs, env: variant.env, ...(variant.cli ? { cli: variant.cli } : {}) });
  const { proxy } = fresh;
  try {
    await sleep(SETTLE_MS);
    const idle = readMemoryStatus(proxy.pid);
    const idleThreads = threadNames(proxy.pid);
    const idleKinds = readMemoryKinds(proxy.pid);
    const route = proxiedBlobRoute(origin, blob, proxy);
    progress(`${variant.label}, ${scenario}: proxy pid ${proxy.pid}, ${fixed(idle.VmRSS / 1024, 0)} MiB at idle, ${idle.Threads} threads; ${options.clients} clients`);
    const kindsSampler = new MemoryKindsSampler(proxy.pid);
    const run = await measureClients({
      origin,
      blob,
      route,
      clients: options.clients,
      proxy,
      expectCache: scenario === 'cold' ? ['MISS', 'JOINED'] : ['HIT'],
      together: true,
    });
    const hwmMiB = readMemoryStatus(proxy.pid).VmHWM / 1024;
    const peakKinds = kindsSampler.stop() ?? idleKinds;
    if (scenario === 'cold') await waitForCacheHit(route); // the fill commits: the warm run needs the blob
    await sleep(SETTLE_MS);
    const after = readMemoryStatus(proxy.pid);
    const peak = run.proxy!.peakMemory!;
    return {
      variant: variant.label,
      scenario,
      idle,
      idleThreads,
      peak,
      hwmMiB,
      after,
      rssBySecondMiB: run.proxy!.rssBySecondKiB.map(mib),
      idleKinds,
      peakKinds,
      run,
    };
  } finally {
    await proxy.stop();
  }
}

function mib(kib: number): number {
  return kib / 1024;
}

function printReport(options: Options, measurements: readonly Measurement[], environment: Record<string, string | number>): void {
  const out = [
    '',
    `${NAME}: ${options.clients} clients released at once on a ${formatSize(options.size)} blob; cold = fresh proxy and cache (1 fill, MISS + JOINED), warm = proxy restarted on that cache (HIT)`,
    environmentLine(environment),
    '',
    formatTable(
      ['variant', 'scenario', 'idle RSS MiB', 'idle anon', 'idle file', 'peak RSS MiB (sampled)', 'VmHWM MiB', 'anon at peak', 'file at peak', 'threads', 'RSS after MiB', 'MiB/s', 'proxy CPU-s/GiB', `≤ ${GOAL_PEAK_MIB} MiB`],
      measurements.map((m) => [
        m.variant,
        m.scenario,
        fixed(mib(m.idle.VmRSS), 0),
        fixed(mib(m.idle.RssAnon), 0),
        fixed(mib(m.idle.RssFile), 0),
        fixed(mib(m.peak.VmRSS), 0),
        fixed(m.hwmMiB, 0),
        fixed(mib(m.peak.RssAnon), 0),
        fixed(mib(m.peak.RssFile), 0),
        String(m.peak.Threads),
        fixed(mib(m.after.VmRSS), 0),
        fixed(m.run.mibPerSecond, 0),
        fixed(m.run.proxy!.cpuSecondsPerGiB, 2),
        m.hwmMiB <= GOAL_PEAK_MIB ? 'met' : 'MISSED',
      ]),
    ),
    'idle: 1 s after start, before any request; anon/file: RssAnon (heaps, Buffers, stacks) and RssFile (node binary, libraries, LMDB map); after: 1 s after the run;',
    `the goal is on VmHWM (the kernel's peak, between samples included)`,
    '',
    'where the memory is (MiB, from /proc/<pid>/smaps; at idle, and the largest sample of the run, taken every 500 ms):',
    formatTable(
      ['variant', 'scenario', 'when', 'total', 'V8 heap pages', 'malloc main arena', 'malloc thread arenas', 'other anon', 'node binary', 'other files'],
      measurements.flatMap((m) =>
        (['idle', 'peak'] as const).map((when) => {
          const k = when === 'idle' ? m.idleKinds : m.peakKinds;
          return [m.variant, m.scenario, when, ...[k.totalKiB, k.v8Pages, k.mallocMain, k.mallocThreads, k.anonOther, k.nodeBinary, k.otherFiles].map((v) => fixed(mib(v), 0))];
        }),
      ),
    ),
    'V8 heap pages: 256 KiB pages of the JS heaps of every thread; malloc main arena: [heap], what the main thread malloc()s (Buffers\' memory,',
    'OpenSSL); malloc thread arenas: the same for the other threads (fill workers, libuv pool); other anon: V8 code and large-object spaces,',
    'WebAssembly memory (the TypeScript stripper), stacks, large mmap()ed chunks. A heuristic on the shape of the mappings: see perf/lib/procfs.ts.',
    '',
    'threads at idle: ' + [...new Set(measurements.map((m) => JSON.stringify(m.idleThreads)))].join(' | '),
    '',
    'RSS by second of the run (MiB, highest sample in each second):',
    ...measurements.map((m) => `  ${m.variant}, ${m.scenario}: ${thin(m.rssBySecondMiB).map((v) => v.toFixed(0)).join(' ')}`),
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

/** At most 24 values: every k-th second's, so a long run fits on one line. */
function thin(values: readonly number[]): number[] {
  const step = Math.max(1, Math.ceil(values.length / 24));
  return values.filter((_, i) => i % step === 0);
}

async function main(): Promise<void> {
  const started = performance.now();
  const options = parseOptions(process.argv.slice(2));
  const dir = makeTempDir(NAME);
  const origin = await startOrigin({ dir, blobs: [{ repository: REPOSITORY, size: options.size }], progress });
  const environment = describeEnvironment(origin.nginx.version);
  const measurements: Measurement[] = [];
  try {
    const rounds = Array.from({ length: options.repeat }, () => [...options.variants.entries()]).flat();
    for (const [pass, [index, variant]] of rounds.entries()) {
      const cacheDir = proxyDir(dir, `variant-${index}-${pass}`);
      try {
        for (const scenario of ['cold', 'warm'] as const) {
          const m = await measureScenario(origin, options, variant, scenario, cacheDir);
          measurements.push(m);
          progress(
            `${variant.label}, ${scenario}: peak ${fixed(mib(m.peak.VmRSS), 0)} MiB sampled, VmHWM ${fixed(m.hwmMiB, 0)} MiB, ` +
              `${fixed(m.run.mibPerSecond, 0)} MiB/s, X-Cache ${m.run.cache.join(' ')}`,
          );
        }
      } finally {
        rmSync(cacheDir, { recursive: true, force: true });
      }
    }
  } finally {
    await origin.nginx.stop();
  }
  printReport(options, measurements, environment);
  const result = {
    benchmark: NAME,
    date: new Date().toISOString(),
    environment,
    options: { size: options.size, clients: options.clients, repeat: options.repeat, variants: options.variants },
    goalPeakMiB: GOAL_PEAK_MIB,
    summary: measurements.map((m) => ({
      variant: m.variant,
      scenario: m.scenario,
      idleRssMiB: mib(m.idle.VmRSS),
      peakRssMiB: mib(m.peak.VmRSS),
      hwmMiB: m.hwmMiB,
      peakAnonMiB: mib(m.peak.RssAnon),
      peakFileMiB: mib(m.peak.RssFile),
      threads: m.peak.Threads,
      afterRssMiB: mib(m.after.VmRSS),
      mibPerSecond: m.run.mibPerSecond,
      proxyCpuSecondsPerGiB: m.run.proxy!.cpuSecondsPerGiB,
      gibDelivered: m.run.bytes / GIB,
      met: m.hwmMiB <= GOAL_PEAK_MIB,
    })),
    totalSeconds: round((performance.now() - started) / 1000),
    measurements,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

await runBenchmark(main, progress);
