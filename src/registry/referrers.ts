// GET and HEAD of /v2/<name>/referrers/<digest>[?artifactType=…] (OCI 1.1): the signatures,
// attestations and SBOMs that point at a manifest, cached as mutable — served for the registry's tag
// TTL (manifests.defaultTtl), then fetched again, and served stale while upstream fails, up to
// maxStale — with one upstream request at a time per list. The artifacts themselves are manifests and
// blobs, cached by digest like any other. A registry without the API answers 404, which is passed on:
// clients then use cosign's tag schema (sha256-<hex>.sig, .att, .sbom), which are tags like any other.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Dispatcher } from 'undici';
import type { ProxyUser, RegistryPolicy } from '../../config/policy.ts';
import { referrersKey, type ReferrersStore, type StoredReferrers } from '../cache/referrers-store.ts';
import type { CacheStatus, Logger } from '../log.ts';
import { SingleFlight } from '../single-flight.ts';
import { endSpan, startUpstreamSpan } from '../tracing.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { readAtMost } from '../upstream/body.ts';
import { describeUpstreamError, responseHeadersForClient } from '../upstream/forward.ts';
import { requestFollowingRedirects } from '../upstream/redirects.ts';
import { sendRegistryError } from './errors.ts';
import { STALE_ON_STATUS, type ManifestResult } from './manifests.ts';
import type { ReadAccess } from './read-access.ts';
import type { Digest, RepositoryName } from './route.ts';
import type { AuthDecision, UpstreamAuth, UpstreamTarget } from './upstream-auth.ts';

/** A referrers list is an image index: the same bound as a manifest. */
const MAX_LIST_BYTES = 4 * 1024 * 1024;
/** An artifactType is a media type; anything longer is not one (and would not fit an index key). */
const MAX_ARTIFACT_TYPE = 255;
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

export interface ReferrersRequest {
  registry: RegistryPolicy;
  upstream: UpstreamConfig;
  hostHeader: string;
  name: RepositoryName;
  digest: Digest;
  /** The artifactType filter the client asked for, if any. */
  artifactType?: string;
  user?: ProxyUser;
}

export type ReferrersResult = ManifestResult;

export interface ReferrersDeps {
  store: ReferrersStore;
  upstreams: UpstreamAgents;
  auth: UpstreamAuth;
  readAccess: ReadAccess;
  log: Logger;
}

export type ReferrersHandler = (req: IncomingMessage, res: ServerResponse, request: ReferrersRequest) => Promise<ReferrersResult>;

type Outcome =
  | { kind: 'fresh'; list: StoredReferrers; upstreamMs: number }
  | { kind: 'failed'; error: string; status?: number; upstreamMs?: number }
  | { kind: 'answer'; status: number; headers: Record<string, string | string[]>; body: Buffer; upstreamMs: number };

/** The artifactType of `?artifactType=…` (the only query the cache understands); null: another query. */
export function referrersFilter(url: string): { artifactType?: string } | null {
  const query = new URL(url, 'http://x').searchParams;
  const keys = [...query.keys()];
  if (keys.length === 0) return {};
  if (keys.length !== 1 || keys[0] !== 'artifactType') return null;
  const artifactType = query.get('artifactType')!;
  return artifactType.length > MAX_ARTIFACT_TYPE ? null : { artifactType };
}

export function createReferrersHandler(deps: ReferrersDeps): ReferrersHandler {
  const flights = new SingleFlight<Outcome>();
  return async (req, res, request) => {
    const key = referrersKey(request.registry.key, request.name, request.digest, request.artifactType);
    const cached = deps.store.get(key);
    const ttl = request.registry.manifests.enabled ? request.registry.manifests.defaultTtlMs : 0;
    if (cached && Date.now() - cached.fetchedAt < ttl) return (await refuseUnlessReadable(deps, req, res, request, cached)) ?? send(req, res, cached, 'HIT');

    const { value: outcome, led } = await flights.run(key, () => fetchList(deps, req, request, key).catch((err: unknown): Outcome => ({ kind: 'failed', error: describeUpstreamError(err as Error) })));
    switch (outcome.kind) {
      case 'fresh':
        if (!led) {
          const refused = await refuseUnlessReadable(deps, req, res, request, outcome.list);
          if (refused) return refused;
        }
        return { ...send(req, res, outcome.list, led ? 'MISS' : 'JOINED'), upstreamStatus: 200, upstreamMs: outcome.upstreamMs };
      case 'failed': {
        const overdue = cached ? Date.now() - cached.fetchedAt - ttl : Infinity;
        if (cached && overdue <= request.registry.manifests.maxStaleMs && deps.readAccess.allowedWithoutUpstream({ access: cached.access, req, user: request.user, target: targetOf(request), path: subjectPath(request) })) {
          deps.log.warn('upstream failed; serving a stale referrers list', { registry: request.registry.key, repository: request.name, digest: request.digest, error: outcome.error });
          return { ...send(req, res, cached, 'STALE', outcome.error), ...(outcome.status !== undefined ? { upstreamStatus: outcome.status } : {}) };
        }
        const message = `upstream ${request.upstream.origin} failed: ${outcome.error}`;
        sendRegistryError(res, outcome.status && outcome.status !== 401 ? outcome.status : 502, outcome.status === 429 ? 'TOOMANYREQUESTS' : 'UNAVAILABLE', message);
        return { status: outcome.status && outcome.status !== 401 ? outcome.status : 502, bytes: 0, cache: 'MISS', error: message, ...(outcome.status !== undefined ? { upstreamStatus: outcome.status } : {}) };
      }
      case 'answer':
        // Upstream's own answer (404: no referrers API, the client falls back to the tag schema).
        res.writeHead(outcome.status, { ...outcome.headers, 'content-length': String(req.method === 'HEAD' ? 0 : outcome.body.length), 'X-Cache': 'MISS' });
        res.end(req.method === 'HEAD' ? undefined : outcome.body);
        return { status: outcome.status, bytes: req.method === 'HEAD' ? 0 : outcome.body.length, cache: 'MISS', upstreamStatus: outcome.status, upstreamMs: outcome.upstreamMs };
    }
  };
}

