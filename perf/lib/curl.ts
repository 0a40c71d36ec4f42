// curl clients: a native, widely used client whose own cost is the same whether it talks to the
// origin or through the proxy, so the difference between the two runs is the proxy's. Each client is
// its own process, so N clients use N connections and can use every core.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { addCleanup, spawnTracked } from './cleanup.ts';

/** Where and how curl connects; the URL is always the origin's (through the proxy, curl sends CONNECT). */
export interface CurlRoute {
  /** For messages: "direct" or "through the proxy at …". */
  label: string;
  url: string;
  args: string[];
}

/** Straight to the origin: the reference. `--noproxy '*'` so that an HTTPS_PROXY in the shell cannot interfere. */
export function directRoute(options: { host: string; port: number; path: string; caFile: string }): CurlRoute {
  return {
    label: 'direct',
    url: `https://${options.host}:${options.port}${options.path}`,
    args: ['--noproxy', '*', '--resolve', `${options.host}:${options.port}:127.0.0.1`, '--cacert', options.caFile],
  };
}

/** Through the proxy with CONNECT; the proxy resolves the host (its policy's `hosts`), curl does not. */
export function proxiedRoute(options: { host: string; port: number; path: string; proxyUrl: string; proxyCaFile: string }): CurlRoute {
  return {
    label: `through the proxy at ${options.proxyUrl}`,
    url: `https://${options.host}:${options.port}${options.path}`,
    args: ['--proxy', options.proxyUrl, '--cacert', options.proxyCaFile],
  };
}

export interface CurlResult {
  status: number;
  bytes: number;
  /** curl's time_total and time_starttransfer (connect, CONNECT, TLS, request, first byte). */
  totalSeconds: number;
  firstByteSeconds: number;
  /** The response's X-Cache header (HIT, MISS, JOINED, BYPASS); '' when there is none (nginx). */
  cache: string;
  /** When curl exited, in seconds after the first client was spawned (or, with `together`, released). */
  exitedAtSeconds: number;
}

export interface ClientsResult {
  /** From spawning the first client (with `together`: from releasing them) to the exit of the last one. */
  wallSeconds: number;
  clients: CurlResult[];
  /**
   * How far apart the clients started: max − min over the clients of (exit time − curl's time_total),
   * in ms. With `together` this is the spread of curl's own starts after the release.
   */
  startSpreadMs: number;
}

export interface ClientsOptions {
  /** Bytes every client must receive (the file's size, or the range's); anything else throws. */
  expectBytes: number;
  /** "0-1023": ask for a byte range (expects 206). */
  range?: string;
  /** Gives up on a client after this long. */
  maxSeconds?: number;
  /** Every client's X-Cache must be one of these (e.g. ['HIT'], or ['MISS', 'JOINED']); anything else throws. */
  expectCache?: readonly string[];
  /**
   * Start the clients as one: each is spawned as `sh` blocked in opening a FIFO for reading, and once
   * every one of them is blocked there (/proc/<pid>/wchan), one open for writing releases them all at
   * once; each then execs curl. The wall time is counted from the release. Without it the clients are
   * spawned one after the other (a few ms apart) and the wall time counts from the first spawn.
   */
  together?: boolean;
}

/** The X-Cache header last: it may be empty, and then the split below leaves it ''. */
const WRITE_OUT = '%{http_code} %{size_download} %{time_total} %{time_starttransfer} %header{x-cache}';
/** How long `together` waits for every client to block on the FIFO before it gives up. */
const BARRIER_TIMEOUT_MS = 10_000;

/** Runs `count` curl clients at once, each downloading the whole of `route.url` to /dev/null. */
export async function runClients(count: number, route: CurlRoute, options: ClientsOptions): Promise<ClientsResult> {
  const barrier = options.together ? new StartBarrier() : undefined;
  try {
    let started = performance.now();
    const clock = { since: () => (performance.now() - started) / 1000 };
    const running = Array.from({ length: count }, () => runOne(route, options, clock, barrier));
    if (barrier) {
      try {
        await barrier.waitUntilBlocked(count);
      } catch (err) {
        // Never release clients that were not measured: kill them, and let their failures settle.
        barrier.kill();
        await Promise.allSettled(running);
        throw err;
      }
      started = performance.now();
      barrier.release();
    }
    const clients = await Promise.all(running);
    const wallSeconds = clock.since();
    const starts = clients.map((c) => c.exitedAtSeconds - c.totalSeconds);
    return { wallSeconds, clients, startSpreadMs: (Math.max(...starts) - Math.min(...starts)) * 1000 };
  } finally {
    barrier?.remove();
  }
}

/**
 * The FIFO that `together` clients wait on; see ClientsOptions.together. Exported for clients other
 * than curl (perf/lib/skopeo.ts): wrap() their command, push their pids, waitUntilBlocked(), release().
 */
