// Upstreams shaped like the ones real clusters pull from, for end-to-end tests (R9), all on loopback
// under test names that only the proxy's `hosts:` policy (or the rig's own agent and tunnel) resolves:
//
//   registry.hub.test   Docker Hub's registry: a TLS front before a real distribution 2.8 with token
//                       auth. Blob GETs are checked (a HEAD with the client's Authorization) and then
//                       307-redirected to the CDN with a signed, expiring URL; manifest GETs count
//                       against a rate limit (429 TOOMANYREQUESTS + ratelimit-* headers); HEAD is free.
//   auth.hub.test       Docker Hub's token service (token-service.ts behind a TLS front): anonymous pull
//                       on every repository except the private ones; an optional private user.
//   cdn.hub.test        Cloudflare's role: checks signature and expiry (403 otherwise), serves the
//                       bytes with Range (fetched from distribution), and takes injected faults.
//   registry.k8s.test   registry.k8s.io: answers /v2/ itself and 307s manifests and blobs to…
//   regional.k8s.test   …an Artifact Registry-like host before an anonymous distribution, which serves
//                       manifests and 302s blobs once more, to a relative download path (GAR's shape).
//
// Every host is a node https server fed by a TCP listener of the rig's own, so down()/up() can refuse
// connections and accept them again on the same ports. Each host records every request it answered:
// the "upstream's own log" tests count.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import dns from 'node:dns';
import http, { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request, type Dispatcher } from 'undici';
import { createTestCa, writePem, type TestCa } from './pki.ts';
import { makeTempDir, removeTempDir } from './process.ts';
import { startRegistry, type Credentials, type RegistryHandle, type RequestKind } from './registry.ts';
import { pushImage } from './skopeo.ts';
import { startTokenService, type TokenService } from './token-service.ts';

/** The rig's hosts, by role. */
export type RigHost = 'registry' | 'auth' | 'cdn' | 'k8s' | 'regional';
export const RIG_HOSTS: readonly RigHost[] = ['registry', 'auth', 'cdn', 'k8s', 'regional'];

export const DEFAULT_RIG_NAMES: Readonly<Record<RigHost, string>> = {
  registry: 'registry.hub.test',
  auth: 'auth.hub.test',
  cdn: 'cdn.hub.test',
  k8s: 'registry.k8s.test',
  regional: 'regional.k8s.test',
};

export interface HubRigOptions {
  /** Issues every host's certificate; default a fresh CA. */
  ca?: TestCa;
  names?: Partial<Record<RigHost, string>>;
  /** Manifest GETs allowed before 429 (Docker Hub: 100 per 6 h anonymous). Default 100. */
  rateLimit?: number;
  /** The `w=` of the ratelimit-* headers (informational: the window never resets by itself). Default 21600. */
  rateLimitWindowSeconds?: number;
  /** Lifetime of the signed CDN URLs the registry redirects blobs to. Default 600 s. */
  cdnUrlLifetimeSeconds?: number;
  /** Repositories anonymous tokens do not cover (a glob, * matches '/'). Default 'private/*'. */
  privateRepositories?: string;
  /** A token-service user who may pull the private repositories (and everything public). */
  privateUser?: Credentials;
  /** The private user may push too (to test pushes through the proxy). Default false. */
  privateUserPushes?: boolean;
  /** The token service's audience (distribution's auth.token.service). Default 'registry.hub.test'. */
  service?: string;
  /** expires_in of tokens; default 300 (Docker Hub's). Changeable later on `tokens`. */
  tokenTtlSeconds?: number;
  /** See token-service.ts: exp is set this much before expires_in says. Default 60. */
  leewaySeconds?: number;
  /** Start the registry.k8s.io-shaped pair; default true. */
  k8s?: boolean;
  /** Path prefix the regional host keeps images under. Default 'k8s-artifacts-prod/images'. */
  regionalPrefix?: string;
}

/**
 * 'download': a request for bytes at a storage URL (the CDN, or the regional host's download path);
 * 'token': a request to the token service's front.
 */
export type RigRequestKind = RequestKind | 'download' | 'token';

/** One request a rig host answered. */
export interface RigRequest {
  host: RigHost;
  method: string;
  /** Path without the query string (a CDN URL's signature never shows). */
  path: string;
  /** The status line the host sent (recorded when the head was written). */
  status: number;
  userAgent: string;
  /** Whether the request carried an Authorization header. */
  authorization: boolean;
  kind: RigRequestKind;
  /** /v2/<name>/… requests (the name as this host saw it; regional names carry the prefix). */
  repository?: string;
  /** Tag or digest (manifests), digest (blobs, downloads). */
  reference?: string;
  /** The Range header, when sent. */
  range?: string;
  /** Body bytes written so far. */
  bytes: number;
  /** The whole body was handed to the connection (false for cut ones and answers still streaming). */
  complete: boolean;
}

export interface RigRequestFilter {
  host?: RigHost;
  method?: string;
  kind?: RigRequestKind;
  repository?: string;
  reference?: string;
  status?: number;
  authorization?: boolean;
  /** Exact path, or a pattern tested against the path. */
  path?: string | RegExp;
}

export interface RigEndpoint {
  /** 'registry.hub.test' */
  name: string;
  port: number;
  /** 'registry.hub.test:PORT' */
  hostPort: string;
  /** 'https://registry.hub.test:PORT' */
  url: string;
}

