// The registry-mirror front (src/mirror.ts) beside the intercepting one, on the same cached blob and
// the same cached tag: what a cache hit costs when a node asks the mirror directly (plain HTTP, or
// HTTPS with a leaf from the proxy's CA) instead of going through CONNECT and an intercepted TLS
// session. The issue's question: the mirror over plain HTTP saves the TLS the other front pays — by
// how much?
//
//   node perf/mirror.ts [--size 512MiB] [--clients 1,4] [--rates 500,2000] [--duration 10s] [--warm-up 2s]
//                       [--repeat 3] [--connections 8] [--fronts intercept,mirror-http,mirror-https]
//                       [--parts blob,manifest] [--form ns|path] [--commit REV]
//
// Fronts (scenario prefixes):
//   intercept     CONNECT origin.test:<port> (or registry.test:<port>) to the proxy, TLS inside with a
//                 leaf from the proxy's CA: what HTTPS_PROXY clients do (blob-hit, manifest-hit);
//   mirror-http   the mirror of the same proxy process, plain HTTP on 127.0.0.1, the registry named by
//                 ?ns=<host:port> (containerd's hosts.toml form; --form path: /v2/<host>_<port>/…);
//   mirror-https  the mirror of a second proxy process whose mirror has tls: { names: [mirror.test] }
//                 (one mirror per process), with a cache of its own, filled before the runs.
// Blobs: curl clients (1 and 4 at once, each a whole download) as in blob-hit, the proxy's CPU per GiB
// from /proc. Manifests: the open loop of manifest-hit (perf/lib/open-loop.ts) over an undici pool of
// keep-alive connections, p50/p99 from the scheduled time. Runs interleaved, medians, ratios to intercept.
//
// Asserted, or the benchmark fails: every measured download and every manifest answer is a 200 (206 in
// warm-ups) with X-Cache: HIT and the right bytes; the proxy's own access log has exactly one HIT line
// per measured request; and neither origin (nginx for the blob, the registry for the tag) saw any
// request during any measured run. `--size` and `--clients` do not apply to manifests, `--rates` etc.
// not to blobs. See perf/README.md.
import { mkdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { Pool } from 'undici';
import { formatSize, parseDuration, parseSize } from '../config/units.ts';
import type { Blob } from './lib/blob.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { runClients, waitForCacheHit, type CurlRoute } from './lib/curl.ts';
import { openPool, throughProxy, type Route } from './lib/https-clients.ts';
import { describeEnvironment, environmentLine, GIB, MIB, percent, progressTo, type ProxyFigures } from './lib/measure.ts';
import {
  describeEntries,
  mirrorCurlRoute,
  mirrorPath,
  mirrorPolicyLines,
  mirrorPoolRoute,
  ProxyAccessLog,
  readReapedChildrenCpuSeconds,
  waitForMirrorPort,
  type MirrorEndpoint,
  type MirrorForm,
  type ProxyAccessEntry,
} from './lib/mirror-front.ts';
import { runOpenLoop, type OpenLoopResult } from './lib/open-loop.ts';
import { ORIGIN_HOST, originRequestsSince, proxiedBlobRoute, startOrigin, type Origin } from './lib/origin.ts';
import { PeakRssSampler, readCounters, readMachineBusySeconds, readMainThreadCpu, readStatusKiB, subtractCounters } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { CONTAINERD_ACCEPT, pushSmallImage, REGISTRY_HOST, startUpstreamRegistry, type Upstream } from './lib/registry.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { measureClients, type ClientsRun } from './lib/run-clients.ts';
import { buildCommit, describeSource, sourceLine, type SourceState } from './lib/source.ts';

const NAME = 'mirror';
const BLOB_REPOSITORY = 'bench/mirror';
const MANIFEST_REPOSITORY = 'bench/mirror-manifest';
/** No TTL tier matches "v1": fresh for the policy's defaultTtl. */
const TAG = 'v1';
const TTL = '1h';
/** 8 small layers: a manifest of ~1.3 KB, as manifest-hit's. */
const LAYERS = Array.from({ length: 8 }, (_, i) => ({ files: { [`layer-${i}/file.txt`]: `mirror layer ${i}\n` } }));
const USER_AGENT = 'pullthrough-perf/mirror';
/** Each front gets this much (a range) before the blob runs: leaf minted, hot paths compiled. */
const WARM_UP_BYTES = 64 * MIB;
const DRAIN_MS = 5_000;
const REQUEST_TIMEOUT_MS = 5_000;
const progress = progressTo(NAME);

const FRONTS = ['intercept', 'mirror-http', 'mirror-https'] as const;
type Front = (typeof FRONTS)[number];
const PARTS = ['blob', 'manifest'] as const;
type Part = (typeof PARTS)[number];

interface Options {
  size: number;
  clients: number[];
  repeat: number;
  rates: number[];
  durationMs: number;
  warmUpMs: number;
  connections: number;
  fronts: Front[];
  parts: Part[];
  form: MirrorForm;
  commit?: string;
}

function parseOptions(argv: string[]): Options {
  const usage =
    `usage: node perf/${NAME}.ts [--size 512MiB] [--clients 1,4] [--rates 500,2000] [--duration 10s] [--warm-up 2s] [--repeat 3] [--connections 8]\n` +
    `                        [--fronts ${FRONTS.join(',')}] [--parts ${PARTS.join(',')}] [--form ns|path] [--commit REV]\n`;
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '512MiB' },
      clients: { type: 'string', default: '1,4' },
      repeat: { type: 'string', default: '3' },
      rates: { type: 'string', default: '500,2000' },
      duration: { type: 'string', default: '10s' },
      'warm-up': { type: 'string', default: '2s' },
      connections: { type: 'string', default: '8' },
      fronts: { type: 'string', default: FRONTS.join(',') },
      parts: { type: 'string', default: PARTS.join(',') },
      form: { type: 'string', default: 'ns' },
      commit: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const size = parseSize(values.size);
  const clients = values.clients.split(',').map(Number);
  const repeat = Number(values.repeat);
  const rates = values.rates.split(',').map(Number);
  const durationMs = parseDuration(values.duration);
  const warmUpMs = parseDuration(values['warm-up']);
  const connections = Number(values.connections);
  const fronts = values.fronts.split(',') as Front[];
  const parts = values.parts.split(',') as Part[];
  if (size < 1) throw new Error(`--size ${values.size}: must be at least 1 byte`);
  if (clients.some((n) => !Number.isInteger(n) || n < 1 || n > 64)) throw new Error(`--clients ${values.clients}: counts of 1–64, e.g. 1,4`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (rates.some((r) => !Number.isFinite(r) || r <= 0 || r > 20_000)) throw new Error(`--rates ${values.rates}: requests per second, 1–20000 each`);
  if (durationMs < 100 || durationMs > 300_000) throw new Error(`--duration ${values.duration}: 100ms–300s`);
  if (warmUpMs > 60_000) throw new Error(`--warm-up ${values['warm-up']}: at most 60s`);
  if (!Number.isInteger(connections) || connections < 1 || connections > 256) throw new Error(`--connections ${values.connections}: 1–256`);
  if (fronts.length === 0 || fronts.some((f) => !FRONTS.includes(f))) throw new Error(`--fronts ${values.fronts}: some of ${FRONTS.join(', ')}`);
  if (parts.length === 0 || parts.some((p) => !PARTS.includes(p))) throw new Error(`--parts ${values.parts}: some of ${PARTS.join(', ')}`);
  if (values.form !== 'ns' && values.form !== 'path') throw new Error(`--form ${values.form}: ns or path`);
  // The order of the scenarios is always intercept, mirror-http, mirror-https.
  return {
    size,
    clients,
    repeat,
    rates,
    durationMs,
    warmUpMs,
    connections,
    fronts: FRONTS.filter((f) => fronts.includes(f)),
    parts: PARTS.filter((p) => parts.includes(p)),
    form: values.form,
    ...(values.commit ? { commit: values.commit } : {}),
  };
}

/** One proxy process and the fronts measured on it. */
interface ProxyUnderTest {
  /** "A" (intercepting front + plain-HTTP mirror) or "B" (HTTPS mirror). */
  label: string;
  proxy: ProxyProcess;
  mirror: MirrorEndpoint;
  access: ProxyAccessLog;
  idleRssMiB: number;
  fronts: Front[];
}

interface Manifest {
  body: Buffer;
  mediaType: string;
  digest: string;
  /** /v2/<repository>/manifests/<tag>, as the registry names it. */
  path: string;
}

interface Bench {
  options: Options;
  dir: string;
  origin?: Origin;
  blob?: Blob;
  upstream?: Upstream;
  manifest?: Manifest;
  proxies: ProxyUnderTest[];
  proxyOf: (front: Front) => ProxyUnderTest;
}

async function main(): Promise<void> {
  const started = performance.now();
  // describeEnvironment() runs after the runs; the machine's load when this benchmark started is what tells whether something else ran.
  const [load1AtStart, load5AtStart] = os.loadavg();
  const options = parseOptions(process.argv.slice(2));
  const dir = makeTempDir(NAME);
  const wantBlob = options.parts.includes('blob');
  const wantManifest = options.parts.includes('manifest');
  const built = options.commit ? buildCommit(options.commit, join(dir, 'build')) : undefined;
  const source: SourceState = built?.source ?? describeSource();
  if (built) progress(`built commit ${source.commit.slice(0, 12)} into ${join(dir, 'build')}`);

  const bench: Bench = { options, dir, proxies: [], proxyOf: () => { throw new Error('no proxy yet'); } };
  try {
    if (wantBlob) {
      bench.origin = await startOrigin({ dir, blobs: [{ repository: BLOB_REPOSITORY, size: options.size }], accessLog: true, progress });
      bench.blob = bench.origin.blobs[0]!;
    }
    if (wantManifest) {
      bench.upstream = await startUpstreamRegistry(dir);
      bench.manifest = await pushManifest(bench.upstream, dir);
    }
    await startProxies(bench, built?.cli);

    const blob = wantBlob ? await blobPart(bench) : undefined;
    const manifest = wantManifest ? await manifestPart(bench) : undefined;

    const lifetimePeakRssMiB = Object.fromEntries(bench.proxies.map((p) => [p.label, readStatusKiB(p.proxy.pid, 'VmHWM') / 1024]));
    const environment = {
      ...describeEnvironment(bench.origin?.nginx.version ?? 'nginx not started'),
      loadAverage1m: Math.round(load1AtStart! * 100) / 100,
      loadAverage5m: Math.round(load5AtStart! * 100) / 100,
      loadAverage1mAtEnd: Math.round(os.loadavg()[0]! * 100) / 100,
      ...(bench.upstream ? { registry: bench.upstream.version } : {}),
    };
    printReport(bench, environment, source, blob, manifest, lifetimePeakRssMiB);
    const result = {
      benchmark: NAME,
      date: new Date().toISOString(),
      environment,
      source,
      options,
      proxies: bench.proxies.map((p) => ({ label: p.label, fronts: p.fronts, mirrorTls: p.mirror.tls, idleRssMiB: p.idleRssMiB, lifetimePeakRssMiB: lifetimePeakRssMiB[p.label] })),
      ...(blob ? { blob: { bytes: bench.blob!.size, prepared: blob.prepared, summaries: blob.summaries, ratios: blob.ratios, runs: blob.runs } } : {}),
      ...(manifest
        ? {
            manifest: {
              bytes: bench.manifest!.body.length,
              mediaType: bench.manifest!.mediaType,
              prepared: manifest.prepared,
              summaries: manifest.summaries,
              ratios: manifest.ratios,
              runs: manifest.runs,
            },
          }
        : {}),
      totalSeconds: (performance.now() - started) / 1000,
    };
    process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
  } finally {
    for (const p of bench.proxies) await p.proxy.stop();
    await bench.origin?.nginx.stop();
    await bench.upstream?.registry.stop();
  }
}

// ---------------------------------------------------------------------------------------------------
// Setup

async function pushManifest(upstream: Upstream, dir: string): Promise<Manifest> {
  const image = await pushSmallImage(upstream, dir, { repository: MANIFEST_REPOSITORY, tag: TAG, layers: LAYERS });
  const path = `/v2/${MANIFEST_REPOSITORY}/manifests/${TAG}`;
  const fromRegistry = await upstream.registry.fetch(path, { headers: { accept: CONTAINERD_ACCEPT } });
  if (fromRegistry.status !== 200 || fromRegistry.headers['docker-content-digest'] !== image.manifestDigest) {
    throw new Error(`the registry answered ${fromRegistry.status} (${String(fromRegistry.headers['docker-content-digest'])}) for ${path}`);
  }
  return { body: fromRegistry.body, mediaType: String(fromRegistry.headers['content-type']), digest: image.manifestDigest, path };
}

/** The registries of the policy: the blob's nginx and the tag's registry, each with its test CA, both resolved to loopback. */
function policy(bench: Bench, mirrorTls: boolean): string {
  const { origin, upstream } = bench;
  const registries: string[] = [];
  const hosts: string[] = [];
  if (origin) {
    registries.push(`  ${JSON.stringify(`${ORIGIN_HOST}:${origin.nginx.port}`)}:`, `    tls: { ca: ${JSON.stringify(origin.caFile)} }`);
    hosts.push(`  ${ORIGIN_HOST}: 127.0.0.1`);
  }
  if (upstream) {
    registries.push(`  ${JSON.stringify(upstream.registry.hostPort)}:`, `    tls: { ca: ${JSON.stringify(upstream.caFile)} }`);
    hosts.push(`  ${REGISTRY_HOST}: 127.0.0.1`);
  }
  return ['registries:', ...registries, 'hosts:', ...hosts, 'manifests:', `  defaultTtl: ${TTL}`, ...mirrorPolicyLines({ tls: mirrorTls }), ''].join('\n');
}

/** A (intercept, mirror-http) and B (mirror-https), as the chosen fronts need them. */
async function startProxies(bench: Bench, cli: string | undefined): Promise<void> {
  const wanted: Array<{ label: string; tls: boolean; fronts: Front[] }> = [
    { label: 'A', tls: false, fronts: bench.options.fronts.filter((f) => f !== 'mirror-https') },
    { label: 'B', tls: true, fronts: bench.options.fronts.filter((f) => f === 'mirror-https') },
  ];
  for (const { label, tls, fronts } of wanted) {
    if (fronts.length === 0) continue;
    const proxyDir = join(bench.dir, `proxy-${label}`);
    mkdirSync(proxyDir);
    const proxy = await startProxyProcess({ dir: proxyDir, policy: policy(bench, tls), ...(cli ? { cli } : {}) });
    const port = await waitForMirrorPort(proxy);
    const idleRssMiB = readStatusKiB(proxy.pid, 'VmRSS') / 1024;
    bench.proxies.push({
      label,
      proxy,
      mirror: { port, tls, caFile: proxy.caFile, caPem: readFileSync(proxy.caFile, 'utf8') },
      access: new ProxyAccessLog(proxy),
      idleRssMiB,
      fronts,
    });
    progress(`proxy ${label} (pid ${proxy.pid}, RSS ${fixed(idleRssMiB, 0)} MiB): ${fronts.join(', ')}; front on ${proxy.url}, mirror on ${tls ? 'https' : 'http'}://127.0.0.1:${port}`);
  }
  bench.proxyOf = (front) => {
    const found = bench.proxies.find((p) => p.fronts.includes(front));
    if (!found) throw new Error(`no proxy serves ${front}`);
    return found;
  };
}

// ---------------------------------------------------------------------------------------------------
// Both origins quiet, and what the proxy says it answered

interface OriginMark {
  nginx: number;
}

/** Before a measured run: nginx's access log position, the registry's count reset. */
async function markOrigins(bench: Bench): Promise<OriginMark> {
  if (bench.upstream) {
    await bench.upstream.registry.settle();
    bench.upstream.registry.resetCounts();
  }
  return { nginx: bench.origin?.nginx.accessLog!.mark() ?? 0 };
}

/** After a measured run: the requests either origin served since the mark; the run fails unless there are none. */
async function assertOriginsQuiet(bench: Bench, mark: OriginMark, what: string): Promise<{ nginx: number; registry: number }> {
  const nginxEntries = bench.origin?.nginx.accessLog!.entriesSince(mark.nginx) ?? [];
  let registryRequests: Array<{ method: string; path: string; status: number }> = [];
  if (bench.upstream) {
    await bench.upstream.registry.settle();
    registryRequests = bench.upstream.registry.requests();
  }
  if (nginxEntries.length > 0 || registryRequests.length > 0) {
    const listed = [...nginxEntries.map((e) => `nginx: ${e.method} ${e.uri} ${e.status}`), ...registryRequests.map((r) => `registry: ${r.method} ${r.path} ${r.status}`)];
    throw new Error(`${what}: the origin saw ${listed.length} request(s) during a measured run, expected none: ${listed.slice(0, 10).join('; ')}`);
  }
  return { nginx: nginxEntries.length, registry: registryRequests.length };
}

/**
 * After a measured run: the proxy's access log since `mark` must hold exactly `expected` lines for the
 * measured path, each a GET answered 200 from the cache (X-Cache: HIT). Other lines (a CONNECT, a
 * session) are counted and returned, not judged.
 */
async function assertProxyHits(put: ProxyUnderTest, mark: number, expected: number, canonicalPath: string, what: string): Promise<{ hits: number; otherLines: number }> {
  const isMeasured = (e: ProxyAccessEntry) => e.path === canonicalPath;
  let entries = await put.access.waitForEntries(mark, expected);
  // waitForEntries counts every line; wait on for the measured ones if unrelated lines came first.
  const deadline = performance.now() + 3_000;
  while (entries.filter(isMeasured).length < expected && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    entries = put.access.entriesSince(mark);
  }
  const measured = entries.filter(isMeasured);
  const hits = measured.filter((e) => e.method === 'GET' && e.status === 200 && e.cache === 'HIT').length;
  if (measured.length !== expected || hits !== expected) {
    throw new Error(`${what}: the proxy's access log shows ${describeEntries(measured)} for ${canonicalPath}, expected GET 200 HIT × ${expected}`);
  }
  return { hits, otherLines: entries.length - measured.length };
}

// ---------------------------------------------------------------------------------------------------
// Blobs

interface BlobRun extends ClientsRun {
  scenario: string;
  front: Front;
  repetition: number;
  proxyLabel: string;
  proxyAccess: { hits: number; otherLines: number };
  /** The curl clients' own CPU (this process's reaped children: user + system), and per GiB delivered. */
  clientsCpuSeconds: number;
  clientsCpuSecondsPerGiB: number;
}

interface BlobSummary {
  scenario: string;
  front: Front;
  clients: number;
  runs: number;
  wallSeconds: number;
  mibPerSecond: number;
  firstByteMs: number;
  proxyCpuSecondsPerGiB: number;
  proxyMainThreadCpuSecondsPerGiB: number;
  proxyOtherThreadsCpuSecondsPerGiB: number;
  proxyCores: number;
  proxySystemShare: number;
  proxyWriteKiBPerCall: number;
  proxyPeakRssMiB: number;
  /** The curl clients' own CPU per GiB (TLS decryption, or none over plain HTTP). */
  clientsCpuSecondsPerGiB: number;
  /** The machine's busy time minus the proxy's and nginx's, per GiB: the clients and anyone else's work. */
  restCpuSecondsPerGiB: number;
  machineCores: number;
}

interface BlobRatios {
  front: Front;
  clients: number;
  /** Mirror throughput / intercept throughput. */
  throughput: number;
  /** Mirror proxy CPU-s/GiB / intercept proxy CPU-s/GiB: below 1, the mirror is cheaper. */
  proxyCpuPerGiB: number;
  /** Intercept − mirror, CPU-s per GiB of the proxy process. */
  proxyCpuSecondsPerGiBSaved: number;
  mainThreadCpuPerGiB: number;
  /** The curl clients' CPU per GiB, mirror / intercept: over plain HTTP they decrypt nothing. */
  clientsCpuPerGiB: number;
}

interface BlobPart {
  prepared: Record<string, unknown>;
  summaries: BlobSummary[];
  ratios: BlobRatios[];
  runs: BlobRun[];
}

function blobRoute(bench: Bench, front: Front): CurlRoute {
  const { origin, blob, options } = bench;
  const put = bench.proxyOf(front);
  if (front === 'intercept') return proxiedBlobRoute(origin!, blob!, put.proxy);
  return mirrorCurlRoute(put.mirror, mirrorPath(blob!.urlPath, `${ORIGIN_HOST}:${origin!.nginx.port}`, options.form));
}

async function blobPart(bench: Bench): Promise<BlobPart> {
  const { options, origin, blob } = bench;
  const prepared: Record<string, unknown> = {};
  // Each proxy's cache is filled once, through its first front (one GET at nginx), and must then answer HIT.
  for (const put of bench.proxies) {
    const front = put.fronts[0]!;
    const route = blobRoute(bench, front);
    const logMark = origin!.nginx.accessLog!.mark();
    const fill = await runClients(1, route, { expectBytes: blob!.size, expectCache: ['MISS'] });
    const commitSeconds = await waitForCacheHit(route);
    const upstream = originRequestsSince(origin!, blob!, logMark);
    if (upstream.get !== 1) throw new Error(`proxy ${put.label}: the fill through ${front} sent ${upstream.get} GETs for the blob to nginx, expected 1`);
    prepared[`fill${put.label}`] = { front, wallSeconds: fill.wallSeconds, mibPerSecond: blob!.size / MIB / fill.wallSeconds, commitSeconds, originGets: upstream.get };
    progress(`proxy ${put.label}: blob filled through ${front} (MISS, ${fixed(blob!.size / MIB / fill.wallSeconds, 0)} MiB/s), a HIT ${fixed(commitSeconds, 2)} s after`);
  }
  // A range through every front: the leaf for the name minted, the front's hot paths compiled, the file in the page cache.
  const bytes = Math.min(WARM_UP_BYTES, blob!.size);
  for (const front of options.fronts) {
    await runClients(1, blobRoute(bench, front), { expectBytes: bytes, range: `0-${bytes - 1}`, expectCache: ['HIT'] });
  }
  progress(`warmed up: ${formatSize(bytes)} through each of ${options.fronts.join(', ')} (HIT)`);

  const runs: BlobRun[] = [];
  for (let repetition = 1; repetition <= options.repeat; repetition++) {
    for (const clients of options.clients) {
      for (const front of options.fronts) {
        const run = await measureBlob(bench, front, clients, repetition);
        runs.push(run);
        progress(
          `${run.scenario} #${repetition}: ${fixed(run.mibPerSecond, 0)} MiB/s in ${fixed(run.wallSeconds, 2)} s, ` +
            `proxy ${run.proxyLabel} ${fixed(run.proxy!.cpuSecondsPerGiB, 2)} CPU-s/GiB, curl ${fixed(run.clientsCpuSecondsPerGiB, 2)} CPU-s/GiB`,
        );
      }
    }
  }
  const summaries = summariseBlobs(runs);
  return { prepared, summaries, ratios: blobRatios(summaries, options), runs };
}

async function measureBlob(bench: Bench, front: Front, clients: number, repetition: number): Promise<BlobRun> {
  const put = bench.proxyOf(front);
  const scenario = `${front}-${clients}`;
  const originMark = await markOrigins(bench);
  const accessMark = put.access.mark();
  const clientsBefore = readReapedChildrenCpuSeconds();
  const run = await measureClients({ origin: bench.origin!, blob: bench.blob!, route: blobRoute(bench, front), clients, proxy: put.proxy, expectCache: ['HIT'] });
  const clientsCpuSeconds = readReapedChildrenCpuSeconds() - clientsBefore;
  const what = `${scenario} #${repetition}`;
  const proxyAccess = await assertProxyHits(put, accessMark, clients, bench.blob!.urlPath, what);
  await assertOriginsQuiet(bench, originMark, what);
  return { scenario, front, repetition, proxyLabel: put.label, proxyAccess, clientsCpuSeconds, clientsCpuSecondsPerGiB: clientsCpuSeconds / (run.bytes / GIB), ...run };
}

function summariseBlobs(runs: readonly BlobRun[]): BlobSummary[] {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const m = (pick: (r: BlobRun) => number) => median(of.map(pick));
    const p = (pick: (proxy: ProxyFigures) => number) => m((r) => pick(r.proxy!));
    return {
      scenario,
      front: of[0]!.front,
      clients: of[0]!.clients,
      runs: of.length,
      wallSeconds: m((r) => r.wallSeconds),
      mibPerSecond: m((r) => r.mibPerSecond),
      firstByteMs: m((r) => r.medianFirstByteMs),
      proxyCpuSecondsPerGiB: p((x) => x.cpuSecondsPerGiB),
      proxyMainThreadCpuSecondsPerGiB: p((x) => x.mainThreadCpuSecondsPerGiB),
      proxyOtherThreadsCpuSecondsPerGiB: p((x) => x.cpuSecondsPerGiB - x.mainThreadCpuSecondsPerGiB),
      proxyCores: p((x) => x.cores),
      proxySystemShare: p((x) => x.systemShare),
      proxyWriteKiBPerCall: p((x) => x.writeKiBPerCall),
      proxyPeakRssMiB: p((x) => x.peakRssMiB),
      clientsCpuSecondsPerGiB: m((r) => r.clientsCpuSecondsPerGiB),
      restCpuSecondsPerGiB: m((r) => r.restCpuSecondsPerGiB),
      machineCores: m((r) => r.machineCores),
    };
  });
}

