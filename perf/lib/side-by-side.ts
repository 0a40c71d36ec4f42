// The comparison behind `passthrough` and `blob-hit`: the same curl clients download the same blob
// from nginx directly and through the proxy, 1 and 4 at once, interleaved (direct, proxy, direct,
// proxy, …) so that drift in the machine hits both sides alike; medians over the repetitions, ratios of
// the proxy's figures to nginx's. What differs between the benchmarks (the policy, what happens before
// the measured runs, the X-Cache the proxy must answer with) comes in a SideBySideConfig.
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../../config/units.ts';
import type { Blob } from './blob.ts';
import { makeTempDir, runBenchmark } from './cleanup.ts';
import { runClients, type CurlRoute } from './curl.ts';
import {
  describeEnvironment,
  environmentLine,
  MIB,
  percent,
  progressTo,
  type ProxyFigures,
} from './measure.ts';
import { directBlobRoute, proxiedBlobRoute, registryPolicy, startOrigin, type Origin } from './origin.ts';
import { readStatusKiB } from './procfs.ts';
import { startProxyProcess, type ProxyProcess } from './proxy.ts';
import { fixed, formatTable, median, round, roundNumbers } from './report.ts';
import { measureClients, type ClientsRun } from './run-clients.ts';

/** The warm-up fetches this much (or the whole blob if smaller) by each route before measuring. */
const WARM_UP_BYTES = 64 * MIB;

export interface SideBySideOptions {
  size: number;
  repeat: number;
  clients: number[];
  /** Write a V8 CPU profile of the proxy here (it slows the proxy: figures are then not comparable). */
  profileDir?: string;
  /** Another build of the proxy's cli (ProxyOptions.cli), e.g. one commit's built apart from the working tree. */
  cli?: string;
}

export interface SideBySideConfig {
  /** The benchmark's name: perf/<name>.ts, the progress prefix, the JSON's "benchmark". */
  name: string;
  repository: string;
  /** Policy lines after the registry's (e.g. a `cache:` section). */
  policyExtra?: readonly string[];
  /** The X-Cache header every proxied download must answer with, warm-up included. */
  proxyCache: string;
  /** Log nginx's requests and count, in every run, those for the blob: what reached the origin. */
  countOriginRequests?: boolean;
  /**
   * Runs after the proxy started and before the warm-up (blob-hit fills the cache here). Its lines are
   * printed under the title; its figures go into the JSON as `prepared`.
   */
  prepare?: (bench: SideBySideBench, progress: (message: string) => void) => Promise<{ lines: string[]; figures: Record<string, unknown> }>;
}

export type Via = 'direct' | 'proxy';

export interface SideBySideBench {
  options: SideBySideOptions;
  origin: Origin;
  blob: Blob;
  proxy: ProxyProcess;
  proxyIdleRssMiB: number;
  routes: Record<Via, CurlRoute>;
}

/** One run of a scenario; its figures are ClientsRun's (perf/lib/run-clients.ts). */
interface Run extends ClientsRun {
  scenario: string;
  via: Via;
  repetition: number;
}

/** Medians per scenario, over its repetitions. */
interface Summary {
  scenario: string;
  via: Via;
  clients: number;
  runs: number;
  wallSeconds: number;
  mibPerSecond: number;
  firstByteMs: number;
  originGets?: number;
  machineCores: number;
  nginxCpuSecondsPerGiB: number;
  nginxCores: number;
  nginxSystemShare: number;
  nginxWriteKiBPerCall: number;
  proxyCpuSecondsPerGiB?: number;
  proxyMainThreadCpuSecondsPerGiB?: number;
  /** Every thread but the main one: V8's garbage collector helpers, the libuv pool, the fill workers. */
  proxyOtherThreadsCpuSecondsPerGiB?: number;
  proxyCores?: number;
  proxySystemShare?: number;
  proxyPeakRssMiB?: number;
  proxyReadKiBPerCall?: number;
  proxyWriteKiBPerCall?: number;
}

