// The registry-mirror front (mirror.listen): the distribution API spoken directly, over plain HTTP or
// HTTPS, for clients configured with a mirror instead of HTTPS_PROXY — containerd's hosts.toml,
// CRI-O/podman registries.conf, dockerd's registry-mirrors. It only turns a request into the parsed
// registry request the intercepting front makes (which registry, the canonical /v2/ path, the client
// and its credentials) and hands it to the same registry handler: one pipeline, one cache, so an image
// pulled through either front is a hit through the other.
//
// Which registry a request means:
//   /v2/<repo>/manifests/<ref>?ns=ghcr.io        containerd (hosts.toml mirror of ghcr.io)
//   /v2/ghcr.io/<repo>/manifests/<ref>           containerd override_path, CRI-O and podman mirrors
//                                                (a port as host_5443: a reference's path has no colon)
//   /v2/<repo>/manifests/<ref>                   dockerd registry-mirrors: the default (Docker Hub),
//                                                with library/ for one-segment names
// Only registries of the policy are served; anything else gets a registry-style error that says how
// to add it. A registry's Bearer challenge names the mirror's own token route (/token/<registry>), so
// clients fetch their tokens through the mirror: nodes need to reach only the mirror, and the proxy
// sees which tokens were issued anonymously (public content stays public in the cache).
import { readFileSync } from 'node:fs';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import type { Policy, ProxyUser, RegistryPolicy } from '../config/policy.ts';
import { DOCKER_HUB_KEY, mirrorRegistryKey, type MirrorPolicy } from '../config/mirror.ts';
import type { CertificateAuthority } from './ca.ts';
import { applyClientTimeouts, closeServer, createLeafServer } from './leaf-server.ts';
import { pathForLog, type Logger } from './log.ts';
import { authenticateProxyUser } from './proxy-users.ts';
import { sendRegistryError } from './registry/errors.ts';
import { hostHeaderFor, type RegistryHandler } from './registry/handler.ts';
import { forwardTokenRequest, onlyPullScopes } from './registry/token-requests.ts';
import { clientAuthorization, type UpstreamAuth } from './registry/upstream-auth.ts';
import { answerFailure, withErrorAnswers } from './request-failures.ts';
import { parseChallenges, type Challenge } from './upstream/challenge.ts';
import { upstreamConfig, type UpstreamAgents } from './upstream/agents.ts';
import { forward } from './upstream/forward.ts';

export interface MirrorDeps {
  policy: Policy;
  mirror: MirrorPolicy;
  ca: CertificateAuthority;
  registryHandler: RegistryHandler;
  auth: UpstreamAuth;
  upstreams: UpstreamAgents;
  log: Logger;
}

export interface MirrorFront {
  server: http.Server;
  close(): Promise<void>;
}

/** Where a mirror request goes: a registry of the policy and the path as that registry names it. */
export type MirrorTarget = { registry: RegistryPolicy; path: string } | { status: number; code: string; message: string };

/**
 * The mirror's token route: /token for the challenge of its /v2/ ping (the registry is then read from
 * the scope's repository, or is the default), /token/<registry> for a registry's own challenges.
 */
const TOKEN_ROUTE = '/token';

