// A rollout: N clients (default 20) pull a tag the proxy has never seen, all at the same moment, and
// the registry's own access log says what reached upstream — manifest GETs by tag, manifest HEADs,
// manifest GETs by digest, GETs of each blob — with the wall time from the release to the last client
// done. Without single flight for manifests every client's manifest request goes upstream (~N GETs);
// with it, one. The benchmark prints what it measures; it asserts nothing about the counts.
//
//   node perf/manifest-rollout.ts [--clients 20] [--repeat 3] [--kinds skopeo,containerd] [--no-direct]
//                                 [--layers 4KiB,64KiB,256KiB,1MiB,4MiB] [--commit REV]
//
// Two kinds of client (--kinds):
// - skopeo (the headline): N real `skopeo copy docker://… dir:…` processes through HTTPS_PROXY with the
//   proxy's CA, released at once by a FIFO start barrier (perf/lib/skopeo.ts). skopeo pings /v2/, GETs
//   the manifest by tag, then GETs the config and the layers.
// - containerd: N concurrent clients in this process doing containerd's sequence (perf/lib/containerd-pull.ts):
//   HEAD the tag with containerd's Accept, GET the manifest by digest, GET each blob, 3 at a time.
// For each kind and repetition: `direct` (the same N clients straight to the registry: the reference
// for the wall time; every request reaches upstream by definition), then `proxy` — a fresh proxy with
// an empty cache, warmed up on another image (leaf minted, code loaded, fill workers started), then the
// N clients on the new tag. Every client must finish with the right digests. The proxy's own answers
// (X-Cache per request, from its access log) are printed next to the registry's counts.
import { mkdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import type { BuiltImage } from '../test/helpers/oci-image.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { PeakRssSampler, readCounters, readMachineBusySeconds, subtractCounters, type Counters } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { countUpstream, pushSmallImage, startUpstreamRegistry, upstreamPolicy, type Upstream, type UpstreamCounts } from './lib/registry.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { describeAnswers, pullAtOnce, readProxyAnswers, spreadMs, type ClientKind, type ProxyAnswers } from './lib/rollout.ts';
import { skopeoVersion } from './lib/skopeo.ts';
import { buildCommit, describeSource, sourceLine, type SourceState } from './lib/source.ts';

const NAME = 'manifest-rollout';
const REPOSITORY = 'bench/rollout';
const TAG = 'v2';
const WARM_UP_REPOSITORY = 'bench/rollout-warm-up';
const WARM_UP_TAG = 'w1';
const progress = progressTo(NAME);

type Kind = ClientKind;
type Via = 'direct' | 'proxy';

interface Options {
  clients: number;
  repeat: number;
  kinds: Kind[];
  direct: boolean;
  layerSizes: number[];
  commit?: string;
}

interface Run {
  scenario: string;
  kind: Kind;
  via: Via;
  repetition: number;
  clients: number;
  /** From the release to the last client done. */
  wallSeconds: number;
  clientSecondsMedian: number;
  clientSecondsMax: number;
  upstream: UpstreamCounts;
  /** Through the proxy: its answers by request type and X-Cache, e.g. { 'GET manifest': { MISS: 1, JOINED: 19 } }. */
  proxyAnswers?: Record<string, Record<string, number>>;
  /** Through the proxy: first to last arrival of the clients' requests for the tag, ms (how "at once" they were). */
  tagArrivalSpreadMs?: number;
  proxyCpuSeconds?: number;
  proxyPeakRssMiB?: number;
  machineCores: number;
}

function parseOptions(argv: string[]): Options {
  const usage =
    `usage: node perf/${NAME}.ts [--clients 20] [--repeat 3] [--kinds skopeo,containerd] [--no-direct]\n` +
    '                             [--layers 4KiB,64KiB,256KiB,1MiB,4MiB] [--commit REV]\n';
  const { values } = parseArgs({
    args: argv,
    options: {
      clients: { type: 'string', default: '20' },
      repeat: { type: 'string', default: '3' },
      kinds: { type: 'string', default: 'skopeo,containerd' },
      'no-direct': { type: 'boolean', default: false },
      layers: { type: 'string', default: '4KiB,64KiB,256KiB,1MiB,4MiB' },
      commit: { type: 'string' },
      // Passed by `npm run perf -- --size …` to every benchmark; the image's layers are --layers here.
      size: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const clients = Number(values.clients);
  const repeat = Number(values.repeat);
  const kinds = values.kinds.split(',') as Kind[];
  const layerSizes = values.layers.split(',').map(parseSize);
  if (!Number.isInteger(clients) || clients < 1 || clients > 100) throw new Error(`--clients ${values.clients}: one count, 1–100`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: must be a positive integer`);
  if (kinds.length === 0 || kinds.some((k) => k !== 'skopeo' && k !== 'containerd')) throw new Error(`--kinds ${values.kinds}: skopeo and/or containerd`);
  if (layerSizes.some((s) => s < 1 || s > 256 * 1024 * 1024)) throw new Error(`--layers ${values.layers}: sizes of 1 B–256 MiB`);
  return { clients, repeat, kinds, direct: !values['no-direct'], layerSizes, ...(values.commit ? { commit: values.commit } : {}) };
}

interface Bench {
  options: Options;
  dir: string;
  upstream: Upstream;
  image: BuiltImage;
  warmUpImage: BuiltImage;
  /** Config first, then the layers: the order of the per-blob counts. */
  blobOrder: string[];
  cli?: string;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const dir = makeTempDir(NAME);
  const built = options.commit ? buildCommit(options.commit, join(dir, 'build')) : undefined;
  const source: SourceState = built?.source ?? describeSource();
  const upstream = await startUpstreamRegistry(dir);
  try {
    progress(`registry on ${upstream.registry.address}; building and pushing ${REPOSITORY}:${TAG} (layers ${options.layerSizes.map(formatSize).join(', ')}) and ${WARM_UP_REPOSITORY}:${WARM_UP_TAG}`);
    const image = await pushSmallImage(upstream, dir, {
      repository: REPOSITORY,
      tag: TAG,
      layers: options.layerSizes.map((size) => ({ randomBytes: size })),
    });
    const warmUpImage = await pushSmallImage(upstream, dir, {
      repository: WARM_UP_REPOSITORY,
      tag: WARM_UP_TAG,
      layers: [{ randomBytes: 64 * 1024 }, { randomBytes: 256 * 1024 }],
    });
    const bench: Bench = {
      options,
      dir,
      upstream,
      image,
      warmUpImage,
      blobOrder: [image.configDigest, ...image.layerDigests],
      ...(built ? { cli: built.cli } : {}),
    };
    const runs: Run[] = [];
    for (let repetition = 1; repetition <= options.repeat; repetition++) {
      for (const kind of options.kinds) {
        for (const via of options.direct ? (['direct', 'proxy'] as const) : (['proxy'] as const)) {
          const run = await runScenario(bench, kind, via, repetition);
          runs.push(run);
          const u = run.upstream;
          progress(
            `${run.scenario} #${repetition}: ${fixed(run.wallSeconds, 2)} s; upstream: manifest GET by tag ${u.manifestGetsByTag}, HEAD ${u.manifestHeadsByTag + u.manifestHeadsByDigest}, ` +
              `GET by digest ${u.manifestGetsByDigest}, blob GETs ${blobCounts(bench, u)}` +
              (run.proxyAnswers ? `; proxy answered ${describeAnswers(run.proxyAnswers)}` : ''),
          );
        }
      }
    }
    const environment = { ...describeEnvironment('nginx not used'), registry: upstream.version, skopeo: skopeoVersion() };
    printReport(bench, runs, environment, source);
    const result = {
      benchmark: NAME,
      date: new Date().toISOString(),
      environment,
      source,
      options,
      image: { manifestDigest: image.manifestDigest, manifestBytes: image.manifestSize, blobs: bench.blobOrder, layerSizes: options.layerSizes },
      summaries: summarise(runs),
      totalSeconds: (performance.now() - started) / 1000,
      runs,
    };
    process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
  } finally {
    await upstream.registry.stop();
  }
}

