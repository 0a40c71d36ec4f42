// A client's token request to an intercepted token service (auth.docker.io, a GitLab host, quay.io's
// /v2/auth): when the client brings no credentials, the central ones of the registry this service
// issues tokens for are put in, as the seed does — but only for pull scopes (never push), and with
// proxy users only for repositories the user may read. The token that comes back is remembered (by
// hash) so that what the client fetches with it is labelled 'central', not private. When the service
// refuses the central credentials, the request goes once more without them (public images still work).
// A token request without any credentials is watched the same way: the token it brings back is an
// anonymous one, and what a client reads with it is public in the cache (Docker Hub's anonymous pulls).
// While the token service is down, the proxy answers with a placeholder token of its own, so a client
// can go on pulling what is cached and public.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { Credentials, Policy, ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import { mayRead } from '../proxy-users.ts';
import { describeUpstreamError, requestHeadersForUpstream, responseHeadersForClient } from '../upstream/forward.ts';
import { readAtMost } from '../upstream/body.ts';
import { basicAuthorization, MAX_TOKEN_RESPONSE_BYTES, parseTokenResponse } from '../upstream/token-exchange.ts';
import { randomBytes } from 'node:crypto';
import { clientAuthorization, OFFLINE_TOKEN_PREFIX, type UpstreamAuth, type UpstreamTarget } from './upstream-auth.ts';

export interface TokenRequestResult {
  status: number;
  bytes: number;
  upstreamStatus?: number;
  upstreamMs?: number;
  /** Central credentials were put into the request. */
  injected: boolean;
  /** The token service failed and the proxy answered with its placeholder. */
  offline?: boolean;
  error?: string;
}

/** How long a placeholder token is good for: clients ask again soon, and reach the service once it is back. */
const OFFLINE_TOKEN_SECONDS = 60;

/**
 * A client's token request, as far as the proxy can tell: a GET outside the distribution API that
 * names a scope or a service (the token protocol's parameters), without credentials or cookies of the
 * client's own (what it gets back is then an anonymous token).
 */
export function isAnonymousTokenRequest(req: IncomingMessage): boolean {
  if (req.method !== 'GET' || clientAuthorization(req) || req.headers.cookie) return false;
  const url = new URL(req.url ?? '/', 'https://token.invalid');
  return url.searchParams.has('scope') || url.searchParams.has('service');
}

/** The token protocol's parameters a client sends; anything else (offline_token, refresh_token…) is not a plain pull token. */
const TOKEN_PARAMETERS = new Set(['service', 'scope', 'client_id']);

/**
 * The central credentials this GET may carry, or undefined (pass it through untouched). Only a token
 * request of a served registry's own token endpoint (the realm its challenge names: path and host),
 * for its service, asking only `repository:<name>:pull` scopes (at least one) with nothing but the
 * token protocol's parameters, from a client without credentials of its own; with proxy users, only
 * for repositories the user may read. Never a refresh or offline token, never another path on the host.
 */
export async function credentialsToInject(policy: Policy, host: RegistryPolicy, req: IncomingMessage, user: ProxyUser | undefined, auth: UpstreamAuth, targetFor: (registry: RegistryPolicy) => UpstreamTarget): Promise<Credentials | undefined> {
  if (req.method !== 'GET' || clientAuthorization(req) || req.headers.cookie) return undefined;
  const url = new URL(req.url ?? '/', 'https://token.invalid');
  const served = [host, ...host.tokenServiceFor.map((key) => policy.registries.get(key))].filter((r): r is RegistryPolicy => r?.auth !== undefined);
  if (served.length === 0) return undefined;
  // Several registries may share one token service: the one named by `service`, else the first.
  const service = url.searchParams.get('service')?.toLowerCase();
  const registry = served.find((r) => r.host === service || r.key === service) ?? served[0]!;
  const endpoint = await auth.tokenEndpoint(targetFor(registry));
  const hostPort = host.port === 443 ? host.host : `${host.host}:${host.port}`;
  const endpointHost = endpoint ? (endpoint.realm.port ? `${endpoint.realm.hostname}:${endpoint.realm.port}` : endpoint.realm.hostname).toLowerCase() : undefined;
  if (!endpoint || endpointHost !== hostPort.toLowerCase() || endpoint.realm.pathname !== url.pathname) return undefined;
  if (service !== undefined && endpoint.service !== undefined && service !== endpoint.service.toLowerCase()) return undefined;
  return onlyPullScopes(url, registry, user) ? registry.auth : undefined;
}

