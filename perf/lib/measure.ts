// What one run cost, per process: the figures every benchmark reports for nginx and for the proxy
// (CPU per GiB, cores, kernel share, bytes per syscall, per-thread CPU, peak RSS), and the machine they
// ran on.
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import {
  PeakRssSampler,
  readCounters,
  readMainThreadCpu,
  readThreadCpu,
  subtractCounters,
  threadCpuByName,
  type Counters,
  type MemoryStatus,
} from './procfs.ts';

export const MIB = 1024 ** 2;
export const GIB = 1024 ** 3;

/** What one process (or nginx's master + workers) spent during one run. */
export interface ProcessFigures {
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

export interface ProxyFigures extends ProcessFigures {
  /** The main thread alone: client TLS, HTTP and the streams from the cache run there. */
  mainThreadCpuSecondsPerGiB: number;
  peakRssMiB: number;
  /** /proc/<pid>/status at the sample with the highest VmRSS (KiB; Threads is a count). */
  peakMemory?: MemoryStatus;
  /** The highest VmRSS sampled in each second of the run, KiB: a plateau or growth. */
  rssBySecondKiB: number[];
  /** CPU seconds by thread name: "MainThread", "V8Worker" (V8's GC and compiler helpers), "WorkerThread" (the pool), … */
  threads: Record<string, number>;
}

export interface ProxySnapshot {
  counters: Counters;
  mainThreadCpu: number;
  threads: ReturnType<typeof readThreadCpu>;
  rss: PeakRssSampler;
}

/** Counters of the proxy before a run; starts sampling its RSS. */
export function snapshotProxy(pid: number): ProxySnapshot {
  return { counters: readCounters(pid), mainThreadCpu: readMainThreadCpu(pid), threads: readThreadCpu(pid), rss: new PeakRssSampler(pid) };
}

/** What the proxy spent since `before`, per GiB of `bytes` delivered; stops the RSS sampler. */
export function proxyFigures(pid: number, before: ProxySnapshot, bytes: number, wall: number): ProxyFigures {
  const peakKiB = before.rss.stop();
  const spent = subtractCounters(readCounters(pid), before.counters);
  const threads = threadCpuByName(readThreadCpu(pid), before.threads);
  return {
    ...processFigures(spent, bytes, wall),
    mainThreadCpuSecondsPerGiB: (readMainThreadCpu(pid) - before.mainThreadCpu) / (bytes / GIB),
    peakRssMiB: peakKiB / 1024,
    ...(before.rss.peak ? { peakMemory: before.rss.peak } : {}),
    rssBySecondKiB: before.rss.perSecondKiB,
    threads: Object.fromEntries(Object.entries(threads).filter(([, seconds]) => seconds > 0)),
  };
}

export function processFigures(spent: Counters, bytes: number, wall: number): ProcessFigures {
  return {
    cpuSeconds: spent.cpuSeconds,
    cpuSecondsPerGiB: spent.cpuSeconds / (bytes / GIB),
    cores: spent.cpuSeconds / wall,
    systemShare: spent.systemSeconds / Math.max(spent.cpuSeconds, Number.EPSILON),
    readKiBPerCall: spent.readBytes / Math.max(1, spent.readCalls) / 1024,
    writeKiBPerCall: spent.writeBytes / Math.max(1, spent.writeCalls) / 1024,
  };
}

export function percent(share: number | undefined): number | undefined {
  return share === undefined ? undefined : share * 100;
}

/** Node, nginx, curl, CPU, kernel, and the machine's load average when the benchmark started. */
export function describeEnvironment(nginxVersion: string): Record<string, string | number> {
  const curl = spawnSync('curl', ['--version'], { encoding: 'utf8' }).stdout ?? '';
  const [load1, load5] = os.loadavg();
  return {
    node: process.version,
    nginx: nginxVersion,
    curl: /^curl (\S+)/.exec(curl)?.[1] ?? 'unknown',
    cpus: os.availableParallelism(),
    cpu: os.cpus()[0]?.model.trim() ?? 'unknown',
    kernel: os.release(),
    loadAverage1m: Math.round(load1! * 100) / 100,
    loadAverage5m: Math.round(load5! * 100) / 100,
  };
}

/** The environment line of a report. */
export function environmentLine(environment: Record<string, string | number>): string {
  return (
    `${environment.node}, ${environment.nginx}, curl ${environment.curl}, ${environment.cpus} × ${environment.cpu}, Linux ${environment.kernel}, ` +
    `load average ${environment.loadAverage1m} (1 min) / ${environment.loadAverage5m} (5 min) at start`
  );
}

/** Progress on stderr, prefixed with the benchmark's name. */
export function progressTo(name: string): (message: string) => void {
  return (message) => process.stderr.write(`[${name}] ${message}\n`);
}