async function runScenario(bench: Bench, kind: Kind, via: Via, repetition: number): Promise<Run> {
  const { upstream, options } = bench;
  const scenario = `${kind}-${via}`;
  const workDir = join(bench.dir, `${scenario}-${repetition}`);
  let proxy: ProxyProcess | undefined;
  try {
    if (via === 'proxy') {
      proxy = await startProxyProcess({ dir: makeDir(join(workDir, 'proxy')), policy: upstreamPolicy(upstream), ...(bench.cli ? { cli: bench.cli } : {}) });
      // Not measured: the leaf for the registry is minted, the code paths are compiled, the fill workers start.
      await pull(bench, kind, proxy, WARM_UP_REPOSITORY, WARM_UP_TAG, bench.warmUpImage, 1, join(workDir, 'warm-up'));
    }
    await upstream.registry.settle();
    upstream.registry.resetCounts();
    const logMark = proxy ? statSync(proxy.stdoutFile).size : 0;
    let rss: PeakRssSampler | undefined;
    let proxyBefore: Counters | undefined;
    let machineBefore = 0;
    // At the release of the clients (skopeo: after spawning them and waiting for all at the barrier).
    const atStart = () => {
      rss = proxy ? new PeakRssSampler(proxy.pid) : undefined;
      proxyBefore = proxy ? readCounters(proxy.pid) : undefined;
      machineBefore = readMachineBusySeconds();
    };

    const result = await pull(bench, kind, proxy, REPOSITORY, TAG, bench.image, options.clients, join(workDir, 'clients'), atStart);

    const machineSeconds = readMachineBusySeconds() - machineBefore;
    const proxyCpuSeconds = proxy && proxyBefore ? subtractCounters(readCounters(proxy.pid), proxyBefore).cpuSeconds : undefined;
    const peakRssKiB = rss?.stop();
    await upstream.registry.settle();
    const counts = countUpstream(upstream.registry.requests(), bench.blobOrder);
    return {
      scenario,
      kind,
      via,
      repetition,
      clients: options.clients,
      wallSeconds: result.wallSeconds,
      clientSecondsMedian: median(result.clientSeconds),
      clientSecondsMax: Math.max(...result.clientSeconds),
      upstream: counts,
      ...(proxy ? { ...proxyLogFigures(proxy.stdoutFile, logMark), proxyCpuSeconds, proxyPeakRssMiB: peakRssKiB! / 1024 } : {}),
      machineCores: machineSeconds / result.wallSeconds,
    };
  } finally {
    await proxy?.stop();
    rmSync(workDir, { recursive: true, force: true });
  }
}