export interface RigResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

export interface RigFetchOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
}

/** A fault: the answer's head is sent as it is, then only `cutAfter` body bytes, then the connection is cut. */
export interface RigCut {
  cutAfter: number;
}

export interface RigPushOptions {
  /** Tag in the registry; default the layout tag. */
  destinationTag?: string;
  /** Push every platform of an index (skopeo --all). */
  all?: boolean;
}

export interface HubRig {
  ca: TestCa;
  /** PEM of the CA behind every rig host: what the proxy must trust upstream. */
  caPem: string;
  /** caPem in a file, for `tls: { ca: … }` and SSL_CERT_FILE. */
  caFile: string;
  endpoints: Record<RigHost, RigEndpoint>;
  /** 'registry.hub.test:PORT': the Docker Hub registry as clients name it. */
  hubHostPort: string;
  /** 'registry.k8s.test:PORT' (when started). */
  k8sHostPort: string;
  /** The realm the registry's challenges name: 'https://auth.hub.test:PORT/token'. */
  realm: string;
  /** The token service's audience, in every challenge's service="…". */
  service: string;
  /** Every rig name → '127.0.0.1': the proxy's `hosts:` map. */
  hosts: Record<string, string>;
  /** The token service (its own log, mint(), tokenTtlSeconds). */
  tokens: TokenService;
  /** distribution behind registry.hub.test (its access log counts the front's checks too). */
  hubStorage: RegistryHandle;
  /** The anonymous distribution behind regional.k8s.test, when started. */
  regionalStorage?: RegistryHandle;
  /** Path prefix of images on the regional host, e.g. 'k8s-artifacts-prod/images'. */
  regionalPrefix: string;
  /** An undici Agent that resolves the rig's names to loopback and trusts only the rig's CA. */
  agent: Dispatcher;
  /** 'http://127.0.0.1:PORT': a plain CONNECT proxy into the rig's hosts (and nowhere else), for Go clients. */
  tunnelUrl: string;

  /** `registries:` (the hub and k8s registries, with the CA) and `hosts:` for a pullthrough policy. */
  proxyConfig(): string;
  /** Just the entries under `registries:`, indented two spaces. */
  registriesYaml(): string;
  /** Just the entries under `hosts:`, indented two spaces. */
  hostsYaml(): string;

  /** 'ok', or '429': every manifest GET at registry.hub.test answers 429 TOOMANYREQUESTS. */
  manifestGets: 'ok' | '429';
  /** Lifetime of the CDN URLs the registry hands out from now on (negative: already expired). */
  cdnUrlLifetimeSeconds: number;
  /** A new limit (default: the current one), with nothing used. */
  resetRateLimit(limit?: number): void;
  /** Manifest GETs still allowed. */
  rateLimitRemaining(): number;

  /** Stops accepting connections (refused) and drops open ones: default the registry and token hosts. */
  down(hosts?: RigHost[]): Promise<void>;
  /** Accepts connections again, on the same ports: default every host that is down. */
  up(hosts?: RigHost[]): Promise<void>;

  /**
   * The next requests to `host` (only those for `match.digest`, if given) meet these faults, one request
   * each, in order: a status is answered instead (registry-style JSON, or S3-style XML from storage
   * hosts); `{ cutAfter: N }` sends the real head, then N body bytes, then cuts the connection. Faults
   * armed by several calls queue up in call order.
   */
  failNext(host: RigHost, faults: Array<number | RigCut>, match?: { digest?: string }): void;
  /** failNext(host, [{ cutAfter: afterBytes }], { digest }): the next download of `digest` is cut. */
  cutNext(host: RigHost, digest: string, afterBytes: number): void;
  /** Forgets every fault not met yet. */
  clearFaults(): void;
  /** A signed CDN URL for a blob of a hub repository, as the registry would redirect to. */
  cdnUrl(digest: string, options?: { repository?: string; lifetimeSeconds?: number }): string;

  /** Requests the rig's hosts answered since start or resetCounts(), oldest first. */
  requests(filter?: RigRequestFilter | ((r: RigRequest) => boolean)): RigRequest[];
  count(filter?: RigRequestFilter | ((r: RigRequest) => boolean)): number;
  /** Forgets the rig's requests and the token service's, and the hub storage's access log. */
  resetCounts(): void;
  /** 'registry GET manifest library/alpine:3.20 200 ×1, …' for assertion messages. */
  describeRequests(filter?: RigRequestFilter | ((r: RigRequest) => boolean)): string;

  /** A request straight to a rig URL through `agent`; redirects are not followed. */
  fetch(url: string, options?: RigFetchOptions): Promise<RigResponse>;
  /** Pushes oci:<layoutDir>:<tag> into the hub as <repository>; returns 'registry.hub.test:PORT/<repository>:<tag>'. */
  pushHub(layoutDir: string, tag: string, repository: string, options?: RigPushOptions): Promise<string>;
  /** Pushes into the regional registry under the prefix; returns 'registry.k8s.test:PORT/<name>:<tag>'. */
  pushK8s(layoutDir: string, tag: string, name: string, options?: RigPushOptions): Promise<string>;
  stop(): Promise<void>;
}

