// A token service for end-to-end tests: the Docker token protocol (GET /token with Basic auth, and the
// OAuth2 POST form) for a real docker-registry started with `auth.token`. Tokens are RS256 JWTs signed
// by a throw-away key whose self-signed certificate is both the token's x5c and the registry's
// rootcertbundle. Every request is recorded, so tests can count token fetches.
import { randomBytes, sign, X509Certificate } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { createTestCa, type TestCa } from './pki.ts';
import type { TokenAuth } from './registry.ts';

/** One entry of a token's access claim; distribution checks type, name and each action. */
export interface TokenAccess {
  /** Default 'repository'. */
  type?: string;
  name: string;
  actions: string[];
}

/** What a user may do. `repository` is a glob: * matches any run of characters, '/' included. */
export interface AccessRule {
  repository: string;
  actions: string[];
  /** Globs this rule does not cover, e.g. a public '*' except 'private/*' (Docker Hub's anonymous pull). */
  except?: string[];
}

export interface TokenUser {
  password: string;
  access: AccessRule[];
}

export interface TokenServiceOptions {
  /** Name in the realm URL and the certificate, e.g. 'auth.test'. */
  host: string;
  /** Issues the service's TLS certificate (for host and 127.0.0.1). */
  ca: TestCa;
  /** The registry's auth.token.service, which distribution requires as the token's aud. */
  service?: string;
  issuer?: string;
  users?: Record<string, TokenUser>;
  /** What a request without credentials is granted; default nothing (a token with empty access). */
  anonymous?: AccessRule[];
  /** A disabled method answers 405. Both are enabled by default. */
  methods?: { get?: boolean; post?: boolean };
  /** expires_in of issued tokens; default 300. Can be changed later on the handle. */
  tokenTtlSeconds?: number;
  /**
   * distribution 2.8 accepts a token until exp + 60 s (token.Leeway). The exp claim is set that much
   * earlier, so the registry refuses a token when expires_in says it has expired and an expiry test
   * waits seconds, not a minute. 0 makes exp honest. Default 60.
   */
  leewaySeconds?: number;
}

/** One request the service answered. */
export interface TokenRequest {
  method: string;
  /** Path without the query. */
  path: string;
  /** Requested scopes as sent, e.g. 'repository:team/app:pull,push'. */
  scopes: string[];
  service?: string;
  /** Basic or form username (never the password); for refresh_token grants, the token's owner. */
  user?: string;
  grantType?: string;
  clientId?: string;
  status: number;
}

export type TokenRequestFilter = Partial<Pick<TokenRequest, 'method' | 'path' | 'service' | 'user' | 'grantType' | 'status'>>;

export interface MintOptions {
  /** Default: the handle's tokenTtlSeconds. */
  ttlSeconds?: number;
  subject?: string;
  /** Default: the service. Another value makes a token the registry must refuse. */
  audience?: string;
  issuer?: string;
}

export interface TokenService {
  /** The realm: 'https://auth.test:PORT/token'. */
  url: string;
  host: string;
  port: number;
  /** 'auth.test:PORT' */
  hostPort: string;
  /** '127.0.0.1:PORT': where to connect, since the test host name does not resolve. */
  address: string;
  service: string;
  issuer: string;
  /** The signing certificate: the registry's auth.token.rootcertbundle. */
  rootCertBundlePem: string;
  /** What startRegistry's tokenAuth option takes. */
  registryAuth: TokenAuth;
  /** PEM of the CA that issued the service's TLS certificate. */
  caPem: string;
  /** expires_in of tokens issued from now on. */
  tokenTtlSeconds: number;
  /** A token signed like the ones the service issues, without a request. */
  mint(access: TokenAccess[], options?: MintOptions): string;
  /** Requests answered since start or the last resetCounts(), oldest first. */
  requests(): TokenRequest[];
  count(filter?: TokenRequestFilter | ((r: TokenRequest) => boolean)): number;
  resetCounts(): void;
  stop(): Promise<void>;
}