export class StartBarrier {
  readonly fifo: string;
  readonly pids: number[] = [];
  private readonly dir: string;
  private readonly unregister: () => void;

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'pullthrough-perf-barrier-'));
    this.fifo = join(this.dir, 'start');
    const made = spawnSync('mkfifo', [this.fifo], { encoding: 'utf8' });
    if (made.status !== 0) throw new Error(`mkfifo ${this.fifo} failed: ${made.stderr ?? made.error?.message}`);
    this.unregister = addCleanup(() => rmSync(this.dir, { recursive: true, force: true }));
  }

  /** sh: block in open(2) of the FIFO until the release, close it, become curl. */
  wrap(command: string, args: readonly string[]): { command: string; args: string[] } {
    return { command: 'sh', args: ['-c', 'exec 3<"$0" && exec 3<&- && exec "$@"', this.fifo, command, ...args] };
  }

  async waitUntilBlocked(count: number): Promise<void> {
    const deadline = performance.now() + BARRIER_TIMEOUT_MS;
    while (this.pids.length < count || !this.pids.every((pid) => wchan(pid) === 'wait_for_partner')) {
      if (performance.now() > deadline) throw new Error(`the clients did not all reach the start barrier within ${BARRIER_TIMEOUT_MS} ms`);
      await sleep(5);
    }
  }

  /** Opening the FIFO for writing completes every reader's open at once. */
  release(): void {
    closeSync(openSync(this.fifo, 'w'));
  }

  kill(): void {
    for (const pid of this.pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }

  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
    this.unregister();
  }
}

/** What the process is blocked on in the kernel ("wait_for_partner": opening a FIFO without a writer). */
function wchan(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/wchan`, 'utf8');
  } catch {
    return '';
  }
}

async function runOne(route: CurlRoute, options: ClientsOptions, clock: { since(): number }, barrier?: StartBarrier): Promise<CurlResult> {
  const args = [
    '--disable', // must come first: no ~/.curlrc
    '--silent',
    '--show-error',
    '--http1.1',
    '--output',
    '/dev/null',
    '--write-out',
    WRITE_OUT,
    '--max-time',
    String(options.maxSeconds ?? 600),
    ...(options.range ? ['--range', options.range] : []),
    ...route.args,
    route.url,
  ];
  const wrapped = barrier ? barrier.wrap('curl', args) : { command: 'curl', args };
  const { code, stdout, stderr } = await capture(wrapped.command, wrapped.args, (pid) => barrier?.pids.push(pid));
  const exitedAtSeconds = clock.since();
  const [status, bytes, total, firstByte, cache] = stdout.trim().split(' ');
  const result: CurlResult = {
    status: Number(status ?? 0),
    bytes: Number(bytes ?? 0),
    totalSeconds: Number(total ?? 0),
    firstByteSeconds: Number(firstByte ?? 0),
    cache: cache ?? '',
    exitedAtSeconds,
  };
  const expectStatus = options.range ? 206 : 200;
  const cacheOk = !options.expectCache || options.expectCache.includes(result.cache);
  if (code !== 0 || result.status !== expectStatus || result.bytes !== options.expectBytes || !cacheOk) {
    throw new Error(
      `curl ${route.url} (${route.label}) failed: exit ${code}, HTTP ${result.status} (expected ${expectStatus}), ` +
        `${result.bytes} bytes (expected ${options.expectBytes})` +
        (options.expectCache ? `, X-Cache "${result.cache}" (expected ${options.expectCache.join(' or ')})` : '') +
        (stderr ? `: ${stderr.trim()}` : ''),
    );
  }
  return result;
}

function capture(command: string, args: string[], spawned: (pid: number) => void = () => {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawnTracked(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } });
    if (child.pid !== undefined) spawned(child.pid);
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.once('error', (err) => reject(new Error(`cannot run ${command}: ${err.message}`)));
    // 'close', not 'exit': all output has been read by then.
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** HEAD of `route.url`: the status and X-Cache header ('' without one). Never throws for an HTTP status. */
export async function headRequest(route: CurlRoute): Promise<{ status: number; cache: string }> {
  const args = ['--disable', '--silent', '--show-error', '--http1.1', '--head', '--output', '/dev/null', '--write-out', '%{http_code} %header{x-cache}', '--max-time', '30', ...route.args, route.url];
  const { code, stdout, stderr } = await capture('curl', args);
  if (code !== 0) throw new Error(`curl --head ${route.url} (${route.label}) failed: exit ${code}: ${stderr.trim()}`);
  const [status, cache] = stdout.trim().split(' ');
  return { status: Number(status), cache: cache ?? '' };
}

/** Polls HEAD until X-Cache is HIT (a fill is committed only after its last client got the last byte). */
export async function waitForCacheHit(route: CurlRoute, timeoutMs = 120_000): Promise<number> {
  const started = performance.now();
  for (;;) {
    const { cache } = await headRequest(route);
    if (cache === 'HIT') return (performance.now() - started) / 1000;
    if (performance.now() - started > timeoutMs) throw new Error(`${route.url} is not a cache HIT after ${timeoutMs / 1000} s (X-Cache "${cache}")`);
    await sleep(100);
  }
}
