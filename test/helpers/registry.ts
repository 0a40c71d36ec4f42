// A real upstream registry for end-to-end tests: Debian's docker-registry (distribution 2.8) serving
// TLS on loopback under a test host name, with filesystem storage in a temp dir. The handle counts
// the requests the registry served, parsed from its access log, so tests can assert "exactly one
// upstream blob GET" and the like.
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request, type Dispatcher } from 'undici';
import { stringify } from 'yaml';
import { hasCommand, makeTempDir, removeTempDir, requireTool, run, spawnTracked, stopChild } from './process.ts';
import type { TestCa } from './pki.ts';

const REGISTRY_BIN = '/usr/bin/docker-registry';
const READY_TIMEOUT_MS = 15_000;
const MAX_START_ATTEMPTS = 3;
/** Query parameter of the requests settle() sends; they are left out of requests(). */
const MARKER_PARAM = 'pullthrough-harness-marker';

export interface Credentials {
  username: string;
  password: string;
}

/** distribution's token auth (auth.token): what the registry is told about its token service. */
export interface TokenAuth {
  /** Token endpoint the Bearer challenge names, e.g. 'https://auth.test:PORT/token'. */
  realm: string;
  /** The registry's name: every token's aud must equal it. */
  service: string;
  /** Every token's iss must equal it. */
  issuer: string;
  /** PEM certificates the x5c chain of a token must lead to. */
  rootCertBundlePem: string;
}

export interface RegistryOptions {
  /** Name clients use for the registry, e.g. 'registry.test'; it is in the certificate and in url/hostPort. */
  host: string;
  /** 0 or absent: pick a free port. */
  port?: number;
  /** Loopback address to listen on; default 127.0.0.1. */
  bindAddress?: string;
  ca: TestCa;
  /** Require HTTP Basic auth (distribution's htpasswd auth, bcrypt). */
  htpasswd?: Credentials;
  /** Require Bearer tokens from a token service (see token-service.ts); excludes htpasswd. */
  tokenAuth?: TokenAuth;
}

export type RequestKind = 'base' | 'manifest' | 'blob' | 'upload' | 'tags' | 'catalog' | 'other';

/** One request the registry served, from its access log. */
export interface ServedRequest {
  method: string;
  /** Request URI as received: path plus query string. */
  path: string;
  status: number;
  /** Response body bytes written (0 for HEAD and for "-"). */
  bytes: number;
  userAgent: string;
  kind: RequestKind;
  /** Repository name for /v2/<name>/... requests. */
  repository?: string;
  /** Tag or digest (manifests), digest (blobs). */
  reference?: string;
}

export interface RequestFilter {
  method?: string;
  kind?: RequestKind;
  repository?: string;
  reference?: string;
  status?: number;
  /** Exact path, or a pattern tested against the path. */
  path?: string | RegExp;
}

export interface DirectResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

export interface DirectRequestOptions {
  method?: string;
  headers?: Record<string, string>;
  /** Send the handle's htpasswd credentials (default: true when the registry has them). */
  auth?: boolean;
  /** Send `Authorization: Bearer <token>` (instead of any htpasswd credentials). */
  bearer?: string;
}

export interface RegistryHandle {
  /** 'https://registry.test:PORT' */
  url: string;
  /** 'registry.test:PORT' */
  hostPort: string;
  host: string;
  port: number;
  bindAddress: string;
  /** 'bindAddress:PORT': where to connect, since the test host name does not resolve. */
  address: string;
  /** PEM of the CA that issued the registry's certificate. */
  caPem: string;
  credentials?: Credentials;
  /** Set when the registry was started with token auth. */
  tokenAuth?: TokenAuth;
  /** Requests served since start or the last resetCounts(), oldest first. */
  requests(): ServedRequest[];
  count(filter?: RequestFilter | ((r: ServedRequest) => boolean)): number;
  resetCounts(): void;
  /**
   * Resolves once every request the registry completed before the call appears in requests(). The
   * access log line is written just after the response, so a test that counts right after a client
   * finished should await this first.
   */
  settle(): Promise<void>;
  /** A request straight to the registry over TLS (no proxy), with the right SNI, CA and Host. */
  fetch(path: string, options?: DirectRequestOptions): Promise<DirectResponse>;
  /** The registry's own log (JSON lines on stderr), for debugging failed tests. */
  logText(): string;
  stop(): Promise<void>;
}

