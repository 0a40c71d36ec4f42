// The primary thread's event loop under a big cache: how long it is ever kept from its other clients
// while the cache holds --blobs blobs and --tags tags, evicts as new blobs arrive, /healthz is polled
// every 100 ms (as a Kubernetes probe does, only more often), the dashboard's ui/data.json every second
// and /metrics every 5 s, and curl clients pull.
//
//   node perf/event-loop.ts [--blobs 100000] [--tags 20000] [--duration 20s] [--clients 4] [--size 1MiB] [--miss-rate 10] [--repeat 1] [--profile FILE]
//
// The proxy runs in this process (src/server.ts's startProxy, as the tests start it), so that
// perf_hooks.monitorEventLoopDelay sees its event loop; the clients are curl processes, and the pollers
// here are a few small requests a second. The curl clients are spawned by a small child process of
// this script (started before the proxy): a spawn from the proxy's process, whose address space holds
// the cache's index and maps, blocked its event loop for 100–280 ms each (fork copies the page tables).
// The proxy's access and operator logs go to files in the temp dir.
//
// The cache is made up before the proxy starts, straight into its data directory: --blobs sparse files
// of --size bytes each at blobs/sha256/<ab>/<hex> (no disk blocks: they are never read) with their
// entries in the LMDB index's "blobs" database (last access spread over the past day, so they are the
// first to go), and --tags tags ("tag-variants") each with its own image manifest ("manifests"). The
// cache's maxSize is exactly what those blobs add up to, so every blob a client pulls for the first
// time makes room by evicting. The origin is nginx over TLS (perf/lib/origin.ts) with enough new blobs
// for --miss-rate first pulls a second over every measured run.
//
// Two phases per repetition, each --duration long:
//   idle     only the pollers (the proxy also counts its tags in the background after it starts);
//   pulling  the pollers and --clients curl clients, each pulling one blob after another: a new one
//            (a MISS: a fill and an eviction) when the shared --miss-rate budget allows, else one
//            already cached (a HIT).
// Per phase: the event loop's delay (monitorEventLoopDelay, 1 ms resolution: how late its timer fired;
// max, p99, p99.9, mean);
// the stalls over 20 ms that a 5 ms interval timer saw: when, how long, and how much CPU the main
// thread used meanwhile (on a shared machine a stall may be time the thread did not get a core); "max
// busy", the most CPU the main thread used between two ticks (its longest stretch of work of its own);
// /healthz's latency, the evictions, and the pulls by X-Cache. Goal: no stall over 20 ms.
// `--profile FILE` writes a CPU profile of this process over the measured phases (the inspector slows
// the proxy: the figures of such a run are not comparable), to see what a stall was made of.
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, createWriteStream, ftruncateSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { request } from 'undici';
import { loadPolicy } from '../config/load.ts';
import { formatSize, parseDuration, parseSize } from '../config/units.ts';
import type { BlobEntry } from '../src/cache/blob-store.ts';
import { openIndex } from '../src/cache/index.ts';
import type { StoredManifest, TagEntry } from '../src/cache/manifest-store.ts';
import { createLogger } from '../src/log.ts';
import { startProxy, type RunningProxy } from '../src/server.ts';
import { addCleanup, makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { proxiedRoute, runClients } from './lib/curl.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { ORIGIN_HOST, proxiedBlobRoute, registryPolicy, startOrigin, type Origin } from './lib/origin.ts';
import type { Blob } from './lib/blob.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { START_ENV, START_NODE_ARGS } from './lib/proxy.ts';

// The proxy runs in this process, so this process takes the V8 flags and malloc setting npm start gives
// it: measured without them (node's defaults), the loop's max was 20.7–25.1 ms; with them, 12.1–21.7.
if (!START_NODE_ARGS.every((arg) => process.execArgv.includes(arg)) || Object.entries(START_ENV).some(([name, value]) => process.env[name] !== value)) {
  const again = spawnSync(process.execPath, [...process.execArgv, ...START_NODE_ARGS, fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: 'inherit', env: { ...process.env, ...START_ENV } });
  process.exit(again.status ?? 1);
}

const NAME = 'event-loop';
const progress = progressTo(NAME);
/** The goal: the event loop is never kept longer than this. */
const GOAL_MS = 20;
const HEALTHZ_EVERY_MS = 100;
const DATA_EVERY_MS = 1000;
const METRICS_EVERY_MS = 5000;
/** monitorEventLoopDelay's timer period. */
const DELAY_RESOLUTION_MS = 1;
/** The stall detector's tick: a tick late by more than GOAL_MS is a stall. */
const TICK_MS = 5;
const SYNTHETIC_REGISTRY = 'registry.synthetic:443';
const IMAGE_TYPE = 'application/vnd.oci.image.manifest.v1+json';

interface Options {
  blobs: number;
  tags: number;
  durationMs: number;
  clients: number;
  size: number;
  missRate: number;
  repeat: number;
  profile?: string;
}

interface PhaseFigures {
  phase: 'idle' | 'pulling';
  repetition: number;
  seconds: number;
  loop: { maxMs: number; p50Ms: number; p99Ms: number; p999Ms: number; meanMs: number };
  /**
   * Ticks of the TICK_MS timer late by more than GOAL_MS: when (s into the phase), by how much, and how
   * much CPU the main thread used meanwhile (process.threadCpuUsage), and how long it waited for a core
   * (runnable but not running: /proc/thread-self/schedstat). The rest of a stall the thread slept in the
   * kernel: a blocking system call, a page fault of the memory-mapped index.
   */
  stalls: Array<{ atSeconds: number; ms: number; cpuMs: number; runQueueMs: number }>;
  /** The most CPU the main thread used between two ticks: the longest it ran without a break. */
  maxBusyMs: number;
  healthz: { requests: number; p50Ms: number; p99Ms: number; maxMs: number; failures: number };
  dataJson: { requests: number; maxMs: number };
  evictions: number;
  pulls: Record<string, number>;
  pullErrors: number;
}

function parseOptions(argv: string[]): Options {
  const usage = `usage: node perf/${NAME}.ts [--blobs 100000] [--tags 20000] [--duration 20s] [--clients 4] [--size 1MiB] [--miss-rate 10] [--repeat 1] [--profile FILE]\n`;
  const { values } = parseArgs({
    args: argv,
    options: {
      blobs: { type: 'string', default: '100000' },
      tags: { type: 'string', default: '20000' },
      duration: { type: 'string', default: '20s' },
      clients: { type: 'string', default: '4' },
      size: { type: 'string', default: '1MiB' },
      'miss-rate': { type: 'string', default: '10' },
      repeat: { type: 'string', default: '1' },
      profile: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  const options: Options = {
    blobs: Number(values.blobs),
    tags: Number(values.tags),
    durationMs: parseDuration(values.duration),
    clients: Number(values.clients),
    size: parseSize(values.size),
    missRate: Number(values['miss-rate']),
    repeat: Number(values.repeat),
    ...(values.profile ? { profile: values.profile } : {}),
  };
  if (!Number.isInteger(options.blobs) || options.blobs < 1 || options.blobs > 10_000_000) throw new Error(`--blobs ${values.blobs}: 1–10000000`);
  if (!Number.isInteger(options.tags) || options.tags < 0 || options.tags > 10_000_000) throw new Error(`--tags ${values.tags}: 0–10000000`);
  if (options.durationMs < 1000 || options.durationMs > 600_000) throw new Error(`--duration ${values.duration}: 1s–600s`);
  if (!Number.isInteger(options.clients) || options.clients < 0 || options.clients > 64) throw new Error(`--clients ${values.clients}: 0–64`);
  if (options.size < 1 || options.size > 256 * 1024 * 1024) throw new Error(`--size ${values.size}: 1 B–256 MiB`);
  if (!(options.missRate >= 0 && options.missRate <= 1000)) throw new Error(`--miss-rate ${values['miss-rate']}: 0–1000 first pulls a second`);
  if (!Number.isInteger(options.repeat) || options.repeat < 1) throw new Error(`--repeat ${values.repeat}: a positive integer`);
  return options;
}

/** sha256:<hex> of a made-up blob (it never gets read: only its entry and its file's size matter). */
function syntheticDigest(n: number): string {
  return `sha256:${createHash('sha256').update(`synthetic blob ${n}`).digest('hex')}`;
}

/** The made-up cache: sparse blob files with their index entries, and tags with their manifests. */
async function seedCache(dataDir: string, options: Options): Promise<void> {
  const started = performance.now();
  const index = openIndex(dataDir);
  try {
    const blobs = index.root.openDB<BlobEntry, string>({ name: 'blobs', encoding: 'msgpack' });
    const now = Date.now();
    const BATCH = 10_000;
    for (let from = 0; from < options.blobs; from += BATCH) {
      const to = Math.min(options.blobs, from + BATCH);
      const entries: Array<[string, BlobEntry]> = [];
      for (let n = from; n < to; n++) {
        const digest = syntheticDigest(n);
        const hex = digest.slice('sha256:'.length);
        const dir = join(dataDir, 'blobs', 'sha256', hex.slice(0, 2));
        mkdirSync(dir, { recursive: true });
        const fd = openSync(join(dir, hex), 'w', 0o600);
        ftruncateSync(fd, options.size); // sparse: the size without the blocks
        closeSync(fd);
        const lastAccess = now - 86_400_000 + Math.floor((n * 86_400_000) / options.blobs);
        entries.push([digest, { size: options.size, firstAccess: lastAccess, lastAccess, hits: 1, registry: SYNTHETIC_REGISTRY, repository: 'synthetic/blobs', access: 'anonymous' }]);
      }
      await index.root.transaction(() => {
        for (const [digest, entry] of entries) blobs.put(digest, entry);
      });
      progress(`made up ${to} of ${options.blobs} blobs`);
    }
    const bodies = index.root.openDB<StoredManifest, string>({ name: 'manifests', encoding: 'msgpack' });
    const tags = index.root.openDB<TagEntry[], string>({ name: 'tag-variants', encoding: 'msgpack' });
    for (let from = 0; from < options.tags; from += BATCH) {
      const to = Math.min(options.tags, from + BATCH);
      await index.root.transaction(() => {
        for (let n = from; n < to; n++) {
          const repository = `synthetic/app${n % 500}`;
          const layers = Array.from({ length: 6 }, (_, i) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', size: 1000 + ((n * 7919 + i * 104_729) % 50_000_000), digest: syntheticDigest(n * 6 + i) }));
          const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: IMAGE_TYPE, config: { mediaType: 'application/vnd.oci.image.config.v1+json', size: 1500, digest: syntheticDigest(-n - 1) }, layers }));
          const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`;
          bodies.put(`${SYNTHETIC_REGISTRY}/${repository}@${digest}`, { body, mediaType: IMAGE_TYPE, digest, storedAt: now, access: 'anonymous' });
          tags.put(`${SYNTHETIC_REGISTRY}/${repository}:v${n}`, [{ accept: IMAGE_TYPE, digest, mediaType: IMAGE_TYPE, size: body.length, validatedAt: now, access: 'anonymous' }]);
        }
      });
    }
    progress(`made up ${options.tags} tags; the cache took ${((performance.now() - started) / 1000).toFixed(1)} s to write`);
  } finally {
    await index.close();
  }
}

/** Polls `path` every `everyMs` (never two at once) and keeps each answer's time; stop() ends it. */
function poll(url: string, everyMs: number): { times: number[]; failures: () => number; stop(): Promise<void> } {
  const times: number[] = [];
  let failures = 0;
  let pending: Promise<void> | undefined;
  const timer = setInterval(() => {
    if (pending) return;
    const started = performance.now();
    pending = request(url)
      .then(async (response) => {
        await response.body.dump();
        if (response.statusCode !== 200) failures++;
        times.push(performance.now() - started);
      })
      .catch(() => void failures++)
      .finally(() => (pending = undefined));
  }, everyMs);
  return {
    times,
    failures: () => failures,
    async stop() {
      clearInterval(timer);
      await pending;
    },
  };
}

function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

async function evictionsSoFar(proxyUrl: string): Promise<number> {
  const text = await (await request(`${proxyUrl}/metrics`)).body.text();
  return Number(/^pullthrough_cache_evictions_total (\S+)$/m.exec(text)?.[1] ?? Number.NaN);
}

interface Pulling {
  counts: Record<string, number>;
  errors: number;
  stop(): Promise<void>;
}

/** What the driver is asked to do for one phase, and what it answers. */
interface PullOrder {
  type: 'pull';
  originPort: number;
  proxyUrl: string;
  caFile: string;
  fresh: Blob[];
  cached: Blob[];
  clients: number;
  missRate: number;
}
interface PullReport {
  type: 'pulled';
  counts: Record<string, number>;
  errors: number;
  /** The fresh blobs it pulled (now cached). */
  pulled: string[];
}

/**
 * Pulls in the driver process: `clients` curl loops, each pulling a new blob of the origin (a MISS)
 * when the shared budget of `missRate` a second allows, else one already cached (a HIT), until told to stop.
 */
async function drive(): Promise<void> {
  let order: PullOrder | undefined;
  let stopped = false;
  process.on('disconnect', () => process.exit(0));
  process.on('message', (message: PullOrder | { type: 'stop' }) => {
    if (message.type === 'stop') stopped = true;
    else order = message;
  });
  for (;;) {
    while (!order) await sleep(20);
    const { fresh, cached, originPort, proxyUrl, caFile, clients, missRate } = order;
    order = undefined;
    stopped = false;
    const counts: Record<string, number> = {};
    const pulled: string[] = [];
    let errors = 0;
    let missesTaken = 0;
    const started = performance.now();
    const loop = async () => {
      while (!stopped) {
        const allowed = ((performance.now() - started) / 1000) * missRate;
        const isNew = missesTaken < allowed && fresh.length > 0;
        const blob = isNew ? fresh.shift()! : cached[Math.floor(Math.random() * cached.length)];
        if (!blob) {
          await sleep(50);
          continue;
        }
        if (isNew) missesTaken++;
        try {
          const route = proxiedRoute({ host: ORIGIN_HOST, port: originPort, path: blob.urlPath, proxyUrl, proxyCaFile: caFile });
          const result = await runClients(1, route, { expectBytes: blob.size, maxSeconds: 60 });
          const cache = result.clients[0]!.cache || 'none';
          counts[cache] = (counts[cache] ?? 0) + 1;
          if (isNew) {
            cached.push(blob);
            pulled.push(blob.digest);
          }
        } catch (err) {
          errors++;
          if (errors <= 3) progress(`a pull failed: ${(err as Error).message.slice(0, 300)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: clients }, loop));
    process.send!({ type: 'pulled', counts, errors, pulled } satisfies PullReport);
  }
}

/** Asks the driver to pull until stop(); `fresh` and `cached` are updated with what it pulled. */
function startPulling(driver: ChildProcess, origin: Origin, proxy: RunningProxy, caFile: string, fresh: Blob[], cached: Blob[], options: Options): Pulling {
  const pulling: Pulling = {
    counts: {},
    errors: 0,
    stop: () =>
      new Promise<void>((resolve) => {
        driver.once('message', (report: PullReport) => {
          Object.assign(pulling.counts, report.counts);
          pulling.errors = report.errors;
          for (const digest of report.pulled) {
            const at = fresh.findIndex((b) => b.digest === digest);
            if (at >= 0) cached.push(...fresh.splice(at, 1));
          }
          resolve();
        });
        driver.send({ type: 'stop' });
      }),
  };
  const order: PullOrder = { type: 'pull', originPort: origin.nginx.port, proxyUrl: `http://127.0.0.1:${proxy.port}`, caFile, fresh, cached, clients: options.clients, missRate: options.missRate };
  driver.send(order);
  return pulling;
}

async function measurePhase(phase: PhaseFigures['phase'], repetition: number, proxy: RunningProxy, pulls: () => Pulling | undefined, options: Options): Promise<PhaseFigures> {
  const url = `http://127.0.0.1:${proxy.port}`;
  const evictionsBefore = await evictionsSoFar(url);
  const delay = monitorEventLoopDelay({ resolution: DELAY_RESOLUTION_MS });
  const stalls: PhaseFigures['stalls'] = [];
  const started = performance.now();
  let last = started;
  const cpuNow = () => {
    const { user, system } = process.threadCpuUsage();
    return (user + system) / 1000;
  };
  /** Milliseconds the main thread has spent runnable, waiting for a core (Linux schedstat; 0 elsewhere). */
  const runQueueNow = () => {
    try {
      return Number(readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ')[1]) / 1e6;
    } catch {
      return 0;
    }
  };
  let lastCpu = cpuNow();
  let lastRunQueue = runQueueNow();
  let maxBusyMs = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    const cpu = cpuNow();
    const runQueue = runQueueNow();
    const late = now - last - TICK_MS;
    const busy = cpu - lastCpu;
    if (late > GOAL_MS) stalls.push({ atSeconds: (now - started) / 1000, ms: late, cpuMs: busy, runQueueMs: runQueue - lastRunQueue });
    maxBusyMs = Math.max(maxBusyMs, busy);
    last = now;
    lastCpu = cpu;
    lastRunQueue = runQueue;
  }, TICK_MS);
  delay.enable();
  const healthz = poll(`${url}/healthz`, HEALTHZ_EVERY_MS);
  const data = poll(`${url}/ui/data.json`, DATA_EVERY_MS);
  const metrics = poll(`${url}/metrics`, METRICS_EVERY_MS);
  const pulling = pulls();
  await sleep(options.durationMs);
  await pulling?.stop();
  await Promise.all([healthz.stop(), data.stop(), metrics.stop()]);
  delay.disable();
  clearInterval(ticker);
  const seconds = (performance.now() - started) / 1000;
  // The histogram holds the time between two callbacks of its timer, which fires every resolution ms:
  // how late the loop was is that minus the resolution (an idle loop's mean is 1.1 ms, not 0.1).
  const ms = (ns: number) => Math.max(0, ns / 1e6 - DELAY_RESOLUTION_MS);
  return {
    phase,
    repetition,
    seconds,
    loop: { maxMs: ms(delay.max), p50Ms: ms(delay.percentile(50)), p99Ms: ms(delay.percentile(99)), p999Ms: ms(delay.percentile(99.9)), meanMs: ms(delay.mean) },
    stalls,
    maxBusyMs,
    healthz: { requests: healthz.times.length, p50Ms: percentile(healthz.times, 50), p99Ms: percentile(healthz.times, 99), maxMs: Math.max(...healthz.times), failures: healthz.failures() },
    dataJson: { requests: data.times.length, maxMs: Math.max(...data.times) },
    evictions: (await evictionsSoFar(url)) - evictionsBefore,
    pulls: { ...(pulling?.counts ?? {}) },
    pullErrors: pulling?.errors ?? 0,
  };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  // Forked while this process is small: see the note at the top.
  const driver = fork(new URL(import.meta.url).pathname, [], { env: { ...process.env, PULLTHROUGH_EVENT_LOOP_DRIVER: '1' }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  addCleanup(() => driver.kill('SIGKILL'));
  const dir = makeTempDir(NAME);
  const dataDir = join(dir, 'proxy', 'data');
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const newBlobs = options.clients > 0 ? Math.ceil((options.missRate * options.durationMs) / 1000) * options.repeat + 8 : 0;
  progress(`origin: ${newBlobs} blobs of ${formatSize(options.size)}; cache: ${options.blobs} blobs of ${formatSize(options.size)} (sparse) and ${options.tags} tags`);
  const origin = await startOrigin({ dir, blobs: Array.from({ length: newBlobs }, (_, i) => ({ repository: `bench/event-loop-${i % 16}`, size: options.size })) });
  await seedCache(dataDir, options);

  const configFile = join(dir, 'proxy', 'proxy.yaml');
  writeFileSync(configFile, `listen: 127.0.0.1:0\ndataDir: ${JSON.stringify(dataDir)}\n${registryPolicy(origin, [`cache: { maxSize: ${options.blobs * options.size}, minFree: 0 }`])}`);
  const policy = loadPolicy({ configPath: configFile, env: {} });
  const accessLog = createWriteStream(join(dir, 'proxy', 'access.log'));
  const operatorLog = createWriteStream(join(dir, 'proxy', 'proxy.log'));
  const log = createLogger({ out: (line) => accessLog.write(line + '\n'), err: (line) => operatorLog.write(line + '\n') });
  const startedAt = performance.now();
  const proxy = await startProxy(policy, log);
  progress(`the proxy started in ${((performance.now() - startedAt) / 1000).toFixed(1)} s (it checked ${options.blobs} blob files)`);
  const caFile = join(policy.caDir, 'ca.crt');
  // The worker threads start with the proxy: the first /healthz waits for them.
  await request(`http://127.0.0.1:${proxy.port}/healthz`).then((r) => r.body.dump());

  const environment = describeEnvironment(origin.nginx.version);
  const session = options.profile ? new Session() : undefined;
  if (session) {
    session.connect();
    await session.post('Profiler.enable');
    await session.post('Profiler.setSamplingInterval', { interval: 200 });
    await session.post('Profiler.start');
  }
  const fresh: Blob[] = [...origin.blobs];
  const cached: Blob[] = [];
  // One blob cached before anything is measured, so that the first pulls have a HIT to choose.
  if (options.clients > 0) {
    const first = fresh.shift()!;
    await runClients(1, proxiedBlobRoute(origin, first, { url: `http://127.0.0.1:${proxy.port}`, caFile }), { expectBytes: first.size });
    cached.push(first);
  }
  const phases: PhaseFigures[] = [];
  for (let repetition = 1; repetition <= options.repeat; repetition++) {
    progress(`repetition ${repetition}: idle (pollers only) for ${options.durationMs / 1000} s`);
    phases.push(await measurePhase('idle', repetition, proxy, () => undefined, options));
    if (options.clients > 0) {
      progress(`repetition ${repetition}: pulling (${options.clients} curl clients, ${options.missRate} new blobs/s) for ${options.durationMs / 1000} s`);
      phases.push(await measurePhase('pulling', repetition, proxy, () => startPulling(driver, origin, proxy, caFile, fresh, cached, options), options));
    }
  }
  if (session) {
    const { profile } = await session.post('Profiler.stop');
    writeFileSync(options.profile!, JSON.stringify(profile));
    session.disconnect();
    progress(`CPU profile written to ${options.profile}`);
  }
  driver.disconnect();
  await proxy.close();
  await origin.nginx.stop();
  accessLog.end();
  operatorLog.end();

  const rows = phases.map((p) => [
    `${p.phase} #${p.repetition}`,
    fixed(p.loop.maxMs, 1),
    fixed(p.loop.p99Ms, 1),
    fixed(p.loop.p999Ms, 1),
    fixed(p.loop.meanMs, 2),
    String(p.stalls.length),
    fixed(p.maxBusyMs, 1),
    `${fixed(p.healthz.p50Ms, 1)} / ${fixed(p.healthz.p99Ms, 1)} / ${fixed(p.healthz.maxMs, 1)}`,
    String(p.healthz.requests),
    fixed(p.dataJson.maxMs, 1),
    String(p.evictions),
    Object.entries(p.pulls).map(([cache, n]) => `${n} ${cache}`).join(', ') + (p.pullErrors ? `, ${p.pullErrors} failed` : ''),
  ]);
  process.stdout.write(`\n${NAME}: ${options.blobs} blobs, ${options.tags} tags, ${options.clients} clients, ${options.durationMs / 1000} s per phase\n`);
  process.stdout.write(`${environmentLine(environment)}\n\n`);
  process.stdout.write(
    formatTable(['phase', 'loop max ms', 'p99 ms', 'p99.9 ms', 'mean ms', `stalls > ${GOAL_MS} ms`, 'max busy ms', '/healthz p50 / p99 / max ms', '/healthz n', 'data.json max ms', 'evictions', 'pulls'], rows) + '\n',
  );
  const worst = phases.flatMap((p) => p.stalls.map((s) => ({ ...s, phase: `${p.phase} #${p.repetition}` }))).sort((a, b) => b.ms - a.ms).slice(0, 5);
  if (worst.length > 0) process.stdout.write(`\nlongest stalls: ${worst.map((s) => `${s.ms.toFixed(0)} ms: ${s.cpuMs.toFixed(0)} ms of CPU, ${s.runQueueMs.toFixed(0)} waiting for a core (${s.phase}, at ${s.atSeconds.toFixed(1)} s)`).join('; ')}\n`);
  const maxStall = Math.max(...phases.map((p) => p.loop.maxMs));
  const maxBusy = Math.max(...phases.map((p) => p.maxBusyMs));
  const goalMet = maxStall <= GOAL_MS;
  process.stdout.write(`goal: no stall over ${GOAL_MS} ms: ${goalMet ? 'met' : 'MISSED'} (max ${maxStall.toFixed(1)} ms; p99 median over the phases ${median(phases.map((p) => p.loop.p99Ms)).toFixed(1)} ms)\n`);
  const stalls = phases.flatMap((p) => p.stalls);
  const sum = (pick: (s: PhaseFigures['stalls'][number]) => number) => stalls.reduce((total, s) => total + pick(s), 0);
  process.stdout.write(
    `the main thread's longest run without a break: ${maxBusy.toFixed(1)} ms of CPU (${maxBusy <= GOAL_MS ? 'within' : 'OVER'} ${GOAL_MS} ms); ` +
      `the stalls over ${GOAL_MS} ms add up to ${sum((s) => s.ms).toFixed(0)} ms: ${sum((s) => s.cpuMs).toFixed(0)} ms of its CPU, ${sum((s) => s.runQueueMs).toFixed(0)} ms waiting for a core, the rest asleep in the kernel\n`,
  );
  process.stdout.write(JSON.stringify(roundNumbers({ benchmark: NAME, environment, options, goal: { maxStallMs: GOAL_MS, met: goalMet, maxStallObservedMs: maxStall, maxBusyMs: maxBusy }, phases })) + '\n');
}

if (process.env.PULLTHROUGH_EVENT_LOOP_DRIVER) await drive();
else await runBenchmark(main, progress);
