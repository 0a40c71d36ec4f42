// Requests that follow redirects the way registries need: blobs live behind 301/302/303/307/308
// chains to CDNs (Docker Hub → Cloudflare, ghcr → pkg-containers, registry.k8s.io → GAR → a relative
// path). Up to 5 hops; relative Locations resolve against the URL that sent them; Authorization is
// dropped as soon as a hop leaves the registry's origin (scheme, host or port) and never comes back.
import { SpanKind, type Context } from '@opentelemetry/api';
import type { Dispatcher } from 'undici';
import { tracer } from '../tracing.ts';

const REDIRECTS = new Set([301, 302, 303, 307, 308]);
export const MAX_REDIRECTS = 5;

export interface FollowedResponse {
  response: Dispatcher.ResponseData;
  /** The URL that answered last (for logs: without its query string). */
  url: URL;
  hops: number;
}

export class TooManyRedirectsError extends Error {
  override name = 'TooManyRedirectsError';
}

export async function requestFollowingRedirects(
  dispatcher: Dispatcher,
  start: URL,
  options: {
    method: 'GET' | 'HEAD';
    headers: Record<string, string>;
    signal?: AbortSignal;
    /** Tracing: each redirect becomes a `redirect` span, child of this context. */
    trace?: Context;
  },
): Promise<FollowedResponse> {
  let url = start;
  let headers = { ...options.headers };
  for (let hops = 0; ; hops++) {
    const hopStarted = options.trace ? Date.now() : 0;
    const response = await dispatcher.request({
      origin: url.origin,
      path: `${url.pathname}${url.search}`,
      method: options.method,
      headers: { ...headers, host: url.host },
      ...(options.signal ? { signal: options.signal } : {}),
    });
    const location = response.headers.location;
    if (!REDIRECTS.has(response.statusCode) || typeof location !== 'string') return { response, url, hops };
    await response.body.dump();
    if (options.trace) traceRedirect(options.trace, hopStarted, options.method, response.statusCode, url, location);
    if (hops >= MAX_REDIRECTS) throw new TooManyRedirectsError(`more than ${MAX_REDIRECTS} redirects from ${start.host}`);
    const next = new URL(location, url);
    if (next.protocol !== 'https:' && next.protocol !== 'http:') throw new TooManyRedirectsError(`redirect to unsupported ${next.protocol}`);
    // Credentials belong to the registry's origin: a CDN (or anything else) never sees them, nor does the
    // registry's own host over plain http (where anyone on the path would read them).
    if (next.origin !== start.origin) headers = withoutAuthorization(headers);
    url = next;
  }
}

/** A span for one hop that answered with a redirect: where from, where to (both without their query). */
function traceRedirect(parent: Context, startTime: number, method: string, status: number, from: URL, location: string): void {
  let to: string;
  try {
    to = urlForLog(new URL(location, from));
  } catch {
    to = 'invalid';
  }
  const attributes = { 'http.request.method': method, 'url.full': urlForLog(from), 'http.response.status_code': status, 'pullthrough.redirect.location': to };
  tracer.startSpan('redirect', { kind: SpanKind.CLIENT, startTime, attributes }, parent).end();
}

function withoutAuthorization(headers: Record<string, string>): Record<string, string> {
  const { authorization: _dropped, ...rest } = headers;
  return rest;
}

/** A URL for logs and keys: the signed query string of a CDN URL is never part of either. */
export function urlForLog(url: URL): string {
  return `${url.origin}${url.pathname}`;
}
