// Pass-through: what the proxy costs when it forwards a large blob without caching it — client TLS
// terminated with a leaf from the proxy's CA, upstream over TLS with undici — side by side with the
// same clients fetching the same file from the origin directly.
//
//   node perf/passthrough.ts [--size 1GiB] [--repeat 3] [--clients 1,4] [--profile DIR]
//
// nginx serves a file of random bytes over TLS on loopback; the proxy runs as its own process with a
// policy that intercepts the origin; curl clients download the whole file, directly or through the
// proxy, 1 and 4 at once, interleaved (direct, proxy, direct, proxy, …) so that drift in the machine
// hits both sides alike. Figures are medians over the repetitions; see perf/README.md for each one.
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { createTestCa } from '../test/helpers/pki.ts';
import { createRandomBlob, type Blob } from './lib/blob.ts';
import { cleanupAll, makeTempDir } from './lib/cleanup.ts';
import { directRoute, proxiedRoute, runClients, type CurlRoute } from './lib/curl.ts';
import { startTlsNginx, type NginxOrigin } from './lib/nginx.ts';
import {
  PeakRssSampler,
  readCounters,
  readCountersOf,
  readMachineBusySeconds,
  readMainThreadCpu,
  readStatusKiB,
  readThreadCpu,
  subtractCounters,
  threadCpuByName,
  type Counters,
} from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { fixed, formatTable, median, round, roundNumbers } from './lib/report.ts';

const ORIGIN_HOST = 'origin.test';
const REPOSITORY = 'bench/passthrough';
const MIB = 1024 ** 2;
const GIB = 1024 ** 3;
/** The warm-up fetches this much (or the whole blob if smaller) by each route before measuring. */
const WARM_UP_BYTES = 64 * MIB;

interface Options {
  size: number;
  repeat: number;
  clients: number[];
  /** Write a V8 CPU profile of the proxy here (it slows the proxy: figures are then not comparable). */
  profileDir?: string;
}

type Via = 'direct' | 'proxy';

/** What one process (or nginx's master + workers) spent during one run. */
interface ProcessFigures {
  cpuSeconds: number;
  cpuSecondsPerGiB: number;
  /** CPU seconds / wall seconds: 1.0 is one core busy all the time. */
  cores: number;
  /** Share of the CPU time spent in the kernel (stime / (utime + stime)). */
  systemShare: number;
  /** Average bytes returned by one read(2) and taken by one write(2): small values mean small chunks. */
  readKiBPerCall: number;
  writeKiBPerCall: number;
}

interface ProxyFigures extends ProcessFigures {
  /** The main thread alone: everything on the data path runs there today. */
  mainThreadCpuSecondsPerGiB: number;
  peakRssMiB: number;
  /** CPU seconds by thread name: "MainThread", "V8Worker" (V8's GC and compiler helpers), "WorkerThread" (the pool), … */
  threads: Record<string, number>;
}

interface Run {
  scenario: string;
  via: Via;
  clients: number;
  repetition: number;
  wallSeconds: number;
  bytes: number;
  mibPerSecond: number;
  /** Median over the clients of curl's time to first byte (includes connect, CONNECT and TLS). */
  firstByteMs: number;
  /** Cores busy on the whole machine (clients, nginx, proxy, everything else). */
  machineCores: number;
  nginx: ProcessFigures;
  proxy?: ProxyFigures;
}

interface Bench {
  options: Options;
  blob: Blob;
  nginx: NginxOrigin;
  proxy: ProxyProcess;
  proxyIdleRssMiB: number;
  routes: Record<Via, CurlRoute>;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1GiB' },
      repeat: { type: 'string', default: '3' },
      clients: { type: 'string', default: '1,4' },
      profile: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write('usage: node perf/passthrough.ts [--size 1GiB] [--repeat 3] [--clients 1,4] [--profile DIR]\n');
    process.exit(0);
  }
  const size = parseSize(values.size);
  const repeat = Number(values.repeat);
  const clients = values.clients.split(',').map(Number);
  if (size < 1) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (clients.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`--clients ${values.clients}: must be positive integers, e.g. 1,4`);
  return { size, repeat, clients, ...(values.profile ? { profileDir: values.profile } : {}) };
}