export function createMirror(deps: MirrorDeps): MirrorFront {
  const { policy, mirror, log } = deps;
  const handle = withErrorAnswers(deps.registryHandler, log);
  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    serve(req, res).catch((err: unknown) => answerFailure(req, res, err, log, 'mirror'));
  };

  async function serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = performance.now();
    const client = req.socket.remoteAddress ?? '-';
    const refuse = (status: number, code: string, message: string, headers: Record<string, string> = {}) => {
      for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
      sendRegistryError(res, status, code, message);
      log.access({ method: req.method ?? 'GET', host: 'mirror', path: pathForLog(req.url), status, bytes: 0, client, type: 'mirror', ms: Math.round(performance.now() - started), error: message });
    };

    // Proxy users prove who they are with Basic on every request (a mirror has no Proxy-Authorization);
    // their login is the mirror's, never sent upstream.
    let user: ProxyUser | undefined;
    if (policy.users.size > 0) {
      const authenticated = authenticateProxyUser(policy, req.headers.authorization);
      if (authenticated.kind !== 'user') return refuse(401, 'UNAUTHORIZED', `proxy users are configured: log in to the mirror as one (${authenticated.kind === 'refused' ? authenticated.reason : ''})`, { 'WWW-Authenticate': 'Basic realm="pullthrough mirror"' });
      user = authenticated.user;
      delete req.headers.authorization;
    }

    const raw = req.url ?? '/';
    const unsafe = unsafePath(raw);
    if (unsafe) return refuse(400, 'NAME_INVALID', unsafe);
    const url = new URL(raw, 'http://mirror.invalid');
    if (url.pathname === '/v2' || url.pathname === '/v2/') return ping(req, res, user !== undefined || policy.users.size > 0);
    if (url.pathname === TOKEN_ROUTE || url.pathname.startsWith(`${TOKEN_ROUTE}/`)) return tokenRelay(req, res, url, user, refuse);
    if (!url.pathname.startsWith('/v2/')) return refuse(404, 'NOT_FOUND', 'this is a registry mirror: only /v2/ is served here');

    const target = mirrorTarget(url, policy, mirror);
    if ('status' in target) return refuse(target.status, target.code, target.message);
    url.searchParams.delete('ns');
    req.url = `${target.path}${url.search}`;
    rewriteChallenges(req, res, target.registry);
    await handle(req, res, { registry: target.registry, client, ...(user ? { user } : {}) });
  }

  /**
   * A client's token request, relayed to the realm the registry itself named (never one a client
   * chose), with the central credentials put in on the same terms as at an intercepted realm.
   */
  async function tokenRelay(req: IncomingMessage, res: ServerResponse, url: URL, user: ProxyUser | undefined, refuse: (status: number, code: string, message: string) => void): Promise<void> {
    const started = performance.now();
    const named = url.pathname.slice(`${TOKEN_ROUTE}/`.length);
    const registry = named ? policy.registries.get(decodeURIComponent(named)) : registryOfScopes(url, policy, mirror);
    if (!registry) return refuse(404, 'NAME_UNKNOWN', named ? 'no such registry in the policy' : 'the scope names no registry this mirror serves, and it has no default (mirror.default)');
    const upstream = upstreamConfig(registry, policy.hosts, policy.ipv6);
    const challenge = await deps.auth.registryChallenge({ registry, upstream, hostHeader: hostHeaderFor(registry) });
    const realm = challenge?.scheme === 'bearer' && challenge.params.realm ? URL.parse(challenge.params.realm) : null;
    if (!realm) return refuse(404, 'NOT_FOUND', `${registry.key} names no token service`);
    for (const [name, value] of realm.searchParams) if (!url.searchParams.has(name)) url.searchParams.set(name, value);
    // The service the registry's own challenge names (the ping's challenge named the mirror's).
    const service = challenge?.params.service;
    if (service) url.searchParams.set('service', service);
    // The client names repositories as it sees them through the mirror (ghcr.io/team/app, alpine): the
    // registry's token service knows them as team/app, library/alpine.
    const scopes = url.searchParams.getAll('scope');
    url.searchParams.delete('scope');
    for (const scope of scopes) url.searchParams.append('scope', scope.split(' ').map((s) => upstreamScope(s, registry)).join(' '));
    req.url = `${realm.pathname}${url.search}`;
    const target = { dispatcher: deps.upstreams.for(upstream), origin: realm.origin, hostHeader: realm.host };
    const anonymousGet = req.method === 'GET' && !clientAuthorization(req);
    const result = anonymousGet
      ? await forwardTokenRequest(req, res, target, registry.auth && onlyPullScopes(url, registry, user) ? registry.auth : undefined, deps.auth)
      : await forward(req, res, target);
    log.access({ method: req.method ?? 'GET', host: realm.host, path: realm.pathname, client: req.socket.remoteAddress ?? '-', ...(user ? { user: user.name } : {}), ...result, cache: 'BYPASS', type: 'token', ms: Math.round(performance.now() - started) });
  }

  const timeouts = policy.defaults.timeouts;
  let server: http.Server;
  if (mirror.tls?.certFile && mirror.tls.keyFile) {
    server = https.createServer({ cert: readFileSync(mirror.tls.certFile), key: readFileSync(mirror.tls.keyFile) }, onRequest);
  } else if (mirror.tls) {
    // A client that sends no SNI (an address) gets the first name's certificate.
    server = createLeafServer(deps.ca, mirror.tls.names, onRequest);
  } else {
    server = http.createServer(onRequest);
  }
  applyClientTimeouts(server, timeouts);

  return {
    server,
    close: () => closeServer(server),
  };
}

