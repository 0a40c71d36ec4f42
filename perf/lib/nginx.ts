// nginx serving a directory over TLS on loopback: the origin the proxy forwards to, and the reference
// the proxy's figures are compared with (the same files, served the way a well-tuned server does).
// One worker process, HTTP/1.1, sendfile on, no access log unless asked for (to count the requests
// that reach the origin); everything it writes stays in its dir.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { addCleanup, isRunning, spawnTracked, stopChild } from './cleanup.ts';
import { acceptsConnections, freePort, waitFor } from './net.ts';
import { childPids } from './procfs.ts';

export const NGINX_BIN = '/usr/sbin/nginx';
const READY_TIMEOUT_MS = 10_000;
const START_ATTEMPTS = 3;

export interface NginxOptions {
  /** Working dir for its config, pid file, logs and temp paths (created). */
  dir: string;
  /** Document root: a request for /a/b is answered with <root>/a/b. */
  root: string;
  /** PEM certificate chain and key of the server. */
  certPem: string;
  keyPem: string;
  /** Log every request to <dir>/access.log (see AccessLog): to count what reaches the origin. */
  accessLog?: boolean;
  /**
   * Extra directives inside the server block, e.g. a `location` that serves manifests with their media
   * type and headers (perf/manifest-hit.ts). Paths in it must be quoted by the caller.
   */
  serverConfig?: string;
  /**
   * Extra directives at the http{} level: maps, a proxy_cache_path, more server blocks (each with a
   * port of its own from freePort()). Paths in it must be quoted by the caller.
   */
  httpConfig?: string;
  /** worker_processes; default 1. */
  workerProcesses?: number | 'auto';
  /**
   * The access log's format (with `accessLog: true`), instead of "method uri status bytes seconds":
   * AccessLog.entriesSince then does not apply, AccessLog.linesSince does.
   */
  accessLogFormat?: string;
  /** Listen on this port (one attempt) instead of a free one: when other config must name it beforehand. */
  fixedPort?: number;
  /** The address to listen on; default 127.0.0.1. */
  listenAddress?: string;
}

/** One request as nginx logged it (written when the response is finished). */
export interface AccessLogEntry {
  method: string;
  /** As the client sent it, query included. */
  uri: string;
  status: number;
  /** Body bytes sent. */
  bytes: number;
  seconds: number;
}

/** The access log: mark() before a run, entriesSince(mark) after it. */
export class AccessLog {
  readonly file: string;

  constructor(file: string) {
    this.file = file;
  }

  mark(): number {
    try {
      return statSync(this.file).size;
    } catch {
      return 0; // nothing logged yet
    }
  }

  /** The lines logged since `mark`, as written (any format). */
  linesSince(mark: number): string[] {
    const end = this.mark();
    if (end <= mark) return [];
    const buffer = Buffer.alloc(end - mark);
    const fd = openSync(this.file, 'r');
    try {
      readSync(fd, buffer, 0, buffer.length, mark);
    } finally {
      closeSync(fd);
    }
    return buffer
      .toString('utf8')
      .split('\n')
      .filter((line) => line.length > 0);
  }

  entriesSince(mark: number): AccessLogEntry[] {
    return this.linesSince(mark)
      .map((line) => {
        const [method = '', uri = '', status, bytes, seconds] = line.split(' ');
        return { method, uri, status: Number(status), bytes: Number(bytes), seconds: Number(seconds) };
      });
  }
}

export interface NginxOrigin {
  port: number;
  /** nginx -v, e.g. "nginx/1.22.1". */
  version: string;
  masterPid: number;
  workerPids: number[];
  /** With `accessLog: true`. */
  accessLog?: AccessLog;
  /** Master and workers: what the benchmark sums the CPU of. */
  pids(): number[];
  stop(): Promise<void>;
}

export async function startTlsNginx(options: NginxOptions): Promise<NginxOrigin> {
  mkdirSync(join(options.dir, 'temp'), { recursive: true });
  writeFileSync(join(options.dir, 'server.crt'), options.certPem);
  writeFileSync(join(options.dir, 'server.key'), options.keyPem, { mode: 0o600 });
  let lastError: Error | undefined;
  if (options.fixedPort !== undefined) return startOnce(options, options.fixedPort);
  for (let attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
    try {
      return await startOnce(options, await freePort());
    } catch (err) {
      // Most likely the free port was taken between freePort() and nginx's bind: try another one.
      lastError = err as Error;
    }
  }
  throw lastError!;
}