export async function startTokenService(options: TokenServiceOptions): Promise<TokenService> {
  const signer = createTestCa('pullthrough test token signer');
  const x5c = new X509Certificate(signer.certPem).raw.toString('base64');
  const leaf = options.ca.issue([options.host, '127.0.0.1']);
  const service = options.service ?? 'pullthrough-test-registry';
  const issuer = options.issuer ?? 'pullthrough-test-token-service';
  const leeway = options.leewaySeconds ?? 60;
  const users = options.users ?? {};
  const refreshTokens = new Map<string, string>();
  let records: TokenRequest[] = [];

  const mint = (access: TokenAccess[], mintOptions: MintOptions = {}): string => {
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: 'JWT', alg: 'RS256', x5c: [x5c] };
    const claims = {
      iss: mintOptions.issuer ?? issuer,
      sub: mintOptions.subject ?? '',
      aud: mintOptions.audience ?? service,
      exp: now + (mintOptions.ttlSeconds ?? handle.tokenTtlSeconds) - leeway,
      nbf: now,
      iat: now,
      jti: randomBytes(16).toString('hex'),
      access: access.map((a) => ({ type: a.type ?? 'repository', name: a.name, actions: a.actions })),
    };
    const input = `${base64url(header)}.${base64url(claims)}`;
    return `${input}.${sign('sha256', Buffer.from(input), signer.keyPem).toString('base64url')}`;
  };

  const answer = async (req: IncomingMessage, record: TokenRequest): Promise<[number, object, Record<string, string>?]> => {
    if (record.path !== '/token') return [404, registryError('NOT_FOUND', 'no such endpoint')];
    const enabled = { GET: options.methods?.get !== false, POST: options.methods?.post !== false };
    if ((record.method !== 'GET' && record.method !== 'POST') || !enabled[record.method]) {
      const allow = Object.entries(enabled).filter(([, on]) => on).map(([m]) => m).join(', ');
      return [405, registryError('UNSUPPORTED', `${record.method} /token is disabled`), { Allow: allow }];
    }
    const post = record.method === 'POST';
    if (post && !String(req.headers['content-type']).startsWith('application/x-www-form-urlencoded')) {
      return [400, oauthError('invalid_request', 'expected an application/x-www-form-urlencoded body')];
    }
    const params = post ? new URLSearchParams(await readBody(req)) : new URL(req.url ?? '/', 'https://x').searchParams;
    // GET repeats `scope`; the OAuth form separates scopes with spaces.
    record.scopes = params.getAll('scope').flatMap((s) => s.split(' ')).filter(Boolean);
    record.service = params.get('service') ?? undefined;
    record.clientId = params.get('client_id') ?? undefined;

    let user: string | undefined;
    if (post) {
      record.grantType = params.get('grant_type') ?? undefined;
      if (!record.clientId) return [400, oauthError('invalid_request', 'client_id is required')];
      if (record.grantType === 'password') {
        user = record.user = params.get('username') ?? '';
        if (users[user]?.password !== params.get('password')) return [401, oauthError('invalid_grant', 'incorrect username or password')];
      } else if (record.grantType === 'refresh_token') {
        user = record.user = refreshTokens.get(params.get('refresh_token') ?? '');
        if (user === undefined) return [401, oauthError('invalid_grant', 'unknown refresh token')];
      } else {
        return [400, oauthError('unsupported_grant_type', `grant_type ${record.grantType ?? '(none)'}`)];
      }
    } else if (req.headers.authorization !== undefined) {
      const basic = parseBasic(req.headers.authorization);
      record.user = basic?.username;
      if (!basic || users[basic.username]?.password !== basic.password) {
        return [401, registryError('UNAUTHORIZED', 'incorrect username or password'), { 'WWW-Authenticate': `Basic realm="${issuer}"` }];
      }
      user = basic.username;
    }

    const rules = user === undefined ? (options.anonymous ?? []) : (users[user]?.access ?? []);
    const granted = grant(rules, record.scopes);
    // aud is the service asked for: a client sending the wrong one gets a token the registry refuses.
    const token = mint(granted, { subject: user ?? '', audience: record.service ?? service });
    // Refresh tokens only for a user who asked for one: access_type=offline (POST), offline_token=true (GET).
    const offline = post ? params.get('access_type') === 'offline' : params.get('offline_token') === 'true';
    const refresh = offline && user !== undefined ? randomBytes(24).toString('base64url') : undefined;
    if (refresh && user !== undefined) refreshTokens.set(refresh, user);
    const common = { expires_in: handle.tokenTtlSeconds, issued_at: new Date().toISOString(), ...(refresh ? { refresh_token: refresh } : {}) };
    if (post) return [200, { access_token: token, scope: granted.map(formatScope).join(' '), ...common }];
    return [200, { token, access_token: token, ...common }];
  };

  const server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
    const record: TokenRequest = { method: req.method ?? 'GET', path: (req.url ?? '/').split('?')[0] ?? '/', scopes: [], status: 0 };
    answer(req, record).then(
      ([status, body, headers]) => reply(res, record, status, body, headers),
      (err: Error) => res.destroy(err),
    );
  });
  const reply = (res: ServerResponse, record: TokenRequest, status: number, body: object, headers: Record<string, string> = {}): void => {
    record.status = status;
    records.push(record);
    const text = JSON.stringify(body);
    res.writeHead(status, { ...headers, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  };
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  const url = `https://${options.host}:${port}/token`;

  const handle: TokenService = {
    url,
    host: options.host,
    port,
    hostPort: `${options.host}:${port}`,
    address: `127.0.0.1:${port}`,
    service,
    issuer,
    rootCertBundlePem: signer.certPem,
    registryAuth: { realm: url, service, issuer, rootCertBundlePem: signer.certPem },
    caPem: options.ca.certPem,
    tokenTtlSeconds: options.tokenTtlSeconds ?? 300,
    mint,
    requests: () => [...records],
    count: (filter = {}) =>
      records.filter(typeof filter === 'function' ? filter : (r) => Object.entries(filter).every(([k, v]) => r[k as keyof TokenRequest] === v)).length,
    resetCounts: () => {
      records = [];
    },
    stop: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  return handle;
}

/** For each requested repository scope, the requested actions some rule allows ('*' allows all). */
function grant(rules: AccessRule[], scopes: string[]): TokenAccess[] {
  const granted: TokenAccess[] = [];
  for (const scope of scopes) {
    // type:name:actions, where only the name may hold colons (a registry host with a port).
    const first = scope.indexOf(':');
    const last = scope.lastIndexOf(':');
    if (first < 0 || last <= first || scope.slice(0, first) !== 'repository') continue;
    const name = scope.slice(first + 1, last);
    const covers = (r: AccessRule): boolean => globMatches(r.repository, name) && !(r.except ?? []).some((glob) => globMatches(glob, name));
    const allowed = new Set(rules.filter(covers).flatMap((r) => r.actions));
    const actions = scope.slice(last + 1).split(',').filter((a) => a && (allowed.has(a) || allowed.has('*')));
    if (actions.length > 0) granted.push({ type: 'repository', name, actions });
  }
  return granted;
}

function globMatches(glob: string, name: string): boolean {
  const pattern = glob.split('*').map((part) => part.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*');
  return new RegExp(`^${pattern}$`).test(name);
}

function formatScope(a: TokenAccess): string {
  return `${a.type ?? 'repository'}:${a.name}:${a.actions.join(',')}`;
}

function parseBasic(header: string): { username: string; password: string } | undefined {
  const m = /^Basic\s+(\S+)$/i.exec(header);
  if (!m) return undefined;
  const decoded = Buffer.from(m[1] ?? '', 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function base64url(value: object): string {
  return Buffer.from(JSON.stringify(value)).toString('base64url');
}

function registryError(code: string, message: string): object {
  return { errors: [{ code, message, detail: null }] };
}

function oauthError(error: string, description: string): object {
  return { error, error_description: description };
}
