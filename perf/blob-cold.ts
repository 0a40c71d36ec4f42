// Cold blobs: N clients (default 8) ask a proxy with an empty cache for the same blob at the same
// moment. The first starts the one fill (X-Cache: MISS), the others join it (JOINED), and every client
// reads the growing file. Measured against nginx serving the same blob directly, and against a single
// client's cold download through a fresh proxy.
//
//   node perf/blob-cold.ts [--size 1GiB] [--repeat 3] [--clients 8] [--cli PATH]
//
// Each repetition runs, in this order: direct-1, cold-1, direct-N, cold-N. Every cold-* run gets a
// proxy of its own with a fresh, empty data dir, warmed up on two small blobs of its own (leaf minted,
// fill workers loaded) and removed after the run. The clients of a run are released at once by a
// start barrier (perf/lib/curl.ts). nginx logs its requests: each cold run must cost the origin exactly
// one GET of the blob. Goals: 1 GET per cold run; every client's time to first byte within +20 ms of a
// direct download's (direct-1); all N done within 1.1× a single cold download's time (cold-1).
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { runBenchmark, makeTempDir } from './lib/cleanup.ts';
import { waitForCacheHit } from './lib/curl.ts';
import { describeEnvironment, environmentLine, MIB, percent, progressTo } from './lib/measure.ts';
import { directBlobRoute, proxiedBlobRoute, startOrigin, type Origin } from './lib/origin.ts';
import { readStatusKiB } from './lib/procfs.ts';
import { fixed, formatTable, median, round, roundNumbers } from './lib/report.ts';
import { measureClients, proxyDir, startProxyIn, warmUpProxy, type ClientsRun } from './lib/run-clients.ts';

const NAME = 'blob-cold';
const REPOSITORY = 'bench/blob-cold';
/** Two small blobs per fresh proxy, for its warm-up: two fills, so that both pool workers load their code. */
const WARM_UP_BLOB_BYTES = 8 * MIB;
const progress = progressTo(NAME);

/** The goals, from the brief of this benchmark. */
const GOAL_TTFB_EXTRA_MS = 20;
const GOAL_ALL_DONE_RATIO = 1.1;

interface Options {
  size: number;
  repeat: number;
  clients: number;
  /** Another build of the proxy's cli (e.g. one commit's, built apart from the working tree). */
  cli?: string;
}

type Scenario = 'direct-1' | 'cold-1' | 'direct-N' | 'cold-N';

interface Run extends ClientsRun {
  scenario: string;
  repetition: number;
  /** cold-*: from the last client's exit until a HEAD through the proxy answered HIT (fsync, rename, index). */
  commitSeconds?: number;
  /** cold-*: the proxy's RSS right after start, and its VmHWM after the run. */
  proxyIdleRssMiB?: number;
  proxyHwmMiB?: number;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1GiB' },
      repeat: { type: 'string', default: '3' },
      clients: { type: 'string', default: '8' },
      cli: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`usage: node perf/${NAME}.ts [--size 1GiB] [--repeat 3] [--clients 8] [--cli PATH]\n`);
    process.exit(0);
  }
  const size = parseSize(values.size);
  const repeat = Number(values.repeat);
  const clients = Number(values.clients);
  if (size < 1) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (!Number.isInteger(clients) || clients < 2) throw new Error(`--clients ${values.clients}: must be an integer ≥ 2`);
  return { size, repeat, clients, ...(values.cli ? { cli: values.cli } : {}) };
}

async function runScenario(origin: Origin, scenario: Scenario, options: Options, repetition: number): Promise<Run> {
  const blob = origin.blobs[0]!;
  const warmUpBlobs = origin.blobs.slice(1);
  const clients = scenario.endsWith('-1') ? 1 : options.clients;
  const label = scenario.replace('-N', `-${options.clients}`);
  if (scenario.startsWith('direct')) {
    const run = await measureClients({ origin, blob, route: directBlobRoute(origin, blob), clients, together: true });
    return { scenario: label, repetition, ...run };
  }
  const fresh = await startProxyIn({ origin, dir: proxyDir(origin.dir, `${label}-${repetition}`), ...(options.cli ? { cli: options.cli } : {}) });
  try {
    const idleRss = readStatusKiB(fresh.proxy.pid, 'VmRSS') / 1024;
    await warmUpProxy(origin, fresh.proxy, warmUpBlobs);
    const route = proxiedBlobRoute(origin, blob, fresh.proxy);
    const run = await measureClients({ origin, blob, route, clients, proxy: fresh.proxy, expectCache: ['MISS', 'JOINED'], together: true });
    const commitSeconds = await waitForCacheHit(route);
    const hwm = readStatusKiB(fresh.proxy.pid, 'VmHWM') / 1024;
    return { scenario: label, repetition, ...run, commitSeconds, proxyIdleRssMiB: idleRss, proxyHwmMiB: hwm };
  } finally {
    await fresh.remove();
  }
}

