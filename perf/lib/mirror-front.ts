// The proxy's registry-mirror front (mirror: in proxy.yaml, src/mirror.ts) for benchmarks: its policy
// lines, its port (it listens on 127.0.0.1:0 and says where in its operator log), the routes to it for
// curl and for undici pools (plain HTTP or HTTPS with a leaf from the proxy's CA), and the proxy's own
// access log, to check what the proxy says it answered.
import { closeSync, openSync, readFileSync, readSync, statSync } from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { CurlRoute } from './curl.ts';
import { directTls, type Route } from './https-clients.ts';
import type { ProxyProcess } from './proxy.ts';

/** The name the HTTPS mirror's certificate is for (tls: { names: [...] }); clients resolve it to loopback. */
export const MIRROR_HOST = 'mirror.test';
const MIRROR_LISTENING = 'the registry mirror is listening';
const PORT_TIMEOUT_MS = 10_000;

/** `mirror:` lines for proxy.yaml: on a port of its choosing, plain HTTP or HTTPS for MIRROR_HOST. */
export function mirrorPolicyLines(options: { tls: boolean }): string[] {
  return ['mirror:', '  listen: 127.0.0.1:0', ...(options.tls ? [`  tls: { names: [${MIRROR_HOST}] }`] : [])];
}

/**
 * The mirror's port, from the proxy's operator log (stderr, JSON lines): the mirror starts listening
 * after the intercepting front, so it may not be there yet when /healthz first answers.
 */
export async function waitForMirrorPort(proxy: ProxyProcess): Promise<number> {
  const deadline = performance.now() + PORT_TIMEOUT_MS;
  for (;;) {
    for (const line of readFileSync(proxy.stderrFile, 'utf8').split('\n')) {
      if (!line.includes(MIRROR_LISTENING)) continue;
      const listen = (JSON.parse(line) as { listen?: string }).listen ?? '';
      const port = Number(/:(\d+)$/.exec(listen)?.[1]);
      if (port > 0) return port;
    }
    if (performance.now() > deadline) {
      throw new Error(`the proxy (pid ${proxy.pid}) did not log "${MIRROR_LISTENING}" within ${PORT_TIMEOUT_MS} ms; ${proxy.stderrFile}:\n${readFileSync(proxy.stderrFile, 'utf8').slice(-2000)}`);
    }
    await sleep(20);
  }
}

/** How a mirror request names its registry: containerd's `?ns=host:port`, or the path prefix `host_port/` of CRI-O and podman. */
export type MirrorForm = 'ns' | 'path';

/** The mirror's path for `/v2/<repository>/…` of the registry `hostPort` (e.g. origin.test:8443). */
export function mirrorPath(canonicalPath: string, hostPort: string, form: MirrorForm): string {
  if (!canonicalPath.startsWith('/v2/')) throw new Error(`not a registry path: ${canonicalPath}`);
  if (form === 'ns') return `${canonicalPath}?ns=${encodeURIComponent(hostPort)}`;
  return `/v2/${hostPort.replace(/:(\d+)$/, '_$1')}/${canonicalPath.slice('/v2/'.length)}`;
}

export interface MirrorEndpoint {
  port: number;
  /** HTTPS with a leaf from the proxy's CA for MIRROR_HOST; plain HTTP otherwise. */
  tls: boolean;
  /** The proxy's CA (PEM file and text), for the HTTPS mirror's clients. */
  caFile: string;
  caPem: string;
}

/** curl to the mirror: http://127.0.0.1:<port><path>, or https://mirror.test:<port><path> resolved to loopback. */
export function mirrorCurlRoute(mirror: MirrorEndpoint, path: string): CurlRoute {
  if (!mirror.tls) {
    return { label: `the mirror on http://127.0.0.1:${mirror.port}`, url: `http://127.0.0.1:${mirror.port}${path}`, args: ['--noproxy', '*'] };
  }
  return {
    label: `the mirror on https://${MIRROR_HOST}:${mirror.port}`,
    url: `https://${MIRROR_HOST}:${mirror.port}${path}`,
    args: ['--noproxy', '*', '--resolve', `${MIRROR_HOST}:${mirror.port}:127.0.0.1`, '--cacert', mirror.caFile],
  };
}