async function fetchList(deps: ReferrersDeps, req: IncomingMessage, request: ReferrersRequest, key: string): Promise<Outcome> {
  const path = `/v2/${request.name}/referrers/${request.digest}${request.artifactType !== undefined ? `?artifactType=${encodeURIComponent(request.artifactType)}` : ''}`;
  const span = startUpstreamSpan('GET', () => `${request.upstream.origin}/v2/${request.name}/referrers/${request.digest}`, { 'pullthrough.purpose': 'referrers' });
  const started = performance.now();
  const target = targetOf(request);
  const dispatcher = deps.upstreams.for(request.upstream);
  let response: Dispatcher.ResponseData;
  let decision: AuthDecision;
  try {
    ({ response, decision } = await deps.auth.request(target, await deps.auth.decide(req, target), async (authorization) => {
      const followed = await requestFollowingRedirects(dispatcher, new URL(path, request.upstream.origin), {
        method: 'GET',
        headers: { host: request.hostHeader, accept: OCI_INDEX, ...(authorization ? { authorization } : {}) },
      });
      return Object.assign(followed.response, { hops: followed.hops });
    }));
  } catch (err) {
    const error = describeUpstreamError(err as Error);
    endSpan(span, {}, error);
    return { kind: 'failed', error };
  }
  const upstreamMs = Math.round(performance.now() - started);
  endSpan(span, { 'http.response.status_code': response.statusCode });
  const body = await readAtMost(response.body, MAX_LIST_BYTES).catch(() => undefined);
  if (body === undefined) return { kind: 'failed', error: 'the referrers list was cut or too large', upstreamMs };
  if (STALE_ON_STATUS.has(response.statusCode) || (response.statusCode === 401 && decision.tokenFailed)) {
    return { kind: 'failed', error: `upstream answered ${response.statusCode}`, status: response.statusCode, upstreamMs };
  }
  if (response.statusCode !== 200) return { kind: 'answer', status: response.statusCode, headers: responseHeadersForClient(response.headers), body, upstreamMs };
  const filtersApplied = response.headers['oci-filters-applied'];
  const list: StoredReferrers = {
    body,
    contentType: String(response.headers['content-type'] ?? OCI_INDEX),
    ...(typeof filtersApplied === 'string' ? { filtersApplied } : {}),
    fetchedAt: Date.now(),
    access: decision.access,
  };
  await deps.store.put(key, list);
  return { kind: 'fresh', list, upstreamMs };
}

/** R6: a list cached with another client's credentials is served only to a client that may read the subject. */
async function refuseUnlessReadable(deps: ReferrersDeps, req: IncomingMessage, res: ServerResponse, request: ReferrersRequest, list: StoredReferrers): Promise<ReferrersResult | undefined> {
  let verdict;
  try {
    verdict = await deps.readAccess.check({ access: list.access, req, user: request.user, target: targetOf(request), path: subjectPath(request), expected: { digest: request.digest } });
  } catch (err) {
    const message = `cannot verify read access with ${request.upstream.origin}: ${describeUpstreamError(err as Error)}`;
    sendRegistryError(res, 503, 'UNAVAILABLE', message);
    return { status: 503, bytes: 0, cache: 'HIT', error: message };
  }
  if (verdict.allowed) return undefined;
  sendRegistryError(res, verdict.status, verdict.status === 401 ? 'UNAUTHORIZED' : 'DENIED', 'access to the requested resource is not authorized');
  return { status: verdict.status, bytes: 0, cache: 'HIT', upstreamStatus: verdict.status, error: 'read access refused' };
}

function send(req: IncomingMessage, res: ServerResponse, list: StoredReferrers, cache: CacheStatus, staleBecause?: string): ReferrersResult {
  res.writeHead(200, {
    'Content-Type': list.contentType,
    'Content-Length': list.body.length,
    'Docker-Distribution-API-Version': 'registry/2.0',
    ...(list.filtersApplied ? { 'OCI-Filters-Applied': list.filtersApplied } : {}),
    'X-Cache': cache,
    ...(staleBecause ? { Warning: '110 pullthrough "Response is Stale"' } : {}),
  });
  res.end(req.method === 'HEAD' ? undefined : list.body);
  return { status: 200, bytes: req.method === 'HEAD' ? 0 : list.body.length, cache, ...(staleBecause ? { error: staleBecause } : {}) };
}

/** The subject manifest: whoever may read it may read what points at it. */
function subjectPath(request: ReferrersRequest): string {
  return `/v2/${request.name}/manifests/${request.digest}`;
}

function targetOf(request: ReferrersRequest): UpstreamTarget & { repository: string } {
  return { registry: request.registry, upstream: request.upstream, hostHeader: request.hostHeader, repository: request.name };
}