interface Summary {
  scenario: string;
  clients: number;
  runs: number;
  wallSeconds: number;
  mibPerSecond: number;
  medianFirstByteMs: number;
  maxFirstByteMs: number;
  startSpreadMs: number;
  finishSpreadMs: number;
  /** The most GETs for the blob at the origin in one run, and the fewest. */
  originGetsMax: number;
  originGetsMin: number;
  machineCores: number;
  /** Everything but nginx and the proxy (the curl clients, mostly), per GiB delivered. */
  restCpuSecondsPerGiB: number;
  nginxCpuSecondsPerGiB: number;
  proxyCpuSecondsPerGiB?: number;
  proxyMainThreadCpuSecondsPerGiB?: number;
  /** The pool's fill workers ("WorkerThread"): upstream TLS, hashing, writing. */
  proxyFillThreadsCpuSecondsPerGiB?: number;
  /** V8's helpers ("V8Worker": GC, compiler) and everything else that is neither main thread nor pool. */
  proxyOtherThreadsCpuSecondsPerGiB?: number;
  proxyCores?: number;
  proxySystemShare?: number;
  proxyPeakRssMiB?: number;
  commitSeconds?: number;
}

function summarise(runs: readonly Run[]): Summary[] {
  return [...new Set(runs.map((r) => r.scenario))].map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const m = (pick: (run: Run) => number) => round(median(of.map(pick)));
    const gets = of.map((r) => r.originGets ?? 0);
    const summary: Summary = {
      scenario,
      clients: of[0]!.clients,
      runs: of.length,
      wallSeconds: m((r) => r.wallSeconds),
      mibPerSecond: m((r) => r.mibPerSecond),
      medianFirstByteMs: m((r) => r.medianFirstByteMs),
      maxFirstByteMs: m((r) => r.maxFirstByteMs),
      startSpreadMs: m((r) => r.startSpreadMs),
      finishSpreadMs: m((r) => r.finishSpreadMs),
      originGetsMax: Math.max(...gets),
      originGetsMin: Math.min(...gets),
      machineCores: m((r) => r.machineCores),
      restCpuSecondsPerGiB: m((r) => r.restCpuSecondsPerGiB),
      nginxCpuSecondsPerGiB: m((r) => r.nginx.cpuSecondsPerGiB),
    };
    if (of[0]!.proxy) {
      const perGiB = (r: Run, seconds: number) => seconds / (r.bytes / 1024 ** 3);
      const thread = (r: Run, name: string) => r.proxy!.threads[name] ?? 0;
      summary.proxyCpuSecondsPerGiB = m((r) => r.proxy!.cpuSecondsPerGiB);
      summary.proxyMainThreadCpuSecondsPerGiB = m((r) => r.proxy!.mainThreadCpuSecondsPerGiB);
      summary.proxyFillThreadsCpuSecondsPerGiB = m((r) => perGiB(r, thread(r, 'WorkerThread')));
      summary.proxyOtherThreadsCpuSecondsPerGiB = m((r) => r.proxy!.cpuSecondsPerGiB - r.proxy!.mainThreadCpuSecondsPerGiB - perGiB(r, thread(r, 'WorkerThread')));
      summary.proxyCores = m((r) => r.proxy!.cores);
      summary.proxySystemShare = m((r) => r.proxy!.systemShare);
      summary.proxyPeakRssMiB = m((r) => r.proxy!.peakRssMiB);
      summary.commitSeconds = m((r) => r.commitSeconds ?? Number.NaN);
    }
    return summary;
  });
}