/** Starts docker-registry and waits until it answers GET /v2/. */
export async function startRegistry(options: RegistryOptions): Promise<RegistryHandle> {
  requireTool(REGISTRY_BIN, 'docker-registry not installed: apt-get install docker-registry');
  if (options.htpasswd && options.tokenAuth) throw new Error('startRegistry: htpasswd and tokenAuth exclude each other');
  const bindAddress = options.bindAddress ?? '127.0.0.1';
  assertLoopback(bindAddress);
  const workDir = makeTempDir('registry');
  try {
    const files = await writeRegistryFiles(workDir, options, bindAddress);
    // A port picked as free can be taken before the registry binds it; only then is a retry useful.
    const attempts = options.port ? 1 : MAX_START_ATTEMPTS;
    for (let attempt = 1; ; attempt++) {
      const port = options.port || (await findFreePort(bindAddress));
      try {
        return await launch(options, bindAddress, port, workDir, files);
      } catch (err) {
        if (attempt >= attempts || !String(err).includes('address already in use')) throw err;
      }
    }
  } catch (err) {
    removeTempDir(workDir);
    throw err;
  }
}

interface RegistryFiles {
  certFile: string;
  keyFile: string;
  /** The config's auth section, naming the files written for it. */
  auth?: object;
}

async function writeRegistryFiles(workDir: string, options: RegistryOptions, bindAddress: string): Promise<RegistryFiles> {
  // The bind address is in the certificate too, so tools that must connect by IP (skopeo pushes:
  // Go never uses a proxy for, and cannot resolve, the test name) can still verify it.
  const leaf = options.ca.issue([options.host, bindAddress]);
  const certFile = join(workDir, 'registry.crt');
  const keyFile = join(workDir, 'registry.key');
  writeFileSync(certFile, leaf.certPem);
  writeFileSync(keyFile, leaf.keyPem, { mode: 0o600 });
  if (options.tokenAuth) {
    const { realm, service, issuer, rootCertBundlePem } = options.tokenAuth;
    const rootcertbundle = join(workDir, 'token-roots.pem');
    writeFileSync(rootcertbundle, rootCertBundlePem);
    return { certFile, keyFile, auth: { token: { realm, service, issuer, rootcertbundle } } };
  }
  if (!options.htpasswd) return { certFile, keyFile };
  const htpasswdFile = join(workDir, 'htpasswd');
  writeFileSync(htpasswdFile, await htpasswdLine(options.htpasswd));
  return { certFile, keyFile, auth: { htpasswd: { realm: 'pullthrough-test', path: htpasswdFile } } };
}

function registryConfig(port: number, bindAddress: string, workDir: string, files: RegistryFiles): unknown {
  return {
    version: 0.1,
    // JSON app log on stderr; the Apache combined access log (every request, 401s included, which the
    // app log's "response completed" lines leave out) on stdout.
    log: { level: 'info', formatter: 'json', accesslog: { disabled: false } },
    storage: {
      filesystem: { rootdirectory: join(workDir, 'storage') },
      delete: { enabled: true },
      // Upload purging only adds log noise in a short-lived test registry.
      maintenance: { uploadpurging: { enabled: false } },
    },
    // No http.host: upload Locations are then built from the request's Host, which works both for
    // direct pushes by IP and for requests through the proxy under the test name.
    http: {
      addr: `${bindAddress.includes(':') ? `[${bindAddress}]` : bindAddress}:${port}`,
      secret: randomBytes(16).toString('hex'),
      tls: { certificate: files.certFile, key: files.keyFile },
    },
    ...(files.auth ? { auth: files.auth } : {}),
  };
}

