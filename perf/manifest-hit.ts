// A cached tag under load: GET /v2/<name>/manifests/<tag> through the proxy (an intercepted TLS session
// over CONNECT, kept alive) at a fixed request rate, side by side with nginx serving the same manifest
// bytes, with the same Content-Type, over TLS with keep-alive at the same rates.
//
//   node perf/manifest-hit.ts [--rates 500,2000] [--duration 10s] [--warm-up 2s] [--repeat 3] [--connections 8] [--commit REV | --cli PATH] [--profile DIR]
//
// The upstream is a real registry (docker-registry 2.8, test/helpers/registry.ts) holding a small OCI
// image whose manifest has 8 layers (~1.3 KB). The tag is fetched through the proxy once (X-Cache: MISS)
// before anything is measured; then every measured answer must be a 200 with the exact bytes (and, through
// the proxy, X-Cache: HIT), and the registry's access log counts the manifest requests that reached it
// during each measured window (0 while the tag's TTL, 1 h here, holds).
//
// Load: an open loop (perf/lib/open-loop.ts) in this process — requests scheduled on a clock, latency
// from the scheduled time, so a stall shows on every request it delays — over an undici Pool of up to
// --connections keep-alive connections. Each run gets a new pool, --warm-up at its rate (not measured,
// opens the connections), then --duration measured. Runs are interleaved (nginx, proxy at each rate,
// --repeat times) and reported as medians. `--size` and `--clients` (which perf/run.ts may pass to every
// benchmark) are accepted and ignored. `--commit REV` measures the proxy of that commit (built into the
// temp dir) instead of the working tree's.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { Pool } from 'undici';
import { parseDuration } from '../config/units.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { directTls, openPool, throughProxy, type Route } from './lib/https-clients.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { startTlsNginx, type NginxOrigin } from './lib/nginx.ts';
import { runOpenLoop, type OpenLoopResult } from './lib/open-loop.ts';
import { PeakRssSampler, readCounters, readCountersOf, readMachineBusySeconds, readMainThreadCpu, readStatusKiB, subtractCounters, type Counters } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { CONTAINERD_ACCEPT, countUpstream, pushSmallImage, REGISTRY_HOST, startUpstreamRegistry, upstreamPolicy, type Upstream, type UpstreamCounts } from './lib/registry.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { buildCommit, describeCli, describeSource, sourceLine } from './lib/source.ts';

const NAME = 'manifest-hit';
const REPOSITORY = 'bench/manifest-hit';
/** No TTL tier matches "v1" (perf/README.md): it is fresh for the policy's defaultTtl. */
const TAG = 'v1';
const TTL = '1h';
/** 8 small layers: a manifest of ~1.3 KB, as a typical application image's. */
const LAYERS = Array.from({ length: 8 }, (_, i) => ({ files: { [`layer-${i}/file.txt`]: `manifest-hit layer ${i}\n` } }));
const USER_AGENT = 'pullthrough-perf/manifest-hit';
const DRAIN_MS = 5_000;
const REQUEST_TIMEOUT_MS = 5_000;
const progress = progressTo(NAME);

type Via = 'nginx' | 'proxy';

interface Options {
  rates: number[];
  durationMs: number;
  warmUpMs: number;
  repeat: number;
  connections: number;
  /** Build the proxy from this commit instead of the working tree. */
  commit?: string;
  /** Run this build's cli.js instead (e.g. one made apart from the working tree). */
  cli?: string;
  /** Write a V8 CPU profile of the proxy here (it slows the proxy: figures are then not comparable). */
  profile?: string;
}

interface ServerFigures {
  cpuSeconds: number;
  /** CPU microseconds per request answered right. */
  cpuMicrosPerRequest: number;
  cores: number;
  systemShare: number;
  /** The proxy's main thread alone (undefined for nginx). */
  mainThreadCpuSeconds?: number;
  /** Highest VmRSS sampled every 50 ms during the measured window (nginx: master + worker). */
  peakRssMiB: number;
}

