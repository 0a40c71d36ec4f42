// One measured run: N curl clients download a blob (directly or through the proxy) while /proc is
// read before and after, for nginx, the proxy and the whole machine; and the proxies the blob-cache
// benchmarks start afresh (an empty data dir) for each cold run.
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Blob } from './blob.ts';
import { runClients, type CurlResult, type CurlRoute } from './curl.ts';
import { MIB, processFigures, proxyFigures, snapshotProxy, type ProcessFigures, type ProxyFigures } from './measure.ts';
import { originRequestsSince, proxiedBlobRoute, registryPolicy, type Origin } from './origin.ts';
import { readCountersOf, readMachineBusySeconds, subtractCounters } from './procfs.ts';
import { startProxyProcess, type ProxyProcess } from './proxy.ts';
import { median } from './report.ts';

export interface ClientsRun {
  clients: number;
  wallSeconds: number;
  /** Bytes delivered to all clients together. */
  bytes: number;
  mibPerSecond: number;
  /** Each client's curl time_starttransfer, in ms, in the order the clients were started. */
  firstByteMs: number[];
  /** Each client's curl time_total, in ms, in the same order. */
  totalMs: number[];
  /** Median over the clients. */
  medianFirstByteMs: number;
  maxFirstByteMs: number;
  /** Each client's X-Cache ('' from nginx). */
  cache: string[];
  /** max − min of the clients' starts (curl's own clock) and of their exits, in ms. */
  startSpreadMs: number;
  finishSpreadMs: number;
  /** GETs / HEADs for the blob that reached nginx during the run (when its access log is on). */
  originGets?: number;
  originHeads?: number;
  /** Cores busy on the whole machine (clients, nginx, proxy, everything else). */
  machineCores: number;
  /**
   * CPU seconds per GiB delivered of everything on the machine but nginx and the proxy: mostly the curl
   * clients (TLS decryption, 16 KiB reads), plus whatever else runs on the machine meanwhile.
   */
  restCpuSecondsPerGiB: number;
  nginx: ProcessFigures;
  proxy?: ProxyFigures;
  /** With `replicas`: each replica's figures, in their order. */
  replicas?: ProxyFigures[];
}

export interface ClientsRunOptions {
  origin: Origin;
  blob: Blob;
  route: CurlRoute;
  clients: number;
  /** Measure this proxy too (the route goes through it). */
  proxy?: ProxyProcess;
  /** Measure each of these proxies too, apart (a cluster's replicas: the route goes through one of them). */
  replicas?: readonly ProxyProcess[];
  /** Every client's X-Cache must be one of these. */
  expectCache?: readonly string[];
  /** Release the clients at once through a start barrier (see runClients). */
  together?: boolean;
}