async function setUp(options: Options): Promise<Bench> {
  const dir = makeTempDir('passthrough');
  const ca = createTestCa('pullthrough perf origin CA');
  const caFile = join(dir, 'test-ca.pem');
  writeFileSync(caFile, ca.certPem);

  progress(`writing ${formatSize(options.size)} of random bytes to ${dir}`);
  const blob = await createRandomBlob(join(dir, 'www'), REPOSITORY, options.size);
  const nginx = await startTlsNginx({ dir: join(dir, 'nginx'), root: join(dir, 'www'), ...ca.issue([ORIGIN_HOST, '127.0.0.1']) });

  mkdirSync(join(dir, 'proxy'));
  const proxy = await startProxyProcess({
    dir: join(dir, 'proxy'),
    policy: passThroughPolicy(nginx.port, caFile),
    // Absolute: the proxy runs in its own (temporary) working directory.
    ...(options.profileDir ? { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${resolve(options.profileDir)}`] } : {}),
  });
  // Its RSS before any request: what the peaks of the runs are to be compared with.
  const proxyIdleRssMiB = readStatusKiB(proxy.pid, 'VmRSS') / 1024;
  progress(`nginx on 127.0.0.1:${nginx.port} (pids ${nginx.pids().join(', ')}), proxy on ${proxy.url} (pid ${proxy.pid}, RSS ${proxyIdleRssMiB.toFixed(0)} MiB)`);

  const target = { host: ORIGIN_HOST, port: nginx.port, path: blob.urlPath };
  return {
    options,
    blob,
    nginx,
    proxy,
    proxyIdleRssMiB,
    routes: {
      direct: directRoute({ ...target, caFile }),
      proxy: proxiedRoute({ ...target, proxyUrl: proxy.url, proxyCaFile: proxy.caFile }),
    },
  };
}

/** Intercept the origin, trust its test CA, resolve its name to loopback. Nothing else. */
function passThroughPolicy(originPort: number, caFile: string): string {
  return [
    'registries:',
    `  ${JSON.stringify(`${ORIGIN_HOST}:${originPort}`)}:`,
    `    tls: { ca: ${JSON.stringify(caFile)} }`,
    'hosts:',
    `  ${ORIGIN_HOST}: 127.0.0.1`,
    '',
  ].join('\n');
}

/**
 * One ranged fetch by each route before measuring: the proxy mints its leaf for the origin and
 * compiles its hot paths, and the file is read into the page cache by nginx's route to it.
 */
async function warmUp(bench: Bench): Promise<void> {
  const bytes = Math.min(WARM_UP_BYTES, bench.blob.size);
  for (const via of ['direct', 'proxy'] as const) {
    await runClients(1, bench.routes[via], { expectBytes: bytes, range: `0-${bytes - 1}` });
  }
}

async function measure(bench: Bench, via: Via, clients: number, repetition: number): Promise<Run> {
  const { nginx, proxy } = bench;
  const nginxBefore = readCountersOf(nginx.pids());
  const proxyBefore = via === 'proxy' ? snapshotProxy(proxy.pid) : undefined;
  const machineBefore = readMachineBusySeconds();

  const result = await runClients(clients, bench.routes[via], { expectBytes: bench.blob.size });

  const machineSeconds = readMachineBusySeconds() - machineBefore;
  const nginxSpent = subtractCounters(readCountersOf(nginx.pids()), nginxBefore);
  const bytes = clients * bench.blob.size;
  const wall = result.wallSeconds;
  return {
    scenario: `${via}-${clients}`,
    via,
    clients,
    repetition,
    wallSeconds: wall,
    bytes,
    mibPerSecond: bytes / MIB / wall,
    firstByteMs: median(result.clients.map((c) => c.firstByteSeconds * 1000)),
    machineCores: machineSeconds / wall,
    nginx: processFigures(nginxSpent, bytes, wall),
    ...(proxyBefore ? { proxy: proxyFigures(proxy.pid, proxyBefore, bytes, wall) } : {}),
  };
}

interface ProxySnapshot {
  counters: Counters;
  mainThreadCpu: number;
  threads: ReturnType<typeof readThreadCpu>;
  rss: PeakRssSampler;
}

function snapshotProxy(pid: number): ProxySnapshot {
  return { counters: readCounters(pid), mainThreadCpu: readMainThreadCpu(pid), threads: readThreadCpu(pid), rss: new PeakRssSampler(pid) };
}

function proxyFigures(pid: number, before: ProxySnapshot, bytes: number, wall: number): ProxyFigures {
  const peakKiB = before.rss.stop();
  const spent = subtractCounters(readCounters(pid), before.counters);
  const threads = threadCpuByName(readThreadCpu(pid), before.threads);
  return {
    ...processFigures(spent, bytes, wall),
    mainThreadCpuSecondsPerGiB: (readMainThreadCpu(pid) - before.mainThreadCpu) / (bytes / GIB),
    peakRssMiB: peakKiB / 1024,
    threads: Object.fromEntries(Object.entries(threads).filter(([, seconds]) => seconds > 0)),
  };
}

function processFigures(spent: Counters, bytes: number, wall: number): ProcessFigures {
  return {
    cpuSeconds: spent.cpuSeconds,
    cpuSecondsPerGiB: spent.cpuSeconds / (bytes / GIB),
    cores: spent.cpuSeconds / wall,
    systemShare: spent.systemSeconds / Math.max(spent.cpuSeconds, Number.EPSILON),
    readKiBPerCall: spent.readBytes / Math.max(1, spent.readCalls) / 1024,
    writeKiBPerCall: spent.writeBytes / Math.max(1, spent.writeCalls) / 1024,
  };
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
  machineCores: number;
  nginxCpuSecondsPerGiB: number;
  nginxCores: number;
  nginxSystemShare: number;
  nginxWriteKiBPerCall: number;
  proxyCpuSecondsPerGiB?: number;
  proxyMainThreadCpuSecondsPerGiB?: number;
  /** Every thread but the main one; today mostly V8's garbage collector helpers. */
  proxyOtherThreadsCpuSecondsPerGiB?: number;
  proxyCores?: number;
  proxySystemShare?: number;
  proxyPeakRssMiB?: number;
  proxyReadKiBPerCall?: number;
  proxyWriteKiBPerCall?: number;
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
      firstByteMs: m((r) => r.firstByteMs),
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

interface Ratios {
  clients: number;
  /** Proxy throughput / direct throughput: 1.0 means the proxy costs the clients nothing. */
  throughput: number;
  /** Proxy CPU-s per GiB / nginx CPU-s per GiB in the direct run: what serving through us costs vs. nginx. */
  cpuPerGiB: number;
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

function printReport(bench: Bench, summaries: readonly Summary[], ratioRows: readonly Ratios[], environment: Record<string, string | number>, lifetimePeakRssMiB: number): void {
  const { options } = bench;
  const out: string[] = [
    '',
    `passthrough: ${formatSize(options.size)} blob, medians of ${options.repeat} interleaved runs`,
    `${environment.node}, ${environment.nginx}, curl ${environment.curl}, ${environment.cpus} × ${environment.cpu}, Linux ${environment.kernel}`,
    '',
    formatTable(
      ['scenario', 'wall s', 'MiB/s', 'TTFB ms', 'proxy CPU-s/GiB', 'nginx CPU-s/GiB', 'proxy peak RSS MiB', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.wallSeconds, 2),
        fixed(s.mibPerSecond, 0),
        fixed(s.firstByteMs, 1),
        fixed(s.proxyCpuSecondsPerGiB, 2),
        fixed(s.nginxCpuSecondsPerGiB, 2),
        fixed(s.proxyPeakRssMiB, 0),
        fixed(s.machineCores, 2),
      ]),
    ),
    `proxy RSS: ${fixed(bench.proxyIdleRssMiB, 0)} MiB after start, ${fixed(lifetimePeakRssMiB, 0)} MiB at its peak (VmHWM, warm-up and all runs)`,
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

function percent(share: number | undefined): number | undefined {
  return share === undefined ? undefined : share * 100;
}

function describeEnvironment(nginx: NginxOrigin): Record<string, string | number> {
  const curl = spawnSync('curl', ['--version'], { encoding: 'utf8' }).stdout ?? '';
  return {
    node: process.version,
    nginx: nginx.version,
    curl: /^curl (\S+)/.exec(curl)?.[1] ?? 'unknown',
    cpus: os.availableParallelism(),
    cpu: os.cpus()[0]?.model.trim() ?? 'unknown',
    kernel: os.release(),
  };
}

function progress(message: string): void {
  process.stderr.write(`[passthrough] ${message}\n`);
}

/** Every scenario, `repeat` times, interleaved: direct-1, proxy-1, direct-4, proxy-4, direct-1, … */
async function runAll(bench: Bench): Promise<Run[]> {
  const runs: Run[] = [];
  for (let repetition = 1; repetition <= bench.options.repeat; repetition++) {
    for (const clients of bench.options.clients) {
      for (const via of ['direct', 'proxy'] as const) {
        const run = await measure(bench, via, clients, repetition);
        runs.push(run);
        const cost = run.proxy ? `proxy ${fixed(run.proxy.cpuSecondsPerGiB, 2)}` : `nginx ${fixed(run.nginx.cpuSecondsPerGiB, 2)}`;
        progress(`${run.scenario} #${repetition}: ${fixed(run.mibPerSecond, 0)} MiB/s in ${fixed(run.wallSeconds, 2)} s, ${cost} CPU-s/GiB`);
      }
    }
  }
  return runs;
}

async function main(): Promise<void> {
  const started = performance.now();
  const options = parseOptions(process.argv.slice(2));
  const bench = await setUp(options);
  let runs: Run[];
  let lifetimePeakRssMiB: number;
  try {
    await warmUp(bench);
    runs = await runAll(bench);
    // VmHWM: the peak over the proxy's whole life (warm-up and every run), read before it stops.
    lifetimePeakRssMiB = readStatusKiB(bench.proxy.pid, 'VmHWM') / 1024;
  } finally {
    await bench.proxy.stop();
    await bench.nginx.stop();
  }
  const summaries = summarise(runs);
  const ratioRows = ratios(summaries, options.clients);
  const environment = describeEnvironment(bench.nginx);
  printReport(bench, summaries, ratioRows, environment, lifetimePeakRssMiB);
  // The last line is the whole result as JSON, for notes and tools to quote.
  const result = {
    benchmark: 'passthrough',
    date: new Date().toISOString(),
    environment,
    options: { size: options.size, repeat: options.repeat, clients: options.clients, profiled: options.profileDir !== undefined },
    summaries,
    ratios: ratioRows,
    proxyIdleRssMiB: bench.proxyIdleRssMiB,
    proxyLifetimePeakRssMiB: lifetimePeakRssMiB,
    totalSeconds: (performance.now() - started) / 1000,
    runs,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

try {
  await main();
} catch (err) {
  process.stderr.write(`[passthrough] failed: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
} finally {
  cleanupAll();
}