const RATE_LIMIT_MESSAGE =
  'You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: https://www.docker.com/increase-rate-limits';
/** Request headers undici refuses or that belong to one connection only. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'expect', 'te', 'trailer', 'http2-settings']);
const CDN_PATH = /^\/registry-v2\/docker\/registry\/v2\/blobs\/sha256\/([0-9a-f]{2})\/([0-9a-f]{64})\/data$/;
const DOWNLOAD_PATH = /^\/artifacts-downloads\/downloads\/([A-Za-z0-9_-]+)$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;

interface Backend {
  /** 'https://127.0.0.1:PORT' */
  origin: string;
}

/** Takes a pending cut for the body about to be relayed: the bytes to send before cutting. */
type CutClaim = () => number | undefined;

interface FailRule {
  host: RigHost;
  faults: Array<number | RigCut>;
  digest?: string;
}

export async function startHubRig(options: HubRigOptions = {}): Promise<HubRig> {
  const ca = options.ca ?? createTestCa('pullthrough hub rig CA');
  const names: Record<RigHost, string> = { ...DEFAULT_RIG_NAMES, ...options.names };
  const withK8s = options.k8s !== false;
  const regionalPrefix = (options.regionalPrefix ?? 'k8s-artifacts-prod/images').replace(/^\/+|\/+$/g, '');
  const privateRepositories = options.privateRepositories ?? 'private/*';
  const service = options.service ?? names.registry;
  const windowSeconds = options.rateLimitWindowSeconds ?? 21600;
  const work = makeTempDir('hub-rig');
  const caFile = writePem(work, 'rig-ca.pem', ca.certPem);
  const cdnSecret = randomBytes(32);

  const records: RigRequest[] = [];
  const failRules: FailRule[] = [];
  /** digest → a hub repository holding it: the CDN reads the bytes from distribution through it. */
  const blobRepositories = new Map<string, string>();
  let manifestGets: 'ok' | '429' = 'ok';
  let cdnUrlLifetimeSeconds = options.cdnUrlLifetimeSeconds ?? 600;
  let rateLimit = options.rateLimit ?? 100;
  let rateUsed = 0;

  const backendAgent = new Agent({ connect: { ca: ca.certPem }, allowH2: false });
  const lookup = rigLookup(new Set(Object.values(names)));
  const agent = new Agent({ connect: { ca: ca.certPem, lookup }, allowH2: false });
  const gates = new Map<RigHost, Gate>();
  let tokens: TokenService | undefined;
  let hubStorage: RegistryHandle | undefined;
  let regionalStorage: RegistryHandle | undefined;
  let tunnel: Tunnel | undefined;
  let hub: Backend | undefined;
  let regional: Backend | undefined;
  let tokenBackend: Backend | undefined;

  const endpoint = (host: RigHost): RigEndpoint => {
    const port = gates.get(host)?.port ?? 0;
    return { name: names[host], port, hostPort: `${names[host]}:${port}`, url: `https://${names[host]}:${port}` };
  };

  // ---- recording ------------------------------------------------------------------------------

  const record = (host: RigHost, req: IncomingMessage): RigRequest => {
    const path = (req.url ?? '/').split('?', 1)[0] ?? '/';
    const range = req.headers.range;
    return {
      host,
      method: req.method ?? 'GET',
      path,
      status: 0,
      userAgent: String(req.headers['user-agent'] ?? ''),
      authorization: req.headers.authorization !== undefined,
      ...classify(host, path),
      ...(range !== undefined ? { range } : {}),
      bytes: 0,
      complete: false,
    };
  };
  /** Writes the head and records the request: a test that has the answer's head finds its record. */
  const head = (res: ServerResponse, rec: RigRequest, status: number, headers: Record<string, string | string[] | number>): void => {
    rec.status = status;
    records.push(rec);
    res.writeHead(status, headers);
  };
  const sendBody = (res: ServerResponse, rec: RigRequest, status: number, headers: Record<string, string>, body: string): void => {
    head(res, rec, status, { ...headers, 'Content-Length': Buffer.byteLength(body) });
    rec.bytes = rec.method === 'HEAD' ? 0 : Buffer.byteLength(body);
    rec.complete = true;
    res.end(rec.method === 'HEAD' ? undefined : body);
  };
  const registryError = (res: ServerResponse, rec: RigRequest, status: number, code: string, message: string, headers: Record<string, string> = {}): void =>
    sendBody(res, rec, status, { 'Content-Type': 'application/json', ...headers }, JSON.stringify({ errors: [{ code, message, detail: null }] }));
  const storageError = (res: ServerResponse, rec: RigRequest, status: number, code: string, message: string): void =>
    sendBody(res, rec, status, { 'Content-Type': 'application/xml' }, `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>${message}</Message></Error>\n`);

  /** Copies an upstream body to the client, counting bytes (and cutting, if a fault says so); HEAD answers end at once. */
  const relay = async (res: ServerResponse, rec: RigRequest, body: Dispatcher.ResponseData['body'], cut?: CutClaim): Promise<void> => {
    const cutAt = rec.method === 'HEAD' ? undefined : cut?.();
    if (cutAt !== undefined) return sendAndCut(res, rec, body, cutAt);
    if (rec.method === 'HEAD') {
      await body.dump();
      rec.complete = true;
      res.end();
      return;
    }
    // Counted and marked complete as bytes are handed to the response, before the client can have them,
    // so a test that has read the whole answer finds its record final.
    const counter = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        rec.bytes += chunk.length;
        done(null, chunk);
      },
      flush(done) {
        rec.complete = true;
        done();
      },
    });
    await pipeline(body, counter, res);
  };

  /** The upstream answer for a client request, headers cleaned for relaying. */
  const forward = (backend: Backend, req: IncomingMessage, override: { method?: string; path?: string; omit?: string[] } = {}): Promise<Dispatcher.ResponseData> => {
    const method = (override.method ?? req.method ?? 'GET') as Dispatcher.HttpMethod;
    const withBody = method !== 'GET' && method !== 'HEAD' && (req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined);
    const headers = requestHeaders(req.headers);
    for (const name of override.omit ?? []) delete headers[name];
    return request(`${backend.origin}${override.path ?? req.url ?? '/'}`, {
      dispatcher: backendAgent,
      method,
      headers,
      ...(withBody ? { body: req } : {}),
    });
  };
  const passThrough = async (backend: Backend, req: IncomingMessage, res: ServerResponse, rec: RigRequest, cut?: CutClaim): Promise<void> => {
    const upstream = await forward(backend, req);
    head(res, rec, upstream.statusCode, responseHeaders(upstream.headers));
    await relay(res, rec, upstream.body, cut);
  };

  /**
   * Serves a blob's bytes from a distribution as a storage host would (no registry headers), honouring
   * Range and any cut armed for it.
   */
  const serveBytes = async (host: 'cdn' | 'regional', backend: Backend, repository: string, digest: string, bearer: string | undefined, req: IncomingMessage, res: ServerResponse, rec: RigRequest, cut?: CutClaim): Promise<void> => {
    const headers: Record<string, string> = { 'user-agent': `pullthrough-hub-rig-${host}` };
    if (req.headers.range !== undefined) headers.range = req.headers.range;
    if (bearer !== undefined) headers.authorization = `Bearer ${bearer}`;
    const method = rec.method === 'HEAD' ? 'HEAD' : 'GET';
    const upstream = await request(`${backend.origin}/v2/${repository}/blobs/${digest}`, { dispatcher: backendAgent, method, headers });
    if (![200, 206, 416].includes(upstream.statusCode)) {
      await upstream.body.dump();
      return storageError(res, rec, upstream.statusCode === 404 ? 404 : 502, upstream.statusCode === 404 ? 'NoSuchKey' : 'InternalError', `origin answered ${upstream.statusCode}`);
    }
    const out: Record<string, string> = { 'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes', ETag: `"${digest.slice('sha256:'.length)}"` };
    for (const name of ['content-length', 'content-range']) {
      const value = upstream.headers[name];
      if (typeof value === 'string') out[name] = value;
    }
    head(res, rec, upstream.statusCode, out);
    return relay(res, rec, upstream.body, cut);
  };

  /**
   * The fault armed for this request: a status is answered here ('answered'). A cut is not used up yet:
   * the returned claim takes it when a body is about to be relayed, so an answer without one (a
   * redirect, a HEAD) leaves it to the next request.
   */
  const injectedFault = (host: RigHost, res: ServerResponse, rec: RigRequest): 'answered' | CutClaim | undefined => {
    const rule = failRules.find((r) => r.host === host && (r.digest === undefined || r.digest === rec.reference));
    const fault = rule?.faults[0];
    if (!rule || fault === undefined) return undefined;
    const take = (): void => {
      if (rule.faults[0] === fault) rule.faults.shift();
      if (rule.faults.length === 0 && failRules.includes(rule)) failRules.splice(failRules.indexOf(rule), 1);
    };
    if (typeof fault !== 'number') {
      return () => {
        if (rule.faults[0] !== fault) return undefined;
        take();
        return fault.cutAfter;
      };
    }
    take();
    const text = http.STATUS_CODES[fault] ?? 'Injected';
    if (host === 'cdn' || rec.kind === 'download') storageError(res, rec, fault, text.replaceAll(' ', ''), `injected ${fault}`);
    else registryError(res, rec, fault, fault === 429 ? 'TOOMANYREQUESTS' : fault === 401 ? 'UNAUTHORIZED' : 'UNAVAILABLE', `injected ${fault}`);
    return 'answered';
  };

  // ---- the hosts -----------------------------------------------------------------------------

  const rateHeaders = (req: IncomingMessage): Record<string, string> => ({
    'ratelimit-limit': `${rateLimit};w=${windowSeconds}`,
    'ratelimit-remaining': `${Math.max(0, rateLimit - rateUsed)};w=${windowSeconds}`,
    'docker-ratelimit-source': req.socket.remoteAddress ?? '127.0.0.1',
  });

  const signature = (path: string, expires: number): string => createHmac('sha256', cdnSecret).update(`${path}\n${expires}`).digest('hex');
  const cdnUrl = (digest: string, lifetimeSeconds = cdnUrlLifetimeSeconds): string => {
    const hex = digest.slice('sha256:'.length);
    const path = `/registry-v2/docker/registry/v2/blobs/sha256/${hex.slice(0, 2)}/${hex}/data`;
    const expires = Math.floor(Date.now() / 1000) + lifetimeSeconds;
    return `${endpoint('cdn').url}${path}?expires=${expires}&sig=${signature(path, expires)}`;
  };

  const handlers: Record<RigHost, (req: IncomingMessage, res: ServerResponse, rec: RigRequest, cut?: CutClaim) => Promise<void>> = {
    async registry(req, res, rec, cut) {
      if (!hub) throw new Error('hub storage not started');
      if (rec.kind === 'manifest' && (rec.method === 'GET' || rec.method === 'HEAD')) {
        if (rec.method === 'GET' && (manifestGets === '429' || rateUsed >= rateLimit)) {
          const headers = { ...rateHeaders(req), 'ratelimit-remaining': `0;w=${windowSeconds}` };
          return registryError(res, rec, 429, 'TOOMANYREQUESTS', RATE_LIMIT_MESSAGE, headers);
        }
        // A GET takes its slot before it is forwarded (concurrent GETs cannot overshoot the limit) and
        // gives it back unless it is answered with the manifest: only pulls count, as on Docker Hub.
        if (rec.method === 'GET') rateUsed++;
        let upstream: Dispatcher.ResponseData;
        try {
          upstream = await forward(hub, req);
        } catch (err) {
          if (rec.method === 'GET') rateUsed--;
          throw err;
        }
        if (rec.method === 'GET' && (upstream.statusCode < 200 || upstream.statusCode >= 300)) rateUsed--;
        head(res, rec, upstream.statusCode, { ...responseHeaders(upstream.headers), ...rateHeaders(req) });
        return relay(res, rec, upstream.body, cut);
      }
      if (rec.kind === 'blob' && rec.method === 'GET' && rec.repository && rec.reference && DIGEST.test(rec.reference)) {
        // Authorised first, as the real registry is: only a client that may read the blob gets a URL.
        // Without the Range, which distribution would answer with 206; the CDN honours it.
        const check = await forward(hub, req, { method: 'HEAD', omit: ['range'] });
        await check.body.dump();
        if (check.statusCode === 200) {
          blobRepositories.set(rec.reference, rec.repository);
          return sendBody(res, rec, 307, { Location: cdnUrl(rec.reference), 'Content-Type': 'text/html; charset=utf-8' }, '');
        }
      }
      return passThrough(hub, req, res, rec, cut);
    },

    async auth(req, res, rec, cut) {
      if (!tokenBackend) throw new Error('token service not started');
      return passThrough(tokenBackend, req, res, rec, cut);
    },

    async cdn(req, res, rec, cut) {
      if (rec.method !== 'GET' && rec.method !== 'HEAD') return storageError(res, rec, 405, 'MethodNotAllowed', 'GET and HEAD only');
      const m = CDN_PATH.exec(rec.path);
      if (!m) return storageError(res, rec, 404, 'NoSuchKey', 'The specified key does not exist.');
      const digest = `sha256:${m[2]}`;
      const query = new URL(req.url ?? '/', 'https://cdn').searchParams;
      const expires = Number(query.get('expires'));
      const given = Buffer.from(query.get('sig') ?? '', 'utf8');
      const wanted = Buffer.from(signature(rec.path, expires), 'utf8');
      if (!Number.isInteger(expires) || given.length !== wanted.length || !timingSafeEqual(given, wanted)) {
        return storageError(res, rec, 403, 'AccessDenied', 'The request signature we calculated does not match the signature you provided.');
      }
      if (expires < Date.now() / 1000) return storageError(res, rec, 403, 'AccessDenied', 'Request has expired');
      const repository = blobRepositories.get(digest);
      if (!repository || !tokens || !hub) return storageError(res, rec, 404, 'NoSuchKey', 'The specified key does not exist.');
      const bearer = tokens.mint([{ name: repository, actions: ['pull'] }]);
      return serveBytes('cdn', hub, repository, digest, bearer, req, res, rec, cut);
    },

    async k8s(req, res, rec) {
      const headers = { 'Docker-Distribution-Api-Version': 'registry/2.0' };
      if (rec.kind === 'base') return sendBody(res, rec, 200, { ...headers, 'Content-Type': 'application/json' }, '{}');
      if ((rec.kind === 'manifest' || rec.kind === 'blob' || rec.kind === 'tags') && rec.repository !== undefined) {
        const rest = (req.url ?? '').slice(`/v2/${rec.repository}`.length);
        const location = `${endpoint('regional').url}/v2/${prefixed(regionalPrefix, rec.repository)}${rest}`;
        return sendBody(res, rec, 307, { ...headers, Location: location, 'Content-Type': 'text/html; charset=utf-8' }, `<a href="${location}">Temporary Redirect</a>.\n`);
      }
      return registryError(res, rec, 404, 'NOT_FOUND', 'not found', headers);
    },

    async regional(req, res, rec, cut) {
      if (!regional) throw new Error('regional storage not started');
      if (rec.kind === 'download') {
        const target = decodeDownload(rec.path);
        if (!target) return storageError(res, rec, 404, 'NoSuchKey', 'unknown download');
        if (rec.method !== 'GET' && rec.method !== 'HEAD') return storageError(res, rec, 405, 'MethodNotAllowed', 'GET and HEAD only');
        return serveBytes('regional', regional, target.repository, target.digest, undefined, req, res, rec, cut);
      }
      if (rec.kind === 'blob' && rec.method === 'GET' && rec.repository && rec.reference && DIGEST.test(rec.reference)) {
        const check = await forward(regional, req, { method: 'HEAD', omit: ['range'] });
        await check.body.dump();
        if (check.statusCode === 200) {
          const opaque = Buffer.from(`${rec.repository}@${rec.reference}`).toString('base64url');
          return sendBody(res, rec, 302, { Location: `/artifacts-downloads/downloads/${opaque}`, 'Content-Type': 'text/html; charset=utf-8' }, '');
        }
      }
      return passThrough(regional, req, res, rec, cut);
    },
  };

  const serve = (host: RigHost) => (req: IncomingMessage, res: ServerResponse): void => {
    const rec = record(host, req);
    const run = async (): Promise<void> => {
      const fault = injectedFault(host, res, rec);
      if (fault === 'answered') return;
      await handlers[host](req, res, rec, fault);
    };
    run().catch((err: Error) => {
      if (res.headersSent) return res.destroy(err);
      // The rig never crashes on a request: an upstream it could not reach is a 502.
      registryError(res, rec, 502, 'UNAVAILABLE', `hub rig ${host}: ${err.message}`);
    });
  };

  try {
    // Listeners first: every host's port is known before anything names it (realm, redirects).
    const hosts: RigHost[] = withK8s ? [...RIG_HOSTS] : ['registry', 'auth', 'cdn'];
    for (const host of hosts) {
      const leaf = ca.issue([names[host], '127.0.0.1']);
      const server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, serve(host));
      const gate = new Gate(server);
      await gate.open();
      gates.set(host, gate);
    }
    const realm = `${endpoint('auth').url}/token`;
    tokens = await startTokenService({
      host: names.auth,
      ca,
      service,
      tokenTtlSeconds: options.tokenTtlSeconds ?? 300,
      leewaySeconds: options.leewaySeconds ?? 60,
      anonymous: [{ repository: '*', except: [privateRepositories], actions: ['pull'] }],
      users: options.privateUser
        ? { [options.privateUser.username]: { password: options.privateUser.password, access: [{ repository: '*', actions: options.privateUserPushes ? ['pull', 'push'] : ['pull'] }] } }
        : {},
    });
    tokenBackend = { origin: `https://${tokens.address}` };
    // The storage registries carry the public names: the front forwards the client's Host, and undici
    // takes the SNI (so the certificate name it checks) from it.
    hubStorage = await startRegistry({ host: names.registry, ca, tokenAuth: { ...tokens.registryAuth, realm } });
    hub = { origin: `https://${hubStorage.address}` };
    if (withK8s) {
      regionalStorage = await startRegistry({ host: names.regional, ca });
      regional = { origin: `https://${regionalStorage.address}` };
    }
    tunnel = await startTunnel(new Map(Object.values(names).map((name) => [name, '127.0.0.1'])));
  } catch (err) {
    await Promise.allSettled([...gates.values()].map((g) => g.close()));
    await Promise.allSettled([tokens?.stop(), hubStorage?.stop(), regionalStorage?.stop(), tunnel?.close(), agent.close(), backendAgent.close()]);
    removeTempDir(work);
    throw err;
  }

  const startedTokens = tokens;
  const startedHub = hubStorage;
  const startedTunnel = tunnel;
  const filterOf = (filter: RigRequestFilter | ((r: RigRequest) => boolean) = {}): ((r: RigRequest) => boolean) =>
    typeof filter === 'function' ? filter : (r) => matches(r, filter);
  const ymlRegistries = (): string =>
    [...(['registry', 'k8s'] as const)]
      .filter((h) => gates.has(h))
      .map((h) => `  ${endpoint(h).hostPort}:\n    tls: { ca: ${caFile} }\n`)
      .join('');
  const ymlHosts = (): string => Object.values(names).map((name) => `  ${name}: 127.0.0.1\n`).join('');

  const rig: HubRig = {
    ca,
    caPem: ca.certPem,
    caFile,
    endpoints: Object.fromEntries(RIG_HOSTS.map((h) => [h, endpoint(h)])) as Record<RigHost, RigEndpoint>,
    hubHostPort: endpoint('registry').hostPort,
    k8sHostPort: endpoint('k8s').hostPort,
    realm: `${endpoint('auth').url}/token`,
    service,
    hosts: Object.fromEntries(Object.values(names).map((name) => [name, '127.0.0.1'])),
    tokens: startedTokens,
    hubStorage: startedHub,
    ...(regionalStorage ? { regionalStorage } : {}),
    regionalPrefix,
    agent,
    tunnelUrl: `http://127.0.0.1:${startedTunnel.port}`,

    proxyConfig: () => `registries:\n${ymlRegistries()}hosts:\n${ymlHosts()}`,
    registriesYaml: ymlRegistries,
    hostsYaml: ymlHosts,

    get manifestGets() {
      return manifestGets;
    },
    set manifestGets(value: 'ok' | '429') {
      manifestGets = value;
    },
    get cdnUrlLifetimeSeconds() {
      return cdnUrlLifetimeSeconds;
    },
    set cdnUrlLifetimeSeconds(value: number) {
      cdnUrlLifetimeSeconds = value;
    },
    resetRateLimit(limit = rateLimit) {
      rateLimit = limit;
      rateUsed = 0;
    },
    rateLimitRemaining: () => Math.max(0, rateLimit - rateUsed),

    async down(which = ['registry', 'auth']) {
      await Promise.all(which.map((h) => gates.get(h)?.close()));
    },
    async up(which = [...gates.keys()]) {
      for (const h of which) await gates.get(h)?.open();
    },

    failNext(host, faults, match = {}) {
      if (faults.length === 0) return;
      failRules.push({ host, faults: [...faults], ...(match.digest !== undefined ? { digest: match.digest } : {}) });
    },
    cutNext(host, digest, afterBytes) {
      rig.failNext(host, [{ cutAfter: afterBytes }], { digest });
    },
    clearFaults() {
      failRules.length = 0;
    },
    cdnUrl(digest, opts = {}) {
      if (opts.repository !== undefined) blobRepositories.set(digest, opts.repository);
      return cdnUrl(digest, opts.lifetimeSeconds);
    },

    requests: (filter) => records.filter(filterOf(filter)),
    count: (filter) => records.filter(filterOf(filter)).length,
    resetCounts() {
      records.length = 0;
      startedTokens.resetCounts();
      startedHub.resetCounts();
      regionalStorage?.resetCounts();
    },
    describeRequests: (filter) => describe(records.filter(filterOf(filter))),

    async fetch(url, opts = {}) {
      const res = await request(url, {
        dispatcher: agent,
        method: (opts.method ?? 'GET') as Dispatcher.HttpMethod,
        headers: { 'user-agent': 'pullthrough-hub-rig-test', ...opts.headers },
        ...(opts.body !== undefined ? { body: opts.body } : {}),
      });
      return { status: res.statusCode, headers: res.headers, body: Buffer.from(await res.body.arrayBuffer()) };
    },
    async pushHub(layoutDir, tag, repository, opts = {}) {
      const registryToken = startedTokens.mint([{ name: repository, actions: ['pull', 'push'] }], { ttlSeconds: 3600 });
      await pushImage(layoutDir, tag, startedHub, { repository, registryToken, ...opts });
      return `${rig.hubHostPort}/${repository}:${opts.destinationTag ?? tag}`;
    },
    async pushK8s(layoutDir, tag, name, opts = {}) {
      if (!regionalStorage) throw new Error('pushK8s: the rig was started with k8s: false');
      await pushImage(layoutDir, tag, regionalStorage, { repository: prefixed(regionalPrefix, name), ...opts });
      return `${rig.k8sHostPort}/${name}:${opts.destinationTag ?? tag}`;
    },
    async stop() {
      await Promise.allSettled([...gates.values()].map((g) => g.close()));
      await Promise.allSettled([startedTunnel.close(), startedTokens.stop(), startedHub.stop(), regionalStorage?.stop()]);
      await Promise.allSettled([agent.close(), backendAgent.close()]);
      removeTempDir(work);
    },
  };
  return rig;
}

