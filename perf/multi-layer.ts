// Multi-layer images pulled by skopeo, cold and warm, through pullthrough and through nginx configured as
// the seed, beside the same clients straight to the registry (issue 18): most real images are many small
// and medium layers, where the per-request milliseconds (connections, the token, a fill's dispatch and
// commit) count more than the bytes per second.
//
//   node perf/multi-layer.ts [--shapes multi,medium] [--clients 1,4] [--repeat 3] [--routes direct,seed,proxy]
//                            [--commit REV]… [--cli LABEL=PATH]… [--profile DIR]
//
// The upstream is Docker-Hub-shaped (perf/lib/hub-origin.ts, nginx): GET /v2/ answers 401 with a Bearer
// challenge, the token service is a host of its own, blobs 307 to a CDN host over TLS. Images:
//   multi   12 layers from 64 KiB to 16 MiB (~37 MiB) and a config blob
//   medium  3 layers of 5, 10 and 15 MiB (the issue's 30 MiB shape) and a config blob
//   big     1 layer of 512 MiB (--shapes big; not in the default set): that the big-layer figures hold
// Routes, interleaved within each repetition (shape × client count):
//   direct  skopeo straight to the registry (by IP literal: Go resolves no test name)
//   seed    skopeo straight to nginx configured as the seed's caching layer (perf/lib/seed-nginx.ts),
//           fresh (an empty cache) for the cold run, the same one for the warm run
//   proxy   skopeo through pullthrough (HTTPS_PROXY, the proxy's CA), fresh (an empty data dir) for the
//           cold run, warmed up first on two images of another site of the origin (~13 MiB each: 2
//           clients on one, then 1 on the other, then the first again: misses, joins and hits compiled,
//           fill workers started, as in a proxy that has been serving) and with its leaves minted (a TLS
//           handshake to the registry and the token service through CONNECT, no request): no
//           connection to the measured registry, its token service or its CDN is open when the cold run
//           starts. The warm run follows on the same proxy once every blob is a HIT.
// --upstream-rtt 20ms puts the origin a round trip away from everyone (the proxy, nginx as the seed, direct
// clients): a delay line (perf/lib/delay-line.ts) holds every chunk back half of it each way, as a registry
// and CDN across the internet would. Without it the origin answers in microseconds and a cold pull is
// bound by CPU alone.
// Every client must finish and hold the image's exact manifest and blobs (skopeo checks digests; the
// copy is checked again here). The origin's access log counts what reached upstream in each run.
// Builds: the working tree's (as `npm start` runs it) unless --commit (a commit's, built apart) or --cli
// (any build's cli.js, e.g. one made by perf/lib/source.ts) name others, each repeatable: every build is
// a proxy route of its own, measured in the same repetitions (before/after in one run).
import { mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { formatSize, parseDuration } from '../config/units.ts';
import { buildOciImage, type BuiltImage } from '../test/helpers/oci-image.ts';
import { createTestCa, writePem } from '../test/helpers/pki.ts';
import { verifyDirCopy } from '../test/helpers/skopeo.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { startDelayLine } from './lib/delay-line.ts';
import { headRequest, proxiedRoute } from './lib/curl.ts';
import { startHubOrigin, type HubOrigin, type HubRequest, type HubSite } from './lib/hub-origin.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { readCounters, readMachineBusySeconds } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { startSeedNginx } from './lib/seed-nginx.ts';
import { runSkopeoClients, skopeoVersion } from './lib/skopeo.ts';
import { buildCommit, describeCli, describeSource, sourceLine, type SourceState } from './lib/source.ts';

const NAME = 'multi-layer';
const KiB = 1024;
const MiB = 1024 * KiB;
const TAG = 'v1';
const progress = progressTo(NAME);

const SHAPES: Record<string, { repository: string; layers: number[]; describe: string }> = {
  multi: {
    repository: 'bench/multi',
    layers: [64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB, 512 * KiB, 768 * KiB, 1 * MiB, 2 * MiB, 3 * MiB, 4 * MiB, 8 * MiB, 16 * MiB],
    describe: '12 layers, 64 KiB–16 MiB',
  },
  medium: { repository: 'bench/medium', layers: [5 * MiB, 10 * MiB, 15 * MiB], describe: '3 layers, 5/10/15 MiB' },
  /** Not in the default set: the issue's big-layer figures, to check they do not regress (--shapes big). */
  big: { repository: 'bench/big', layers: [512 * MiB], describe: '1 layer of 512 MiB' },
};
/** Two images of another site, pulled before a cold run: the proxy's code paths compiled, as in a proxy that has been serving. */
const WARM_UP = { repositories: ['bench/warm-up-1', 'bench/warm-up-2'], layers: [64 * KiB, 1 * MiB, 4 * MiB, 8 * MiB] };

/** 'direct', 'seed', or a proxy build's label. */
type Route = string;
type Phase = 'cold' | 'warm';

/** A build of the proxy to measure: `cli` undefined is the working tree's (perf/lib/proxy.ts builds dist/). */
interface Build {
  label: string;
  cli?: string;
  commit?: string;
}

interface Options {
  shapes: string[];
  clients: number[];
  repeat: number;
  routes: Array<'direct' | 'seed' | 'proxy'>;
  builds: Build[];
  profile?: string;
  /** A round trip added between everyone and the origin (perf/lib/delay-line.ts); 0: none. */
  upstreamRttMs: number;
}

interface Run {
  scenario: string;
  shape: string;
  clients: number;
  route: Route;
  phase: Phase | 'direct';
  repetition: number;
  wallSeconds: number;
  clientSecondsMedian: number;
  clientSecondsMax: number;
  /** What reached the origin, by kind; `reused`: requests on a kept-alive connection. */
  upstream: Record<string, number> & { reused: number; total: number; downloadBytes: number };
  /** nginx (seed) or the proxy process. */
  serverCpuSeconds?: number;
  /** Through the proxy: its answers, "GET blob MISS" → { count, medianMs, maxMs }. */
  proxyAnswers?: Record<string, { count: number; medianMs: number; maxMs: number }>;
  machineCores: number;
}

function parseOptions(argv: string[]): Options {
  const usage =
    `usage: node perf/${NAME}.ts [--shapes multi,medium] [--clients 1,4] [--repeat 3] [--routes direct,seed,proxy]\n` +
    '                             [--commit REV]… [--cli LABEL=PATH]… [--profile DIR] [--upstream-rtt 20ms]\n';
  const { values } = parseArgs({
    args: argv,
    options: {
      shapes: { type: 'string', default: 'multi,medium' },
      clients: { type: 'string', default: '1,4' },
      repeat: { type: 'string', default: '3' },
      routes: { type: 'string', default: 'direct,seed,proxy' },
      commit: { type: 'string', multiple: true },
      cli: { type: 'string', multiple: true },
      profile: { type: 'string' },
      'upstream-rtt': { type: 'string', default: '0ms' },
      size: { type: 'string' }, // passed to every benchmark by perf/run.ts; the shapes are fixed here
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const shapes = values.shapes.split(',');
  const clients = values.clients.split(',').map(Number);
  const repeat = Number(values.repeat);
  const routes = values.routes.split(',') as Options['routes'];
  if (shapes.some((s) => !SHAPES[s])) throw new Error(`--shapes ${values.shapes}: of ${Object.keys(SHAPES).join(', ')}`);
  if (clients.some((c) => !Number.isInteger(c) || c < 1 || c > 32)) throw new Error(`--clients ${values.clients}: counts of 1–32`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: a positive integer`);
  if (routes.some((r) => r !== 'direct' && r !== 'seed' && r !== 'proxy')) throw new Error(`--routes ${values.routes}: of direct, seed, proxy`);
  const upstreamRttMs = parseDuration(values['upstream-rtt']);
  if (!(upstreamRttMs >= 0)) throw new Error(`--upstream-rtt ${values['upstream-rtt']}: a duration (20ms)`);
  const builds: Build[] = [
    ...(values.commit ?? []).map((commit) => ({ label: `@${commit.slice(0, 10)}`, commit })),
    ...(values.cli ?? []).map((spec) => {
      const at = spec.indexOf('=');
      if (at < 1) throw new Error(`--cli ${spec}: LABEL=PATH (the path of a build's dist/src/cli.js)`);
      return { label: spec.slice(0, at), cli: spec.slice(at + 1) };
    }),
  ];
  if (builds.length === 0) builds.push({ label: 'proxy' });
  if (new Set(builds.map((b) => b.label)).size !== builds.length || builds.some((b) => b.label === 'direct' || b.label === 'seed')) throw new Error('every build needs a label of its own (not direct or seed)');
  return { shapes, clients, repeat, routes, builds, upstreamRttMs, ...(values.profile ? { profile: values.profile } : {}) };
}

interface Bench {
  options: Options;
  dir: string;
  origin: HubOrigin;
  hub: HubSite;
  warm: HubSite;
  ca: ReturnType<typeof createTestCa>;
  caFile: string;
  images: Record<string, BuiltImage>;
  warmUpImages: BuiltImage[];
  /** The proxy builds measured, with the cli each runs. */
  builds: Array<Build & { source: SourceState }>;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const dir = makeTempDir(NAME);
  const builds = options.routes.includes('proxy')
    ? options.builds.map((build, i) => {
        if (build.commit) {
          const built = buildCommit(build.commit, join(dir, `build-${i}`));
          return { ...build, cli: built.cli, source: built.source };
        }
        const source: SourceState = build.cli ? describeCli(build.cli) : describeSource();
        return { ...build, source };
      })
    : [];
  const environment: Record<string, string | number> = { ...describeEnvironment('nginx'), skopeo: skopeoVersion() };
  const ca = createTestCa('pullthrough perf hub CA');
  const caFile = writePem(dir, 'hub-ca.pem', ca.certPem);
  const layoutDir = join(dir, 'layout');
  const images: Record<string, BuiltImage> = {};
  for (const shape of options.shapes) {
    const { repository, layers } = SHAPES[shape]!;
    progress(`building ${repository}:${TAG} (${layers.map(formatSize).join(', ')})`);
    images[shape] = await buildOciImage(layoutDir, { tag: `${shape}-${TAG}`, layers: layers.map((size) => ({ randomBytes: size })), labels: { shape } });
  }
  const warmUpImages: BuiltImage[] = [];
  for (const [i, repository] of WARM_UP.repositories.entries()) {
    warmUpImages.push(await buildOciImage(layoutDir, { tag: `warm-up-${i}`, layers: WARM_UP.layers.map((size) => ({ randomBytes: size })), labels: { shape: repository } }));
  }
  // With a round trip to add, nginx listens on 127.0.0.2 and the delay line takes its ports on 127.0.0.1.
  const delayed = options.upstreamRttMs > 0;
  const origin = await startHubOrigin({
    dir,
    ca,
    layoutDir,
    ...(delayed ? { listenAddress: '127.0.0.2' } : {}),
    sites: [
      { name: 'hub', images: options.shapes.map((shape) => ({ repository: SHAPES[shape]!.repository, tag: TAG, image: images[shape]! })) },
      { name: 'warm', images: WARM_UP.repositories.map((repository, i) => ({ repository, tag: TAG, image: warmUpImages[i]! })) },
    ],
  });
  const [hub, warm] = origin.sites as [HubSite, HubSite];
  if (delayed) {
    const ports = origin.sites.flatMap((site) => [site.registryPort, site.authPort, site.cdnPort]);
    await startDelayLine(ports, '127.0.0.2', options.upstreamRttMs / 2); // stopped by the exit cleanup
    progress(`the origin is ${options.upstreamRttMs} ms away (a delay line in front of it)`);
  }
  environment.nginx = origin.nginx.version;
  progress(`origin: registry ${hub.registryHostPort}, token service ${hub.authHostPort}, CDN ${hub.cdnHostPort} (nginx ${origin.nginx.version})`);
  const bench: Bench = { options, dir, origin, hub, warm, ca, caFile, images, warmUpImages, builds };
  const runs: Run[] = [];
  for (let repetition = 1; repetition <= options.repeat; repetition++) {
    for (const shape of options.shapes) {
      for (const clients of options.clients) {
        runs.push(...(await repetitionOf(bench, shape, clients, repetition)));
      }
    }
  }
  printReport(bench, runs, environment);
  const result = {
    benchmark: NAME,
    date: new Date().toISOString(),
    environment,
    builds: builds.map(({ label, source }) => ({ label, source })),
    options,
    shapes: Object.fromEntries(options.shapes.map((shape) => [shape, { layers: SHAPES[shape]!.layers, blobs: images[shape]!.blobs.size - 1, manifestDigest: images[shape]!.manifestDigest }])),
    summaries: summarise(runs),
    totalSeconds: (performance.now() - started) / 1000,
    runs,
  };
  process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
}

/**
 * One repetition of a shape and client count: direct, then cold and warm of the seed and of each proxy
 * build, interleaved (the builds take turns first, repetition by repetition).
 */
async function repetitionOf(bench: Bench, shape: string, clients: number, repetition: number): Promise<Run[]> {
  const { options } = bench;
  const work = join(bench.dir, `${shape}-${clients}-${repetition}`);
  const runs: Run[] = [];
  let seed: Awaited<ReturnType<typeof startSeedNginx>> | undefined;
  const proxies = new Map<string, ProxyProcess>();
  const turn = (repetition - 1) % Math.max(1, bench.builds.length);
  const builds = [...bench.builds.slice(turn), ...bench.builds.slice(0, turn)];
  try {
    if (options.routes.includes('seed')) seed = await startSeedNginx({ dir: makeDir(join(work, 'seed')), ca: bench.ca, caFile: bench.caFile, site: bench.hub });
    for (const build of builds) proxies.set(build.label, await freshProxy(bench, build, join(work, `proxy-${build.label.replace(/[^\w.-]/g, '_')}`)));
    const measure = async (route: Route, phase: Phase | 'direct') => {
      const run = await measureRun(bench, { shape, clients, route, phase, repetition, seed, proxy: proxies.get(route) }, join(work, `run-${runs.length}`));
      runs.push(run);
      progress(`${run.scenario} #${repetition}: ${fixed(run.wallSeconds, 2)} s (client median ${fixed(run.clientSecondsMedian, 2)} s); upstream ${describeUpstream(run.upstream)}`);
    };
    if (options.routes.includes('direct')) await measure('direct', 'direct');
    if (seed) await measure('seed', 'cold');
    for (const build of builds) await measure(build.label, 'cold');
    for (const proxy of proxies.values()) await waitForHits(bench, proxy, shape);
    if (seed) await measure('seed', 'warm');
    for (const build of builds) await measure(build.label, 'warm');
  } finally {
    await Promise.all([seed?.stop(), ...[...proxies.values()].map((proxy) => proxy.stop())]);
    rmSync(work, { recursive: true, force: true });
  }
  return runs;
}

async function freshProxy(bench: Bench, build: Build, dir: string): Promise<ProxyProcess> {
  const { hub, warm } = bench;
  const registries = [hub.registryHostPort, hub.authHostPort, warm.registryHostPort, warm.authHostPort].map((key) => `  ${JSON.stringify(key)}:\n    tls: { ca: ${JSON.stringify(bench.caFile)} }`);
  const policy = ['registries:', ...registries, 'hosts:', ...bench.origin.hostNames.map((name) => `  ${name}: 127.0.0.1`), ''].join('\n');
  const proxy = await startProxyProcess({
    dir: makeDir(dir),
    policy,
    ...(build.cli ? { cli: build.cli } : {}),
    ...(bench.options.profile ? { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${bench.options.profile}`] } : {}),
  });
  // Not measured: code loaded and compiled on another site's images (misses with a joined client, misses
  // alone, hits), fill workers started, leaves minted.
  for (const [i, [repository, clients]] of ([[WARM_UP.repositories[0]!, 2], [WARM_UP.repositories[1]!, 1], [WARM_UP.repositories[0]!, 1]] as const).entries()) {
    const warmUp = await runSkopeoClients(clients, { image: `${warm.registryHostPort}/${repository}:${TAG}`, proxy: { url: proxy.url, caFile: proxy.caFile } }, makeDir(join(dir, `warm-up-${i}`)));
    const failed = warmUp.clients.find((c) => c.code !== 0);
    if (failed) throw new Error(`the warm-up pull failed:\n${failed.stderr.slice(-2000)}`);
  }
  const caPem = readFileSync(proxy.caFile, 'utf8');
  for (const hostPort of [hub.registryHostPort, hub.authHostPort]) await handshakeOnly(proxy.port, hostPort, caPem);
  return proxy;
}

/** CONNECT and a TLS handshake, no request: the proxy mints (and keeps) the leaf, and asks nothing upstream. */
async function handshakeOnly(proxyPort: number, hostPort: string, caPem: string): Promise<void> {
  const raw = net.connect(proxyPort, '127.0.0.1');
  await new Promise<void>((resolve, reject) => {
    raw.once('error', reject);
    raw.once('connect', () => raw.write(`CONNECT ${hostPort} HTTP/1.1\r\nHost: ${hostPort}\r\n\r\n`));
    raw.once('data', (chunk: Buffer) => (/^HTTP\/1\.[01] 200/.test(chunk.toString('latin1')) ? resolve() : reject(new Error(`CONNECT ${hostPort}: ${chunk.toString('latin1').split('\r\n')[0]}`))));
  });
  const socket = tls.connect({ socket: raw, servername: hostPort.split(':')[0]!, ca: caPem });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  socket.end();
  raw.destroy();
}

/** Every blob of the shape answers HIT through the proxy (the fills committed: fsync, rename, index). */
async function waitForHits(bench: Bench, proxy: ProxyProcess, shape: string): Promise<void> {
  const image = bench.images[shape]!;
  const { repository } = SHAPES[shape]!;
  const deadline = performance.now() + 60_000;
  for (const digest of [image.configDigest, ...image.layerDigests]) {
    const route = proxiedRoute({ host: `registry.${bench.hub.name}.test`, port: bench.hub.registryPort, path: `/v2/${repository}/blobs/${digest}`, proxyUrl: proxy.url, proxyCaFile: proxy.caFile });
    while ((await headRequest(route)).cache !== 'HIT') {
      if (performance.now() > deadline) throw new Error(`${digest} is not a HIT 60 s after the cold pull`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

async function measureRun(
  bench: Bench,
  at: { shape: string; clients: number; route: Route; phase: Phase | 'direct'; repetition: number; seed?: { address: string; pids(): number[] }; proxy?: ProxyProcess },
  dir: string,
): Promise<Run> {
  const { shape, clients, route, phase, repetition } = at;
  const image = bench.images[shape]!;
  const { repository } = SHAPES[shape]!;
  const scenario = `${shape}-${clients} ${route === 'direct' ? 'direct' : `${route} ${phase}`}`;
  const skopeoRoute =
    at.proxy
      ? { image: `${bench.hub.registryHostPort}/${repository}:${TAG}`, proxy: { url: at.proxy!.url, caFile: at.proxy!.caFile } }
      : { image: `${route === 'seed' ? at.seed!.address : bench.hub.registryAddress}/${repository}:${TAG}`, registryCaPem: bench.ca.certPem };
  const logMark = bench.origin.nginx.accessLog!.mark();
  const proxyLogMark = at.proxy ? statSync(at.proxy.stdoutFile).size : 0;
  let serverBefore = new Map<number, number>();
  let machineBefore = 0;
  // Per process: nginx's cache loader exits a minute after start, so the seed's processes come and go.
  const serverCpu = () => cpuByPid(at.proxy ? [at.proxy.pid] : route === 'seed' ? at.seed!.pids() : []);
  const run = await runSkopeoClients(clients, skopeoRoute, makeDir(dir), () => {
    serverBefore = serverCpu();
    machineBefore = readMachineBusySeconds();
  });
  const serverAfter = serverCpu();
  const serverCpuSeconds = [...serverAfter].reduce((sum, [pid, seconds]) => sum + (serverBefore.has(pid) ? seconds - serverBefore.get(pid)! : 0), 0);
  const machineSeconds = readMachineBusySeconds() - machineBefore;
  for (const [i, client] of run.clients.entries()) {
    if (client.code !== 0) throw new Error(`${scenario}: skopeo client ${i} failed, exit ${client.code}:\n${client.stderr.slice(-2000)}`);
    const copy = await verifyDirCopy(client.destDir);
    if (copy.manifestDigest !== image.manifestDigest) throw new Error(`${scenario}: client ${i} got manifest ${copy.manifestDigest}, expected ${image.manifestDigest}`);
  }
  rmSync(dir, { recursive: true, force: true });
  // nginx logs a request when it is done; the proxy's fills may still be committing, which the origin never sees.
  await new Promise((resolve) => setTimeout(resolve, 50));
  const requests = bench.origin.requestsSince(logMark).filter((r) => r.site === bench.hub.name);
  return {
    scenario,
    shape,
    clients,
    route,
    phase,
    repetition,
    wallSeconds: run.wallSeconds,
    clientSecondsMedian: median(run.clients.map((c) => c.seconds)),
    clientSecondsMax: Math.max(...run.clients.map((c) => c.seconds)),
    upstream: countRequests(requests),
    ...(route !== 'direct' ? { serverCpuSeconds } : {}),
    ...(at.proxy ? { proxyAnswers: proxyAnswers(at.proxy.stdoutFile, proxyLogMark) } : {}),
    machineCores: machineSeconds / run.wallSeconds,
  };
}

/** CPU seconds of each of these processes that is still running. */
function cpuByPid(pids: readonly number[]): Map<number, number> {
  const cpu = new Map<number, number>();
  for (const pid of pids) {
    try {
      cpu.set(pid, readCounters(pid).cpuSeconds);
    } catch {
      // exited (nginx's cache loader does, after its first minute)
    }
  }
  return cpu;
}

function countRequests(requests: readonly HubRequest[]): Run['upstream'] {
  const counts: Run['upstream'] = { reused: 0, total: requests.length, downloadBytes: 0 };
  for (const r of requests) {
    counts[r.kind] = (counts[r.kind] ?? 0) + 1;
    if (r.reused) counts.reused++;
    if (r.kind === 'download') counts.downloadBytes += r.bytes;
  }
  return counts;
}

function describeUpstream(u: Run['upstream']): string {
  return `${['ping', 'token', 'manifest', 'blob-redirect', 'download'].map((k) => `${k} ${u[k] ?? 0}`).join(', ')} (${u.reused}/${u.total} on kept-alive connections)`;
}

/** The proxy's access log since `mark`: per method, type and X-Cache, the count and the milliseconds. */
function proxyAnswers(file: string, mark: number): Run['proxyAnswers'] {
  const text = readFileSync(file, 'utf8').slice(mark);
  const byKey = new Map<string, number[]>();
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    const entry = JSON.parse(line) as { method: string; type?: string; cache?: string; ms: number; host: string };
    if (entry.type === 'admin') continue;
    const key = `${entry.method} ${entry.type ?? '?'} ${entry.cache ?? '-'}`;
    byKey.set(key, [...(byKey.get(key) ?? []), entry.ms]);
  }
  return Object.fromEntries([...byKey].map(([key, ms]) => [key, { count: ms.length, medianMs: median(ms), maxMs: Math.max(...ms) }]));
}

interface Summary {
  scenario: string;
  shape: string;
  clients: number;
  route: Route;
  phase: Phase | 'direct';
  runs: number;
  wallSeconds: number;
  clientSecondsMedian: number;
  clientSecondsMax: number;
  serverCpuSeconds?: number;
  upstream: Record<string, string>;
  proxyAnswers?: Record<string, { count: number; medianMs: number; maxMs: number }>;
  machineCores: number;
}

function summarise(runs: readonly Run[]): Summary[] {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const first = of[0]!;
    const kinds = [...new Set(of.flatMap((r) => Object.keys(r.upstream)))];
    const answers = [...new Set(of.flatMap((r) => Object.keys(r.proxyAnswers ?? {})))];
    return {
      scenario,
      shape: first.shape,
      clients: first.clients,
      route: first.route,
      phase: first.phase,
      runs: of.length,
      wallSeconds: median(of.map((r) => r.wallSeconds)),
      clientSecondsMedian: median(of.map((r) => r.clientSecondsMedian)),
      clientSecondsMax: median(of.map((r) => r.clientSecondsMax)),
      ...(first.serverCpuSeconds !== undefined ? { serverCpuSeconds: median(of.map((r) => r.serverCpuSeconds!)) } : {}),
      upstream: Object.fromEntries(kinds.map((kind) => [kind, spread(of.map((r) => r.upstream[kind] ?? 0))])),
      ...(answers.length > 0
        ? {
            proxyAnswers: Object.fromEntries(
              answers.map((key) => {
                const seen = of.map((r) => r.proxyAnswers?.[key]).filter((a) => a !== undefined);
                return [key, { count: median(seen.map((a) => a.count)), medianMs: median(seen.map((a) => a.medianMs)), maxMs: Math.max(...seen.map((a) => a.maxMs)) }];
              }),
            ),
          }
        : {}),
      machineCores: median(of.map((r) => r.machineCores)),
    };
  });
}

function printReport(bench: Bench, runs: readonly Run[], environment: Record<string, string | number>): void {
  const summaries = summarise(runs);
  const lines: string[] = [];
  lines.push(`${NAME}: skopeo copy of multi-layer images, direct, through nginx as the seed, through pullthrough; cold and warm; medians of ${bench.options.repeat}`);
  lines.push(`${environmentLine(environment)}, skopeo ${environment.skopeo}${bench.options.upstreamRttMs > 0 ? `; the origin ${bench.options.upstreamRttMs} ms away (round trip, perf/lib/delay-line.ts)` : ''}`);
  for (const build of bench.builds) lines.push(`${build.label}: ${sourceLine(build.source)}`);
  for (const shape of bench.options.shapes) lines.push(`${shape}: ${SHAPES[shape]!.describe}, ${formatSize([...bench.images[shape]!.blobs.values()].reduce((a, b) => a + b, 0))} in ${bench.images[shape]!.blobs.size - 1} blobs + the manifest`);
  lines.push('');
  lines.push(
    formatTable(
      ['scenario', 'wall s', 'client s median', 'client s max', 'server CPU-s', 'ping', 'token', 'manifest', 'blob 307', 'CDN GET', 'kept-alive', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.wallSeconds, 3),
        fixed(s.clientSecondsMedian, 3),
        fixed(s.clientSecondsMax, 3),
        fixed(s.serverCpuSeconds, 2),
        s.upstream.ping ?? '0',
        s.upstream.token ?? '0',
        s.upstream.manifest ?? '0',
        s.upstream['blob-redirect'] ?? '0',
        s.upstream.download ?? '0',
        `${s.upstream.reused ?? '0'}/${s.upstream.total ?? '0'}`,
        fixed(s.machineCores, 2),
      ]),
    ),
  );
  lines.push('upstream columns: requests that reached the origin in a run (registry /v2/, token service, manifests, blob 307s, CDN downloads); kept-alive: of them on a reused connection; server CPU: nginx (seed) or the proxy process');
  lines.push('');
  const ratioRows: string[][] = [];
  for (const shape of bench.options.shapes) {
    for (const clients of bench.options.clients) {
      const wall = (route: Route, phase: Phase | 'direct') => summaries.find((s) => s.shape === shape && s.clients === clients && s.route === route && s.phase === phase)?.wallSeconds;
      for (const phase of ['cold', 'warm'] as const) {
        for (const build of bench.builds) {
          const proxy = wall(build.label, phase);
          const seed = wall('seed', phase);
          const direct = wall('direct', 'direct');
          const ratio = proxy !== undefined && seed !== undefined ? proxy / seed : undefined;
          ratioRows.push([`${shape}-${clients} ${phase} ${build.label}`, fixed(proxy, 3), fixed(seed, 3), fixed(direct, 3), fixed(ratio, 2), fixed(proxy !== undefined && direct !== undefined ? proxy / direct : undefined, 2), fixed(seed !== undefined && direct !== undefined ? seed / direct : undefined, 2), ratio === undefined ? '-' : ratio <= 1 ? 'met' : 'MISSED']);
        }
      }
    }
  }
  lines.push(formatTable(['wall time', 'proxy s', 'seed s', 'direct s', 'proxy / seed', 'proxy / direct', 'seed / direct', 'goal proxy ≤ seed'], ratioRows));
  const proxied = summaries.filter((s) => s.proxyAnswers);
  if (proxied.length > 0) {
    lines.push('');
    lines.push('the proxy\'s answers (its access log): count, median ms, max ms per request kind');
    const keys = [...new Set(proxied.flatMap((s) => Object.keys(s.proxyAnswers!)))].sort();
    lines.push(
      formatTable(
        ['scenario', ...keys],
        proxied.map((s) => [s.scenario, ...keys.map((key) => {
          const a = s.proxyAnswers![key];
          return a ? `${a.count}× ${fixed(a.medianMs, 0)}/${fixed(a.maxMs, 0)}` : '-';
        })]),
      ),
    );
  }
  process.stdout.write(lines.join('\n') + '\n');
}

function spread(values: readonly number[]): string {
  const min = Math.min(...values);
  const max = Math.max(...values);
  return min === max ? String(min) : `${min}–${max}`;
}

function makeDir(path: string): string {
  mkdirSync(path, { recursive: true });
  return path;
}

await runBenchmark(main, progress);
