// What a process costs, read from /proc: CPU time (all threads, including threads that have already
// exited), read/write syscall counts and bytes (to tell small chunks from large ones), RSS. Reading
// /proc costs microseconds and needs no cooperation from the process measured.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

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
  private peakKiB = 0;
  private timer: NodeJS.Timeout | undefined;

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
      this.peakKiB = Math.max(this.peakKiB, readStatusKiB(this.pid, 'VmRSS'));
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