async function launch(
  options: RegistryOptions,
  bindAddress: string,
  port: number,
  workDir: string,
  files: RegistryFiles,
): Promise<RegistryHandle> {
  const configFile = join(workDir, `config-${port}.yml`);
  writeFileSync(configFile, stringify(registryConfig(port, bindAddress, workDir, files)));
  const child = spawnTracked(REGISTRY_BIN, ['serve', configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = new AccessLog(child);
  const dispatcher = new Agent({ connect: { ca: options.ca.certPem, servername: options.host }, allowH2: false });
  const hostPort = `${options.host}:${port}`;
  const address = `${bindAddress.includes(':') ? `[${bindAddress}]` : bindAddress}:${port}`;
  const credentials = options.htpasswd;

  const fetchDirect = (path: string, opts: DirectRequestOptions = {}): Promise<DirectResponse> =>
    directRequest(dispatcher, address, hostPort, path, opts, opts.auth === false ? undefined : credentials);

  try {
    await waitUntilReady(child, log, fetchDirect);
  } catch (err) {
    await stopChild(child);
    await dispatcher.close();
    throw err;
  }

  let markerSeq = 0;
  const handle: RegistryHandle = {
    url: `https://${hostPort}`,
    hostPort,
    host: options.host,
    port,
    bindAddress,
    address,
    caPem: options.ca.certPem,
    ...(credentials ? { credentials } : {}),
    ...(options.tokenAuth ? { tokenAuth: options.tokenAuth } : {}),
    requests: () => log.served.filter((r) => !r.path.includes(MARKER_PARAM)),
    count: (filter = {}) => handle.requests().filter(typeof filter === 'function' ? filter : (r) => matches(r, filter)).length,
    resetCounts: () => {
      log.served.length = 0;
    },
    settle: async () => {
      const marker = `${MARKER_PARAM}=${++markerSeq}`;
      await fetchDirect(`/v2/?${marker}`);
      await log.waitFor((r) => r.path.endsWith(marker), 5_000);
    },
    fetch: fetchDirect,
    logText: () => log.stderrText(),
    stop: async () => {
      await stopChild(child);
      await dispatcher.close();
      removeTempDir(workDir);
    },
  };
  return handle;
}

/** Reads the registry's stdout (access log) and keeps its stderr (app log) for error messages. */
class AccessLog {
  readonly served: ServedRequest[] = [];
  private readonly stderrChunks: string[] = [];
  private readonly waiters = new Set<() => void>();

  constructor(child: ChildProcess) {
    if (!child.stdout || !child.stderr) throw new Error('registry started without piped stdio');
    createInterface({ input: child.stdout }).on('line', (line) => {
      const parsed = parseAccessLogLine(line);
      if (!parsed) return;
      this.served.push(parsed);
      for (const wake of this.waiters) wake();
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => this.stderrChunks.push(chunk));
  }

  stderrText(): string {
    return this.stderrChunks.join('');
  }

  waitFor(predicate: (r: ServedRequest) => boolean, timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!this.served.some(predicate)) return;
        cleanup();
        resolve();
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`registry access log: expected line did not appear within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }
}

// distribution 2.8's access log is gorilla/handlers' Apache combined format, e.g.
// 127.0.0.1 - - [23/Nov/2026:08:21:31 +0000] "GET /v2/foo/manifests/latest HTTP/1.1" 404 96 "" "curl/7.88.1"
const ACCESS_LINE = /^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) "[^"]*" "([^"]*)"/;

export function parseAccessLogLine(line: string): ServedRequest | undefined {
  const m = ACCESS_LINE.exec(line);
  if (!m) return undefined;
  const [, method = '', path = '', status = '0', bytes = '-', userAgent = ''] = m;
  return {
    method,
    path,
    status: Number(status),
    bytes: bytes === '-' ? 0 : Number(bytes),
    userAgent,
    ...classify(path),
  };
}

// Repository names contain slashes, so the name is everything between /v2/ and the last
// /manifests/, /blobs/ or /tags/ segment.
function classify(path: string): { kind: RequestKind; repository?: string; reference?: string } {
  const pathname = path.split('?', 1)[0] ?? path;
  if (pathname === '/v2/' || pathname === '/v2') return { kind: 'base' };
  if (pathname === '/v2/_catalog') return { kind: 'catalog' };
  const upload = /^\/v2\/(.+)\/blobs\/uploads(?:\/([^/]*))?$/.exec(pathname);
  if (upload) return { kind: 'upload', repository: upload[1] ?? '' };
  const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(pathname);
  if (m) return { kind: m[2] === 'blobs' ? 'blob' : 'manifest', repository: m[1] ?? '', reference: decodeURIComponent(m[3] ?? '') };
  const tags = /^\/v2\/(.+)\/tags\/list$/.exec(pathname);
  if (tags) return { kind: 'tags', repository: tags[1] ?? '' };
  return { kind: 'other' };
}

function matches(r: ServedRequest, f: RequestFilter): boolean {
  if (f.method !== undefined && r.method !== f.method.toUpperCase()) return false;
  if (f.kind !== undefined && r.kind !== f.kind) return false;
  if (f.repository !== undefined && r.repository !== f.repository) return false;
  if (f.reference !== undefined && r.reference !== f.reference) return false;
  if (f.status !== undefined && r.status !== f.status) return false;
  if (typeof f.path === 'string' && r.path !== f.path) return false;
  if (f.path instanceof RegExp && !f.path.test(r.path)) return false;
  return true;
}

async function directRequest(
  dispatcher: Dispatcher,
  address: string,
  hostPort: string,
  path: string,
  options: DirectRequestOptions,
  credentials: Credentials | undefined,
): Promise<DirectResponse> {
  const headers: Record<string, string> = { host: hostPort, 'user-agent': 'pullthrough-test-harness', ...options.headers };
  if (!Object.keys(headers).some((k) => k.toLowerCase() === 'authorization')) {
    if (options.bearer !== undefined) headers.authorization = `Bearer ${options.bearer}`;
    else if (credentials) headers.authorization = `Basic ${Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64')}`;
  }
  const res = await request(`https://${address}${path}`, { dispatcher, method: (options.method ?? 'GET') as Dispatcher.HttpMethod, headers });
  const body = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, headers: res.headers, body };
}

async function waitUntilReady(
  child: ChildProcess,
  log: AccessLog,
  fetchDirect: (path: string) => Promise<DirectResponse>,
): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastError: unknown;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`docker-registry exited (${child.exitCode ?? child.signalCode}) during start:\n${tail(log.stderrText())}`);
    }
    try {
      // Any HTTP answer (401 with htpasswd or token auth) means it serves; the probe is not a test request.
      await fetchDirect(`/v2/?${MARKER_PARAM}=ready`);
      return;
    } catch (err) {
      lastError = err;
      await sleep(50);
    }
  }
  throw new Error(`docker-registry not ready after ${READY_TIMEOUT_MS} ms: ${String(lastError)}\n${tail(log.stderrText())}`);
}