/** N clients of `kind` pull repository:tag at once (through `proxy` when given); every one must get `image`. */
function pull(
  bench: Bench,
  kind: Kind,
  proxy: ProxyProcess | undefined,
  repository: string,
  tag: string,
  image: BuiltImage,
  count: number,
  dir: string,
  atStart: () => void = () => {},
): Promise<{ wallSeconds: number; clientSeconds: number[] }> {
  return pullAtOnce({ kind, upstream: bench.upstream, repository, tag, image, count, dir, atStart, ...(proxy ? { proxyFor: () => proxy } : {}) });
}

function proxyLogFigures(file: string, mark: number): { proxyAnswers: ProxyAnswers; tagArrivalSpreadMs: number } {
  const { answers, tagArrivalsMs } = readProxyAnswers(file, mark, TAG);
  return { proxyAnswers: answers, tagArrivalSpreadMs: spreadMs(tagArrivalsMs) };
}

/** GETs of each blob, config first: "1/1/1/1/1/1". */
function blobCounts(bench: Bench, counts: UpstreamCounts): string {
  return bench.blobOrder.map((digest) => String(counts.blobGets[digest] ?? 0)).join('/');
}

function makeDir(path: string): string {
  mkdirSync(path, { recursive: true });
  return path;
}

/** A count over the repetitions: "20", or "18–20" when they differ. */
function spread(values: readonly number[]): string {
  const min = Math.min(...values);
  const max = Math.max(...values);
  return min === max ? String(min) : `${min}–${max}`;
}

interface Summary {
  scenario: string;
  runs: number;
  wallSeconds: number;
  clientSecondsMedian: number;
  clientSecondsMax: number;
  manifestGetsByTag: string;
  manifestHeads: string;
  manifestGetsByDigest: string;
  blobGets: string;
  pings: string;
  upstreamTotal: string;
  proxyCpuSeconds?: number;
  proxyPeakRssMiB?: number;
  tagArrivalSpreadMs?: number;
  machineCores: number;
}

