// Two audiences: the access log (one JSON line per request on stdout, for machines) and operator
// messages (JSON lines on stderr, each naming what happened and what to do). Neither ever receives a
// header value: callers pass chosen fields, never a request's headers.

/** What an error is called in a log field or a message: its code (ECONNREFUSED…) when it has one, else its message. */
export function errorCode(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? (err as Error).message;
}

export type CacheStatus = 'HIT' | 'MISS' | 'STALE' | 'REVALIDATED' | 'JOINED' | 'BYPASS' | 'TUNNEL';

export interface AccessEntry {
  method: string;
  host: string;
  path: string;
  status: number;
  bytes: number;
  /** Milliseconds from sending upstream to its response headers; absent when upstream was not asked. */
  upstreamMs?: number;
  upstreamStatus?: number;
  cache?: CacheStatus;
  type?: string;
  client?: string;
  /** The proxy user, when users are configured (never a credential). */
  user?: string;
  /** Cluster mode: the replica that served the request, when it was not this one. */
  peer?: string;
  /** Cluster mode: served here for another replica's client (that replica logs the client's request). */
  forPeer?: boolean;
  ms: number;
  error?: string;
}

export interface Logger {
  access(entry: AccessEntry): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

export interface LoggerOptions {
  out?: (line: string) => void;
  err?: (line: string) => void;
  /** false: no access lines (benchmarks). */
  access?: boolean;
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const out = options.out ?? ((line) => process.stdout.write(line + '\n'));
  const err = options.err ?? ((line) => process.stderr.write(line + '\n'));
  const operator = (level: string) => (message: string, fields?: Record<string, unknown>) =>
    err(JSON.stringify({ time: new Date().toISOString(), level, message, ...fields }));
  return {
    access: options.access === false ? () => {} : (entry) => out(JSON.stringify({ time: new Date().toISOString(), ...entry })),
    info: operator('info'),
    warn: operator('warn'),
    error: operator('error'),
  };
}

/** Drops the query string: signed CDN URLs and upload states carry tokens in it. */
export function pathForLog(url: string | undefined): string {
  const text = url ?? '';
  const q = text.indexOf('?');
  return q < 0 ? text : text.slice(0, q);
}