/**
 * At least one scope, each `repository:<name>:pull`, nothing but the token protocol's parameters, and
 * with proxy users only repositories the user may read: a token request the central credentials may serve.
 */
export function onlyPullScopes(url: URL, registry: RegistryPolicy, user: ProxyUser | undefined): boolean {
  if ([...url.searchParams.keys()].some((name) => !TOKEN_PARAMETERS.has(name))) return false;
  const scopes = url.searchParams.getAll('scope').flatMap((s) => s.split(' ')).filter(Boolean);
  if (scopes.length === 0) return false;
  for (const scope of scopes) {
    const parts = scope.split(':');
    if (parts.length < 3 || parts[0] !== 'repository') return false;
    const actions = parts[parts.length - 1]!.split(',');
    if (actions.some((action) => action !== 'pull')) return false;
    if (user && !mayRead(user, registry, parts.slice(1, -1).join(':'))) return false;
  }
  return true;
}

/**
 * A client's token request without credentials of its own, sent with the central ones when `credentials`
 * is given (and once more without them if refused), else as it came. The token that comes back is
 * remembered with what it grants; a token service that fails gets the proxy's placeholder answered.
 */
export async function forwardTokenRequest(
  req: IncomingMessage,
  res: ServerResponse,
  target: { dispatcher: Dispatcher; origin: string; hostHeader: string },
  credentials: Credentials | undefined,
  auth: UpstreamAuth,
): Promise<TokenRequestResult> {
  const started = performance.now();
  const get = async (authorization?: string) => {
    const response = await target.dispatcher.request({ origin: target.origin, path: req.url ?? '/', method: 'GET', headers: requestHeadersForUpstream(req, target.hostHeader, authorization) });
    return { response, body: await readToken(response.body) };
  };
  let response: Dispatcher.ResponseData;
  let body: Buffer;
  let injected = credentials !== undefined;
  try {
    ({ response, body } = await get(credentials ? basicAuthorization(credentials) : undefined));
    if (response.statusCode === 401 && injected) {
      // The service refused the central credentials: the client's own request, as it was.
      injected = false;
      ({ response, body } = await get());
    }
  } catch (err) {
    return answerOffline(res, injected, `the token service ${target.origin} failed: ${describeUpstreamError(err as Error)}`);
  }
  const upstreamMs = Math.round(performance.now() - started);
  if (response.statusCode === 429 || response.statusCode >= 500) {
    return { ...answerOffline(res, injected, `the token service ${target.origin} answered ${response.statusCode}`), upstreamStatus: response.statusCode, upstreamMs };
  }
  // A token issued to the client's own credentials is the client's: only what the proxy knows it asked
  // for (the central credentials, or none at all) is remembered.
  if (response.statusCode === 200 && !clientAuthorization(req)) {
    const token = parseTokenResponse(body.toString('utf8'));
    if (token) auth.recordIssued(token.token, token.expiresAt, injected ? 'central' : 'anonymous');
  }
  res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), 'content-length': String(body.length), 'X-Cache': 'BYPASS' });
  res.end(body);
  return {
    status: response.statusCode,
    bytes: body.length,
    upstreamStatus: response.statusCode,
    upstreamMs,
    injected,
    ...(credentials && !injected ? { error: 'the token service refused the central credentials' } : {}),
  };
}

/**
 * The token service is down: a placeholder token, which the proxy drops from the client's requests
 * (they count as anonymous), so a pull of what is cached and public goes on.
 */
function answerOffline(res: ServerResponse, injected: boolean, error: string): TokenRequestResult {
  const token = `${OFFLINE_TOKEN_PREFIX}${randomBytes(12).toString('base64url')}`;
  const body = Buffer.from(JSON.stringify({ token, access_token: token, expires_in: OFFLINE_TOKEN_SECONDS, issued_at: new Date().toISOString() }));
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': body.length, 'Cache-Control': 'no-store', 'X-Cache': 'STALE' });
  res.end(body);
  return { status: 200, bytes: body.length, injected, offline: true, error };
}

async function readToken(body: Dispatcher.ResponseData['body']): Promise<Buffer> {
  const read = await readAtMost(body, MAX_TOKEN_RESPONSE_BYTES);
  if (!read) throw new Error(`a token response larger than ${MAX_TOKEN_RESPONSE_BYTES} bytes`);
  return read;
}