function summarise(runs: readonly Run[]): Summary[] {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  return scenarios.map((scenario) => {
    const of = runs.filter((r) => r.scenario === scenario);
    const m = (pick: (r: Run) => number) => median(of.map(pick));
    const blobOrder = Object.keys(of[0]!.upstream.blobGets);
    return {
      scenario,
      runs: of.length,
      wallSeconds: m((r) => r.wallSeconds),
      clientSecondsMedian: m((r) => r.clientSecondsMedian),
      clientSecondsMax: m((r) => r.clientSecondsMax),
      manifestGetsByTag: spread(of.map((r) => r.upstream.manifestGetsByTag)),
      manifestHeads: spread(of.map((r) => r.upstream.manifestHeadsByTag + r.upstream.manifestHeadsByDigest)),
      manifestGetsByDigest: spread(of.map((r) => r.upstream.manifestGetsByDigest)),
      blobGets: blobOrder.map((digest) => spread(of.map((r) => r.upstream.blobGets[digest] ?? 0))).join('/'),
      pings: spread(of.map((r) => r.upstream.pings)),
      upstreamTotal: spread(of.map((r) => r.upstream.total)),
      ...(of[0]!.proxyCpuSeconds !== undefined
        ? { proxyCpuSeconds: m((r) => r.proxyCpuSeconds!), proxyPeakRssMiB: m((r) => r.proxyPeakRssMiB!), tagArrivalSpreadMs: m((r) => r.tagArrivalSpreadMs!) }
        : {}),
      machineCores: m((r) => r.machineCores),
    };
  });
}

function printReport(bench: Bench, runs: readonly Run[], environment: Record<string, string | number>, source: SourceState): void {
  const { options, image } = bench;
  const summaries = summarise(runs);
  const proxyRuns = runs.filter((r) => r.proxyAnswers);
  const out = [
    '',
    `${NAME}: ${options.clients} clients pull ${REPOSITORY}:${TAG} at once (a ${image.manifestSize}-byte OCI manifest, config + ${image.layerDigests.length} layers of ` +
      `${options.layerSizes.map(formatSize).join(', ')}); every proxy run on a fresh proxy with an empty cache; ${options.repeat} repetitions, times are medians`,
    `${environmentLine(environment)}, ${environment.registry}, skopeo ${environment.skopeo}`,
    sourceLine(source),
    '',
    "what reached the registry (its access log), per run; a range when the repetitions differ",
    formatTable(
      ['scenario', 'wall s', 'client s median', 'client s max', 'manifest GET by tag', 'manifest HEAD', 'manifest GET by digest', 'blob GETs per blob', 'GET /v2/', 'upstream requests', 'proxy CPU-s', 'proxy peak RSS MiB', 'machine cores busy'],
      summaries.map((s) => [
        s.scenario,
        fixed(s.wallSeconds, 2),
        fixed(s.clientSecondsMedian, 2),
        fixed(s.clientSecondsMax, 2),
        s.manifestGetsByTag,
        s.manifestHeads,
        s.manifestGetsByDigest,
        s.blobGets,
        s.pings,
        s.upstreamTotal,
        fixed(s.proxyCpuSeconds, 2),
        fixed(s.proxyPeakRssMiB, 0),
        fixed(s.machineCores, 2),
      ]),
    ),
    `blob GETs per blob: config, then the layers in the order above (${bench.blobOrder.map((d) => d.slice(7, 15)).join(', ')}); ` +
      'wall s: from the release of the clients to the last one done (skopeo: process start-up included)',
    '',
    'what the proxy answered (its access log: request type, X-Cache × count), per run',
    ...proxyRuns.map((r) => `  ${r.scenario} #${r.repetition}: ${describeAnswers(r.proxyAnswers!)}; the ${r.clients} requests for the tag arrived within ${fixed(r.tagArrivalSpreadMs, 0)} ms`),
    '',
  ];
  process.stdout.write(out.join('\n') + '\n');
}

await runBenchmark(main, progress);