// ---- listeners that can refuse connections and come back on the same port ---------------------

/** A TCP listener on loopback handing its connections to an https server that never listens itself. */
class Gate {
  port = 0;
  private listener: net.Server | undefined;
  private readonly sockets = new Set<net.Socket>();

  private readonly server: https.Server;

  constructor(server: https.Server) {
    this.server = server;
    // A client that resets mid-handshake is not the rig's failure.
    server.on('tlsClientError', () => {});
  }

  async open(): Promise<void> {
    if (this.listener) return;
    const listener = net.createServer((socket) => {
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
      this.server.emit('connection', socket);
    });
    await new Promise<void>((resolve, reject) => listener.once('error', reject).listen(this.port, '127.0.0.1', () => resolve()));
    this.port = (listener.address() as net.AddressInfo).port;
    this.listener = listener;
  }

  /** Stops listening (connects are refused) and drops every open connection. */
  async close(): Promise<void> {
    const listener = this.listener;
    if (!listener) return;
    this.listener = undefined;
    const closed = new Promise<void>((resolve) => listener.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }
}

interface Tunnel {
  port: number;
  close(): Promise<void>;
}

/** A plain CONNECT proxy that reaches only the given names (name → address), for Go clients. */
async function startTunnel(names: Map<string, string>): Promise<Tunnel> {
  const sockets = new Set<net.Socket>();
  const track = (socket: net.Socket): void => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
  };
  const server = http.createServer((_req, res) => {
    res.writeHead(405, { 'Content-Type': 'text/plain' });
    res.end('CONNECT only\n');
  });
  server.on('connect', (req: IncomingMessage, client: net.Socket, head: Buffer) => {
    track(client);
    const m = /^([^:]+):(\d+)$/.exec(req.url ?? '');
    const address = m ? names.get((m[1] ?? '').toLowerCase()) : undefined;
    if (!m || !address) {
      client.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    const upstream = net.connect(Number(m[2]), address);
    track(upstream);
    upstream.once('connect', () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    upstream.once('error', () => {
      if (!client.destroyed && upstream.bytesRead === 0) client.end('HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n');
    });
    client.once('close', () => upstream.destroy());
    upstream.once('close', () => client.destroy());
  });
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of sockets) socket.destroy();
      server.closeAllConnections();
      await closed;
    },
  };
}

