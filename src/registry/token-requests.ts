// A client's token request to an intercepted token service (auth.docker.io, a GitLab host, quay.io's
// /v2/auth): when the client brings no credentials, the central ones of the registry this service
// issues tokens for are put in, as the seed does — but only for pull scopes (never push), and with
// proxy users only for repositories the user may read. The token that comes back is remembered (by
// hash) so that what the client fetches with it is labelled 'central', not private. When the service
// refuses the central credentials, the request goes once more without them (public images still work).
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { Credentials, Policy, ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import { mayRead } from '../proxy-users.ts';
import { describeUpstreamError, requestHeadersForUpstream, responseHeadersForClient } from '../upstream/forward.ts';
import { readAtMost } from '../upstream/body.ts';
import { basicAuthorization, MAX_TOKEN_RESPONSE_BYTES, parseTokenResponse } from '../upstream/token-exchange.ts';
import { sendRegistryError } from './errors.ts';
import { clientAuthorization, type UpstreamAuth } from './upstream-auth.ts';

export interface TokenRequestResult {
  status: number;
  bytes: number;
  upstreamStatus?: number;
  upstreamMs?: number;
  /** Central credentials were put into the request. */
  injected: boolean;
  error?: string;
}

/** The central credentials this GET may carry, or why not (undefined: pass it through untouched). */
export function credentialsToInject(policy: Policy, host: RegistryPolicy, req: IncomingMessage, user: ProxyUser | undefined): Credentials | undefined {
  if (req.method !== 'GET' || clientAuthorization(req)) return undefined;
  const url = new URL(req.url ?? '/', 'https://token.invalid');
  const served = [host, ...host.tokenServiceFor.map((key) => policy.registries.get(key))].filter((r): r is RegistryPolicy => r?.auth !== undefined);
  if (served.length === 0) return undefined;
  // Several registries may share one token service: the one named by `service`, else the first.
  const service = url.searchParams.get('service')?.toLowerCase();
  const registry = served.find((r) => r.host === service || r.key === service) ?? served[0]!;
  for (const scope of url.searchParams.getAll('scope').flatMap((s) => s.split(' ')).filter(Boolean)) {
    const parts = scope.split(':');
    if (parts.length < 3 || parts[0] !== 'repository') return undefined;
    const actions = parts[parts.length - 1]!.split(',');
    if (actions.some((action) => action !== 'pull')) return undefined;
    if (user && !mayRead(user, registry, parts.slice(1, -1).join(':'))) return undefined;
  }
  return registry.auth;
}

export async function forwardTokenRequest(
  req: IncomingMessage,
  res: ServerResponse,
  target: { dispatcher: Dispatcher; origin: string; hostHeader: string },
  credentials: Credentials,
  auth: UpstreamAuth,
): Promise<TokenRequestResult> {
  const started = performance.now();
  const get = async (authorization?: string) => {
    const response = await target.dispatcher.request({ origin: target.origin, path: req.url ?? '/', method: 'GET', headers: requestHeadersForUpstream(req, target.hostHeader, authorization) });
    return { response, body: await readToken(response.body) };
  };
  let response: Dispatcher.ResponseData;
  let body: Buffer;
  let injected = true;
  try {
    ({ response, body } = await get(basicAuthorization(credentials)));
    if (response.statusCode === 401) {
      // The service refused the central credentials: the client's own request, as it was.
      injected = false;
      ({ response, body } = await get());
    }
  } catch (err) {
    const message = `the token service ${target.origin} failed: ${describeUpstreamError(err as Error)}`;
    sendRegistryError(res, 502, 'UNAVAILABLE', message);
    return { status: 502, bytes: 0, injected, error: message };
  }
  const upstreamMs = Math.round(performance.now() - started);
  if (injected && response.statusCode === 200) {
    const token = parseTokenResponse(body.toString('utf8'));
    if (token) auth.recordMinted(token.token, token.expiresAt);
  }
  res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), 'content-length': String(body.length), 'X-Cache': 'BYPASS' });
  res.end(body);
  return {
    status: response.statusCode,
    bytes: body.length,
    upstreamStatus: response.statusCode,
    upstreamMs,
    injected,
    ...(injected ? {} : { error: 'the token service refused the central credentials' }),
  };
}

async function readToken(body: Dispatcher.ResponseData['body']): Promise<Buffer> {
  const read = await readAtMost(body, MAX_TOKEN_RESPONSE_BYTES);
  if (!read) throw new Error(`a token response larger than ${MAX_TOKEN_RESPONSE_BYTES} bytes`);
  return read;
}
