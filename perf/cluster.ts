// Cluster mode on this machine: clusters of 1, 2 and 3 replicas (each its own process, peers on
// 127.0.0.21… over TLS, one shared CA; perf/lib/cluster.ts), in front of nginx as the blob origin and a
// real registry for the rollout. For each cluster size, three parts (--parts):
//
// - hit: a cached blob (--size, default 512 MiB) downloaded by 1 and 4 curl clients (--clients) through
//   its owner (a local HIT) and through a replica that is not its owner (the owner's bytes relayed over
//   the peer port); interleaved, --repeat times. CPU seconds per GiB delivered of every replica process
//   together (from /proc), and of the owner and the receiving replica apart; throughput. The cluster of
//   1 is the local-HIT baseline.
// - cold: one client downloads a blob no replica has (a fresh digest per run: 1 MiB and 64 MiB,
//   --cold-sizes), through its owner and through a non-owner, interleaved, --cold-repeat times: time to
//   first byte and total time (curl's), medians. The owner fills; the non-owner relays the fill as it
//   grows.
// - rollout: --rollout-clients (30) clients spread round-robin over the replicas pull one new image
//   (config + --layers) from the registry at once, for each client kind (--kinds: containerd's sequence
//   in this process; skopeo processes): what reached the registry by its own access log (manifest GETs
//   by tag and by digest, HEADs, GETs per blob) — one per object is the design, whatever the cluster
//   size —, and what the replicas answered (HIT, MISS, JOINED, "relayed" from the owner, "for a peer").
//
// It prints figures; it asserts only what makes them meaningful (every download whole, X-Cache HIT on
// hits and MISS on cold runs through either route).
//
//   node perf/cluster.ts [--replicas 1,2,3] [--parts hit,cold,rollout] [--size 512MiB] [--clients 1,4]
//                        [--repeat 3] [--cold-sizes 1MiB,64MiB] [--cold-repeat 5] [--rollout-clients 30]
//                        [--layers …] [--kinds containerd,skopeo] [--commit REV | --cli PATH] [--profile DIR]
import { rmSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { blobKey, manifestKey } from '../src/cluster/rendezvous.ts';
import type { BuiltImage } from '../test/helpers/oci-image.ts';
import { createRandomBlob, type Blob } from './lib/blob.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { accessLogMark, peersOf, startCluster, type Cluster, type ClusterWarning, type Replica } from './lib/cluster.ts';
import { runClients, waitForCacheHit } from './lib/curl.ts';
import { describeEnvironment, environmentLine, GIB, MIB, progressTo, type ProxyFigures } from './lib/measure.ts';
import { originPolicyEntries, proxiedBlobRoute, startOrigin, type Origin } from './lib/origin.ts';
import { readCounters } from './lib/procfs.ts';
import type { ProxyProcess } from './lib/proxy.ts';
import { countUpstream, pushSmallImage, startUpstreamRegistry, upstreamPolicyEntries, type Upstream, type UpstreamCounts } from './lib/registry.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { addAnswers, describeAnswers, pullAtOnce, readProxyAnswers, spreadMs, type ClientKind, type ProxyAnswers } from './lib/rollout.ts';
import { measureClients, type ClientsRun } from './lib/run-clients.ts';
import { skopeoVersion } from './lib/skopeo.ts';
import { buildCommit, describeCli, describeSource, sourceLine, type SourceState } from './lib/source.ts';

const NAME = 'cluster';
const HIT_REPOSITORY = 'bench/cluster-hit';
const COLD_REPOSITORY = 'bench/cluster-cold';
const WARM_UP_REPOSITORY = 'bench/cluster-warm-up';
const ROLLOUT_TAG = 'v1';
const WARM_UP_TAG = 'w1';
/** Each replica fills two blobs of its own before anything is measured (both pool workers load their code). */
const WARM_UP_BLOBS_PER_REPLICA = 2;
const WARM_UP_BLOB_BYTES = 4 * MIB;
/** The hit part's warm-up: this much of the blob (a range; all of it when smaller) by each route. */
const HIT_WARM_UP_BYTES = 64 * MIB;
/** How long each cluster is watched doing nothing, before its runs: its replicas' background CPU. */
const IDLE_WATCH_MS = 2_000;
const progress = progressTo(NAME);

type Part = 'hit' | 'cold' | 'rollout';
type Via = 'owner' | 'relay';

interface Options {
  replicas: number[];
  parts: Part[];
  size: number;
  clients: number[];
  repeat: number;
  coldSizes: number[];
  coldRepeat: number;
  rolloutClients: number;
  layerSizes: number[];
  kinds: ClientKind[];
  commit?: string;
  cli?: string;
  profileDir?: string;
}

function parseOptions(argv: string[]): Options {
  const usage =
    `usage: node perf/${NAME}.ts [--replicas 1,2,3] [--parts hit,cold,rollout] [--size 512MiB] [--clients 1,4] [--repeat 3]\n` +
    '                        [--cold-sizes 1MiB,64MiB] [--cold-repeat 5] [--rollout-clients 30] [--layers 64KiB,256KiB,1MiB,4MiB,16MiB]\n' +
    '                        [--kinds containerd,skopeo] [--commit REV | --cli PATH] [--profile DIR]\n' +
    'a quick look (~1 min): --size 256MiB --repeat 1 --cold-repeat 3 --kinds containerd\n';
  const { values } = parseArgs({
    args: argv,
    options: {
      replicas: { type: 'string', default: '1,2,3' },
      parts: { type: 'string', default: 'hit,cold,rollout' },
      size: { type: 'string', default: '512MiB' },
      clients: { type: 'string', default: '1,4' },
      repeat: { type: 'string', default: '3' },
      'cold-sizes': { type: 'string', default: '1MiB,64MiB' },
      'cold-repeat': { type: 'string', default: '5' },
      'rollout-clients': { type: 'string', default: '30' },
      layers: { type: 'string', default: '64KiB,256KiB,1MiB,4MiB,16MiB' },
      kinds: { type: 'string', default: 'containerd,skopeo' },
      commit: { type: 'string' },
      cli: { type: 'string' },
      profile: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const counts = (text: string, name: string, max: number) => {
    const list = text.split(',').map(Number);
    if (list.length === 0 || list.some((n) => !Number.isInteger(n) || n < 1 || n > max)) throw new Error(`--${name} ${text}: counts of 1–${max}`);
    return list;
  };
  const parts = values.parts.split(',') as Part[];
  if (parts.some((p) => !['hit', 'cold', 'rollout'].includes(p))) throw new Error(`--parts ${values.parts}: hit, cold and/or rollout`);
  const kinds = values.kinds.split(',') as ClientKind[];
  if (kinds.some((k) => k !== 'skopeo' && k !== 'containerd')) throw new Error(`--kinds ${values.kinds}: containerd and/or skopeo`);
  if (values.commit && values.cli) throw new Error('--commit and --cli: one or the other');
  const size = parseSize(values.size);
  const coldSizes = values['cold-sizes'].split(',').map(parseSize);
  const layerSizes = values.layers.split(',').map(parseSize);
  if (size < 1) throw new Error(`--size ${values.size}: at least 1 byte`);
  if (coldSizes.some((s) => s < 1) || layerSizes.some((s) => s < 1 || s > 256 * MIB)) throw new Error('--cold-sizes, --layers: sizes of 1 B–256 MiB');
  return {
    replicas: counts(values.replicas, 'replicas', 8),
    parts,
    size,
    clients: counts(values.clients, 'clients', 32),
    repeat: counts(values.repeat, 'repeat', 100)[0]!,
    coldSizes,
    coldRepeat: counts(values['cold-repeat'], 'cold-repeat', 100)[0]!,
    rolloutClients: counts(values['rollout-clients'], 'rollout-clients', 100)[0]!,
    layerSizes,
    kinds,
    ...(values.commit ? { commit: values.commit } : {}),
    ...(values.cli ? { cli: values.cli } : {}),
    ...(values.profile ? { profileDir: resolve(values.profile) } : {}),
  };
}

interface Bench {
  options: Options;
  dir: string;
  origin: Origin;
  upstream?: Upstream;
  images: Map<ClientKind, BuiltImage>;
  warmUpImage?: BuiltImage;
  cli?: string;
}

/**
 * CPU of a download: every replica together, the owner, the receiving replica (undefined when it is the
 * owner); per GiB, and in seconds (of the run, or per run in a summary).
 */
interface CpuFigures {
  cpuSecondsPerGiB: number;
  ownerCpuSecondsPerGiB: number;
  ownerMainThreadCpuSecondsPerGiB: number;
  receiverCpuSecondsPerGiB?: number;
  receiverMainThreadCpuSecondsPerGiB?: number;
  cpuSeconds: number;
  ownerCpuSeconds: number;
  receiverCpuSeconds?: number;
}

/** One measured download (hit or cold), with the replicas' figures. */
interface BlobRun extends CpuFigures {
  replicas: number;
  via: Via;
  clients: number;
  size: number;
  repetition: number;
  /** The owner's index, and the receiving replica's (the owner's own for `owner`). */
  owner: number;
  receiver: number;
  wallSeconds: number;
  mibPerSecond: number;
  firstByteMs: number;
  totalMs: number;
  cache: string[];
  originGets: number;
  machineCores: number;
  replicaFigures: ProxyFigures[];
}

interface RolloutRun {
  replicas: number;
  kind: ClientKind;
  clients: number;
  wallSeconds: number;
  clientSecondsMedian: number;
  clientSecondsMax: number;
  upstream: UpstreamCounts;
  blobOrder: string[];
  /** Which replica owns the manifests of the repository, and each blob (config first). */
  manifestOwner: number;
  blobOwners: number[];
  answers: ProxyAnswers;
  tagArrivalSpreadMs: number;
  replicasCpuSeconds: number;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const dir = makeTempDir(NAME);
  const built = options.commit ? buildCommit(options.commit, join(dir, 'build')) : undefined;
  const cli = built?.cli ?? options.cli;
  const source: SourceState = built?.source ?? (options.cli ? describeCli(options.cli) : describeSource());
  const origin = await startOrigin({ dir, blobs: options.parts.includes('hit') ? [{ repository: HIT_REPOSITORY, size: options.size }] : [], accessLog: true, progress });
  let upstream: Upstream | undefined;
  try {
    const bench: Bench = { options, dir, origin, images: new Map(), ...(cli ? { cli } : {}) };
    if (options.parts.includes('rollout')) {
      upstream = await startUpstreamRegistry(dir);
      bench.upstream = upstream;
      progress(`registry on ${upstream.registry.address}; pushing an image per client kind (layers ${options.layerSizes.map(formatSize).join(', ')})`);
      for (const kind of options.kinds) {
        bench.images.set(kind, await pushSmallImage(upstream, dir, { repository: `bench/cluster-rollout-${kind}`, tag: ROLLOUT_TAG, layers: options.layerSizes.map((size) => ({ randomBytes: size })) }));
      }
      bench.warmUpImage = await pushSmallImage(upstream, dir, { repository: WARM_UP_REPOSITORY, tag: WARM_UP_TAG, layers: [{ randomBytes: 64 * 1024 }, { randomBytes: 256 * 1024 }] });
    }
    const hits: BlobRun[] = [];
    const colds: BlobRun[] = [];
    const rollouts: RolloutRun[] = [];
    const warnings: Array<ClusterWarning & { replicas: number }> = [];
    const idle: IdleFigures[] = [];
    for (const n of options.replicas) {
      const cluster = await startCluster({
        dir: join(dir, `cluster-${n}`),
        replicas: n,
        upstreams: [originPolicyEntries(origin), ...(upstream ? [upstreamPolicyEntries(upstream)] : [])],
        ...(options.profileDir ? { nodeArgs: (i: number) => ['--cpu-prof', `--cpu-prof-dir=${join(options.profileDir!, `replicas-${n}`, `replica-${i}`)}`] } : {}),
        ...(cli ? { cli } : {}),
      });
      try {
        progress(`cluster of ${n}: ${cluster.replicas.map((r) => `replica ${r.index} (id ${r.id.slice(0, 8)}) pid ${r.proxy.pid} on ${r.proxy.url}, peer port ${r.address}`).join('; ')}`);
        await warmUp(bench, cluster);
        idle.push(await watchIdle(cluster));
        progress(`cluster of ${n}, idle: ${idle.at(-1)!.cores.map((c) => fixed(c, 2)).join(', ')} cores per replica`);
        if (options.parts.includes('hit')) hits.push(...(await hitPart(bench, cluster)));
        if (options.parts.includes('cold')) colds.push(...(await coldPart(bench, cluster)));
        if (options.parts.includes('rollout')) for (const kind of options.kinds) rollouts.push(await rolloutRun(bench, cluster, kind));
      } finally {
        warnings.push(...cluster.warnings().map((w) => ({ replicas: n, ...w })));
        await cluster.stop();
        rmSync(join(dir, `cluster-${n}`), { recursive: true, force: true });
      }
    }
    const environment = {
      ...describeEnvironment(origin.nginx.version),
      ...(upstream ? { registry: upstream.version } : {}),
      ...(options.kinds.includes('skopeo') && upstream ? { skopeo: skopeoVersion() } : {}),
    };
    printReport(bench, environment, source, hits, colds, rollouts, warnings, idle);
    const result = {
      benchmark: NAME,
      date: new Date().toISOString(),
      environment,
      source,
      options,
      summaries: { hit: summariseBlobRuns(hits), cold: summariseBlobRuns(colds), rollout: rollouts.map(rolloutSummary) },
      warnings,
      idle,
      totalSeconds: (performance.now() - started) / 1000,
      runs: { hit: hits.map(trimmedForJson), cold: colds.map(trimmedForJson), rollout: rollouts },
    };
    process.stdout.write(JSON.stringify(roundNumbers(result)) + '\n');
  } finally {
    await upstream?.registry.stop();
    await origin.nginx.stop();
  }
}

/**
 * Before anything is measured: every replica fills blobs it owns (its leaf for the origin minted, its
 * pool workers loaded and connected) and every other replica relays them (its peer connections to the
 * owner opened, the relay path compiled); with the rollout, one client per replica pulls another image.
 */
async function warmUp(bench: Bench, cluster: Cluster): Promise<void> {
  const { origin } = bench;
  const owned = new Map<Replica, Blob[]>(cluster.replicas.map((r) => [r, []]));
  const made: Blob[] = [];
  for (let attempt = 0; [...owned.values()].some((blobs) => blobs.length < WARM_UP_BLOBS_PER_REPLICA); attempt++) {
    if (attempt > 50 * cluster.replicas.length) throw new Error('no warm-up blobs owned by every replica after many attempts');
    const blob = await createRandomBlob(join(origin.dir, 'www'), WARM_UP_REPOSITORY, WARM_UP_BLOB_BYTES);
    made.push(blob);
    const blobs = owned.get(cluster.rank(blobKey(blob.digest))[0]!)!;
    if (blobs.length < WARM_UP_BLOBS_PER_REPLICA) blobs.push(blob);
  }
  for (const [owner, blobs] of owned) {
    await Promise.all(blobs.map((blob) => runClients(1, proxiedBlobRoute(origin, blob, owner.proxy), { expectBytes: blob.size, expectCache: ['MISS'] })));
    for (const blob of blobs) await waitForCacheHit(proxiedBlobRoute(origin, blob, owner.proxy));
    for (const other of cluster.replicas.filter((r) => r !== owner)) {
      for (const blob of blobs) await runClients(1, proxiedBlobRoute(origin, blob, other.proxy), { expectBytes: blob.size, expectCache: ['HIT'] });
    }
  }
  for (const blob of made) rmSync(blob.file);
  if (bench.upstream && bench.warmUpImage) {
    await pullAtOnce({
      kind: 'containerd',
      upstream: bench.upstream,
      repository: WARM_UP_REPOSITORY,
      tag: WARM_UP_TAG,
      image: bench.warmUpImage,
      count: cluster.replicas.length,
      dir: join(bench.dir, 'warm-up-pull'),
      proxyFor: (i) => cluster.replicas[i]!.proxy,
    });
  }
}

interface IdleFigures {
  replicas: number;
  /** CPU seconds per second of each replica while no client is served. */
  cores: number[];
}

/** What the replicas spend when nobody asks them anything (membership refreshes, timers): should be ~0. */
async function watchIdle(cluster: Cluster): Promise<IdleFigures> {
  const cpu = () => cluster.replicas.map((r) => readCounters(r.proxy.pid).cpuSeconds);
  const before = cpu();
  await sleep(IDLE_WATCH_MS);
  return { replicas: cluster.replicas.length, cores: cpu().map((after, i) => (after - before[i]!) / (IDLE_WATCH_MS / 1000)) };
}

/** The hit blob filled at its owner, then local and relayed hits interleaved, 1 and 4 clients. */
async function hitPart(bench: Bench, cluster: Cluster): Promise<BlobRun[]> {
  const { origin, options } = bench;
  const n = cluster.replicas.length;
  const blob = origin.blobs[0]!;
  const [owner, receiver] = cluster.rank(blobKey(blob.digest));
  const routes: Array<{ via: Via; through: Replica }> = [{ via: 'owner', through: owner! }, ...(receiver ? [{ via: 'relay' as const, through: receiver }] : [])];
  await runClients(1, proxiedBlobRoute(origin, blob, owner!.proxy), { expectBytes: blob.size, expectCache: ['MISS'] });
  for (const { through } of routes) await waitForCacheHit(proxiedBlobRoute(origin, blob, through.proxy));
  const warmBytes = Math.min(HIT_WARM_UP_BYTES, blob.size);
  for (const { through } of routes) await runClients(1, proxiedBlobRoute(origin, blob, through.proxy), { expectBytes: warmBytes, range: `0-${warmBytes - 1}`, expectCache: ['HIT'] });
  progress(`cluster of ${n}: ${formatSize(blob.size)} cached at its owner, replica ${owner!.index}${receiver ? `; relayed through replica ${receiver.index}` : ''}`);
  const runs: BlobRun[] = [];
  for (let repetition = 1; repetition <= options.repeat; repetition++) {
    for (const clients of options.clients) {
      for (const { via, through } of routes) {
        const run = await measureBlob(bench, cluster, blob, via, through, owner!, clients, ['HIT'], repetition);
        runs.push(run);
        progress(
          `cluster of ${n}, hit ${via}-${clients} #${repetition}: ${fixed(run.mibPerSecond, 0)} MiB/s, ${fixed(run.cpuSecondsPerGiB, 2)} CPU-s/GiB all replicas ` +
            `(owner ${fixed(run.ownerCpuSecondsPerGiB, 2)}${run.receiverCpuSecondsPerGiB !== undefined ? `, receiver ${fixed(run.receiverCpuSecondsPerGiB, 2)}` : ''})`,
        );
      }
    }
  }
  return runs;
}

/** For each size, a fresh blob per run: one client through the owner, one through a non-owner, interleaved. */
async function coldPart(bench: Bench, cluster: Cluster): Promise<BlobRun[]> {
  const { origin, options } = bench;
  const n = cluster.replicas.length;
  const vias: Via[] = n > 1 ? ['owner', 'relay'] : ['owner'];
  const runs: BlobRun[] = [];
  for (const size of options.coldSizes) {
    // Written before the runs (not while measuring), into the page cache nginx reads from.
    const blobs: Blob[] = [];
    for (let i = 0; i < options.coldRepeat * vias.length; i++) blobs.push(await createRandomBlob(join(origin.dir, 'www'), COLD_REPOSITORY, size));
    for (let repetition = 1; repetition <= options.coldRepeat; repetition++) {
      for (const via of vias) {
        const blob = blobs.shift()!;
        const [owner, second] = cluster.rank(blobKey(blob.digest));
        const through = via === 'owner' ? owner! : second!;
        const run = await measureBlob(bench, cluster, blob, via, through, owner!, 1, ['MISS'], repetition);
        // The fill commits after its client got the last byte: not into the next run.
        await waitForCacheHit(proxiedBlobRoute(origin, blob, through.proxy));
        rmSync(blob.file);
        runs.push(run);
        progress(`cluster of ${n}, cold ${formatSize(size)} ${via} #${repetition}: TTFB ${fixed(run.firstByteMs, 1)} ms, total ${fixed(run.totalMs, 1)} ms, ${run.originGets} GET at the origin`);
      }
    }
  }
  return runs;
}

async function measureBlob(bench: Bench, cluster: Cluster, blob: Blob, via: Via, through: Replica, owner: Replica, clients: number, expectCache: string[], repetition: number): Promise<BlobRun> {
  const processes: ProxyProcess[] = cluster.replicas.map((r) => r.proxy);
  const mark = accessLogMark(through);
  const run: ClientsRun = await measureClients({ origin: bench.origin, blob, route: proxiedBlobRoute(bench.origin, blob, through.proxy), clients, replicas: processes, expectCache });
  // The owner as the replicas saw it, not only as computed here: a relayed answer names its peer.
  const expected = via === 'owner' ? '' : owner.address;
  const peers = await peersOf(through, mark, blob.urlPath, clients);
  if (peers.length !== clients || peers.some((peer) => peer !== expected)) {
    throw new Error(`${via} run through replica ${through.index}: its access log says ${JSON.stringify(peers)} served the ${clients} GETs, expected ${expected ? `the owner at ${expected}` : 'itself'} (the benchmark's idea of the owner is not the replicas')`);
  }
  const figures = run.replicas!;
  const cpuSeconds = figures.reduce((sum, f) => sum + f.cpuSeconds, 0);
  const ownerFigures = figures[owner.index]!;
  const receiverFigures = through === owner ? undefined : figures[through.index]!;
  return {
    replicas: cluster.replicas.length,
    via,
    clients,
    size: blob.size,
    repetition,
    owner: owner.index,
    receiver: through.index,
    wallSeconds: run.wallSeconds,
    mibPerSecond: run.mibPerSecond,
    firstByteMs: run.medianFirstByteMs,
    totalMs: median(run.totalMs),
    cache: run.cache,
    originGets: run.originGets ?? Number.NaN,
    machineCores: run.machineCores,
    cpuSeconds,
    ownerCpuSeconds: ownerFigures.cpuSeconds,
    ...(receiverFigures ? { receiverCpuSeconds: receiverFigures.cpuSeconds } : {}),
    cpuSecondsPerGiB: cpuSeconds / (run.bytes / GIB),
    ownerCpuSecondsPerGiB: ownerFigures.cpuSecondsPerGiB,
    ownerMainThreadCpuSecondsPerGiB: ownerFigures.mainThreadCpuSecondsPerGiB,
    ...(receiverFigures ? { receiverCpuSecondsPerGiB: receiverFigures.cpuSecondsPerGiB, receiverMainThreadCpuSecondsPerGiB: receiverFigures.mainThreadCpuSecondsPerGiB } : {}),
    replicaFigures: figures,
  };
}

/** The rollout clients of one kind, spread round-robin over the replicas, on an image no replica has. */
async function rolloutRun(bench: Bench, cluster: Cluster, kind: ClientKind): Promise<RolloutRun> {
  const upstream = bench.upstream!;
  const image = bench.images.get(kind)!;
  const repository = `bench/cluster-rollout-${kind}`;
  const blobOrder = [image.configDigest, ...image.layerDigests];
  const n = cluster.replicas.length;
  await upstream.registry.settle();
  upstream.registry.resetCounts();
  const marks = cluster.replicas.map((r) => statSync(r.proxy.stdoutFile).size);
  let cpuBefore = 0;
  const cpuNow = () => cluster.replicas.reduce((sum, r) => sum + readCounters(r.proxy.pid).cpuSeconds, 0);
  const result = await pullAtOnce({
    kind,
    upstream,
    repository,
    tag: ROLLOUT_TAG,
    image,
    count: bench.options.rolloutClients,
    dir: join(bench.dir, `rollout-${n}-${kind}`),
    proxyFor: (i) => cluster.replicas[i % n]!.proxy,
    atStart: () => (cpuBefore = cpuNow()),
  });
  const replicasCpuSeconds = cpuNow() - cpuBefore;
  rmSync(join(bench.dir, `rollout-${n}-${kind}`), { recursive: true, force: true });
  await upstream.registry.settle();
  const counts = countUpstream(upstream.registry.requests(), blobOrder);
  const logs = cluster.replicas.map((r, i) => readProxyAnswers(r.proxy.stdoutFile, marks[i]!, ROLLOUT_TAG));
  const run: RolloutRun = {
    replicas: n,
    kind,
    clients: bench.options.rolloutClients,
    wallSeconds: result.wallSeconds,
    clientSecondsMedian: median(result.clientSeconds),
    clientSecondsMax: Math.max(...result.clientSeconds),
    upstream: counts,
    blobOrder,
    manifestOwner: cluster.rank(manifestKey(upstream.registry.hostPort, repository))[0]!.index,
    blobOwners: blobOrder.map((digest) => cluster.rank(blobKey(digest))[0]!.index),
    answers: addAnswers(logs.map((l) => l.answers)),
    tagArrivalSpreadMs: spreadMs(logs.flatMap((l) => l.tagArrivalsMs)),
    replicasCpuSeconds,
  };
  progress(`cluster of ${n}, rollout ${kind}: ${fixed(run.wallSeconds, 2)} s; upstream ${describeCounts(run)}; the replicas answered ${describeAnswers(run.answers)}`);
  return run;
}

function describeCounts(run: RolloutRun): string {
  const u = run.upstream;
  return `manifest GET by tag ${u.manifestGetsByTag}, HEAD ${u.manifestHeadsByTag + u.manifestHeadsByDigest}, GET by digest ${u.manifestGetsByDigest}, blob GETs ${run.blobOrder.map((d) => u.blobGets[d] ?? 0).join('/')}`;
}

interface BlobSummary extends CpuFigures {
  replicas: number;
  via: Via;
  clients: number;
  size: number;
  runs: number;
  wallSeconds: number;
  mibPerSecond: number;
  firstByteMs: number;
  firstByteMsMin: number;
  firstByteMsMax: number;
  totalMs: number;
  originGets: string;
  machineCores: number;
}

function summariseBlobRuns(runs: readonly BlobRun[]): BlobSummary[] {
  const keys = [...new Set(runs.map((r) => `${r.replicas} ${r.size} ${r.clients} ${r.via}`))];
  return keys.map((key) => {
    const of = runs.filter((r) => `${r.replicas} ${r.size} ${r.clients} ${r.via}` === key);
    const m = (pick: (r: BlobRun) => number) => median(of.map(pick));
    const first = of[0]!;
    const gets = of.map((r) => r.originGets);
    return {
      replicas: first.replicas,
      via: first.via,
      clients: first.clients,
      size: first.size,
      runs: of.length,
      wallSeconds: m((r) => r.wallSeconds),
      mibPerSecond: m((r) => r.mibPerSecond),
      firstByteMs: m((r) => r.firstByteMs),
      firstByteMsMin: Math.min(...of.map((r) => r.firstByteMs)),
      firstByteMsMax: Math.max(...of.map((r) => r.firstByteMs)),
      totalMs: m((r) => r.totalMs),
      cpuSecondsPerGiB: m((r) => r.cpuSecondsPerGiB),
      ownerCpuSecondsPerGiB: m((r) => r.ownerCpuSecondsPerGiB),
      ownerMainThreadCpuSecondsPerGiB: m((r) => r.ownerMainThreadCpuSecondsPerGiB),
      ...(first.receiverCpuSecondsPerGiB !== undefined
        ? { receiverCpuSecondsPerGiB: m((r) => r.receiverCpuSecondsPerGiB!), receiverMainThreadCpuSecondsPerGiB: m((r) => r.receiverMainThreadCpuSecondsPerGiB!) }
        : {}),
      cpuSeconds: m((r) => r.cpuSeconds),
      ownerCpuSeconds: m((r) => r.ownerCpuSeconds),
      ...(first.receiverCpuSeconds !== undefined ? { receiverCpuSeconds: m((r) => r.receiverCpuSeconds!) } : {}),
      originGets: Math.min(...gets) === Math.max(...gets) ? String(gets[0]) : `${Math.min(...gets)}–${Math.max(...gets)}`,
      machineCores: m((r) => r.machineCores),
    };
  });
}

function rolloutSummary(run: RolloutRun) {
  const u = run.upstream;
  return {
    replicas: run.replicas,
    kind: run.kind,
    clients: run.clients,
    wallSeconds: run.wallSeconds,
    manifestGetsByTag: u.manifestGetsByTag,
    manifestHeads: u.manifestHeadsByTag + u.manifestHeadsByDigest,
    manifestGetsByDigest: u.manifestGetsByDigest,
    blobGets: run.blobOrder.map((d) => u.blobGets[d] ?? 0),
    pings: u.pings,
    upstreamTotal: u.total,
    replicasCpuSeconds: run.replicasCpuSeconds,
  };
}

/** The per-thread CPU of each replica stays in the JSON; the RSS samples per second do not. */
function trimmedForJson(run: BlobRun) {
  return { ...run, replicaFigures: run.replicaFigures.map(({ rssBySecondKiB: _, peakMemory: __, ...rest }) => rest) };
}

function printReport(
  bench: Bench,
  environment: Record<string, string | number>,
  source: SourceState,
  hits: BlobRun[],
  colds: BlobRun[],
  rollouts: RolloutRun[],
  warnings: Array<ClusterWarning & { replicas: number }>,
  idle: readonly IdleFigures[],
): void {
  const { options } = bench;
  const out: string[] = [
    '',
    `${NAME}: clusters of ${options.replicas.join(', ')} replicas on loopback (each its own process; peers over TLS on 127.0.0.21…), curl clients through CONNECT; ` +
      `"owner": the client's replica owns the blob (a local answer); "relay": another replica relays the owner's bytes over the peer port`,
    `${environmentLine(environment)}${environment.registry ? `, ${environment.registry}` : ''}${environment.skopeo ? `, skopeo ${environment.skopeo}` : ''}`,
    sourceLine(source),
    '',
    `idle, before the runs (${IDLE_WATCH_MS / 1000} s, every replica warmed up, no client): ` +
      idle.map((i) => `cluster of ${i.replicas}: ${i.cores.map((c) => fixed(c, 2)).join(' + ')} cores`).join('; '),
  ];
  if (hits.length > 0) {
    const summaries = summariseBlobRuns(hits);
    out.push(
      '',
      `hit: a cached ${formatSize(options.size)} blob, ${options.repeat} × interleaved, medians; CPU-s per GiB delivered (all threads); "all replicas" sums every replica process`,
      formatTable(
        ['replicas', 'route', 'clients', 'wall s', 'MiB/s', 'TTFB ms', 'CPU-s/GiB all replicas', 'owner', 'owner main thread', 'receiver', 'receiver main thread', 'machine cores busy', 'origin GETs'],
        summaries.map((s) => [
          String(s.replicas),
          s.via,
          String(s.clients),
          fixed(s.wallSeconds, 2),
          fixed(s.mibPerSecond, 0),
          fixed(s.firstByteMs, 1),
          fixed(s.cpuSecondsPerGiB, 2),
          fixed(s.ownerCpuSecondsPerGiB, 2),
          fixed(s.ownerMainThreadCpuSecondsPerGiB, 2),
          fixed(s.receiverCpuSecondsPerGiB, 2),
          fixed(s.receiverMainThreadCpuSecondsPerGiB, 2),
          fixed(s.machineCores, 2),
          s.originGets,
        ]),
      ),
      '',
      'relay / local hit, same cluster and client count (and against the cluster of 1 when it ran)',
      formatTable(
        ['replicas', 'clients', 'CPU-s/GiB relay / owner', 'relay / 1-replica', 'MiB/s relay / owner', 'relay / 1-replica'],
        summaries
          .filter((s) => s.via === 'relay')
          .map((relay) => {
            const local = summaries.find((s) => s.replicas === relay.replicas && s.clients === relay.clients && s.via === 'owner')!;
            const single = summaries.find((s) => s.replicas === 1 && s.clients === relay.clients);
            return [
              String(relay.replicas),
              String(relay.clients),
              fixed(relay.cpuSecondsPerGiB / local.cpuSecondsPerGiB, 2),
              fixed(single ? relay.cpuSecondsPerGiB / single.cpuSecondsPerGiB : undefined, 2),
              fixed(relay.mibPerSecond / local.mibPerSecond, 2),
              fixed(single ? relay.mibPerSecond / single.mibPerSecond : undefined, 2),
            ];
          }),
      ),
    );
  }
  if (colds.length > 0) {
    const summaries = summariseBlobRuns(colds);
    out.push(
      '',
      `cold: one client, a fresh digest per run (the owner fills from nginx), ${options.coldRepeat} runs each, interleaved; curl's time to first byte (connect, CONNECT, TLS, first byte) and time_total; ` +
        'medians; CPU seconds per run (10 ms ticks: coarse for small blobs)',
      formatTable(
        ['replicas', 'size', 'route', 'TTFB ms', 'min', 'max', 'total ms', 'MiB/s', 'CPU-s all replicas', 'owner', 'receiver', 'origin GETs per run'],
        summaries.map((s) => [
          String(s.replicas),
          formatSize(s.size),
          s.via,
          fixed(s.firstByteMs, 1),
          fixed(s.firstByteMsMin, 1),
          fixed(s.firstByteMsMax, 1),
          fixed(s.totalMs, 1),
          fixed(s.size / MIB / (s.totalMs / 1000), 0),
          fixed(s.cpuSeconds, 2),
          fixed(s.ownerCpuSeconds, 2),
          fixed(s.receiverCpuSeconds, 2),
          s.originGets,
        ]),
      ),
      '',
      'relay − owner, same cluster and size (medians)',
      formatTable(
        ['replicas', 'size', 'TTFB ms', 'total ms', 'total relay / owner'],
        summaries
          .filter((s) => s.via === 'relay')
          .map((relay) => {
            const local = summaries.find((s) => s.replicas === relay.replicas && s.size === relay.size && s.via === 'owner')!;
            return [String(relay.replicas), formatSize(relay.size), fixed(relay.firstByteMs - local.firstByteMs, 1), fixed(relay.totalMs - local.totalMs, 1), fixed(relay.totalMs / local.totalMs, 2)];
          }),
      ),
    );
  }
  if (rollouts.length > 0) {
    const image = bench.images.get(rollouts[0]!.kind)!;
    out.push(
      '',
      `rollout: ${options.rolloutClients} clients spread round-robin over the replicas pull a new image at once (a ${image.manifestSize}-byte OCI manifest, config + ${image.layerDigests.length} layers of ` +
        `${options.layerSizes.map(formatSize).join(', ')}); what reached the registry (its access log); one run each`,
      formatTable(
        ['replicas', 'kind', 'clients', 'wall s', 'client s median', 'max', 'manifest GET by tag', 'manifest HEAD', 'manifest GET by digest', 'blob GETs per blob', 'GET /v2/', 'upstream requests', 'replicas CPU-s'],
        rollouts.map((r) => {
          const s = rolloutSummary(r);
          return [
            String(r.replicas),
            r.kind,
            String(r.clients),
            fixed(r.wallSeconds, 2),
            fixed(r.clientSecondsMedian, 2),
            fixed(r.clientSecondsMax, 2),
            String(s.manifestGetsByTag),
            String(s.manifestHeads),
            String(s.manifestGetsByDigest),
            s.blobGets.join('/'),
            String(s.pings),
            String(s.upstreamTotal),
            fixed(r.replicasCpuSeconds, 2),
          ];
        }),
      ),
      'blob GETs per blob: config, then the layers in the order of --layers',
      '',
      "what the replicas answered (access logs, all replicas added up: \"relayed\" = a client's answer relayed from the owner; \"for a peer\" = the owner's answer to a peer)",
      ...rollouts.map((r) => `  ${r.replicas} × ${r.kind}: ${describeAnswers(r.answers)}; the requests for the tag arrived within ${fixed(r.tagArrivalSpreadMs, 0)} ms; manifests owned by replica ${r.manifestOwner}, blobs by ${r.blobOwners.join('/')}`),
    );
  }
  out.push(
    '',
    warnings.length === 0
      ? 'the replicas logged no warning or error'
      : `what the replicas logged at warn or error (a peer passed over means duplicate fills: its keys were served by the next replica)`,
    ...warnings.map((w) => `  cluster of ${w.replicas}, replica ${w.replica}: ${w.level} ×${w.count}: ${w.message} ${JSON.stringify(w.first)}`),
  );
  process.stdout.write(out.join('\n') + '\n');
}

await runBenchmark(main, progress);