/** dns.lookup for net.connect, answering the rig's names with loopback (both callback shapes). */
function rigLookup(names: Set<string>): net.LookupFunction {
  return ((hostname: string, options: dns.LookupOptions, callback: (...args: unknown[]) => void) => {
    if (!names.has(hostname.toLowerCase())) return dns.lookup(hostname, options, callback as never);
    if (options.all) callback(null, [{ address: '127.0.0.1', family: 4 }]);
    else callback(null, '127.0.0.1', 4);
  }) as net.LookupFunction;
}

// ---- small pieces ----------------------------------------------------------------------------

/** Writes the first `cutAt` bytes of the body, waits until they are out, then cuts the connection. */
async function sendAndCut(res: ServerResponse, rec: RigRequest, body: Dispatcher.ResponseData['body'], cutAt: number): Promise<void> {
  let sent = 0;
  for await (const chunk of body) {
    const piece = (chunk as Buffer).subarray(0, cutAt - sent);
    if (piece.length > 0 && !(await writeFlushed(res, piece))) break;
    sent += piece.length;
    rec.bytes = sent;
    if (sent >= cutAt) break;
  }
  body.destroy();
  await sleep(100);
  res.socket?.destroy();
}

function writeFlushed(res: ServerResponse, bytes: Buffer): Promise<boolean> {
  return new Promise((resolve) => {
    if (res.destroyed) return resolve(false);
    res.write(bytes, (err) => resolve(!err));
  });
}

