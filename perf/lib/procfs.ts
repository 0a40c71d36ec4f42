// What a process costs, read from /proc: CPU time (all threads, including threads that have already
// exited), read/write syscall counts and bytes (to tell small chunks from large ones), RSS. Reading
// /proc costs microseconds and needs no cooperation from the process measured.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

/** Clock ticks per second of utime/stime; 100 on every Linux we know, asked once anyway. */
const CLOCK_TICKS = ((): number => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

export interface Counters {
  /** utime + stime. */
  cpuSeconds: number;
  /** stime alone: the kernel's share (socket and file I/O, page faults). */
  systemSeconds: number;
  /** read(2)-family syscalls and the bytes they returned (sockets included; recv(2) is not counted). */
  readCalls: number;
  readBytes: number;
  /** write(2)-family syscalls and the bytes they took (sendfile(2) is not counted). */
  writeCalls: number;
  writeBytes: number;
}

/** The fields of /proc/<pid>[/task/<tid>]/stat after the command name (which may hold spaces and parens). */
function statFields(path: string): string[] {
  const text = readFileSync(path, 'utf8');
  return text.slice(text.lastIndexOf(')') + 2).split(' ');
}

/** utime and stime from a stat file: fields 14 and 15 of proc(5), i.e. 11 and 12 after the name. */
function cpuTimesOf(statPath: string): { user: number; system: number } {
  const fields = statFields(statPath);
  return { user: Number(fields[11]) / CLOCK_TICKS, system: Number(fields[12]) / CLOCK_TICKS };
}

function cpuSecondsOf(statPath: string): number {
  const { user, system } = cpuTimesOf(statPath);
  return user + system;
}

export function readCounters(pid: number): Counters {
  const io = new Map<string, number>();
  for (const line of readFileSync(`/proc/${pid}/io`, 'utf8').split('\n')) {
    const [key, value] = line.split(': ');
    if (key && value) io.set(key, Number(value));
  }
  const { user, system } = cpuTimesOf(`/proc/${pid}/stat`);
  return {
    cpuSeconds: user + system,
    systemSeconds: system,
    readCalls: io.get('syscr') ?? 0,
    readBytes: io.get('rchar') ?? 0,
    writeCalls: io.get('syscw') ?? 0,
    writeBytes: io.get('wchar') ?? 0,
  };
}

/** Counters summed over several processes (nginx: master and workers). */
export function readCountersOf(pids: readonly number[]): Counters {
  return pids.map(readCounters).reduce(addCounters, zeroCounters());
}

export function subtractCounters(after: Counters, before: Counters): Counters {
  return {
    cpuSeconds: after.cpuSeconds - before.cpuSeconds,
    systemSeconds: after.systemSeconds - before.systemSeconds,
    readCalls: after.readCalls - before.readCalls,
    readBytes: after.readBytes - before.readBytes,
    writeCalls: after.writeCalls - before.writeCalls,
    writeBytes: after.writeBytes - before.writeBytes,
  };
}

function addCounters(a: Counters, b: Counters): Counters {
  return {
    cpuSeconds: a.cpuSeconds + b.cpuSeconds,
    systemSeconds: a.systemSeconds + b.systemSeconds,
    readCalls: a.readCalls + b.readCalls,
    readBytes: a.readBytes + b.readBytes,
    writeCalls: a.writeCalls + b.writeCalls,
    writeBytes: a.writeBytes + b.writeBytes,
  };
}

function zeroCounters(): Counters {
  return { cpuSeconds: 0, systemSeconds: 0, readCalls: 0, readBytes: 0, writeCalls: 0, writeBytes: 0 };
}

/** CPU seconds of each live thread, keyed by thread id, with the thread's name (comm). */
export function readThreadCpu(pid: number): Map<number, { name: string; cpuSeconds: number }> {
  const threads = new Map<number, { name: string; cpuSeconds: number }>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      threads.set(Number(tid), { name, cpuSeconds: cpuSecondsOf(`/proc/${pid}/task/${tid}/stat`) });
    } catch {
      // The thread exited between readdir and read; its time is still in the process's total.
    }
  }
  return threads;
}

