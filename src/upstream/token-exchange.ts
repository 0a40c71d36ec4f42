// The proxy's own answer to a registry's Bearer challenge (distribution's token protocol): a token
// from the realm for a service and scopes, with the registry's central credentials or anonymously.
// GET with Basic first (what every token service speaks); the OAuth2 password grant (POST form) when
// the service does not offer GET. Tokens are cached per realm, service, scopes and identity until
// shortly before they expire; concurrent requests for the same token share one exchange.
import { SpanKind } from '@opentelemetry/api';
import type { Dispatcher } from 'undici';
import type { Credentials } from '../../config/policy.ts';
import { endSpan, tracer } from '../tracing.ts';
import { readAtMost } from './body.ts';

export interface TokenRequest {
  /** The challenge's realm, e.g. https://auth.docker.io/token. */
  realm: URL;
  service?: string;
  scopes: string[];
  credentials?: Credentials;
}

export type TokenResult =
  | { ok: true; token: string; expiresAt: number }
  /** `status`: the token service's answer, when it gave one. */
  | { ok: false; error: string; status?: number };

/** The spec's default lifetime when a token service does not say (60 s). */
const DEFAULT_EXPIRES_IN_S = 60;
export const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024;
/**
 * Bound on cached tokens (one per registry, scope and identity in use; a scope names a repository, so
 * clients choose the keys): the least recently used goes first.
 */
export const MAX_CACHED_TOKENS = 4096;
/**
 * Bound on exchanges under way at once (distinct keys; requests for the same token share one). Beyond
 * it a request fails at once instead of queueing: a client naming ever new repositories cannot grow
 * the map, nor send the token service more than this many requests at a time.
 */
export const MAX_EXCHANGES_IN_FLIGHT = 256;

export class TokenExchange {
  private readonly cache = new Map<string, { token: string; expiresAt: number }>();
  private readonly inflight = new Map<string, Promise<TokenResult>>();

  async token(dispatcher: Dispatcher, request: TokenRequest): Promise<TokenResult> {
    const key = cacheKey(request);
    const cached = this.cache.get(key);
    if (cached) {
      this.cache.delete(key);
      if (cached.expiresAt > Date.now()) {
        this.cache.set(key, cached); // the most recently used last
        return { ok: true, ...cached };
      }
    }
    let pending = this.inflight.get(key);
    if (!pending) {
      if (this.inflight.size >= MAX_EXCHANGES_IN_FLIGHT) {
        return { ok: false, error: `${MAX_EXCHANGES_IN_FLIGHT} token exchanges are already under way; try again shortly` };
      }
      pending = exchange(dispatcher, request).finally(() => this.inflight.delete(key));
      this.inflight.set(key, pending);
    }
    const result = await pending;
    if (result.ok) {
      this.cache.delete(key);
      this.cache.set(key, { token: result.token, expiresAt: result.expiresAt });
      if (this.cache.size > MAX_CACHED_TOKENS) this.cache.delete(this.cache.keys().next().value!);
    }
    return result;
  }

  /** Tokens cached and exchanges under way, for tests of the bounds. */
  get sizes(): { cached: number; inFlight: number } {
    return { cached: this.cache.size, inFlight: this.inflight.size };
  }

  /** A token the registry refused (expired early, revoked): the next request exchanges again. */
  forget(request: TokenRequest, token: string): void {
    const key = cacheKey(request);
    if (this.cache.get(key)?.token === token) this.cache.delete(key);
  }
}

function cacheKey(request: TokenRequest): string {
  return JSON.stringify([request.realm.href, request.service ?? '', [...request.scopes].sort(), request.credentials?.username ?? '']);
}

async function exchange(dispatcher: Dispatcher, request: TokenRequest): Promise<TokenResult> {
  const span = tracer.startSpan('token', {
    kind: SpanKind.CLIENT,
    attributes: {
      'url.full': `${request.realm.origin}${request.realm.pathname}`,
      'pullthrough.token.scopes': request.scopes.join(' '),
      'pullthrough.token.identity': request.credentials ? 'central' : 'anonymous',
    },
  });
  let result: TokenResult;
  try {
    result = await tokenByGet(dispatcher, request);
    // No GET endpoint: the OAuth2 password grant, which needs credentials to be worth asking.
    if (!result.ok && (result.status === 404 || result.status === 405) && request.credentials) result = await tokenByPost(dispatcher, request);
  } catch (err) {
    result = { ok: false, error: `the token service ${request.realm.origin} failed: ${(err as Error).message}` };
  }
  endSpan(span, result.ok ? { 'http.response.status_code': 200 } : result.status !== undefined ? { 'http.response.status_code': result.status } : {}, result.ok ? undefined : result.error);
  return result;
}

async function tokenByGet(dispatcher: Dispatcher, request: TokenRequest): Promise<TokenResult> {
  const url = new URL(request.realm);
  if (request.service) url.searchParams.set('service', request.service);
  for (const scope of request.scopes) url.searchParams.append('scope', scope);
  const headers: Record<string, string> = { host: url.host, accept: 'application/json' };
  if (request.credentials) headers.authorization = basicAuthorization(request.credentials);
  const response = await dispatcher.request({ origin: url.origin, path: `${url.pathname}${url.search}`, method: 'GET', headers });
  return tokenFrom(response, request);
}

async function tokenByPost(dispatcher: Dispatcher, request: TokenRequest): Promise<TokenResult> {
  const form = new URLSearchParams({ grant_type: 'password', client_id: 'pullthrough', username: request.credentials!.username, password: request.credentials!.password });
  if (request.service) form.set('service', request.service);
  if (request.scopes.length > 0) form.set('scope', request.scopes.join(' '));
  const body = form.toString();
  const response = await dispatcher.request({
    origin: request.realm.origin,
    path: `${request.realm.pathname}${request.realm.search}`,
    method: 'POST',
    headers: { host: request.realm.host, 'content-type': 'application/x-www-form-urlencoded', 'content-length': String(Buffer.byteLength(body)), accept: 'application/json' },
    body,
  });
  return tokenFrom(response, request);
}

async function tokenFrom(response: Dispatcher.ResponseData, request: TokenRequest): Promise<TokenResult> {
  const text = (await readAtMost(response.body, MAX_TOKEN_RESPONSE_BYTES))?.toString('utf8') ?? '';
  if (response.statusCode !== 200) {
    return { ok: false, status: response.statusCode, error: `the token service ${request.realm.origin} answered ${response.statusCode}` };
  }
  const parsed = parseTokenResponse(text);
  if (!parsed) return { ok: false, status: 200, error: `the token service ${request.realm.origin} answered without a token` };
  return { ok: true, ...parsed };
}

/**
 * `token` (or OAuth2's `access_token`) and when to stop using it: a tenth of its life early, at most
 * 30 s, so that a request never starts with a token about to expire.
 */
export function parseTokenResponse(text: string, now = Date.now()): { token: string; expiresAt: number } | undefined {
  let json: { token?: unknown; access_token?: unknown; expires_in?: unknown };
  try {
    json = JSON.parse(text) as typeof json;
  } catch {
    return undefined;
  }
  const token = typeof json.token === 'string' && json.token ? json.token : typeof json.access_token === 'string' && json.access_token ? json.access_token : undefined;
  if (!token) return undefined;
  const lifetime = typeof json.expires_in === 'number' && json.expires_in > 0 ? json.expires_in : DEFAULT_EXPIRES_IN_S;
  return { token, expiresAt: now + (lifetime - Math.min(30, lifetime / 10)) * 1000 };
}

export function basicAuthorization(credentials: Credentials): string {
  return `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64')}`;
}