interface Ratios {
  clients: number;
  /** Proxy throughput / direct throughput: 1.0 means the proxy costs the clients nothing. */
  throughput: number;
  /** Proxy CPU-s per GiB / nginx CPU-s per GiB in the direct run: what serving through us costs vs. nginx. */
  cpuPerGiB: number;
}

export function parseSideBySideOptions(name: string, argv: string[]): SideBySideOptions {
  const usage = `usage: node perf/${name}.ts [--size 1GiB] [--repeat 3] [--clients 1,4] [--profile DIR] [--cli PATH]\n`;
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1GiB' },
      repeat: { type: 'string', default: '3' },
      clients: { type: 'string', default: '1,4' },
      profile: { type: 'string' },
      cli: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const size = parseSize(values.size);
  const repeat = Number(values.repeat);
  const clients = values.clients.split(',').map(Number);
  if (size < 1) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (clients.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`--clients ${values.clients}: must be positive integers, e.g. 1,4`);
  return { size, repeat, clients, ...(values.profile ? { profileDir: values.profile } : {}), ...(values.cli ? { cli: values.cli } : {}) };
}

/** The whole benchmark: set up, prepare, warm up, measure, report; cleans up however it ends. */
export async function runSideBySide(config: SideBySideConfig, argv: string[]): Promise<void> {
  const progress = progressTo(config.name);
  await runBenchmark(() => main(config, parseSideBySideOptions(config.name, argv), progress), progress);
}