interface Goals {
  /** Every cold run cost the origin exactly one GET of the blob. */
  oneOriginGet: { met: boolean; getsPerColdRun: number[] };
  /** cold-N: median over the runs of the slowest client's TTFB, minus direct-1's TTFB (median). */
  firstByte: {
    met: boolean;
    directMs: number;
    coldMedianMs: number;
    coldMaxMs: number;
    extraMaxMs: number;
    goalExtraMs: number;
    /** For context: one cold client's TTFB over direct-1's, and nginx's own TTFB with N clients at once. */
    cold1ExtraMs: number;
    directNMedianMs: number;
    directNMaxMs: number;
  };
  /** cold-N wall / cold-1 wall (medians); direct-N / direct-1 for reference: the same for nginx. */
  allDone: { met: boolean; ratio: number; directRatio: number; goal: number };
}

function goals(runs: readonly Run[], summaries: readonly Summary[], options: Options): Goals {
  const get = (scenario: string) => summaries.find((s) => s.scenario === scenario)!;
  const direct1 = get('direct-1');
  const cold1 = get('cold-1');
  const directN = get(`direct-${options.clients}`);
  const coldN = get(`cold-${options.clients}`);
  const getsPerColdRun = runs.filter((r) => r.scenario.startsWith('cold')).map((r) => r.originGets ?? Number.NaN);
  const extraMaxMs = coldN.maxFirstByteMs - direct1.medianFirstByteMs;
  const ratio = coldN.wallSeconds / cold1.wallSeconds;
  return {
    oneOriginGet: { met: getsPerColdRun.every((n) => n === 1), getsPerColdRun },
    firstByte: {
      met: extraMaxMs <= GOAL_TTFB_EXTRA_MS,
      directMs: direct1.medianFirstByteMs,
      coldMedianMs: coldN.medianFirstByteMs,
      coldMaxMs: coldN.maxFirstByteMs,
      extraMaxMs: round(extraMaxMs),
      goalExtraMs: GOAL_TTFB_EXTRA_MS,
      cold1ExtraMs: round(cold1.medianFirstByteMs - direct1.medianFirstByteMs),
      directNMedianMs: directN.medianFirstByteMs,
      directNMaxMs: directN.maxFirstByteMs,
    },
    allDone: { met: ratio <= GOAL_ALL_DONE_RATIO, ratio: round(ratio), directRatio: round(directN.wallSeconds / direct1.wallSeconds), goal: GOAL_ALL_DONE_RATIO },
  };
}