export async function measureClients(options: ClientsRunOptions): Promise<ClientsRun> {
  const { origin, blob, proxy, clients } = options;
  const nginx = origin.nginx;
  const logMark = nginx.accessLog?.mark() ?? 0;
  const nginxBefore = readCountersOf(nginx.pids());
  const proxyBefore = proxy ? snapshotProxy(proxy.pid) : undefined;
  const replicasBefore = options.replicas?.map((replica) => snapshotProxy(replica.pid));
  const machineBefore = readMachineBusySeconds();

  const result = await runClients(clients, options.route, {
    expectBytes: blob.size,
    ...(options.expectCache ? { expectCache: options.expectCache } : {}),
    ...(options.together ? { together: true } : {}),
  });

  const machineSeconds = readMachineBusySeconds() - machineBefore;
  const nginxSpent = subtractCounters(readCountersOf(nginx.pids()), nginxBefore);
  const bytes = clients * blob.size;
  const wall = result.wallSeconds;
  const firstByteMs = result.clients.map((c: CurlResult) => c.firstByteSeconds * 1000);
  const exits = result.clients.map((c) => c.exitedAtSeconds * 1000);
  // nginx writes a request's line when it has sent the response: by now every GET is in.
  const origins = nginx.accessLog ? originRequestsSince(origin, blob, logMark) : undefined;
  const proxySpent = proxy && proxyBefore ? proxyFigures(proxy.pid, proxyBefore, bytes, wall) : undefined;
  const replicasSpent = options.replicas?.map((replica, i) => proxyFigures(replica.pid, replicasBefore![i]!, bytes, wall));
  const replicasSeconds = (replicasSpent ?? []).reduce((sum, figures) => sum + figures.cpuSeconds, 0);
  const restSeconds = machineSeconds - nginxSpent.cpuSeconds - (proxySpent?.cpuSeconds ?? 0) - replicasSeconds;
  return {
    clients,
    wallSeconds: wall,
    bytes,
    mibPerSecond: bytes / MIB / wall,
    firstByteMs,
    totalMs: result.clients.map((c) => c.totalSeconds * 1000),
    medianFirstByteMs: median(firstByteMs),
    maxFirstByteMs: Math.max(...firstByteMs),
    cache: result.clients.map((c) => c.cache),
    startSpreadMs: result.startSpreadMs,
    finishSpreadMs: Math.max(...exits) - Math.min(...exits),
    ...(origins ? { originGets: origins.get, originHeads: origins.head } : {}),
    machineCores: machineSeconds / wall,
    restCpuSecondsPerGiB: restSeconds / (bytes / 1024 ** 3),
    nginx: processFigures(nginxSpent, bytes, wall),
    ...(proxySpent ? { proxy: proxySpent } : {}),
    ...(replicasSpent ? { replicas: replicasSpent } : {}),
  };
}

export interface FreshProxy {
  proxy: ProxyProcess;
  /** Its working dir (proxy.yaml, data/, logs): remove() deletes it. */
  dir: string;
  /** Stops the proxy and deletes its dir (its cache with it). */
  remove(): Promise<void>;
}

export interface FreshProxyOptions {
  origin: Origin;
  /** A dir that does not exist yet (created here): its data/ is the proxy's empty cache. */
  dir: string;
  nodeArgs?: string[];
  env?: Record<string, string>;
  /** Another build of the proxy's cli (ProxyOptions.cli). */
  cli?: string;
}

/** A proxy for the origin with an empty cache (or, when `dir` exists, the cache left there). */
export async function startProxyIn(options: FreshProxyOptions): Promise<FreshProxy> {
  mkdirSync(options.dir, { recursive: true });
  const proxy = await startProxyProcess({
    dir: options.dir,
    policy: registryPolicy(options.origin),
    ...(options.nodeArgs ? { nodeArgs: options.nodeArgs } : {}),
    ...(options.env ? { env: options.env } : {}),
    ...(options.cli ? { cli: options.cli } : {}),
  });
  return {
    proxy,
    dir: options.dir,
    async remove() {
      await proxy.stop();
      rmSync(options.dir, { recursive: true, force: true });
    },
  };
}

/**
 * Warms a fresh proxy up without touching the blob to be measured: two clients for each warm-up blob,
 * all at once, so that the proxy mints its leaf for the origin, the fill workers load their code and
 * connect upstream (two blobs: two fills, spread over the pool), and the MISS and JOINED paths are
 * compiled. The warm-up blobs stay cached; they are not the measured one.
 */
export async function warmUpProxy(origin: Origin, proxy: ProxyProcess, warmUpBlobs: readonly Blob[]): Promise<void> {
  await Promise.all(
    warmUpBlobs.map((blob) => runClients(2, proxiedBlobRoute(origin, blob, proxy), { expectBytes: blob.size, expectCache: ['MISS', 'JOINED', 'HIT'] })),
  );
}

/** A dir for one proxy inside the benchmark's temp dir. */
export function proxyDir(benchDir: string, label: string): string {
  return join(benchDir, `proxy-${label}`);
}