/**
 * The registry and canonical path a mirror request means, or the error it gets: `?ns=` (containerd)
 * first, then a registry host as the first path segment (override_path, CRI-O, podman), then the
 * default registry (dockerd), whose one-segment names get Docker Hub's library/ namespace.
 */
export function mirrorTarget(url: URL, policy: Policy, mirror: MirrorPolicy): MirrorTarget {
  const rest = url.pathname.slice('/v2/'.length);
  const ns = url.searchParams.get('ns');
  let named: string | undefined;
  let path = rest;
  const slash = rest.indexOf('/');
  const first = slash < 0 ? rest : rest.slice(0, slash);
  const firstNamesRegistry = looksLikeHost(first);
  if (firstNamesRegistry) {
    named = pathSegmentRegistry(first);
    path = slash < 0 ? '' : rest.slice(slash + 1);
  }
  if (ns !== null) {
    // containerd with override_path (http://proxy:5000/v2/ghcr.io) sends both: the same registry twice.
    if (firstNamesRegistry && mirrorRegistryKey(named!) !== mirrorRegistryKey(ns)) {
      return { status: 400, code: 'NAME_INVALID', message: `?ns=${ns} and the path's registry ${first} disagree` };
    }
    named = ns;
  }
  let registry: RegistryPolicy | undefined;
  if (named !== undefined) {
    registry = policy.registries.get(mirrorRegistryKey(named));
    if (!registry) {
      return { status: 404, code: 'NAME_UNKNOWN', message: `this mirror does not serve the registry ${named}: add it under registries: in proxy.yaml` };
    }
  } else if (mirror.defaultRegistry) {
    registry = policy.registries.get(mirror.defaultRegistry);
  }
  if (!registry) {
    return { status: 404, code: 'NAME_UNKNOWN', message: 'name the registry: ?ns=<registry> (containerd) or /v2/<registry>/<repository>/… (CRI-O, podman); this mirror has no default registry (mirror.default)' };
  }
  if (registry.key === DOCKER_HUB_KEY) path = withLibrary(path);
  return { registry, path: `/v2/${path}` };
}

/** `repository:<name>:<actions>` as the registry names the repository (without the mirror's registry segment). */
function upstreamScope(scope: string, registry: RegistryPolicy): string {
  const parts = scope.split(':');
  if (parts.length < 3 || parts[0] !== 'repository') return scope;
  let name = parts.slice(1, -1).join(':');
  const slash = name.indexOf('/');
  if (slash > 0) {
    const first = name.slice(0, slash);
    if (looksLikeHost(first) && mirrorRegistryKey(pathSegmentRegistry(first)) === registry.key) name = name.slice(slash + 1);
  }
  if (registry.key === DOCKER_HUB_KEY && !name.includes('/')) name = `library/${name}`;
  return `repository:${name}:${parts.at(-1)}`;
}

/** Docker Hub's official images live under library/: "alpine/manifests/3" is "library/alpine/…". */
function withLibrary(path: string): string {
  const match = /^([^/]+)\/(manifests|blobs|tags|referrers)\//.exec(path);
  return match ? `library/${path}` : path;
}

/** A registry host as a first path segment: a dot, a port or localhost (Docker Hub namespaces have none). */
function looksLikeHost(segment: string): boolean {
  return segment === 'localhost' || segment.includes('.') || segment.includes(':') || segment.startsWith('[');
}

/**
 * "registry.example.com_5443" is "registry.example.com:5443": a registries.conf mirror location is an
 * image reference, whose path cannot hold a colon, so a registry's port travels after an underscore
 * (which no host name has).
 */
function pathSegmentRegistry(segment: string): string {
  const port = /^(.+)_(\d{1,5})$/.exec(segment);
  return port ? `${port[1]}:${port[2]}` : segment;
}