/** An undici route to the mirror (HTTP/1.1 kept alive by the pool): plain TCP, or TLS trusting only the proxy's CA. */
export function mirrorPoolRoute(mirror: MirrorEndpoint): Route {
  return mirror.tls ? directTls({ host: MIRROR_HOST, port: mirror.port, caPem: mirror.caPem }) : plainHttp(mirror.port);
}

/** Plain HTTP to 127.0.0.1:port (Host: 127.0.0.1:port), as a node configured with http://<address>:<port> as its mirror. */
export function plainHttp(port: number): Route {
  return {
    label: `the mirror on http://127.0.0.1:${port}`,
    origin: `http://127.0.0.1:${port}`,
    connect: (_options, callback) => {
      const socket = net.connect(port, '127.0.0.1');
      const onError = (err: Error) => callback(err, null);
      socket.once('error', onError);
      socket.once('connect', () => {
        socket.off('error', onError);
        socket.setNoDelay(true);
        callback(null, socket);
      });
    },
  };
}

/** One line of the proxy's access log (stdout, JSON lines; src/log.ts AccessEntry), the fields checked here. */
export interface ProxyAccessEntry {
  method: string;
  host: string;
  path: string;
  status: number;
  cache?: string;
  type?: string;
}

/** The proxy's access log: mark() before a run, entriesSince(mark) after it (as nginx.ts's AccessLog). */
export class ProxyAccessLog {
  readonly file: string;

  constructor(proxy: ProxyProcess) {
    this.file = proxy.stdoutFile;
  }

  mark(): number {
    try {
      return statSync(this.file).size;
    } catch {
      return 0;
    }
  }

  entriesSince(mark: number): ProxyAccessEntry[] {
    const end = this.mark();
    if (end <= mark) return [];
    const buffer = Buffer.alloc(end - mark);
    const fd = openSync(this.file, 'r');
    try {
      readSync(fd, buffer, 0, buffer.length, mark);
    } finally {
      closeSync(fd);
    }
    const text = buffer.toString('utf8');
    // A line being written may be cut at the end: only whole lines count.
    const whole = text.slice(0, text.lastIndexOf('\n') + 1);
    return whole
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as ProxyAccessEntry);
  }

  /**
   * The entries since `mark` once there are at least `count` of them (the proxy writes a line when it
   * has finished a response, which may be a little after the client read the last byte), or whatever
   * is there after timeoutMs.
   */
  async waitForEntries(mark: number, count: number, timeoutMs = 3_000): Promise<ProxyAccessEntry[]> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const entries = this.entriesSince(mark);
      if (entries.length >= count || performance.now() > deadline) return entries;
      await sleep(20);
    }
  }
}

/** "GET 200 HIT × 4, GET 200 MISS × 1": what a run's access-log entries say, for messages. */
export function describeEntries(entries: readonly ProxyAccessEntry[]): string {
  const counts = new Map<string, number>();
  for (const e of entries) {
    const key = `${e.method} ${e.status} ${e.cache ?? '-'}`;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].map(([key, n]) => `${key} × ${n}`).join(', ') || 'none';
}

/** Clock ticks per second of /proc's times; 100 on every Linux we know. */
const CLOCK_TICKS = 100;

/**
 * CPU seconds (user + system) of this process's children that have exited and been reaped: fields
 * cutime and cstime of /proc/self/stat. Read before and after a run of curl clients (spawned through
 * setpriv, which execs, so the child is curl itself), the difference is what the clients spent — TLS
 * decryption included — and nothing else that runs on the machine.
 */
export function readReapedChildrenCpuSeconds(): number {
  const text = readFileSync('/proc/self/stat', 'utf8');
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  // proc(5): cutime is field 16, cstime 17; the fields after the name start at field 3.
  return (Number(fields[13]) + Number(fields[14])) / CLOCK_TICKS;
}