function requestHeaders(headers: IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || HOP_BY_HOP.has(name)) continue;
    out[name] = Array.isArray(value) ? value.join(', ') : value;
  }
  return out;
}

function responseHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || HOP_BY_HOP.has(name)) continue;
    out[name] = value;
  }
  return out;
}

function prefixed(prefix: string, name: string): string {
  return prefix ? `${prefix}/${name}` : name;
}

function decodeDownload(path: string): { repository: string; digest: string } | undefined {
  const m = DOWNLOAD_PATH.exec(path);
  if (!m) return undefined;
  const text = Buffer.from(m[1] ?? '', 'base64url').toString('utf8');
  const at = text.lastIndexOf('@');
  const digest = text.slice(at + 1);
  return at > 0 && DIGEST.test(digest) ? { repository: text.slice(0, at), digest } : undefined;
}

// Repository names contain slashes: the name is everything between /v2/ and the last /manifests/,
// /blobs/ or /tags/ segment (as registry.ts classifies distribution's access log).
function classify(host: RigHost, path: string): { kind: RigRequestKind; repository?: string; reference?: string } {
  if (host === 'auth') return { kind: 'token' };
  if (host === 'cdn') {
    const m = CDN_PATH.exec(path);
    return m ? { kind: 'download', reference: `sha256:${m[2]}` } : { kind: 'other' };
  }
  if (host === 'regional' && path.startsWith('/artifacts-downloads/')) {
    const target = decodeDownload(path);
    return target ? { kind: 'download', repository: target.repository, reference: target.digest } : { kind: 'download' };
  }
  if (path === '/v2/' || path === '/v2') return { kind: 'base' };
  if (path === '/v2/_catalog') return { kind: 'catalog' };
  const upload = /^\/v2\/(.+)\/blobs\/uploads(?:\/([^/]*))?$/.exec(path);
  if (upload) return { kind: 'upload', repository: upload[1] ?? '' };
  const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(path);
  if (m) return { kind: m[2] === 'blobs' ? 'blob' : 'manifest', repository: m[1] ?? '', reference: decodeURIComponent(m[3] ?? '') };
  const tags = /^\/v2\/(.+)\/tags\/list$/.exec(path);
  if (tags) return { kind: 'tags', repository: tags[1] ?? '' };
  return { kind: 'other' };
}