function blobRatios(summaries: readonly BlobSummary[], options: Options): BlobRatios[] {
  const rows: BlobRatios[] = [];
  for (const front of options.fronts.filter((f) => f !== 'intercept')) {
    for (const clients of options.clients) {
      const base = summaries.find((s) => s.scenario === `intercept-${clients}`);
      const mirror = summaries.find((s) => s.scenario === `${front}-${clients}`);
      if (!base || !mirror) continue;
      rows.push({
        front,
        clients,
        throughput: mirror.mibPerSecond / base.mibPerSecond,
        proxyCpuPerGiB: mirror.proxyCpuSecondsPerGiB / base.proxyCpuSecondsPerGiB,
        proxyCpuSecondsPerGiBSaved: base.proxyCpuSecondsPerGiB - mirror.proxyCpuSecondsPerGiB,
        mainThreadCpuPerGiB: mirror.proxyMainThreadCpuSecondsPerGiB / base.proxyMainThreadCpuSecondsPerGiB,
        clientsCpuPerGiB: mirror.clientsCpuSecondsPerGiB / base.clientsCpuSecondsPerGiB,
      });
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------------------------------
// Manifests

interface ManifestRun {
  scenario: string;
  front: Front;
  rate: number;
  repetition: number;
  proxyLabel: string;
  load: OpenLoopResult;
  warmUp: { ok: number; errors: Record<string, number>; unfinished: number };
  server: { cpuSeconds: number; cpuMicrosPerRequest: number; cores: number; systemShare: number; mainThreadCpuSeconds: number; peakRssMiB: number };
  generatorCpuSeconds: number;
  machineCores: number;
  proxyAccess: { hits: number; otherLines: number };
}

interface ManifestSummary {
  scenario: string;
  front: Front;
  rate: number;
  runs: number;
  achievedRate: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  maxMs: number;
  serviceP50Ms: number;
  serviceP99Ms: number;
  serverCpuMicrosPerRequest: number;
  serverCores: number;
  mainThreadShare: number;
  serverPeakRssMiB: number;
  generatorCpuSeconds: number;
  lagP50Ms: number;
  lagP99Ms: number;
  maxOutstanding: number;
  machineCores: number;
}

interface ManifestRatios {
  front: Front;
  rate: number;
  p50: number;
  p99: number;
  serviceP50: number;
  serviceP99: number;
  cpuPerRequest: number;
}

interface ManifestPart {
  prepared: Record<string, unknown>;
  summaries: ManifestSummary[];
  ratios: ManifestRatios[];
  runs: ManifestRun[];
}

function manifestRoute(bench: Bench, front: Front): { route: Route; path: string } {
  const { upstream, manifest, options } = bench;
  const put = bench.proxyOf(front);
  if (front === 'intercept') {
    return { route: throughProxy({ host: REGISTRY_HOST, port: upstream!.registry.port }, { port: put.proxy.port, caPem: put.mirror.caPem }), path: manifest!.path };
  }
  return { route: mirrorPoolRoute(put.mirror), path: mirrorPath(manifest!.path, upstream!.registry.hostPort, options.form) };
}

/** One request: right when 200 with the exact bytes, media type and digest, from the cache (X-Cache: HIT). */
function sender(bench: Bench, pool: Pool, path: string, expectCache: string): () => Promise<string | undefined> {
  const manifest = bench.manifest!;
  const headers = { accept: CONTAINERD_ACCEPT, 'user-agent': USER_AGENT };
  return async () => {
    const response = await pool.request({ path, method: 'GET', headers });
    const body = Buffer.from(await response.body.arrayBuffer());
    if (response.statusCode !== 200) return `HTTP ${response.statusCode}`;
    if (!body.equals(manifest.body)) return 'wrong body';
    if (response.headers['content-type'] !== manifest.mediaType) return `Content-Type ${String(response.headers['content-type'])}`;
    if (response.headers['docker-content-digest'] !== manifest.digest) return `Docker-Content-Digest ${String(response.headers['docker-content-digest'])}`;
    if (response.headers['x-cache'] !== expectCache) return `X-Cache ${String(response.headers['x-cache'])}`;
    return undefined;
  };
}

async function manifestPart(bench: Bench): Promise<ManifestPart> {
  const { options, upstream } = bench;
  const prepared: Record<string, unknown> = {};
  // Each proxy fetches the tag once through its first front (MISS: one GET upstream), then every front answers HIT.
  for (const put of bench.proxies) {
    await upstream!.registry.settle();
    upstream!.registry.resetCounts();
    const answers: string[] = [];
    for (const [i, front] of put.fronts.entries()) {
      const { route, path } = manifestRoute(bench, front);
      const pool = openPool(route, { connections: 1, timeoutMs: REQUEST_TIMEOUT_MS });
      try {
        for (const expect of i === 0 ? ['MISS', 'HIT'] : ['HIT']) {
          const wrong = await sender(bench, pool, path, expect)();
          if (wrong) throw new Error(`proxy ${put.label}: warming the tag through ${front}: ${wrong} (expected a 200 ${expect})`);
          answers.push(`${front} ${expect}`);
        }
      } finally {
        await pool.destroy();
      }
    }
    await upstream!.registry.settle();
    const manifestRequests = upstream!.registry.count({ kind: 'manifest' });
    if (manifestRequests !== 1) throw new Error(`proxy ${put.label}: warming the tag sent ${manifestRequests} manifest requests to the registry, expected 1`);
    prepared[`warm${put.label}`] = { answers, upstreamManifestRequests: manifestRequests, upstreamRequests: upstream!.registry.requests().length };
    progress(`proxy ${put.label}: tag warmed: ${answers.join(', ')}; the registry saw ${manifestRequests} manifest request`);
  }

  const runs: ManifestRun[] = [];
  for (let repetition = 1; repetition <= options.repeat; repetition++) {
    for (const rate of options.rates) {
      for (const front of options.fronts) {
        const run = await measureManifest(bench, front, rate, repetition);
        runs.push(run);
        progress(
          `${run.scenario} #${repetition}: ${fixed(run.load.achievedRate, 0)}/s, p50 ${fixed(run.load.latency.p50, 2)} p99 ${fixed(run.load.latency.p99, 2)} ` +
            `max ${fixed(run.load.latency.max, 1)} ms, ${fixed(run.server.cpuMicrosPerRequest, 0)} CPU-µs/request (proxy ${run.proxyLabel})`,
        );
      }
    }
  }
  const summaries = summariseManifests(runs);
  return { prepared, summaries, ratios: manifestRatios(summaries, options), runs };
}

async function measureManifest(bench: Bench, front: Front, rate: number, repetition: number): Promise<ManifestRun> {
  const { options } = bench;
  const put = bench.proxyOf(front);
  const pid = put.proxy.pid;
  const scenario = `${front}-${rate}`;
  const what = `${scenario} #${repetition}`;
  const { route, path } = manifestRoute(bench, front);
  const pool = openPool(route, { connections: options.connections, timeoutMs: REQUEST_TIMEOUT_MS });
  try {
    const send = sender(bench, pool, path, 'HIT');
    // Not measured: opens the pool's connections and lets the proxy settle into the rate. Its answers must be right too.
    const warm = options.warmUpMs > 0 ? await runOpenLoop({ rate, durationMs: options.warmUpMs, drainMs: DRAIN_MS, send }) : undefined;
    if (warm && (Object.keys(warm.errors).length > 0 || warm.unfinished > 0)) {
      throw new Error(`${what}: the warm-up had wrong or missing answers: ${JSON.stringify(warm.errors)}, ${warm.unfinished} unanswered`);
    }
    const originMark = await markOrigins(bench);
    const accessMark = put.access.mark();
    const rss = new PeakRssSampler(pid);
    const serverBefore = readCounters(pid);
    const mainBefore = readMainThreadCpu(pid);
    const machineBefore = readMachineBusySeconds();
    const generatorBefore = process.cpuUsage();
    const wallStart = performance.now();

    const load = await runOpenLoop({ rate, durationMs: options.durationMs, drainMs: DRAIN_MS, send });

    const wall = (performance.now() - wallStart) / 1000;
    const generator = process.cpuUsage(generatorBefore);
    const machineSeconds = readMachineBusySeconds() - machineBefore;
    const spent = subtractCounters(readCounters(pid), serverBefore);
    const mainThreadCpuSeconds = readMainThreadCpu(pid) - mainBefore;
    const peakRssKiB = rss.stop();
    if (Object.keys(load.errors).length > 0 || load.unfinished > 0 || load.ok !== load.scheduled) {
      throw new Error(`${what}: ${load.ok} of ${load.scheduled} answers were right (200, the manifest, X-Cache: HIT); wrong: ${JSON.stringify(load.errors)}, ${load.unfinished} unanswered`);
    }
    const proxyAccess = await assertProxyHits(put, accessMark, load.scheduled, bench.manifest!.path, what);
    await assertOriginsQuiet(bench, originMark, what);
    return {
      scenario,
      front,
      rate,
      repetition,
      proxyLabel: put.label,
      load,
      warmUp: warm ? { ok: warm.ok, errors: warm.errors, unfinished: warm.unfinished } : { ok: 0, errors: {}, unfinished: 0 },
      server: {
        cpuSeconds: spent.cpuSeconds,
        cpuMicrosPerRequest: (spent.cpuSeconds * 1e6) / Math.max(1, load.ok),
        cores: spent.cpuSeconds / wall,
        systemShare: spent.systemSeconds / Math.max(spent.cpuSeconds, Number.EPSILON),
        mainThreadCpuSeconds,
        peakRssMiB: peakRssKiB / 1024,
      },
      generatorCpuSeconds: (generator.user + generator.system) / 1e6,
      machineCores: machineSeconds / wall,
      proxyAccess,
    };
  } finally {
    await pool.destroy();
  }
}

function summariseManifests(runs: readonly ManifestRun[]): ManifestSummary[] {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const m = (pick: (r: ManifestRun) => number) => median(of.map(pick));
    return {
      scenario,
      front: of[0]!.front,
      rate: of[0]!.rate,
      runs: of.length,
      achievedRate: m((r) => r.load.achievedRate),
      p50Ms: m((r) => r.load.latency.p50),
      p90Ms: m((r) => r.load.latency.p90),
      p99Ms: m((r) => r.load.latency.p99),
      maxMs: Math.max(...of.map((r) => r.load.latency.max)),
      serviceP50Ms: m((r) => r.load.service.p50),
      serviceP99Ms: m((r) => r.load.service.p99),
      serverCpuMicrosPerRequest: m((r) => r.server.cpuMicrosPerRequest),
      serverCores: m((r) => r.server.cores),
      mainThreadShare: m((r) => r.server.mainThreadCpuSeconds / Math.max(r.server.cpuSeconds, Number.EPSILON)),
      serverPeakRssMiB: m((r) => r.server.peakRssMiB),
      generatorCpuSeconds: m((r) => r.generatorCpuSeconds),
      lagP50Ms: m((r) => r.load.lag.p50),
      lagP99Ms: m((r) => r.load.lag.p99),
      maxOutstanding: Math.max(...of.map((r) => r.load.maxOutstanding)),
      machineCores: m((r) => r.machineCores),
    };
  });
}

function manifestRatios(summaries: readonly ManifestSummary[], options: Options): ManifestRatios[] {
  const rows: ManifestRatios[] = [];
  for (const front of options.fronts.filter((f) => f !== 'intercept')) {
    for (const rate of options.rates) {
      const base = summaries.find((s) => s.scenario === `intercept-${rate}`);
      const mirror = summaries.find((s) => s.scenario === `${front}-${rate}`);
      if (!base || !mirror) continue;
      rows.push({
        front,
        rate,
        p50: mirror.p50Ms / base.p50Ms,
        p99: mirror.p99Ms / base.p99Ms,
        serviceP50: mirror.serviceP50Ms / base.serviceP50Ms,
        serviceP99: mirror.serviceP99Ms / base.serviceP99Ms,
        cpuPerRequest: mirror.serverCpuMicrosPerRequest / base.serverCpuMicrosPerRequest,
      });
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------------------------------
// Report

function printReport(
  bench: Bench,
  environment: Record<string, string | number>,
  source: SourceState,
  blob: BlobPart | undefined,
  manifest: ManifestPart | undefined,
  lifetimePeakRssMiB: Record<string, number>,
): void {
  const { options } = bench;
  const out: string[] = [
    '',
    `${NAME}: cache hits through the intercepting front and the registry mirror (${options.form === 'ns' ? '?ns=<registry>' : '/v2/<host>_<port>/…'}), ` +
      `medians of ${options.repeat} interleaved runs`,
    `${environmentLine(environment)}, ${environment.loadAverage1mAtEnd} (1 min) at the end${environment.registry ? `; ${environment.registry}` : ''}`,
    sourceLine(source),
    ...bench.proxies.map(
      (p) => `proxy ${p.label}: ${p.fronts.join(', ')} (mirror over ${p.mirror.tls ? 'HTTPS' : 'plain HTTP'}); RSS ${fixed(p.idleRssMiB, 0)} MiB after start, ${fixed(lifetimePeakRssMiB[p.label], 0)} MiB at its peak (VmHWM)`,
    ),
    'asserted in every measured run: each answer X-Cache: HIT (client side and the proxy\'s access log), no request at nginx or the registry',
  ];
  if (blob) {
    out.push(
      '',
      `blob: ${formatSize(bench.blob!.size)}, curl clients each downloading the whole blob; proxy = the process serving the front`,
      formatTable(
        ['scenario', 'wall s', 'MiB/s', 'TTFB ms', 'proxy CPU-s/GiB', 'main thread', 'other threads', 'kernel %', 'KiB/write', 'proxy cores', 'curl CPU-s/GiB', 'peak RSS MiB', 'machine cores busy'],
        blob.summaries.map((s) => [
          s.scenario,
          fixed(s.wallSeconds, 2),
          fixed(s.mibPerSecond, 0),
          fixed(s.firstByteMs, 1),
          fixed(s.proxyCpuSecondsPerGiB, 2),
          fixed(s.proxyMainThreadCpuSecondsPerGiB, 2),
          fixed(s.proxyOtherThreadsCpuSecondsPerGiB, 2),
          fixed(percent(s.proxySystemShare), 0),
          fixed(s.proxyWriteKiBPerCall, 1),
          fixed(s.proxyCores, 2),
          fixed(s.clientsCpuSecondsPerGiB, 2),
          fixed(s.proxyPeakRssMiB, 0),
          fixed(s.machineCores, 2),
        ]),
      ),
      'main thread / other threads: the proxy\'s CPU-s/GiB by thread; curl: the clients\' own CPU per GiB (reaped children of this process; TLS decryption on the TLS fronts)',
    );
    if (blob.ratios.length > 0) {
      const columns = [...new Set(blob.ratios.map((r) => `${r.front} ${r.clients}`))];
      const cell = (pick: (r: BlobRatios) => number) =>
        columns.map((c) => {
          const r = blob.ratios.find((x) => `${x.front} ${x.clients}` === c);
          return fixed(r ? pick(r) : undefined, 2);
        });
      out.push(
        '',
        formatTable(
          ['blob: mirror / intercept', ...columns.map((c) => c.replace(/ (\d+)$/, (_, n: string) => ` ${n} client${n === '1' ? '' : 's'}`))],
          [
            ['throughput', ...cell((r) => r.throughput)],
            ['proxy CPU-s/GiB', ...cell((r) => r.proxyCpuPerGiB)],
            ['proxy CPU-s/GiB saved', ...cell((r) => r.proxyCpuSecondsPerGiBSaved)],
            ['main thread CPU-s/GiB', ...cell((r) => r.mainThreadCpuPerGiB)],
            ['curl CPU-s/GiB', ...cell((r) => r.clientsCpuPerGiB)],
          ],
        ),
      );
    }
  }
  if (manifest) {
    out.push(
      '',
      `manifest: GET of a cached tag (${bench.manifest!.body.length}-byte ${bench.manifest!.mediaType}), open loop, ${options.durationMs / 1000} s measured per run after ` +
        `${options.warmUpMs / 1000} s of warm-up, up to ${options.connections} keep-alive connections; latency from the scheduled time to the last byte, ms`,
      formatTable(
        ['scenario', 'target/s', 'achieved/s', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'from send: p50', 'p99', 'CPU-µs/request', 'proxy cores', 'main thread %', 'peak RSS MiB', 'generator CPU-s', 'send lag p99', 'machine cores busy'],
        manifest.summaries.map((s) => [
          s.scenario,
          fixed(s.rate, 0),
          fixed(s.achievedRate, 0),
          fixed(s.p50Ms, 2),
          fixed(s.p90Ms, 2),
          fixed(s.p99Ms, 2),
          fixed(s.maxMs, 1),
          fixed(s.serviceP50Ms, 2),
          fixed(s.serviceP99Ms, 2),
          fixed(s.serverCpuMicrosPerRequest, 0),
          fixed(s.serverCores, 2),
          fixed(percent(s.mainThreadShare), 0),
          fixed(s.serverPeakRssMiB, 0),
          fixed(s.generatorCpuSeconds, 2),
          fixed(s.lagP99Ms, 2),
          fixed(s.machineCores, 2),
        ]),
      ),
      'max ms: the largest over the runs; "from send": timed from when the generator sent the request (without its send lag); CPU-µs/request: the proxy process, all threads',
    );
    if (manifest.ratios.length > 0) {
      const columns = [...new Set(manifest.ratios.map((r) => `${r.front} ${r.rate}/s`))];
      const cell = (pick: (r: ManifestRatios) => number) =>
        columns.map((c) => {
          const r = manifest.ratios.find((x) => `${x.front} ${x.rate}/s` === c);
          return fixed(r ? pick(r) : undefined, 2);
        });
      out.push(
        '',
        formatTable(
          ['manifest: mirror / intercept', ...columns],
          [
            ['p50 latency', ...cell((r) => r.p50)],
            ['p99 latency', ...cell((r) => r.p99)],
            ['p50 from send', ...cell((r) => r.serviceP50)],
            ['p99 from send', ...cell((r) => r.serviceP99)],
            ['CPU per request', ...cell((r) => r.cpuPerRequest)],
          ],
        ),
      );
    }
  }
  out.push('');
  process.stdout.write(out.join('\n') + '\n');
}

await runBenchmark(main, progress);