function printReport(options: Options, summaries: readonly Summary[], goalFigures: Goals, environment: Record<string, string | number>): void {
  const met = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const g = goalFigures;
  const out = [
    '',
    `${NAME}: ${formatSize(options.size)} blob, ${options.clients} clients released at once, medians of ${options.repeat} runs; every cold run on a fresh proxy with an empty cache`,
    environmentLine(environment),
    '',
    formatTable(
      ['scenario', 'wall s', 'MiB/s', 'TTFB ms median', 'TTFB ms max', 'start spread ms', 'finish spread ms', 'origin GETs', 'proxy CPU-s/GiB', 'nginx CPU-s/GiB', 'clients CPU-s/GiB', 'proxy peak RSS MiB', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.wallSeconds, 2),
        fixed(s.mibPerSecond, 0),
        fixed(s.medianFirstByteMs, 1),
        fixed(s.maxFirstByteMs, 1),
        fixed(s.startSpreadMs, 1),
        fixed(s.finishSpreadMs, 0),
        s.originGetsMin === s.originGetsMax ? String(s.originGetsMax) : `${s.originGetsMin}-${s.originGetsMax}`,
        fixed(s.proxyCpuSecondsPerGiB, 2),
        fixed(s.nginxCpuSecondsPerGiB, 2),
        fixed(s.restCpuSecondsPerGiB, 2),
        fixed(s.proxyPeakRssMiB, 0),
        fixed(s.machineCores, 2),
      ]),
    ),
    'CPU-s/GiB: per GiB delivered to the clients (N GiB for N clients), fill included; clients: the machine\'s busy time minus nginx\'s and the proxy\'s',
    '(the curl clients, and anything else running meanwhile); origin GETs: GETs of the blob in nginx\'s access log during a run (min-max over the runs)',
    '',
    'where the proxy\'s CPU goes (per GiB delivered)',
    formatTable(
      ['scenario', 'proxy cores', 'main thread CPU-s/GiB', 'fill workers CPU-s/GiB', 'other threads CPU-s/GiB', 'kernel %', 'commit s'],
      summaries
        .filter((s) => s.proxyCpuSecondsPerGiB !== undefined)
        .map((s) => [
          s.scenario,
          fixed(s.proxyCores, 2),
          fixed(s.proxyMainThreadCpuSecondsPerGiB, 2),
          fixed(s.proxyFillThreadsCpuSecondsPerGiB, 2),
          fixed(s.proxyOtherThreadsCpuSecondsPerGiB, 2),
          fixed(percent(s.proxySystemShare), 0),
          fixed(s.commitSeconds, 2),
        ]),
    ),
    'commit s: from the last client\'s exit until the blob was a HIT (the fill\'s fsync, rename and index entry)',
    '',
    'goals',
    formatTable(
      ['goal', 'figure', 'target', ''],
      [
        [`origin GETs per cold run`, g.oneOriginGet.getsPerColdRun.join(', '), 'exactly 1', met(g.oneOriginGet.met)],
        [
          `TTFB of the slowest of ${options.clients} cold clients − direct-1 TTFB`,
          `${fixed(g.firstByte.coldMaxMs, 1)} − ${fixed(g.firstByte.directMs, 1)} = ${fixed(g.firstByte.extraMaxMs, 1)} ms`,
          `≤ +${GOAL_TTFB_EXTRA_MS} ms`,
          met(g.firstByte.met),
        ],
        [`(context) TTFB cold-1 − direct-1`, `${fixed(g.firstByte.cold1ExtraMs, 1)} ms`, '', ''],
        [`(context) TTFB direct-${options.clients}: median, max`, `${fixed(g.firstByte.directNMedianMs, 1)}, ${fixed(g.firstByte.directNMaxMs, 1)} ms`, '', ''],
        [`wall cold-${options.clients} / cold-1`, `${fixed(g.allDone.ratio, 2)}× (nginx: direct-${options.clients} / direct-1 = ${fixed(g.allDone.directRatio, 2)}×)`, `≤ ${GOAL_ALL_DONE_RATIO}×`, met(g.allDone.met)],
      ],
    ),
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

async function main(): Promise<void> {
  const started = performance.now();
  const options = parseOptions(process.argv.slice(2));
  const dir = makeTempDir(NAME);
  const origin = await startOrigin({
    dir,
    blobs: [
      { repository: REPOSITORY, size: options.size },
      { repository: 'bench/warm-up-a', size: WARM_UP_BLOB_BYTES },
      { repository: 'bench/warm-up-b', size: WARM_UP_BLOB_BYTES },
    ],
    accessLog: true,
    progress,
  });
  progress(`nginx on 127.0.0.1:${origin.nginx.port} (pids ${origin.nginx.pids().join(', ')}), access log ${origin.nginx.accessLog!.file}`);
  const environment = describeEnvironment(origin.nginx.version);
  const runs: Run[] = [];
  try {
    for (let repetition = 1; repetition <= options.repeat; repetition++) {
      for (const scenario of ['direct-1', 'cold-1', 'direct-N', 'cold-N'] as const) {
        const run = await runScenario(origin, scenario, options, repetition);
        runs.push(run);
        const cost = run.proxy ? `proxy ${fixed(run.proxy.cpuSecondsPerGiB, 2)} CPU-s/GiB, ${run.originGets} origin GET(s), X-Cache ${run.cache.join(' ')}` : `nginx ${fixed(run.nginx.cpuSecondsPerGiB, 2)} CPU-s/GiB`;
        progress(`${run.scenario} #${repetition}: ${fixed(run.mibPerSecond, 0)} MiB/s in ${fixed(run.wallSeconds, 2)} s, TTFB ${run.firstByteMs.map((ms) => ms.toFixed(0)).join('/')} ms, ${cost}`);
      }
    }
  } finally {
    await origin.nginx.stop();
  }
  const summaries = summarise(runs);
  const goalFigures = goals(runs, summaries, options);
  printReport(options, summaries, goalFigures, environment);
  const result = {
    benchmark: NAME,
    date: new Date().toISOString(),
    environment,
    options,
    summaries,
    goals: goalFigures,
    totalSeconds: (performance.now() - started) / 1000,
    runs,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

await runBenchmark(main, progress);