function matches(r: RigRequest, f: RigRequestFilter): boolean {
  if (f.host !== undefined && r.host !== f.host) return false;
  if (f.method !== undefined && r.method !== f.method.toUpperCase()) return false;
  if (f.kind !== undefined && r.kind !== f.kind) return false;
  if (f.repository !== undefined && r.repository !== f.repository) return false;
  if (f.reference !== undefined && r.reference !== f.reference) return false;
  if (f.status !== undefined && r.status !== f.status) return false;
  if (f.authorization !== undefined && r.authorization !== f.authorization) return false;
  if (typeof f.path === 'string' && r.path !== f.path) return false;
  if (f.path instanceof RegExp && !f.path.test(r.path)) return false;
  return true;
}

/** 'registry GET manifest library/alpine:3.20 200 ×1, cdn GET download 200 ×3' in first-seen order. */
function describe(served: RigRequest[]): string {
  const counts = new Map<string, number>();
  for (const r of served) {
    const ref = r.reference === undefined ? '' : r.reference.startsWith('sha256:') ? `@${r.reference.slice(7, 19)}` : `:${r.reference}`;
    const what = `${r.host} ${r.method} ${r.kind}${r.repository !== undefined ? ` ${r.repository}` : ''}${ref} ${r.status}`;
    counts.set(what, (counts.get(what) ?? 0) + 1);
  }
  return [...counts].map(([what, n]) => `${what} ×${n}`).join(', ') || 'nothing';
}