/**
 * CPU seconds spent between two readThreadCpu() snapshots, summed by thread name (Node 24 names them
 * "MainThread", "V8Worker" for V8's GC and compiler helpers, "libuv-worker", "WorkerThread", …).
 */
export function threadCpuByName(after: ReadonlyMap<number, { name: string; cpuSeconds: number }>, before: ReadonlyMap<number, { cpuSeconds: number }>): Record<string, number> {
  const byName: Record<string, number> = {};
  for (const [tid, thread] of after) {
    const spent = thread.cpuSeconds - (before.get(tid)?.cpuSeconds ?? 0);
    byName[thread.name] = (byName[thread.name] ?? 0) + spent;
  }
  return byName;
}

/** Main-thread CPU seconds: the thread whose id is the process id. */
export function readMainThreadCpu(pid: number): number {
  return cpuSecondsOf(`/proc/${pid}/task/${pid}/stat`);
}

/** A field of /proc/<pid>/status in KiB (VmRSS: resident now, VmHWM: the peak so far). */
export function readStatusKiB(pid: number, field: 'VmRSS' | 'VmHWM'): number {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error(`/proc/${pid}/status has no ${field}`);
  return Number(match[1]);
}

/**
 * The memory lines of /proc/<pid>/status, in KiB, and its thread count. VmRSS = RssAnon (heap, stacks,
 * Buffers: what the process allocated) + RssFile (mapped files: the node binary, libraries, LMDB's map)
 * + RssShmem.
 */
export interface MemoryStatus {
  VmRSS: number;
  VmHWM: number;
  RssAnon: number;
  RssFile: number;
  RssShmem: number;
  /** Virtual size: large for Node (V8 reserves address space); says nothing about memory used. */
  VmSize: number;
  Threads: number;
}

export function readMemoryStatus(pid: number): MemoryStatus {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? Number.NaN);
  return {
    VmRSS: field('VmRSS'),
    VmHWM: field('VmHWM'),
    RssAnon: field('RssAnon'),
    RssFile: field('RssFile'),
    RssShmem: field('RssShmem'),
    VmSize: field('VmSize'),
    Threads: field('Threads'),
  };
}

/** Live threads by name (comm): e.g. { MainThread: 1, V8Worker: 4, 'libuv-worker': 4, WorkerThread: 2 }. */
export function threadNames(pid: number): Record<string, number> {
  const byName: Record<string, number> = {};
  for (const { name } of readThreadCpu(pid).values()) byName[name] = (byName[name] ?? 0) + 1;
  return byName;
}

/** Processes whose parent is `pid` (nginx's workers), found by scanning /proc. */
export function childPids(pid: number): number[] {
  const children: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (Number(statFields(`/proc/${entry}/stat`)[1]) === pid) children.push(Number(entry));
    } catch {
      // Exited while we looked.
    }
  }
  return children;
}

/**
 * Samples VmRSS every intervalMs and keeps the peak. VmHWM would be exact, but it is the peak over the
 * process's whole life, and the proxy serves every scenario: each run needs its own peak.
 */
export class PeakRssSampler {
  private readonly pid: number;
  private readonly started = performance.now();
  private peakKiB = 0;
  private timer: NodeJS.Timeout | undefined;
  /** The whole status line-up of the sample with the highest VmRSS: what the peak was made of. */
  peak: MemoryStatus | undefined;
  /** The highest VmRSS (KiB) in each second since the sampler started: growth or a plateau. */
  readonly perSecondKiB: number[] = [];

  constructor(pid: number, intervalMs = 50) {
    this.pid = pid;
    this.sample();
    // unref: a run that fails before stop() must not keep the benchmark alive.
    this.timer = setInterval(() => this.sample(), intervalMs).unref();
  }

  /** Stops sampling (after one last sample) and returns the peak in KiB. */
  stop(): number {
    clearInterval(this.timer);
    this.timer = undefined;
    this.sample();
    return this.peakKiB;
  }

  private sample(): void {
    try {
      const status = readMemoryStatus(this.pid);
      if (status.VmRSS > this.peakKiB) {
        this.peakKiB = status.VmRSS;
        this.peak = status;
      }
      const second = Math.floor((performance.now() - this.started) / 1000);
      while (this.perSecondKiB.length <= second) this.perSecondKiB.push(0);
      this.perSecondKiB[second] = Math.max(this.perSecondKiB[second]!, status.VmRSS);
    } catch {
      // The process is gone; the run will fail on its own, with a better message.
    }
  }
}