async function main(config: SideBySideConfig, options: SideBySideOptions, progress: (message: string) => void): Promise<void> {
  const started = performance.now();
  const bench = await setUp(config, options, progress);
  let runs: Run[];
  let lifetimePeakRssMiB: number;
  let prepared: { lines: string[]; figures: Record<string, unknown> } | undefined;
  try {
    prepared = await config.prepare?.(bench, progress);
    await warmUp(config, bench);
    runs = await runAll(config, bench, progress);
    // VmHWM: the peak over the proxy's whole life (preparation, warm-up and every run), read before it stops.
    lifetimePeakRssMiB = readStatusKiB(bench.proxy.pid, 'VmHWM') / 1024;
  } finally {
    await bench.proxy.stop();
    await bench.origin.nginx.stop();
  }
  const summaries = summarise(runs);
  const ratioRows = ratios(summaries, options.clients);
  const environment = describeEnvironment(bench.origin.nginx.version);
  printReport(config, bench, summaries, ratioRows, environment, lifetimePeakRssMiB, prepared?.lines ?? []);
  // The last line is the whole result as JSON, for notes and tools to quote.
  const result = {
    benchmark: config.name,
    date: new Date().toISOString(),
    environment,
    options: { size: options.size, repeat: options.repeat, clients: options.clients, profiled: options.profileDir !== undefined },
    ...(prepared ? { prepared: prepared.figures } : {}),
    summaries,
    ratios: ratioRows,
    proxyIdleRssMiB: bench.proxyIdleRssMiB,
    proxyLifetimePeakRssMiB: lifetimePeakRssMiB,
    totalSeconds: (performance.now() - started) / 1000,
    runs,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

async function setUp(config: SideBySideConfig, options: SideBySideOptions, progress: (message: string) => void): Promise<SideBySideBench> {
  const dir = makeTempDir(config.name);
  const origin = await startOrigin({
    dir,
    blobs: [{ repository: config.repository, size: options.size }],
    ...(config.countOriginRequests ? { accessLog: true } : {}),
    progress,
  });
  const blob = origin.blobs[0]!;
  mkdirSync(join(dir, 'proxy'));
  const proxy = await startProxyProcess({
    dir: join(dir, 'proxy'),
    policy: registryPolicy(origin, config.policyExtra),
    // Absolute: the proxy runs in its own (temporary) working directory.
    ...(options.profileDir ? { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${resolve(options.profileDir)}`] } : {}),
    ...(options.cli ? { cli: options.cli } : {}),
  });
  // Its RSS before any request: what the peaks of the runs are to be compared with.
  const proxyIdleRssMiB = readStatusKiB(proxy.pid, 'VmRSS') / 1024;
  progress(`nginx on 127.0.0.1:${origin.nginx.port} (pids ${origin.nginx.pids().join(', ')}), proxy on ${proxy.url} (pid ${proxy.pid}, RSS ${proxyIdleRssMiB.toFixed(0)} MiB)`);
  return {
    options,
    origin,
    blob,
    proxy,
    proxyIdleRssMiB,
    routes: { direct: directBlobRoute(origin, blob), proxy: proxiedBlobRoute(origin, blob, proxy) },
  };
}

/**
 * One ranged fetch by each route before measuring: the proxy mints its leaf for the origin and
 * compiles its hot paths, and the file is read into the page cache by nginx's route to it.
 */
async function warmUp(config: SideBySideConfig, bench: SideBySideBench): Promise<void> {
  const bytes = Math.min(WARM_UP_BYTES, bench.blob.size);
  for (const via of ['direct', 'proxy'] as const) {
    await runClients(1, bench.routes[via], { expectBytes: bytes, range: `0-${bytes - 1}`, ...(via === 'proxy' ? { expectCache: [config.proxyCache] } : {}) });
  }
}

async function measure(config: SideBySideConfig, bench: SideBySideBench, via: Via, clients: number, repetition: number): Promise<Run> {
  const run = await measureClients({
    origin: bench.origin,
    blob: bench.blob,
    route: bench.routes[via],
    clients,
    ...(via === 'proxy' ? { proxy: bench.proxy, expectCache: [config.proxyCache] } : {}),
  });
  return { scenario: `${via}-${clients}`, via, repetition, ...run };
}

function summarise(runs: readonly Run[]): Summary[] {
  const scenarios = [...new Set(runs.map((run) => run.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((run) => run.scenario === scenario);
    const m = (pick: (run: Run) => number) => round(median(of.map(pick)));
    const first = of[0]!;
    const summary: Summary = {
      scenario,
      via: first.via,
      clients: first.clients,
      runs: of.length,
      wallSeconds: m((r) => r.wallSeconds),
      mibPerSecond: m((r) => r.mibPerSecond),
      firstByteMs: m((r) => r.medianFirstByteMs),
      ...(first.originGets !== undefined ? { originGets: Math.max(...of.map((r) => r.originGets ?? 0)) } : {}),
      machineCores: m((r) => r.machineCores),
      nginxCpuSecondsPerGiB: m((r) => r.nginx.cpuSecondsPerGiB),
      nginxCores: m((r) => r.nginx.cores),
      nginxSystemShare: m((r) => r.nginx.systemShare),
      nginxWriteKiBPerCall: m((r) => r.nginx.writeKiBPerCall),
    };
    if (first.proxy) {
      const p = (pick: (proxy: ProxyFigures) => number) => m((r) => pick(r.proxy!));
      summary.proxyCpuSecondsPerGiB = p((x) => x.cpuSecondsPerGiB);
      summary.proxyMainThreadCpuSecondsPerGiB = p((x) => x.mainThreadCpuSecondsPerGiB);
      summary.proxyOtherThreadsCpuSecondsPerGiB = p((x) => x.cpuSecondsPerGiB - x.mainThreadCpuSecondsPerGiB);
      summary.proxyCores = p((x) => x.cores);
      summary.proxySystemShare = p((x) => x.systemShare);
      summary.proxyPeakRssMiB = p((x) => x.peakRssMiB);
      summary.proxyReadKiBPerCall = p((x) => x.readKiBPerCall);
      summary.proxyWriteKiBPerCall = p((x) => x.writeKiBPerCall);
    }
    return summary;
  });
}

function ratios(summaries: readonly Summary[], clientCounts: readonly number[]): Ratios[] {
  return clientCounts.map((clients) => {
    const direct = summaries.find((s) => s.scenario === `direct-${clients}`)!;
    const proxy = summaries.find((s) => s.scenario === `proxy-${clients}`)!;
    return {
      clients,
      throughput: round(proxy.mibPerSecond / direct.mibPerSecond),
      cpuPerGiB: round(proxy.proxyCpuSecondsPerGiB! / direct.nginxCpuSecondsPerGiB),
    };
  });
}

function printReport(
  config: SideBySideConfig,
  bench: SideBySideBench,
  summaries: readonly Summary[],
  ratioRows: readonly Ratios[],
  environment: Record<string, string | number>,
  lifetimePeakRssMiB: number,
  preparedLines: readonly string[],
): void {
  const { options } = bench;
  const counted = config.countOriginRequests === true;
  const out: string[] = [
    '',
    `${config.name}: ${formatSize(options.size)} blob, medians of ${options.repeat} interleaved runs; every proxied download answered X-Cache: ${config.proxyCache}`,
    environmentLine(environment),
    ...preparedLines,
    '',
    formatTable(
      ['scenario', 'wall s', 'MiB/s', 'TTFB ms', ...(counted ? ['origin GETs'] : []), 'proxy CPU-s/GiB', 'nginx CPU-s/GiB', 'proxy peak RSS MiB', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.wallSeconds, 2),
        fixed(s.mibPerSecond, 0),
        fixed(s.firstByteMs, 1),
        ...(counted ? [fixed(s.originGets, 0)] : []),
        fixed(s.proxyCpuSecondsPerGiB, 2),
        fixed(s.nginxCpuSecondsPerGiB, 2),
        fixed(s.proxyPeakRssMiB, 0),
        fixed(s.machineCores, 2),
      ]),
    ),
    `proxy RSS: ${fixed(bench.proxyIdleRssMiB, 0)} MiB after start, ${fixed(lifetimePeakRssMiB, 0)} MiB at its peak (VmHWM, over its whole life)`,
    ...(counted ? ['origin GETs: the most GETs for the blob that reached nginx in one run of the scenario (its access log)'] : []),
    '',
    'where the CPU goes (cores = CPU-s / wall-s; kernel % = stime share; KiB/call = average bytes per read(2) / write(2))',
    formatTable(
      ['scenario', 'proxy cores', 'main thread CPU-s/GiB', 'other threads CPU-s/GiB', 'kernel %', 'KiB/read', 'KiB/write', 'nginx cores', 'nginx kernel %', 'nginx KiB/write'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.proxyCores, 2),
        fixed(s.proxyMainThreadCpuSecondsPerGiB, 2),
        fixed(s.proxyOtherThreadsCpuSecondsPerGiB, 2),
        fixed(percent(s.proxySystemShare), 0),
        fixed(s.proxyReadKiBPerCall, 1),
        fixed(s.proxyWriteKiBPerCall, 1),
        fixed(s.nginxCores, 2),
        fixed(percent(s.nginxSystemShare), 0),
        fixed(s.nginxWriteKiBPerCall, 1),
      ]),
    ),
    '',
    formatTable(
      ['ratio', ...ratioRows.map((r) => `${r.clients} client${r.clients === 1 ? '' : 's'}`)],
      [
        ['throughput proxy / direct', ...ratioRows.map((r) => fixed(r.throughput, 2))],
        ['CPU-s/GiB proxy / nginx (direct)', ...ratioRows.map((r) => fixed(r.cpuPerGiB, 2))],
      ],
    ),
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

/** Every scenario, `repeat` times, interleaved: direct-1, proxy-1, direct-4, proxy-4, direct-1, … */
async function runAll(config: SideBySideConfig, bench: SideBySideBench, progress: (message: string) => void): Promise<Run[]> {
  const runs: Run[] = [];
  for (let repetition = 1; repetition <= bench.options.repeat; repetition++) {
    for (const clients of bench.options.clients) {
      for (const via of ['direct', 'proxy'] as const) {
        const run = await measure(config, bench, via, clients, repetition);
        runs.push(run);
        const cost = run.proxy ? `proxy ${fixed(run.proxy.cpuSecondsPerGiB, 2)}` : `nginx ${fixed(run.nginx.cpuSecondsPerGiB, 2)}`;
        progress(`${run.scenario} #${repetition}: ${fixed(run.mibPerSecond, 0)} MiB/s in ${fixed(run.wallSeconds, 2)} s, ${cost} CPU-s/GiB`);
      }
    }
  }
  return runs;
}