function tail(text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

function findFreePort(bindAddress: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, bindAddress, () => {
      const addr = server.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      server.close(() => (port ? resolve(port) : reject(new Error('could not pick a free port'))));
    });
  });
}

function assertLoopback(address: string): void {
  if (!/^127\.\d+\.\d+\.\d+$/.test(address) && address !== '::1') {
    throw new Error(`test registries listen on loopback only, not ${address}`);
  }
}

/**
 * An htpasswd line with a bcrypt hash (the only scheme distribution accepts). Uses apache2-utils'
 * htpasswd when installed, otherwise Debian's python3 crypt module (libxcrypt does bcrypt).
 * Cost 4, the minimum, keeps each authenticated request fast.
 */
async function htpasswdLine({ username, password }: Credentials): Promise<string> {
  if (hasCommand('htpasswd')) {
    const r = await run('htpasswd', ['-nbB', '-C', '4', username, password], { timeoutMs: 10_000 });
    if (r.code === 0) return `${r.stdout.trim()}\n`;
  }
  const script =
    'import crypt, sys\n' +
    'print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))\n';
  const r = await run('python3', ['-W', 'ignore', '-c', script, password], { timeoutMs: 10_000 });
  const hash = r.stdout.trim();
  if (r.code !== 0 || !hash.startsWith('$2')) {
    throw new Error(
      'cannot make a bcrypt htpasswd entry: apt-get install apache2-utils (htpasswd -B), ' +
        `or a python3 with the crypt module (<= 3.12). python3 said: ${r.stderr.trim()}`,
    );
  }
  return `${username}:${hash}\n`;
}
