// The registry request handler: one request of the distribution API, however it arrived (an
// intercepted TLS session, a plain-HTTP absolute-form request, later a registry-mirror listener).
// It does not know about sockets or CONNECT; it gets the registry and the request.
import type { IncomingMessage, ServerResponse } from 'node:http';
import path from 'node:path';
import { SpanKind, SpanStatusCode, type Attributes, type Span } from '@opentelemetry/api';
import type { Policy, ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import { mayRead } from '../proxy-users.ts';
import type { Dispatcher } from 'undici';
import { pathForLog, type AccessEntry, type CacheStatus, type Logger } from '../log.ts';
import { endSpan, startUpstreamSpan, tracer, withSpan } from '../tracing.ts';
import { upstreamConfig, type UpstreamAgents, type UpstreamConfig } from '../upstream/agents.ts';
import { describeUpstreamError, forward, requestHeadersForUpstream, responseHeadersForClient, upstreamFailed, type ForwardResult, type ForwardTarget } from '../upstream/forward.ts';
import type { ManifestStore } from '../cache/manifest-store.ts';
import type { BlobHandler } from './blobs.ts';
import { STALE_ON_STATUS, type ManifestHandler } from './manifests.ts';
import { referrersFilter, type ReferrersHandler } from './referrers.ts';
import { sendRegistryError } from './errors.ts';
import { readAtMost } from '../upstream/body.ts';
import { isRouteError, routeRequest, type Route, type RouteError } from './route.ts';
import { credentialsToInject, forwardTokenRequest, isAnonymousTokenRequest } from './token-requests.ts';
import { clientAuthorization, type UpstreamAuth } from './upstream-auth.ts';
import type { OwnerRouter } from '../cluster/owner-router.ts';
import type { InFlight } from '../in-flight.ts';
import { blobKey, manifestKey } from '../cluster/rendezvous.ts';

export interface RegistryRequestContext {
  registry: RegistryPolicy;
  /** Client address, for the access log. */
  client: string;
  /** The proxy user who opened the session, when users are configured. */
  user?: ProxyUser;
  /** Sent by a cluster peer: served here, never forwarded again. */
  fromPeer?: boolean;
}

export type RegistryHandler = (req: IncomingMessage, res: ServerResponse, context: RegistryRequestContext) => Promise<void>;

export interface RegistryHandlerDeps {
  policy: Policy;
  upstreams: UpstreamAgents;
  blobs: BlobHandler;
  manifests: ManifestHandler;
  manifestStore: ManifestStore;
  referrers: ReferrersHandler;
  auth: UpstreamAuth;
  log: Logger;
  /** Cluster mode: blobs and manifests are served by the owner of their key. */
  owners?: OwnerRouter;
  /** Whether this replica holds a verified copy of a blob (served here, whoever owns it). */
  holdsBlob?: (digest: string) => boolean;
  /** Counts the requests being answered, for a stop that lets them finish. */
  inFlight?: InFlight;
  /** True once the proxy is stopping: answers close their connection, so clients go elsewhere. */
  closing?: () => boolean;
}

/** A /v2/ answer is a small JSON document; a registry sending more is not read into memory. */
const MAX_PING_BYTES = 64 * 1024;

/** Methods that change a registry: denied unless the registry's policy says push: bypass. */
const WRITES = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

export function createRegistryHandler(deps: RegistryHandlerDeps): RegistryHandler {
  const configs = new Map<string, UpstreamConfig>();
  const configFor = (registry: RegistryPolicy) => {
    let config = configs.get(registry.key);
    if (!config) configs.set(registry.key, (config = upstreamConfig(registry, deps.policy.hosts, deps.policy.ipv6)));
    return config;
  };

  return async (req, res, { registry, client, user, fromPeer }) => {
    const started = performance.now();
    const route = routeRequest(req.url ?? '/');
    const access = { method: req.method ?? 'GET', host: registry.key, path: pathForLog(req.url), client, ...(user ? { user: user.name } : {}), ...(fromPeer ? { forPeer: true } : {}) };
    // One root span per client request (never a child of whatever context the socket was made in),
    // active while it is handled, ended with the same figures as its access entry.
    const span = tracer.startSpan(`${access.method} ${isRouteError(route) ? 'invalid' : route.kind}`, { root: true, kind: SpanKind.SERVER, attributes: requestAttributes(access, route) });
    let logged = false;
    const log = (entry: AccessEntry) => {
      logged = true;
      deps.log.access(entry);
      endRequestSpan(span, entry);
    };
    if (deps.closing?.()) res.setHeader('Connection', 'close');
    const work = () => withSpan(span, () => handle(req, res, registry, user, route, access, started, log, fromPeer === true));
    try {
      await (deps.inFlight ? deps.inFlight.track(work) : work());
    } finally {
      if (!logged) endSpan(span, {}, 'the request handler failed');
    }
  };

  async function handle(
    req: IncomingMessage,
    res: ServerResponse,
    registry: RegistryPolicy,
    user: ProxyUser | undefined,
    route: Route | RouteError,
    access: { method: string; host: string; path: string; client: string; user?: string },
    started: number,
    log: (entry: AccessEntry) => void,
    fromPeer: boolean,
  ): Promise<void> {
    if (isRouteError(route)) {
      sendRegistryError(res, route.status, route.code, route.message);
      log({ ...access, status: route.status, bytes: 0, type: 'invalid', ms: elapsed(started), error: route.message });
      return;
    }
    // Proxy users read only the repositories their rules name; others get 403 on that repository alone.
    if (user && 'name' in route && !mayRead(user, registry, route.name)) {
      const message = `proxy user ${user.name} may not use ${hostHeaderFor(registry)}/${route.name} (users.${user.name}.read in proxy.yaml)`;
      sendRegistryError(res, 403, 'DENIED', message);
      log({ ...access, status: 403, bytes: 0, type: route.kind, ms: elapsed(started), error: 'proxy user has no read rule for this repository' });
      return;
    }
    const upstream = configFor(registry);
    const hostHeader = hostHeaderFor(registry);
    const dispatcher = deps.upstreams.for(upstream);
    const reading = req.method === 'GET' || req.method === 'HEAD';
    // A blob this replica holds (it stood in for the owner, or owned it before the members changed) is
    // served here: a local hit costs a quarter of a relayed one, and no fetch is added.
    const heldHere = route.kind === 'blob' && deps.holdsBlob?.(route.digest) === true;
    if (deps.owners && !fromPeer && reading && !heldHere && (route.kind === 'blob' || route.kind === 'manifest')) {
      const own = clientAuthorization(req);
      const tokenAccess = own ? deps.auth.issuedFor(own) : undefined;
      const key = route.kind === 'blob' ? blobKey(route.digest) : manifestKey(registry.key, route.name);
      const result = await deps.owners.serve(req, res, { key, registryKey: registry.key, client: access.client, ...(user ? { user } : {}), ...(tokenAccess ? { tokenAccess } : {}) });
      if (result) {
        log({ ...access, ...result, type: route.kind, ms: elapsed(started) });
        return;
      }
    }
    if (route.kind === 'blob' && reading) {
      const result = await deps.blobs(req, res, { digest: route.digest, name: route.name, registry, upstream, hostHeader, ...(user ? { user } : {}) });
      log({ ...access, ...result, type: 'blob', ms: elapsed(started) });
      return;
    }
    if (route.kind === 'manifest' && reading) {
      const result = await deps.manifests(req, res, { registry, upstream, hostHeader, name: route.name, reference: route.reference, byDigest: route.byDigest, ...(user ? { user } : {}) });
      log({ ...access, ...result, type: 'manifest', ms: elapsed(started) });
      return;
    }
    if (route.kind === 'referrers' && reading) {
      // Another query (a page of a long list) goes through uncached.
      const filter = referrersFilter(req.url ?? '/');
      if (filter) {
        const result = await deps.referrers(req, res, { registry, upstream, hostHeader, name: route.name, digest: route.digest, ...filter, ...(user ? { user } : {}) });
        log({ ...access, ...result, type: 'referrers', ms: elapsed(started) });
        return;
      }
    }
    if (route.kind === 'ping' && reading) {
      const authorization = clientAuthorization(req) ? undefined : await deps.auth.centralBasic({ registry, upstream, hostHeader });
      const result = await ping(req, res, { dispatcher, origin: upstream.origin, hostHeader, ...(authorization ? { authorization } : {}) }, deps.manifestStore.holdsAny(registry.key) || deps.owners !== undefined);
      log({ ...access, ...result, type: 'ping', ms: elapsed(started) });
      return;
    }
    if (route.kind === 'other') {
      const credentials = await credentialsToInject(deps.policy, registry, req, user, deps.auth, (served) => {
        const config = configFor(served);
        return { registry: served, upstream: config, hostHeader: hostHeaderFor(served) };
      });
      if (credentials || isAnonymousTokenRequest(req)) {
        const result = await forwardTokenRequest(req, res, { dispatcher, origin: upstream.origin, hostHeader }, credentials, deps.auth);
        if (credentials && !result.injected && !result.offline) deps.log.warn('the token service refused the central credentials; the client\'s request was sent without them', { host: registry.key, status: 401 });
        log({ ...access, ...result, cache: result.offline ? 'STALE' : 'BYPASS', type: 'token', ms: elapsed(started) });
        return;
      }
    }
    // The distribution API's writes only: a POST to a token endpoint on an intercepted realm host
    // (route "other") is how containerd logs in, not a push.
    if (WRITES.has(req.method ?? '') && route.kind !== 'other' && registry.push === 'deny') {
      const message = `pushing through the proxy is disabled for ${registry.key} (push: deny in proxy.yaml; push: bypass or ALLOW_PUSH=true allows it)`;
      // The client may be mid-upload: read nothing more of it.
      res.setHeader('Connection', 'close');
      sendRegistryError(res, 405, 'UNSUPPORTED', message);
      log({ ...access, status: 405, bytes: 0, cache: 'BYPASS', type: route.kind, ms: elapsed(started), error: 'push denied' });
      return;
    }
    // A pushed or deleted tag: the next pull must ask upstream. Forgotten before the write goes up, so
    // no pull that follows the client's 201 can find the old entry (forgetting after the answer
    // would race the client's next request), and again after it, for a pull that ran meanwhile.
    const retagged = route.kind === 'manifest' && !route.byDigest && (req.method === 'PUT' || req.method === 'DELETE') ? { repository: route.name, tag: route.reference } : undefined;
    const forgetTag = async ({ repository, tag }: { repository: string; tag: string }) => {
      await deps.manifestStore.forgetTag(registry.key, repository, tag);
      // Cluster mode: the tag's owner (and any replica) holds its own copy.
      await deps.owners?.forgetTagEverywhere(registry.key, repository, tag);
    };
    if (retagged) await forgetTag(retagged);
    // Everything else streams through untouched, uploads included (unbuffered and unlimited, unless
    // requestBuffering asks for whole uploads first).
    const uploading = (route.kind === 'upload' || route.kind === 'manifest') && (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH');
    const spoolDir = deps.policy.requestBuffering && uploading ? path.join(deps.policy.dataDir, 'tmp') : undefined;
    // Reads of the distribution API (tags, referrers) by a client without credentials get the proxy's;
    // the catalog (every repository the central account can see), writes and other paths go with the
    // client's own or none.
    const proxyAuthorization =
      reading && route.kind !== 'other' && route.kind !== 'catalog' && !clientAuthorization(req) ? (await deps.auth.proxyDecision({ registry, upstream, hostHeader, ...('name' in route ? { repository: route.name } : {}) })).authorization : undefined;
    const forwarded = startUpstreamSpan(access.method, () => `${upstream.origin}${access.path}`);
    const result = await forward(req, res, { dispatcher, origin: upstream.origin, hostHeader, ...(spoolDir ? { spoolDir } : {}), ...(proxyAuthorization ? { authorization: proxyAuthorization } : {}) }, { 'X-Cache': 'BYPASS' });
    endSpan(forwarded, result.upstreamStatus !== undefined ? { 'http.response.status_code': result.upstreamStatus } : {}, result.upstreamStatus === undefined ? result.error : undefined);
    if (retagged && result.status >= 200 && result.status < 300) await forgetTag(retagged);
    log({ ...access, ...result, cache: 'BYPASS', type: route.kind, ms: elapsed(started) });
  }
}

/** What a request span says from the start: the registry, the route and what it names. No header. */
function requestAttributes(access: { method: string; host: string; path: string; client: string }, route: Route | RouteError): Attributes {
  const attributes: Attributes = { 'http.request.method': access.method, 'url.path': access.path, 'pullthrough.registry': access.host, 'client.address': access.client };
  if (isRouteError(route)) return attributes;
  attributes['pullthrough.route'] = route.kind;
  if ('name' in route) attributes['pullthrough.repository'] = route.name;
  if (route.kind === 'blob' || route.kind === 'referrers') attributes['pullthrough.digest'] = route.digest;
  if (route.kind === 'manifest') attributes['pullthrough.reference'] = route.reference;
  return attributes;
}

/** The access entry's figures on the request span, which ends with it; a 5xx marks it failed. */
function endRequestSpan(span: Span, entry: AccessEntry): void {
  if (span.isRecording()) {
    span.setAttributes({
      'http.response.status_code': entry.status,
      'pullthrough.bytes': entry.bytes,
      ...(entry.cache ? { 'pullthrough.cache': entry.cache } : {}),
      ...(entry.upstreamStatus !== undefined ? { 'pullthrough.upstream.status': entry.upstreamStatus } : {}),
      ...(entry.upstreamMs !== undefined ? { 'pullthrough.upstream.ms': entry.upstreamMs } : {}),
      ...(entry.error ? { 'pullthrough.error': entry.error } : {}),
    });
    if (entry.status >= 500) span.setStatus({ code: SpanStatusCode.ERROR, ...(entry.error ? { message: entry.error } : {}) });
  }
  span.end();
}

/**
 * GET /v2/, every Docker-style client's first request: a failed one ends the pull before it asks for
 * a manifest. While upstream fails as a cached manifest may be served STALE for (network, TLS,
 * timeout, 429, 5xx), and the proxy holds manifests of this registry, it answers the ping itself so
 * that they can be pulled; any other answer (200, or 401 with the challenge a client needs) is
 * upstream's own. With nothing cached the ping is a plain pass-through, failures and all.
 */
async function ping(req: IncomingMessage, res: ServerResponse, target: ForwardTarget, staleAllowed: boolean): Promise<ForwardResult & { cache: CacheStatus }> {
  const method = req.method === 'HEAD' ? 'HEAD' : 'GET';
  const span = startUpstreamSpan(method, () => `${target.origin}${pathForLog(req.url)}`);
  const started = performance.now();
  let response: Dispatcher.ResponseData | undefined;
  let error: string;
  let caught: Error | undefined;
  try {
    const headers = requestHeadersForUpstream(req, target.hostHeader, target.authorization);
    response = await target.dispatcher.request({ origin: target.origin, path: req.url ?? '/v2/', method, headers });
    error = `upstream answered ${response.statusCode}`;
    endSpan(span, { 'http.response.status_code': response.statusCode });
  } catch (err) {
    caught = err as Error;
    error = describeUpstreamError(caught);
    endSpan(span, {}, error);
  }
  const upstreamMs = Math.round(performance.now() - started);
  if (response && (!staleAllowed || !STALE_ON_STATUS.has(response.statusCode))) {
    const body = await readAtMost(response.body, MAX_PING_BYTES).catch(() => undefined);
    if (body === undefined) {
      const message = `upstream ${target.origin} sent a /v2/ answer that was cut or larger than ${MAX_PING_BYTES} bytes`;
      sendRegistryError(res, 502, 'UNAVAILABLE', message);
      return { status: 502, bytes: 0, cache: 'BYPASS', upstreamStatus: response.statusCode, upstreamMs, error: message };
    }
    res.writeHead(response.statusCode, { ...responseHeadersForClient(response.headers), ...(req.method === 'HEAD' ? {} : { 'content-length': String(body.length) }), 'X-Cache': 'BYPASS' });
    res.end(req.method === 'HEAD' ? undefined : body);
    return { status: response.statusCode, upstreamStatus: response.statusCode, upstreamMs, bytes: req.method === 'HEAD' ? 0 : body.length, cache: 'BYPASS' };
  }
  if (caught && !staleAllowed) {
    // Nothing cached to serve stale: the failure, as any pass-through request would see it.
    return { ...upstreamFailed(res, caught, target), cache: 'BYPASS', upstreamMs };
  }
  await response?.body.dump();
  const body = '{}';
  res.writeHead(200, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': body.length,
    'Docker-Distribution-API-Version': 'registry/2.0',
    'X-Cache': 'STALE',
    Warning: '111 pullthrough "Revalidation Failed"',
  });
  res.end(req.method === 'HEAD' ? undefined : body);
  return { status: 200, bytes: req.method === 'HEAD' ? 0 : body.length, cache: 'STALE', upstreamMs, ...(response ? { upstreamStatus: response.statusCode } : {}), error };
}

/** host[:port] as clients write it: the port only when it is not the scheme's default. */
export function hostHeaderFor(registry: RegistryPolicy): string {
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  return registry.port === (registry.http ? 80 : 443) ? host : `${host}:${registry.port}`;
}

function elapsed(since: number): number {
  return Math.round(performance.now() - since);
}