/** A path that could name something other than what it says: dot segments, encoded slashes or dots, backslashes. */
function unsafePath(raw: string): string | undefined {
  const path = raw.split('?')[0]!;
  if (/%2f|%5c|%2e|\\/i.test(path)) return 'encoded slashes, dots and backslashes are not allowed in a registry path';
  if (path.split('/').some((segment) => segment === '.' || segment === '..')) return '. and .. are not allowed in a registry path';
  return undefined;
}

/**
 * The /v2/ ping. containers/image and dockerd send credentials only to a registry whose ping asked
 * for them, so a client without a token is challenged for one from the mirror's token route (which
 * relays to the registry the scope names, anonymously or with the client's credentials); a logged-in
 * proxy user, or a client that brings a token, is answered 200.
 */
function ping(req: IncomingMessage, res: ServerResponse, usersLoggedIn: boolean): void {
  const body = '{}';
  const headers: Record<string, string | number> = { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': body.length, 'Docker-Distribution-API-Version': 'registry/2.0' };
  if (!usersLoggedIn && !clientAuthorization(req)) {
    res.writeHead(401, { ...headers, 'WWW-Authenticate': `Bearer realm="${originOf(req)}${TOKEN_ROUTE}",service="pullthrough-mirror"` });
  } else {
    res.writeHead(200, headers);
  }
  res.end(req.method === 'HEAD' ? undefined : body);
}

/** The registry a token request's scopes name (repository:ghcr.io/team/app:pull), else the default. */
function registryOfScopes(url: URL, policy: Policy, mirror: MirrorPolicy): RegistryPolicy | undefined {
  const keys = new Set<string>();
  for (const scope of url.searchParams.getAll('scope').flatMap((s) => s.split(' ')).filter(Boolean)) {
    const parts = scope.split(':');
    if (parts.length < 3 || parts[0] !== 'repository') continue;
    const first = parts.slice(1, -1).join(':').split('/')[0]!;
    keys.add(looksLikeHost(first) ? mirrorRegistryKey(pathSegmentRegistry(first)) : (mirror.defaultRegistry ?? ''));
  }
  if (keys.size === 0 && mirror.defaultRegistry) keys.add(mirror.defaultRegistry);
  if (keys.size !== 1) return undefined;
  return policy.registries.get([...keys][0]!);
}

function originOf(req: IncomingMessage): string {
  const tls = Boolean((req.socket as { encrypted?: boolean }).encrypted);
  return `${tls ? 'https' : 'http'}://${req.headers.host ?? 'localhost'}`;
}

/**
 * A 401's Bearer challenge names the registry's token service; the client is sent to the mirror's
 * token route for that registry instead (service and scope kept), which relays to it.
 */
function rewriteChallenges(req: IncomingMessage, res: ServerResponse, registry: RegistryPolicy): void {
  const realm = `${originOf(req)}${TOKEN_ROUTE}/${encodeURIComponent(registry.key)}`;
  const writeHead = res.writeHead.bind(res) as (...args: unknown[]) => ServerResponse;
  (res as { writeHead: (...args: unknown[]) => ServerResponse }).writeHead = (status: unknown, ...rest: unknown[]) => {
    if (status === 401) {
      const headers = rest.find((arg): arg is Record<string, unknown> => typeof arg === 'object' && arg !== null && !Array.isArray(arg));
      const key = headers ? Object.keys(headers).find((name) => name.toLowerCase() === 'www-authenticate') : undefined;
      if (headers && key) headers[key] = rewritten(headers[key] as string | string[], realm);
      const preset = res.getHeader('www-authenticate');
      if (preset !== undefined) res.setHeader('www-authenticate', rewritten(preset as string | string[], realm));
    }
    return writeHead(status, ...rest);
  };
}

function rewritten(value: string | string[], realm: string): string[] {
  return parseChallenges(value).map((challenge) => serialise(challenge.scheme === 'bearer' && challenge.params.realm ? { ...challenge, params: { ...challenge.params, realm } } : challenge));
}

function serialise(challenge: Challenge): string {
  const scheme = challenge.scheme === 'bearer' ? 'Bearer' : challenge.scheme === 'basic' ? 'Basic' : challenge.scheme;
  const params = Object.entries(challenge.params).map(([name, value]) => `${name}="${value.replace(/["\\]/g, '\\$&')}"`);
  return params.length ? `${scheme} ${params.join(',')}` : scheme;
}