interface Run {
  scenario: string;
  via: Via;
  rate: number;
  repetition: number;
  load: OpenLoopResult;
  warmUp: { ok: number; errors: Record<string, number>; unfinished: number };
  server: ServerFigures;
  /** This process (the load generator): CPU seconds during the measured window. */
  generatorCpuSeconds: number;
  machineCores: number;
  /** What reached the registry during the measured window. */
  upstream: UpstreamCounts;
}

interface Summary {
  scenario: string;
  via: Via;
  rate: number;
  runs: number;
  achievedRate: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  /** The largest over the repetitions. */
  maxMs: number;
  /** From the send time rather than the scheduled one (OpenLoopResult.service). */
  serviceP50Ms: number;
  serviceP99Ms: number;
  errors: number;
  unfinished: number;
  upstreamManifestRequests: number;
  serverCpuSeconds: number;
  serverCpuMicrosPerRequest: number;
  serverCores: number;
  serverPeakRssMiB: number;
  generatorCpuSeconds: number;
  lagP50Ms: number;
  lagP99Ms: number;
  maxOutstanding: number;
  machineCores: number;
}

function parseOptions(argv: string[]): Options {
  const usage = `usage: node perf/${NAME}.ts [--rates 500,2000] [--duration 10s] [--warm-up 2s] [--repeat 3] [--connections 8] [--commit REV | --cli PATH] [--profile DIR]\n`;
  const { values } = parseArgs({
    args: argv,
    options: {
      rates: { type: 'string', default: '500,2000' },
      duration: { type: 'string', default: '10s' },
      'warm-up': { type: 'string', default: '2s' },
      repeat: { type: 'string', default: '3' },
      connections: { type: 'string', default: '8' },
      commit: { type: 'string' },
      cli: { type: 'string' },
      profile: { type: 'string' },
      // Passed by `npm run perf -- --size … --clients …` to every benchmark; meaningless here.
      size: { type: 'string' },
      clients: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const rates = values.rates.split(',').map(Number);
  const durationMs = parseDuration(values.duration);
  const warmUpMs = parseDuration(values['warm-up']);
  const repeat = Number(values.repeat);
  const connections = Number(values.connections);
  if (rates.some((r) => !Number.isFinite(r) || r <= 0 || r > 20_000)) throw new Error(`--rates ${values.rates}: requests per second, 1–20000 each`);
  if (durationMs < 100 || durationMs > 300_000) throw new Error(`--duration ${values.duration}: 100ms–300s`);
  if (warmUpMs > 60_000) throw new Error(`--warm-up ${values['warm-up']}: at most 60s`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (!Number.isInteger(connections) || connections < 1 || connections > 256) throw new Error(`--connections ${values.connections}: 1–256`);
  if (values.commit && values.cli) throw new Error('--commit and --cli: one or the other');
  return { rates, durationMs, warmUpMs, repeat, connections, ...(values.commit ? { commit: values.commit } : {}), ...(values.cli ? { cli: values.cli } : {}), ...(values.profile ? { profile: values.profile } : {}) };
}

interface Bench {
  options: Options;
  upstream: Upstream;
  nginx: NginxOrigin;
  proxy: ProxyProcess;
  proxyCaPem: string;
  manifest: { body: Buffer; mediaType: string; digest: string; path: string };
  routes: Record<Via, Route>;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const dir = makeTempDir(NAME);
  const built = options.commit ? buildCommit(options.commit, join(dir, 'build')) : undefined;
  const source = built?.source ?? (options.cli ? describeCli(options.cli) : describeSource());
  const upstream = await startUpstreamRegistry(dir);
  let nginx: NginxOrigin | undefined;
  let proxy: ProxyProcess | undefined;
  try {
    progress(`registry on ${upstream.registry.address}; building and pushing ${REPOSITORY}:${TAG}`);
    const image = await pushSmallImage(upstream, dir, { repository: REPOSITORY, tag: TAG, layers: LAYERS });
    const path = `/v2/${REPOSITORY}/manifests/${TAG}`;
    // The bytes and media type the registry serves: nginx serves exactly these.
    const fromRegistry = await upstream.registry.fetch(path, { headers: { accept: CONTAINERD_ACCEPT } });
    const mediaType = String(fromRegistry.headers['content-type']);
    if (fromRegistry.status !== 200 || fromRegistry.headers['docker-content-digest'] !== image.manifestDigest) {
      throw new Error(`the registry answered ${fromRegistry.status} (${String(fromRegistry.headers['docker-content-digest'])}) for ${path}`);
    }
    const manifest = { body: fromRegistry.body, mediaType, digest: image.manifestDigest, path };

    const www = join(dir, 'www');
    mkdirSync(join(www, 'v2', REPOSITORY, 'manifests'), { recursive: true });
    writeFileSync(join(www, path), manifest.body);
    nginx = await startTlsNginx({
      dir: join(dir, 'nginx'),
      root: www,
      ...upstream.ca.issue([REGISTRY_HOST, '127.0.0.1']),
      serverConfig: nginxManifestConfig(manifest.mediaType, manifest.digest),
    });
    mkdirSync(join(dir, 'proxy'));
    proxy = await startProxyProcess({
      dir: join(dir, 'proxy'),
      policy: upstreamPolicy(upstream, ['manifests:', `  defaultTtl: ${TTL}`]),
      ...(built ? { cli: built.cli } : options.cli ? { cli: options.cli } : {}),
      // Absolute: the proxy runs in its own (temporary) working directory.
      ...(options.profile ? { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${resolve(options.profile)}`] } : {}),
    });
    const proxyCaPem = readFileSync(proxy.caFile, 'utf8');
    const proxyIdleRssMiB = readStatusKiB(proxy.pid, 'VmRSS') / 1024;
    progress(`nginx on 127.0.0.1:${nginx.port}, proxy on ${proxy.url} (pid ${proxy.pid}, RSS ${fixed(proxyIdleRssMiB, 0)} MiB); manifest ${manifest.body.length} bytes, ${manifest.mediaType}`);
    const bench: Bench = {
      options,
      upstream,
      nginx,
      proxy,
      proxyCaPem,
      manifest,
      routes: {
        nginx: directTls({ host: REGISTRY_HOST, port: nginx.port, caPem: upstream.ca.certPem }),
        proxy: throughProxy({ host: REGISTRY_HOST, port: upstream.registry.port }, { port: proxy.port, caPem: proxyCaPem }),
      },
    };

    const warmed = await warmTag(bench);
    const runs: Run[] = [];
    for (let repetition = 1; repetition <= options.repeat; repetition++) {
      for (const rate of options.rates) {
        for (const via of ['nginx', 'proxy'] as const) {
          const run = await measure(bench, via, rate, repetition);
          runs.push(run);
          progress(
            `${run.scenario} #${repetition}: ${fixed(run.load.achievedRate, 0)}/s, p50 ${fixed(run.load.latency.p50, 2)} p99 ${fixed(run.load.latency.p99, 2)} ` +
              `max ${fixed(run.load.latency.max, 1)} ms, ${errorCount(run.load)} errors, ${fixed(run.server.cpuMicrosPerRequest, 0)} CPU-µs/request` +
              (via === 'proxy' ? `, ${manifestRequests(run.upstream)} manifest requests upstream` : ''),
          );
        }
      }
    }
    const lifetimePeakRssMiB = readStatusKiB(proxy.pid, 'VmHWM') / 1024;
    const summaries = summarise(runs);
    const environment = { ...describeEnvironment(nginx.version), registry: upstream.version };
    printReport(bench, summaries, environment, source, warmed, proxyIdleRssMiB, lifetimePeakRssMiB);
    const result = {
      benchmark: NAME,
      date: new Date().toISOString(),
      environment,
      source,
      options,
      manifest: { bytes: manifest.body.length, mediaType: manifest.mediaType, digest: manifest.digest },
      warmUp: warmed,
      summaries,
      ratios: ratios(summaries, options.rates),
      proxyIdleRssMiB,
      proxyLifetimePeakRssMiB: lifetimePeakRssMiB,
      totalSeconds: (performance.now() - started) / 1000,
      runs,
    };
    process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
  } finally {
    await proxy?.stop();
    await nginx?.stop();
    await upstream.registry.stop();
  }
}

/** Serve the manifest file with the registry's media type and headers; keep connections for the whole run. */
function nginxManifestConfig(mediaType: string, digest: string): string {
  return [
    // nginx closes a keep-alive connection after 1000 requests by default; the proxy (Node) never does.
    'keepalive_requests 1000000;',
    'location ~ ^/v2/.+/manifests/ {',
    '  types { }',
    `  default_type ${JSON.stringify(mediaType)};`,
    `  add_header Docker-Content-Digest ${JSON.stringify(digest)} always;`,
    '  add_header Docker-Distribution-API-Version "registry/2.0" always;',
    '}',
  ].join('\n');
}

/** The tag fetched through the proxy once (MISS), then a HIT; what that cost upstream. */
async function warmTag(bench: Bench): Promise<{ first: string; second: string; upstream: UpstreamCounts }> {
  await bench.upstream.registry.settle();
  bench.upstream.registry.resetCounts();
  const pool = openPool(bench.routes.proxy, { connections: 1 });
  try {
    const first = await getManifest(bench, pool);
    const second = await getManifest(bench, pool);
    await bench.upstream.registry.settle();
    const upstream = countUpstream(bench.upstream.registry.requests());
    if (first.status !== 200 || second.status !== 200 || second.cache !== 'HIT') {
      throw new Error(`warming the tag through the proxy: ${first.status} ${first.cache}, then ${second.status} ${second.cache} (expected 200 MISS, 200 HIT)`);
    }
    progress(`tag warmed: X-Cache ${first.cache}, then ${second.cache}; upstream saw ${upstream.manifestGetsByTag} manifest GET by tag, ${upstream.total} requests in all`);
    return { first: first.cache, second: second.cache, upstream };
  } finally {
    await pool.destroy();
  }
}

async function getManifest(bench: Bench, pool: Pool): Promise<{ status: number; cache: string; body: Buffer; contentType: string }> {
  const response = await pool.request({ path: bench.manifest.path, method: 'GET', headers: { accept: CONTAINERD_ACCEPT, 'user-agent': USER_AGENT } });
  const body = Buffer.from(await response.body.arrayBuffer());
  return { status: response.statusCode, cache: String(response.headers['x-cache'] ?? ''), body, contentType: String(response.headers['content-type'] ?? '') };
}

/** One request of the load: right when 200, the exact bytes and media type, and (through the proxy) a HIT. */
function sender(bench: Bench, pool: Pool, via: Via): () => Promise<string | undefined> {
  const { manifest } = bench;
  const headers = { accept: CONTAINERD_ACCEPT, 'user-agent': USER_AGENT };
  return async () => {
    const response = await pool.request({ path: manifest.path, method: 'GET', headers });
    const body = Buffer.from(await response.body.arrayBuffer());
    if (response.statusCode !== 200) return `HTTP ${response.statusCode}`;
    if (!body.equals(manifest.body)) return 'wrong body';
    if (response.headers['content-type'] !== manifest.mediaType) return `Content-Type ${String(response.headers['content-type'])}`;
    if (via === 'proxy' && response.headers['x-cache'] !== 'HIT') return `X-Cache ${String(response.headers['x-cache'])}`;
    return undefined;
  };
}

async function measure(bench: Bench, via: Via, rate: number, repetition: number): Promise<Run> {
  const { options } = bench;
  const pool = openPool(bench.routes[via], { connections: options.connections, timeoutMs: REQUEST_TIMEOUT_MS });
  try {
    const send = sender(bench, pool, via);
    // Not measured: opens the pool's connections (CONNECT, TLS) and lets both sides settle into the rate.
    const warm = options.warmUpMs > 0 ? await runOpenLoop({ rate, durationMs: options.warmUpMs, drainMs: DRAIN_MS, send }) : undefined;
    await bench.upstream.registry.settle();
    bench.upstream.registry.resetCounts();

    const pids = via === 'proxy' ? [bench.proxy.pid] : bench.nginx.pids();
    const samplers = pids.map((pid) => new PeakRssSampler(pid));
    const serverBefore = readCountersOf(pids);
    const mainBefore = via === 'proxy' ? readMainThreadCpu(bench.proxy.pid) : 0;
    const machineBefore = readMachineBusySeconds();
    const generatorBefore = process.cpuUsage();
    const wallStart = performance.now();

    const load = await runOpenLoop({ rate, durationMs: options.durationMs, drainMs: DRAIN_MS, send });

    const wall = (performance.now() - wallStart) / 1000;
    const generator = process.cpuUsage(generatorBefore);
    const machineSeconds = readMachineBusySeconds() - machineBefore;
    const spent: Counters = subtractCounters(via === 'proxy' ? readCounters(bench.proxy.pid) : readCountersOf(pids), serverBefore);
    const peakRssKiB = samplers.map((s) => s.stop()).reduce((a, b) => a + b, 0);
    await bench.upstream.registry.settle();
    const upstream = countUpstream(bench.upstream.registry.requests());
    return {
      scenario: `${via}-${rate}`,
      via,
      rate,
      repetition,
      load,
      warmUp: warm ? { ok: warm.ok, errors: warm.errors, unfinished: warm.unfinished } : { ok: 0, errors: {}, unfinished: 0 },
      server: {
        cpuSeconds: spent.cpuSeconds,
        cpuMicrosPerRequest: (spent.cpuSeconds * 1e6) / Math.max(1, load.ok),
        cores: spent.cpuSeconds / wall,
        systemShare: spent.systemSeconds / Math.max(spent.cpuSeconds, Number.EPSILON),
        ...(via === 'proxy' ? { mainThreadCpuSeconds: readMainThreadCpu(bench.proxy.pid) - mainBefore } : {}),
        peakRssMiB: peakRssKiB / 1024,
      },
      generatorCpuSeconds: (generator.user + generator.system) / 1e6,
      machineCores: machineSeconds / wall,
      upstream,
    };
  } finally {
    // Also aborts whatever the drain left unanswered.
    await pool.destroy();
  }
}

function errorCount(load: OpenLoopResult): number {
  return Object.values(load.errors).reduce((a, b) => a + b, 0) + load.unfinished;
}

function manifestRequests(counts: UpstreamCounts): number {
  return counts.manifestGetsByTag + counts.manifestHeadsByTag + counts.manifestGetsByDigest + counts.manifestHeadsByDigest;
}

function summarise(runs: readonly Run[]): Summary[] {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const m = (pick: (r: Run) => number) => median(of.map(pick));
    const first = of[0]!;
    return {
      scenario,
      via: first.via,
      rate: first.rate,
      runs: of.length,
      achievedRate: m((r) => r.load.achievedRate),
      p50Ms: m((r) => r.load.latency.p50),
      p90Ms: m((r) => r.load.latency.p90),
      p99Ms: m((r) => r.load.latency.p99),
      maxMs: Math.max(...of.map((r) => r.load.latency.max)),
      serviceP50Ms: m((r) => r.load.service.p50),
      serviceP99Ms: m((r) => r.load.service.p99),
      errors: of.reduce((sum, r) => sum + errorCount(r.load), 0),
      unfinished: of.reduce((sum, r) => sum + r.load.unfinished, 0),
      upstreamManifestRequests: of.reduce((sum, r) => sum + manifestRequests(r.upstream), 0),
      serverCpuSeconds: m((r) => r.server.cpuSeconds),
      serverCpuMicrosPerRequest: m((r) => r.server.cpuMicrosPerRequest),
      serverCores: m((r) => r.server.cores),
      serverPeakRssMiB: m((r) => r.server.peakRssMiB),
      generatorCpuSeconds: m((r) => r.generatorCpuSeconds),
      lagP50Ms: m((r) => r.load.lag.p50),
      lagP99Ms: m((r) => r.load.lag.p99),
      maxOutstanding: Math.max(...of.map((r) => r.load.maxOutstanding)),
      machineCores: m((r) => r.machineCores),
    };
  });
}

interface Ratios {
  rate: number;
  p50: number;
  p99: number;
  cpuPerRequest: number;
}

function ratios(summaries: readonly Summary[], rates: readonly number[]): Ratios[] {
  return rates.map((rate) => {
    const nginx = summaries.find((s) => s.scenario === `nginx-${rate}`)!;
    const proxy = summaries.find((s) => s.scenario === `proxy-${rate}`)!;
    return {
      rate,
      p50: proxy.p50Ms / nginx.p50Ms,
      p99: proxy.p99Ms / nginx.p99Ms,
      cpuPerRequest: proxy.serverCpuMicrosPerRequest / nginx.serverCpuMicrosPerRequest,
    };
  });
}

function printReport(
  bench: Bench,
  summaries: readonly Summary[],
  environment: Record<string, string | number>,
  source: ReturnType<typeof describeSource>,
  warmed: { first: string; second: string; upstream: UpstreamCounts },
  proxyIdleRssMiB: number,
  lifetimePeakRssMiB: number,
): void {
  const { options, manifest } = bench;
  const rateRows = ratios(summaries, options.rates);
  const out = [
    '',
    `${NAME}: GET of a cached tag (${manifest.body.length}-byte ${manifest.mediaType}), open loop at fixed rates, ` +
      `${options.durationMs / 1000} s measured per run after ${options.warmUpMs / 1000} s of warm-up, up to ${options.connections} keep-alive connections; ` +
      `medians of ${options.repeat} interleaved runs`,
    `${environmentLine(environment)}, ${environment.registry}`,
    sourceLine(source),
    `the tag was warmed through the proxy once: X-Cache ${warmed.first} then ${warmed.second}, ${warmed.upstream.manifestGetsByTag} manifest GET upstream; TTL ${TTL}`,
    '',
    'latency from the scheduled time to the last byte (ms); errors = wrong answers + failures + unanswered, summed over the runs',
    formatTable(
      ['scenario', 'target/s', 'achieved/s', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'errors', 'upstream manifest requests', 'from send: p50 ms', 'p99 ms'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.rate, 0),
        fixed(s.achievedRate, 0),
        fixed(s.p50Ms, 2),
        fixed(s.p90Ms, 2),
        fixed(s.p99Ms, 2),
        fixed(s.maxMs, 1),
        fixed(s.errors, 0),
        s.via === 'proxy' ? fixed(s.upstreamManifestRequests, 0) : '-',
        fixed(s.serviceP50Ms, 2),
        fixed(s.serviceP99Ms, 2),
      ]),
    ),
    'max ms: the largest over the runs; upstream manifest requests: what reached the registry during the measured windows, all runs together;',
    '"from send": the same requests timed from when the generator sent them, i.e. without its send lag (cost table)',
    '',
    'cost (server = the proxy process, or nginx master + worker; generator = this process, the load generator, on the same 2 cores)',
    formatTable(
      ['scenario', 'server CPU-s', 'CPU-µs/request', 'server cores', 'server peak RSS MiB', 'generator CPU-s', 'send lag p50 ms', 'send lag p99 ms', 'max outstanding', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.serverCpuSeconds, 2),
        fixed(s.serverCpuMicrosPerRequest, 0),
        fixed(s.serverCores, 2),
        fixed(s.serverPeakRssMiB, 0),
        fixed(s.generatorCpuSeconds, 2),
        fixed(s.lagP50Ms, 2),
        fixed(s.lagP99Ms, 2),
        fixed(s.maxOutstanding, 0),
        fixed(s.machineCores, 2),
      ]),
    ),
    `proxy RSS: ${fixed(proxyIdleRssMiB, 0)} MiB after start, ${fixed(lifetimePeakRssMiB, 0)} MiB at its peak (VmHWM, over its whole life)`,
    '',
    formatTable(
      ['ratio proxy / nginx', ...rateRows.map((r) => `${r.rate}/s`)],
      [
        ['p50 latency', ...rateRows.map((r) => fixed(r.p50, 2))],
        ['p99 latency', ...rateRows.map((r) => fixed(r.p99, 2))],
        ['CPU per request', ...rateRows.map((r) => fixed(r.cpuPerRequest, 2))],
      ],
    ),
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

await runBenchmark(main, progress);