/**
 * CPU seconds the whole machine spent working, from /proc/stat: user, nice, system, irq and softirq
 * (guest time is already in user; idle, iowait and steal — time the hypervisor took — are not work).
 */
export function readMachineBusySeconds(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  const [user, nice, system, , , irq, softirq] = line.trim().split(/\s+/).slice(1).map(Number);
  return ((user ?? 0) + (nice ?? 0) + (system ?? 0) + (irq ?? 0) + (softirq ?? 0)) / CLOCK_TICKS;
}

/**
 * The resident memory of a process by what holds it, from /proc/<pid>/smaps (KiB). The kinds are told
 * apart by the shape of the mapping, which is a heuristic that fits Node on glibc:
 * - v8Pages: anonymous 256 KiB mappings, the pages of the V8 heaps (every isolate: the main thread and
 *   each worker thread);
 * - mallocMain: [heap], glibc's main arena: what the main thread malloc()s (ArrayBuffer backing stores
 *   of Buffers, OpenSSL's buffers, …);
 * - mallocThreads: anonymous mappings that start on a 64 MiB boundary, glibc's per-thread arenas (the
 *   worker threads' and libuv's threads' malloc()s);
 * - anonOther: every other anonymous mapping (V8's code and large-object spaces, WebAssembly memory,
 *   thread stacks, malloc's own mmap()ed large chunks);
 * - nodeBinary / otherFiles: file-backed pages (shared with other processes running the same files).
 */
export interface MemoryKinds {
  totalKiB: number;
  v8Pages: number;
  mallocMain: number;
  mallocThreads: number;
  anonOther: number;
  nodeBinary: number;
  otherFiles: number;
}

const ARENA_ALIGNMENT = 64 * 1024 * 1024;

export function readMemoryKinds(pid: number): MemoryKinds {
  let exe = '';
  try {
    exe = readlinkSync(`/proc/${pid}/exe`);
  } catch {
    // gone, or not ours to read: every file then counts as "other"
  }
  const kinds: MemoryKinds = { totalKiB: 0, v8Pages: 0, mallocMain: 0, mallocThreads: 0, anonOther: 0, nodeBinary: 0, otherFiles: 0 };
  let kind: keyof MemoryKinds | undefined;
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const header = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$/.exec(line);
    if (header) {
      const start = Number.parseInt(header[1]!, 16);
      const sizeKiB = (Number.parseInt(header[2]!, 16) - start) / 1024;
      const name = header[3]!;
      if (name === '[heap]') kind = 'mallocMain';
      else if (name.startsWith('/')) kind = name === exe ? 'nodeBinary' : 'otherFiles';
      else if (name !== '') kind = 'anonOther'; // [stack], [vdso], anon_inode:…
      else if (sizeKiB === 256) kind = 'v8Pages';
      else if (start % ARENA_ALIGNMENT === 0) kind = 'mallocThreads';
      else kind = 'anonOther';
      continue;
    }
    if (kind && line.startsWith('Rss:')) {
      const kiB = Number(line.split(/\s+/)[1]);
      kinds[kind] += kiB;
      kinds.totalKiB += kiB;
      kind = undefined;
    }
  }
  return kinds;
}

/** Reads readMemoryKinds every intervalMs (smaps is slower to read than status) and keeps the largest. */
export class MemoryKindsSampler {
  private readonly pid: number;
  private timer: NodeJS.Timeout | undefined;
  peak: MemoryKinds | undefined;

  constructor(pid: number, intervalMs = 500) {
    this.pid = pid;
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs).unref();
  }

  stop(): MemoryKinds | undefined {
    clearInterval(this.timer);
    this.timer = undefined;
    return this.peak;
  }

  private sample(): void {
    try {
      const kinds = readMemoryKinds(this.pid);
      if (!this.peak || kinds.totalKiB > this.peak.totalKiB) this.peak = kinds;
    } catch {
      // gone
    }
  }
}
