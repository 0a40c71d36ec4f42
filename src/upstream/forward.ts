// Pass-through of one request to the upstream registry, streaming both ways: what the cache does not
// answer goes here, and so does everything while caching is not enabled for a request type.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { pipeline } from 'node:stream/promises';
import type { Dispatcher } from 'undici';
import { errors as undiciErrors } from 'undici';
import { sendRegistryError } from '../registry/errors.ts';
import { spool, type SpooledBody } from './spool.ts';

/** Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy's own. */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

/**
 * Request headers that stay here. Expect: Node's server has answered the client's 100-continue itself
 * (no 'checkContinue' listener) and reads the body; undici refuses a request that carries it.
 */
const NOT_FORWARDED = new Set(['host', 'expect']);

export interface ForwardTarget {
  /** Set: request bodies are written here in full before they go upstream (PROXY_REQUEST_BUFFERING). */
  spoolDir?: string;
  dispatcher: Dispatcher;
  /** "https://host:port" or "http://host:port". */
  origin: string;
  /** Value of the Host header upstream: the host[:port] the client asked for. */
  hostHeader: string;
  /** The proxy's own Authorization, for a client that sent none. */
  authorization?: string;
}

export interface ForwardResult {
  status: number;
  upstreamStatus?: number;
  upstreamMs?: number;
  bytes: number;
  error?: string;
}

/** The client's end-to-end headers, for `hostHeader`; `authorization`: the proxy's, for a client that sent none. */
export function requestHeadersForUpstream(req: IncomingMessage, hostHeader: string, authorization?: string): Record<string, string | string[]> {
  const headers: Record<string, string | string[]> = {};
  const connectionTokens = new Set(String(req.headers.connection ?? '').toLowerCase().split(/\s*,\s*/));
  for (const [name, value] of Object.entries(req.headers)) {
    if (value === undefined || HOP_BY_HOP.has(name) || connectionTokens.has(name) || NOT_FORWARDED.has(name)) continue;
    headers[name] = value;
  }
  headers.host = hostHeader;
  if (authorization) headers.authorization = authorization;
  return headers;
}

export function responseHeadersForClient(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  const connectionTokens = new Set(String(headers.connection ?? '').toLowerCase().split(/\s*,\s*/));
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || HOP_BY_HOP.has(name) || connectionTokens.has(name)) continue;
    out[name] = value;
  }
  return out;
}

/** Streams the request upstream and the response back; never throws (errors become 502/504 answers). */
export async function forward(req: IncomingMessage, res: ServerResponse, target: ForwardTarget, extraHeaders: Record<string, string> = {}): Promise<ForwardResult> {
  const method = req.method ?? 'GET';
  const hasBody = req.headers['content-length'] !== undefined ? req.headers['content-length'] !== '0' : req.headers['transfer-encoding'] !== undefined;
  let spooled: SpooledBody | undefined;
  const headers = requestHeadersForUpstream(req, target.hostHeader, target.authorization);
  if (hasBody && target.spoolDir) {
    try {
      spooled = await spool(req, target.spoolDir);
    } catch (err) {
      // The client broke off its upload (or the disk failed): nothing went upstream, nothing to answer.
      res.destroy();
      return { status: 499, bytes: 0, error: `the upload could not be read: ${(err as Error).message}` };
    }
    headers['content-length'] = String(spooled.size);
  }
  const started = performance.now();
  let response: Dispatcher.ResponseData;
  try {
    response = await target.dispatcher.request({
      origin: target.origin,
      path: req.url ?? '/',
      method: method as Dispatcher.HttpMethod,
      headers,
      body: spooled ? spooled.body : hasBody ? req : null,
    });
  } catch (err) {
    return upstreamFailed(res, err as Error, target);
  } finally {
    await spooled?.discard();
  }
  const upstreamMs = Math.round(performance.now() - started);
  res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), ...extraHeaders });
  let bytes = 0;
  response.body.on('data', (chunk: Buffer) => (bytes += chunk.length));
  const result = { status: response.statusCode, upstreamStatus: response.statusCode, upstreamMs };
  try {
    await pipeline(response.body, res);
  } catch (err) {
    // The client left, or upstream broke mid-body: either way the client's stream is cut, not ended cleanly.
    res.destroy();
    return { ...result, bytes, error: (err as Error).message };
  }
  return { ...result, bytes };
}

/** A registry-style 504 (timeouts) or 502 (anything else) for a request upstream never answered. */
export function upstreamFailed(res: ServerResponse, err: Error, target: Pick<ForwardTarget, 'origin'>): ForwardResult {
  const timedOut = err instanceof undiciErrors.ConnectTimeoutError || err instanceof undiciErrors.HeadersTimeoutError;
  const status = timedOut ? 504 : 502;
  const message = `upstream ${target.origin} ${timedOut ? 'timed out' : 'failed'}: ${describeUpstreamError(err)}`;
  sendRegistryError(res, status, 'UNAVAILABLE', message);
  return { status, bytes: 0, error: message };
}

/** The cause's own words and code, with what to do for the errors operators meet most. */
export function describeUpstreamError(err: Error): string {
  const cause = ((err as { cause?: Error }).cause ?? err) as NodeJS.ErrnoException;
  const text = cause.code && !cause.message.includes(cause.code) ? `${cause.message} (${cause.code})` : cause.message;
  if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS_CERT/.test(cause.code ?? '')) {
    return `${text}; trust the registry's CA with tls.ca in proxy.yaml or NODE_EXTRA_CA_CERTS`;
  }
  return text;
}
