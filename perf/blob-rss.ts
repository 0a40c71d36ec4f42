// Memory: the proxy's resident set while clients read blobs through it. Two modes:
//
// --mode single (default): N clients (default 8) stream one large blob (default 4 GiB), cold (a fresh
// proxy with an empty cache: one fill, N clients reading the growing file) and warm (the proxy
// restarted on that cache: N hits). Goal: peak RSS ≤ 150 MiB.
//
// --mode many: very many clients (default 1,000) each read a cached blob (default 4 blobs of 4 MiB, client
// i the blob i mod 4), all at once: what every client's connection, TLS session and read buffers cost.
// --size takes a list here (--size 4KiB,64KiB,1MiB,16MiB: blob i has the size i mod the list's length).
// The blobs are filled first by one client each, then the proxy is restarted on that cache (so the
// VmHWM is the run's own), the clients open their sessions (CONNECT + TLS, 64 at a time) and then send
// their GETs together. The clients run in this process (node's TLS, one thread), not as curl
// processes: 1,000 curl processes would not fit the machine. Goal: peak RSS ≤ 250 MiB.
//
//   node perf/blob-rss.ts [--size 4GiB] [--clients 8] [--repeat 1] [--variant SPEC]…
//   node perf/blob-rss.ts --mode many [--clients 1000] [--size 4MiB[,SIZE…]] [--blobs 4] [--repeat 1] [--variant SPEC]…
//
// Per variant, single mode: start a proxy on a fresh data dir and read its RSS at idle; release N
// clients at once (X-Cache MISS + JOINED); wait for the commit; stop it; start a proxy again on the
// same data dir, read its idle RSS; release N clients (X-Cache HIT); stop it. VmHWM (the kernel's peak
// of the process's whole life) is read at the end of each run, so each scenario's peak is its own
// process's; VmRSS, RssAnon and RssFile are also sampled every 50 ms.
//
// --variant starts the proxy differently, to find out where the memory goes: a SPEC is a space-
// separated list of node options and environment variables, written with "=" when it starts with a
// dash (--variant=--max-semi-space-size=1, --variant 'MALLOC_ARENA_MAX=2 --max-semi-space-size=1');
// give --variant several times to compare (each runs both scenarios; "default" is the proxy as users
// run it). A token cli=PATH runs another build of the proxy, e.g. one compiled to .js (type stripping
// loads a TypeScript stripper into every thread that imports a .ts file).
import { readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { runBenchmark, makeTempDir } from './lib/cleanup.ts';
import { runClients, waitForCacheHit } from './lib/curl.ts';
import { describeEnvironment, environmentLine, GIB, progressTo, proxyFigures, snapshotProxy, type ProxyFigures } from './lib/measure.ts';
import { ORIGIN_HOST, proxiedBlobRoute, startOrigin, type Origin } from './lib/origin.ts';
import { MemoryKindsSampler, readMemoryKinds, readMemoryStatus, threadNames, type MemoryKinds, type MemoryStatus } from './lib/procfs.ts';
import { fixed, formatTable, median, round, roundNumbers } from './lib/report.ts';
import type { ProxyProcess } from './lib/proxy.ts';
import { measureClients, proxyDir, startProxyIn, type ClientsRun } from './lib/run-clients.ts';

const NAME = 'blob-rss';
const REPOSITORY = 'bench/blob-rss';
const GOAL_PEAK_MIB = 150;
/** --mode many: the goal with 1,000 clients reading cached blobs at once. */
const GOAL_MANY_PEAK_MIB = 250;
/** --mode many: sessions opened at once before the run (CONNECT + TLS). */
const OPEN_AT_ONCE = 64;
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
  mode: 'single' | 'many';
  /** Bytes of the blob (single), or of each blob: --mode many takes a list, blob i the size i mod the list's length. */
  size: number;
  sizes: number[];
  clients: number;
  /** --mode many: distinct cached blobs the clients read (client i reads blob i mod blobs). */
  blobs: number;
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
      mode: { type: 'string', default: 'single' },
      size: { type: 'string' },
      clients: { type: 'string' },
      blobs: { type: 'string', default: '4' },
      repeat: { type: 'string', default: '1' },
      variant: { type: 'string', multiple: true },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      `usage: node perf/${NAME}.ts [--mode single] [--size 4GiB] [--clients 8] [--repeat 1] [--variant='default' | --variant='--node-option… ENV=VALUE…']…\n` +
        `       node perf/${NAME}.ts --mode many [--clients 1000] [--size 4MiB] [--blobs 4] [--repeat 1] [--variant …]…\n`,
    );
    process.exit(0);
  }
  if (values.mode !== 'single' && values.mode !== 'many') throw new Error(`--mode ${values.mode}: single or many`);
  const mode = values.mode;
  const sizes = (values.size ?? (mode === 'many' ? '4MiB' : '4GiB')).split(',').map((text) => parseSize(text.trim()));
  if (mode === 'single' && sizes.length > 1) throw new Error(`--size ${values.size}: one size in --mode single`);
  const size = sizes[0]!;
  const clients = Number(values.clients ?? (mode === 'many' ? '1000' : '8'));
  const blobs = Number(values.blobs);
  if (!Number.isInteger(blobs) || blobs < 1) throw new Error(`--blobs ${values.blobs}: must be a positive integer`);
  if (sizes.some((n) => n < 1)) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  const repeat = Number(values.repeat);
  if (!Number.isInteger(clients) || clients < 1) throw new Error(`--clients ${values.clients}: must be a positive integer`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  const variants = (values.variant ?? ['']).map(parseVariant);
  return { mode, size, sizes, clients, blobs, repeat, variants };
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
  if (options.mode === 'many') return mainMany(options, started);
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

// --mode many ---------------------------------------------------------------------------------------

interface ManyMeasurement {
  variant: string;
  idle: MemoryStatus;
  /** The sample with the highest VmRSS during the run. */
  peak: MemoryStatus;
  /** VmHWM at the end of the run: the kernel's peak (the proxy was started for this run). */
  hwmMiB: number;
  after: MemoryStatus;
  idleKinds: MemoryKinds;
  peakKinds: MemoryKinds;
  /** Opening the sessions (CONNECT + TLS), before the run. */
  connectSeconds: number;
  /** VmRSS once every session was open, before any GET. */
  connected: MemoryStatus;
  wallSeconds: number;
  bytes: number;
  mibPerSecond: number;
  cache: Record<string, number>;
  /** Time to the response head and to the last byte, over the clients (ms). */
  firstByteMs: { median: number; max: number };
  lastByteMs: { median: number; max: number };
  proxy: ProxyFigures;
}

async function mainMany(options: Options, started: number): Promise<void> {
  const dir = makeTempDir(NAME);
  const origin = await startOrigin({ dir, blobs: Array.from({ length: options.blobs }, (_, i) => ({ repository: REPOSITORY, size: options.sizes[i % options.sizes.length]! })), progress });
  const environment = describeEnvironment(origin.nginx.version);
  const measurements: ManyMeasurement[] = [];
  try {
    const rounds = Array.from({ length: options.repeat }, () => [...options.variants.entries()]).flat();
    for (const [pass, [index, variant]] of rounds.entries()) {
      const cacheDir = proxyDir(dir, `many-${index}-${pass}`);
      try {
        const m = await measureMany(origin, options, variant, cacheDir);
        measurements.push(m);
        progress(`${variant.label}: peak ${fixed(mib(m.peak.VmRSS), 0)} MiB sampled, VmHWM ${fixed(m.hwmMiB, 0)} MiB, ${fixed(m.mibPerSecond, 0)} MiB/s`);
      } finally {
        rmSync(cacheDir, { recursive: true, force: true });
      }
    }
  } finally {
    await origin.nginx.stop();
  }
  printManyReport(options, measurements, environment);
  const result = {
    benchmark: NAME,
    mode: 'many',
    date: new Date().toISOString(),
    environment,
    options: { sizes: options.sizes, clients: options.clients, blobs: options.blobs, repeat: options.repeat, variants: options.variants },
    goalPeakMiB: GOAL_MANY_PEAK_MIB,
    summary: measurements.map((m) => ({
      variant: m.variant,
      idleRssMiB: mib(m.idle.VmRSS),
      connectedRssMiB: mib(m.connected.VmRSS),
      peakRssMiB: mib(m.peak.VmRSS),
      hwmMiB: m.hwmMiB,
      peakAnonMiB: mib(m.peak.RssAnon),
      afterRssMiB: mib(m.after.VmRSS),
      mibPerSecond: m.mibPerSecond,
      proxyCpuSecondsPerGiB: m.proxy.cpuSecondsPerGiB,
      met: m.hwmMiB <= GOAL_MANY_PEAK_MIB,
    })),
    totalSeconds: round((performance.now() - started) / 1000),
    measurements,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

async function measureMany(origin: Origin, options: Options, variant: Variant, dir: string): Promise<ManyMeasurement> {
  const start = () => startProxyIn({ origin, dir, nodeArgs: variant.nodeArgs, env: variant.env, ...(variant.cli ? { cli: variant.cli } : {}) });
  // The blobs into the cache, one client each; then a proxy of its own for the run.
  const filling = await start();
  try {
    for (const blob of origin.blobs) {
      const route = proxiedBlobRoute(origin, blob, filling.proxy);
      await runClients(1, route, { expectBytes: blob.size });
      await waitForCacheHit(route);
    }
  } finally {
    await filling.proxy.stop();
  }
  const { proxy } = await start();
  try {
    await sleep(SETTLE_MS);
    const idle = readMemoryStatus(proxy.pid);
    const idleKinds = readMemoryKinds(proxy.pid);
    progress(`${variant.label}: proxy pid ${proxy.pid}, ${fixed(mib(idle.VmRSS), 0)} MiB at idle; opening ${options.clients} sessions`);
    const caPem = readFileSync(proxy.caFile, 'utf8');
    const connectStarted = performance.now();
    const sessions = await openSessions(proxy, origin, caPem, options.clients);
    const connectSeconds = (performance.now() - connectStarted) / 1000;
    const connected = readMemoryStatus(proxy.pid);
    progress(`${variant.label}: ${options.clients} sessions open in ${fixed(connectSeconds, 1)} s, ${fixed(mib(connected.VmRSS), 0)} MiB; ${options.clients} GETs at once`);
    const kindsSampler = new MemoryKindsSampler(proxy.pid);
    const before = snapshotProxy(proxy.pid);
    const runStarted = performance.now();
    const blobOf = (i: number) => origin.blobs[i % origin.blobs.length]!;
    const results = await Promise.all(sessions.map((socket, i) => getOver(socket, blobOf(i).urlPath, origin, runStarted)));
    const wallSeconds = (performance.now() - runStarted) / 1000;
    const bytes = results.reduce((sum, r) => sum + r.bytes, 0);
    const figures = proxyFigures(proxy.pid, before, bytes, wallSeconds);
    const hwmMiB = readMemoryStatus(proxy.pid).VmHWM / 1024;
    const peakKinds = kindsSampler.stop() ?? idleKinds;
    const failed = results.map((r, i) => ({ ...r, expected: blobOf(i).size })).filter((r) => r.status !== 200 || r.bytes !== r.expected);
    if (failed.length > 0) throw new Error(`${failed.length} of ${results.length} clients failed, e.g. status ${failed[0]!.status}, ${failed[0]!.bytes} of ${failed[0]!.expected} bytes${failed[0]!.error ? `: ${failed[0]!.error}` : ''}`);
    const cache: Record<string, number> = {};
    for (const r of results) cache[r.cache] = (cache[r.cache] ?? 0) + 1;
    if (Object.keys(cache).some((status) => status !== 'HIT')) throw new Error(`every client should be a HIT: X-Cache ${JSON.stringify(cache)}`);
    for (const socket of sessions) socket.destroy();
    await sleep(SETTLE_MS);
    const after = readMemoryStatus(proxy.pid);
    const spread = (values: number[]) => ({ median: median(values), max: Math.max(...values) });
    return {
      variant: variant.label,
      idle,
      peak: figures.peakMemory ?? idle,
      hwmMiB,
      after,
      idleKinds,
      peakKinds,
      connectSeconds,
      connected,
      wallSeconds,
      bytes,
      mibPerSecond: bytes / 1024 ** 2 / wallSeconds,
      cache,
      firstByteMs: spread(results.map((r) => r.firstByteMs)),
      lastByteMs: spread(results.map((r) => r.lastByteMs)),
      proxy: figures,
    };
  } finally {
    await proxy.stop();
  }
}

/** `count` sessions to the origin through the proxy (CONNECT, then TLS trusting the proxy's CA), OPEN_AT_ONCE at a time. */
async function openSessions(proxy: ProxyProcess, origin: Origin, caPem: string, count: number): Promise<tls.TLSSocket[]> {
  const sessions: tls.TLSSocket[] = [];
  try {
    for (let at = 0; at < count; at += OPEN_AT_ONCE) {
      const batch = Array.from({ length: Math.min(OPEN_AT_ONCE, count - at) }, () => openSession(proxy.port, origin.nginx.port, caPem));
      sessions.push(...(await Promise.all(batch)));
    }
    return sessions;
  } catch (err) {
    for (const socket of sessions) socket.destroy();
    throw err;
  }
}

function openSession(proxyPort: number, originPort: number, caPem: string): Promise<tls.TLSSocket> {
  const target = `${ORIGIN_HOST}:${originPort}`;
  return new Promise((resolve, reject) => {
    const raw = net.connect(proxyPort, '127.0.0.1');
    const timer = setTimeout(() => raw.destroy(new Error(`CONNECT ${target}: no session within 30 s`)), 30_000);
    const fail = (err: Error) => {
      clearTimeout(timer);
      raw.destroy();
      reject(err);
    };
    raw.once('error', fail);
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      raw.off('data', onData);
      const statusLine = head.subarray(0, head.indexOf('\r\n')).toString('latin1');
      if (!/^HTTP\/1\.[01] 200/.test(statusLine)) return fail(new Error(`CONNECT ${target} answered "${statusLine}"`));
      if (end + 4 < head.length) raw.unshift(head.subarray(end + 4));
      const socket = tls.connect({ socket: raw, servername: ORIGIN_HOST, ca: caPem, ALPNProtocols: ['http/1.1'] });
      socket.once('error', fail);
      socket.once('secureConnect', () => {
        clearTimeout(timer);
        socket.off('error', fail);
        raw.off('error', fail);
        resolve(socket);
      });
    };
    raw.on('data', onData);
    raw.once('connect', () => raw.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\n`));
  });
}

interface GetResult {
  status: number;
  cache: string;
  bytes: number;
  firstByteMs: number;
  lastByteMs: number;
  error?: string;
}

/** One GET on an open session, its body counted (not kept), read as fast as this process can. */
function getOver(socket: tls.TLSSocket, path: string, origin: Origin, since: number): Promise<GetResult> {
  return new Promise((resolve) => {
    const req = http.request({ createConnection: () => socket, method: 'GET', path, headers: { host: `${ORIGIN_HOST}:${origin.nginx.port}` } });
    const failed = (err: Error) => resolve({ status: 0, cache: '', bytes: 0, firstByteMs: 0, lastByteMs: performance.now() - since, error: err.message });
    req.once('error', failed);
    req.once('response', (res) => {
      const firstByteMs = performance.now() - since;
      let bytes = 0;
      let error: string | undefined;
      res.on('data', (chunk: Buffer) => (bytes += chunk.length));
      res.once('error', (err) => (error = err.message));
      res.once('close', () =>
        resolve({
          status: res.statusCode ?? 0,
          cache: String(res.headers['x-cache'] ?? ''),
          bytes: res.complete ? bytes : -bytes,
          firstByteMs,
          lastByteMs: performance.now() - since,
          ...(error ? { error } : {}),
        }),
      );
    });
    req.end();
  });
}

function printManyReport(options: Options, measurements: readonly ManyMeasurement[], environment: Record<string, string | number>): void {
  const out = [
    '',
    `${NAME} --mode many: ${options.clients} clients at once, each reading one of ${options.blobs} cached blobs of ${options.sizes.map((n) => formatSize(n)).join(', ')} (X-Cache HIT), ` +
      `sessions opened before the GETs; the proxy restarted on the filled cache for the run`,
    environmentLine(environment),
    '',
    formatTable(
      ['variant', 'idle RSS MiB', 'sessions open MiB', 'peak RSS MiB (sampled)', 'VmHWM MiB', 'anon at peak', 'file at peak', 'RSS after MiB', 'MiB/s', 'proxy CPU-s/GiB', 'first byte ms p50/max', 'last byte ms p50/max', `≤ ${GOAL_MANY_PEAK_MIB} MiB`],
      measurements.map((m) => [
        m.variant,
        fixed(mib(m.idle.VmRSS), 0),
        fixed(mib(m.connected.VmRSS), 0),
        fixed(mib(m.peak.VmRSS), 0),
        fixed(m.hwmMiB, 0),
        fixed(mib(m.peak.RssAnon), 0),
        fixed(mib(m.peak.RssFile), 0),
        fixed(mib(m.after.VmRSS), 0),
        fixed(m.mibPerSecond, 0),
        fixed(m.proxy.cpuSecondsPerGiB, 2),
        `${fixed(m.firstByteMs.median, 0)}/${fixed(m.firstByteMs.max, 0)}`,
        `${fixed(m.lastByteMs.median, 0)}/${fixed(m.lastByteMs.max, 0)}`,
        m.hwmMiB <= GOAL_MANY_PEAK_MIB ? 'met' : 'MISSED',
      ]),
    ),
    'sessions open: VmRSS once every client had its CONNECT + TLS session, before any GET; the goal is on VmHWM (the proxy process was started for the run)',
    '',
    'where the memory is (MiB, from /proc/<pid>/smaps; at idle, and the largest sample of the run, taken every 500 ms):',
    formatTable(
      ['variant', 'when', 'total', 'V8 heap pages', 'malloc main arena', 'malloc thread arenas', 'other anon', 'node binary', 'other files'],
      measurements.flatMap((m) =>
        (['idle', 'peak'] as const).map((when) => {
          const k = when === 'idle' ? m.idleKinds : m.peakKinds;
          return [m.variant, when, ...[k.totalKiB, k.v8Pages, k.mallocMain, k.mallocThreads, k.anonOther, k.nodeBinary, k.otherFiles].map((v) => fixed(mib(v), 0))];
        }),
      ),
    ),
    '',
    'RSS by second of the run (MiB, highest sample in each second):',
    ...measurements.map((m) => `  ${m.variant}: ${thin(m.proxy.rssBySecondKiB.map(mib)).map((v) => (v > 0 ? v.toFixed(0) : '·')).join(' ')}`),
    '  (· a second without a sample: the sampler shares this process with the clients)',
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

await runBenchmark(main, progress);