async function startOnce(options: NginxOptions, port: number): Promise<NginxOrigin> {
  const { dir } = options;
  const confFile = join(dir, 'nginx.conf');
  const errorLog = join(dir, 'error.log');
  writeFileSync(confFile, nginxConf(options, port));
  const errorFd = openSync(errorLog, 'a');
  // -e: the error log before the config is read (the compiled-in default is a system path).
  const args = ['-p', `${dir}/`, '-c', confFile, '-e', errorLog, '-g', 'daemon off;'];
  const child = spawnTracked(NGINX_BIN, args, { stdio: ['ignore', errorFd, errorFd] }, 'TERM');
  closeSync(errorFd);
  const exited = (): boolean => !isRunning(child);
  if (!(await waitFor(() => acceptsConnections(port, options.listenAddress), READY_TIMEOUT_MS, exited))) {
    await stopChild(child, 'SIGKILL');
    throw new Error(`nginx did not start on ${options.listenAddress ?? '127.0.0.1'}:${port}; ${errorLog}:\n${readFileSync(errorLog, 'utf8').slice(-2000)}`);
  }
  const masterPid = child.pid!;
  let workerPids: number[];
  try {
    workerPids = await findWorkers(masterPid);
  } catch (err) {
    await stopChild(child, 'SIGTERM');
    throw err;
  }
  // nginx's workers are not our children: when the exit cleanup SIGKILLs the master they would
  // outlive it, holding the port. Kill them too. (A graceful stop takes them down itself.)
  const unregister = addCleanup(() => killQuietly(workerPids));
  return {
    port,
    version: nginxVersion(),
    masterPid,
    workerPids,
    ...(options.accessLog ? { accessLog: new AccessLog(accessLogFile(dir)) } : {}),
    pids: () => [masterPid, ...workerPids],
    async stop() {
      // SIGTERM: fast shutdown; the master stops its workers and then exits.
      await stopChild(child, 'SIGTERM');
      unregister();
    },
  };
}

function nginxConf(options: NginxOptions, port: number): string {
  const { dir } = options;
  const q = (path: string) => JSON.stringify(path); // nginx accepts double-quoted strings with \" escapes
  const temp = (name: string) => q(join(dir, 'temp', name));
  // As root, workers would run as "nobody" and could not read our 0700 temp dir. (As anyone else,
  // nginx cannot switch users and ignores the directive with a warning, so it is left out.)
  const user = process.getuid?.() === 0 ? 'user root;\n' : '';
  return `# Generated by perf/lib/nginx.ts for one benchmark run.
${user}worker_processes ${options.workerProcesses ?? 1};
pid ${q(join(dir, 'nginx.pid'))};
error_log ${q(join(dir, 'error.log'))} warn;
events { worker_connections 1024; }
http {
  ${options.accessLog ? `log_format bench '${options.accessLogFormat ?? '$request_method $request_uri $status $body_bytes_sent $request_time'}';\n  access_log ${q(accessLogFile(dir))} bench;` : 'access_log off;'}
  # Inert under TLS without kernel TLS (not enabled here): the worker reads the file in 32 KiB pieces
  # and writes 16 KiB TLS records (ssl_buffer_size). Kept so that a plain-HTTP origin would use it.
  sendfile on;
  keepalive_timeout 60s;
  default_type application/octet-stream;
  client_body_temp_path ${temp('body')};
  proxy_temp_path ${temp('proxy')};
  fastcgi_temp_path ${temp('fastcgi')};
  uwsgi_temp_path ${temp('uwsgi')};
  scgi_temp_path ${temp('scgi')};
  server {
    listen ${options.listenAddress ?? '127.0.0.1'}:${port} ssl;
    ssl_certificate ${q(join(dir, 'server.crt'))};
    ssl_certificate_key ${q(join(dir, 'server.key'))};
    root ${q(options.root)};
${options.serverConfig ? options.serverConfig.replace(/^/gm, '    ') + '\n' : ''}  }
${options.httpConfig ? options.httpConfig.replace(/^/gm, '  ') + '\n' : ''}}
`;
}

function accessLogFile(dir: string): string {
  return join(dir, 'access.log');
}

/** The master forks its worker right after binding; wait until it shows up in /proc. */
async function findWorkers(masterPid: number): Promise<number[]> {
  let workers: number[] = [];
  await waitFor(async () => (workers = childPids(masterPid)).length > 0, READY_TIMEOUT_MS);
  if (workers.length === 0) throw new Error(`nginx master ${masterPid} has no worker process`);
  return workers;
}

function nginxVersion(): string {
  // nginx -v prints "nginx version: nginx/1.22.1" to stderr.
  const { stderr } = spawnSync(NGINX_BIN, ['-v'], { encoding: 'utf8' });
  return /nginx\/\S+/.exec(stderr ?? '')?.[0] ?? 'unknown';
}

function killQuietly(pids: readonly number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
}
