// Loads the policy: proxy.yaml (or the built-in default) → ${VAR} expansion → validation with
// file:line:key messages → the seed's environment variables → PULLTHROUGH_* overrides.
import { parseCluster } from './cluster.ts';
import { parseMirror } from './mirror.ts';
import { checkWarmRegistries, defaultWarm, parseWarm } from './warm.ts';
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isSeq, LineCounter, parseDocument } from 'yaml';
import {
  parseNoProxyPattern,
  parseTunnelPattern,
  proxyUrlForDisplay,
  registryKey,
  type Credentials,
  type Listen,
  type ManifestPolicy,
  type Policy,
  type ProxyUser,
  type RegistryPolicy,
  type Timeouts,
  type UpstreamProxy,
} from './policy.ts';
import { DEFAULT_TIMEOUTS, defaultManifestPolicy } from './defaults.ts';
import { applySeedEnvironment } from './seed-env.ts';
import { ConfigError, Cursor, type Source } from './yaml-cursor.ts';

export { ConfigError } from './yaml-cursor.ts';

export interface LoadOptions {
  /** --config; else PULLTHROUGH_CONFIG; else ./proxy.yaml when it exists; else the built-in default. */
  configPath?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export function loadPolicy(options: LoadOptions = {}): Policy {
  const env = options.env ?? process.env;
  const cwd = options.cwd ?? process.cwd();
  const explicit = options.configPath ?? env.PULLTHROUGH_CONFIG;
  const file = explicit ? path.resolve(cwd, explicit) : path.join(cwd, 'proxy.yaml');

  let text = '';
  let source = '(built-in default)';
  if (explicit || existsSync(file)) {
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new ConfigError(`${file}: cannot read the policy file: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    source = file;
  }
  const policy = parsePolicy(text, source, env, explicit || existsSync(file) ? path.dirname(file) : cwd);
  for (const tier of ['PRIMARY', 'SECONDARY']) {
    const name = `MANIFEST_CACHE_${tier}_REGEX`;
    const value = env[name];
    if (value) tierRegex(value, (m) => { throw new ConfigError(`${name}="${value}": ${m}`); });
  }
  const fromFile = new Set(policy.registries.keys());
  applySeedEnvironment(policy, env);
  // The registries the seed's variables added take the defaults' upstream proxy, as every other key's default.
  for (const registry of policy.registries.values()) {
    if (!fromFile.has(registry.key)) registry.upstreamProxy ??= policy.defaults.upstreamProxy;
  }
  linkTokenServices(policy);
  checkWarmRegistries(policy);
  if (env.PULLTHROUGH_ADMIN_TOKEN) policy.admin.token = adminToken(env.PULLTHROUGH_ADMIN_TOKEN, (m) => { throw new ConfigError(`PULLTHROUGH_ADMIN_TOKEN: ${m}`); });
  if (env.PULLTHROUGH_LISTEN) policy.listen = parseListen(env.PULLTHROUGH_LISTEN, (m) => { throw new ConfigError(`PULLTHROUGH_LISTEN: ${m}`); });
  const caFollowsData = policy.caDir === policy.dataDir; // no caDir of its own: the CA moves with the data
  if (env.PULLTHROUGH_DATA_DIR) policy.dataDir = path.resolve(cwd, env.PULLTHROUGH_DATA_DIR);
  if (env.PULLTHROUGH_CA_DIR) policy.caDir = path.resolve(cwd, env.PULLTHROUGH_CA_DIR);
  else if (caFollowsData) policy.caDir = policy.dataDir;
  return policy;
}

/** Parses policy text; relative paths in it are resolved against `baseDir` (the file's folder). */
export function parsePolicy(text: string, file: string, env: NodeJS.ProcessEnv, baseDir: string): Policy {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  const firstError = doc.errors[0];
  if (firstError) {
    const { line, col } = lines.linePos(firstError.pos[0]);
    throw new ConfigError(`${file}:${line}:${col}: invalid YAML: ${firstError.message.split('\n')[0]}`);
  }
  const src: Source = { file, lines, env };
  const root = new Cursor(doc.contents as Cursor['node'], '', src);
  const top = root.entries(['listen', 'dataDir', 'caDir', 'cache', 'manifests', 'defaults', 'registries', 'tunnel', 'admin', 'users', 'hosts', 'ipv6', 'workers', 'mirror', 'warm', 'cluster']);
  const at = (key: string) => top.get(key) ?? new Cursor(null, key, src);
  const resolvePath = (p: string) => path.resolve(baseDir, p);

  const listenCursor = at('listen');
  const listen = listenCursor.present ? parseListen(listenCursor.string(), (m) => listenCursor.fail(m)) : { host: '0.0.0.0', port: 3128 };

  const cache = at('cache').entries(['maxSize', 'minFree', 'readCheckTtl', 'prefetch']);
  const manifests = parseManifests(at('manifests'), defaultManifestPolicy());
  const defaultsMap = at('defaults').entries(['push', 'timeouts', 'tls', 'upstreamProxy', 'noProxy']);
  const defaultTls = (defaultsMap.get('tls') ?? new Cursor(null, 'defaults.tls', src)).entries(['verify']);
  const defaults = {
    push: defaultsMap.get('push')?.oneOf(['deny', 'bypass'] as const) ?? 'deny',
    timeouts: parseTimeouts(defaultsMap.get('timeouts'), { ...DEFAULT_TIMEOUTS }),
    tlsVerify: defaultTls.get('verify')?.boolean() ?? true,
    upstreamProxy: parseUpstreamProxy(defaultsMap.get('upstreamProxy'), defaultsMap.get('noProxy'), DIRECT, env),
  };

  const dataDir = resolvePath(at('dataDir').present ? at('dataDir').string() : './data');
  const policy: Policy = {
    source: file,
    listen,
    dataDir,
    caDir: at('caDir').present ? resolvePath(at('caDir').string()) : dataDir,
    cache: {
      maxSize: cache.get('maxSize')?.size() ?? 32 * 1024 ** 3,
      minFree: cache.get('minFree')?.size() ?? 1024 ** 3,
      readCheckTtlMs: cache.get('readCheckTtl')?.durationMs() ?? 60_000,
      prefetch: cache.get('prefetch')?.boolean() ?? true,
    },
    manifests,
    defaults,
    registries: new Map(),
    tunnel: { allow: ['*:443'], deny: [], connectTimeoutMs: defaults.timeouts.connectMs, idleTimeoutMs: defaults.timeouts.clientIdleMs },
    admin: parseAdmin(at('admin'), resolvePath),
    users: new Map(),
    hosts: new Map(),
    ipv6: at('ipv6').present ? at('ipv6').boolean() : true,
    requestBuffering: false,
    workers: at('workers').present ? parseWorkers(at('workers')) : defaultWorkers(),
    warm: defaultWarm(),
  };

  for (const [name, entry] of at('registries').entries()) {
    const registry = parseRegistry(name, entry, policy, resolvePath);
    if (policy.registries.has(registry.key)) entry.fail(`${registry.key} is listed twice`);
    policy.registries.set(registry.key, registry);
  }

  const tunnel = at('tunnel').entries(['allow', 'deny', 'timeouts']);
  for (const key of ['allow', 'deny'] as const) {
    const list = tunnel.get(key);
    if (!list?.present) continue;
    for (const item of list.items()) {
      const parsed = parseTunnelPattern(item.string());
      if ('error' in parsed) item.fail(parsed.error);
    }
    policy.tunnel[key] = list.stringList();
  }
  const tunnelTimeouts = (tunnel.get('timeouts') ?? new Cursor(null, 'tunnel.timeouts', src)).entries(['connect', 'idle']);
  policy.tunnel.connectTimeoutMs = tunnelTimeouts.get('connect')?.durationMs() ?? policy.tunnel.connectTimeoutMs;
  policy.tunnel.idleTimeoutMs = tunnelTimeouts.get('idle')?.durationMs() ?? policy.tunnel.idleTimeoutMs;

  for (const [name, entry] of at('users').entries()) {
    policy.users.set(name, parseUser(name, entry, resolvePath));
  }
  for (const [name, entry] of at('hosts').entries()) {
    // One address, or several (a name that stands for every replica of a cluster, as DNS would give them).
    const addresses = isSeq(entry.node) ? entry.stringList() : [entry.string()];
    if (addresses.length === 0) entry.fail('lists no address');
    policy.hosts.set(name.toLowerCase(), addresses);
  }
  if (at('mirror').present) policy.mirror = parseMirror(at('mirror'), policy, resolvePath, parseListen);
  policy.warm = at('warm').present ? parseWarm(at('warm')) : defaultWarm();
  if (at('cluster').present) policy.cluster = parseCluster(at('cluster'), parseListen);
  return policy;
}

/**
 * admin.token and admin.tokenFile; both may be set while a token is rotated (either is accepted). An
 * empty token (`${PULLTHROUGH_ADMIN_TOKEN:-}` unset) means none. The file is read where it is used
 * (readAdminTokenFile), at start and at each use, so that a rotated Secret applies without a restart.
 */
function parseAdmin(cursor: Cursor, resolvePath: (p: string) => string): Policy['admin'] {
  const a = cursor.entries(['token', 'tokenFile']);
  const admin: Policy['admin'] = {};
  const token = a.get('token');
  if (token?.present && token.string() !== '') admin.token = adminToken(token.string(), (m) => token.fail(m));
  const tokenFile = a.get('tokenFile');
  if (tokenFile?.present) admin.tokenFile = resolvePath(tokenFile.string());
  return admin;
}

/** The token in admin.tokenFile (one trailing newline removed); a ConfigError names what is wrong. */
export function readAdminTokenFile(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    throw new ConfigError(`admin.tokenFile: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return adminToken(text, (m) => {
    throw new ConfigError(`admin.tokenFile: ${file}: ${m}`);
  });
}

/** A token goes into an Authorization header and must not be guessable: 16+ visible ASCII characters. */
function adminToken(text: string, fail: (message: string) => never): string {
  if (!/^[\x21-\x7e]{16,}$/.test(text)) fail('an admin token is at least 16 visible ASCII characters, no spaces (make one with `openssl rand -hex 32`)');
  return text;
}

/**
 * One fill worker per core beyond the one the primary thread's TLS sessions use: fills take ~2–3 CPU-s
 * per GiB, and on 2 cores a second worker only adds memory (~20 MiB each), not throughput.
 */
function defaultWorkers(): number {
  return Math.max(1, os.availableParallelism() - 1);
}

function parseWorkers(cursor: Cursor): number {
  const text = cursor.string();
  if (!/^\d+$/.test(text) || Number(text) < 1 || Number(text) > 64) cursor.fail('expected a number of worker threads from 1 to 64');
  return Number(text);
}

export function parseListen(text: string, fail: (message: string) => never): Listen {
  const match = /^(?:(\[[^\]]+\]|[^:]*):)?(\d{1,5})$/.exec(text.trim());
  const port = Number(match?.[2]);
  if (!match || port > 65535) fail(`"${text}" is not host:port or a port (example: 0.0.0.0:3128)`);
  const host = (match[1] ?? '').replace(/^\[(.*)\]$/, '$1') || '0.0.0.0';
  return { host, port };
}

/** Without overrides the inherited object itself is returned, so the seed's variables reach it later. */
function parseManifests(cursor: Cursor, inherited: ManifestPolicy): ManifestPolicy {
  const fields = cursor.entries(['enabled', 'tiers', 'defaultTtl', 'maxStale']);
  if (fields.size === 0) return inherited;
  const tiers = fields.get('tiers');
  return {
    enabled: fields.get('enabled')?.boolean() ?? inherited.enabled,
    tiers: tiers?.present
      ? tiers.items().map((tier) => {
          const t = tier.entries(['match', 'ttl']);
          const match = t.get('match') ?? tier.fail('a tier needs "match" (a regex) and "ttl"');
          const ttl = t.get('ttl') ?? tier.fail('a tier needs "match" (a regex) and "ttl"');
          return { match: match.string(), regex: tierRegex(match.string(), (m) => match.fail(m)), ttlMs: ttl.durationMs() };
        })
      : inherited.tiers,
    defaultTtlMs: fields.get('defaultTtl')?.durationMs() ?? inherited.defaultTtlMs,
    maxStaleMs: fields.get('maxStale')?.durationMs() ?? inherited.maxStaleMs,
  };
}

/**
 * A tier's regex, matched against the whole tag: ^(?:match)$. `match` must be a regex on its own first:
 * else a ")" in it closes the anchoring group early, and "stable)|(v1" becomes ^(?:stable)|(v1)$, which
 * matches every tag that merely starts with "stable" (or ends with "v1").
 */
function tierRegex(match: string, fail: (message: string) => never): RegExp {
  try {
    new RegExp(match);
  } catch (err) {
    fail(`${(err as Error).message}: a tier's match must be a regular expression on its own (it is anchored as ^(?:…)$)`);
  }
  try {
    return new RegExp(`^(?:${match})$`);
  } catch (err) {
    return fail((err as Error).message);
  }
}

function parseTimeouts(cursor: Cursor | undefined, inherited: Timeouts): Timeouts {
  if (!cursor?.present) return inherited;
  const t = cursor.entries(['connect', 'headers', 'idle', 'clientIdle', 'clientHeader', 'keepAlive']);
  return {
    connectMs: t.get('connect')?.durationMs() ?? inherited.connectMs,
    headersMs: t.get('headers')?.durationMs() ?? inherited.headersMs,
    idleMs: t.get('idle')?.durationMs() ?? inherited.idleMs,
    clientIdleMs: t.get('clientIdle')?.durationMs() ?? inherited.clientIdleMs,
    clientHeaderMs: t.get('clientHeader')?.durationMs() ?? inherited.clientHeaderMs,
    keepAliveMs: t.get('keepAlive')?.durationMs() ?? inherited.keepAliveMs,
  };
}

function parseRegistry(name: string, cursor: Cursor, policy: Policy, resolvePath: (p: string) => string): RegistryPolicy {
  const match = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$/.exec(name);
  const port = match?.[2] ? Number(match[2]) : 443;
  if (!match || port < 1 || port > 65535) cursor.fail(`"${name}" is not a host or host:port`);
  const fields = cursor.entries(['auth', 'tls', 'push', 'http', 'timeouts', 'manifests', 'upstreamProxy', 'noProxy']);
  const tls = (fields.get('tls') ?? new Cursor(null, `${cursor.path}.tls`, cursor.source)).entries(['ca', 'verify']);
  const caFile = tls.get('ca')?.present ? resolvePath(tls.get('ca')!.string()) : undefined;
  let caPem: string | undefined;
  if (caFile) {
    try {
      caPem = readFileSync(caFile, 'utf8');
    } catch (err) {
      tls.get('ca')!.fail(`cannot read ${caFile}: ${(err as NodeJS.ErrnoException).code}`);
    }
    if (!caPem?.includes('-----BEGIN CERTIFICATE-----')) tls.get('ca')!.fail(`${caFile} holds no PEM certificate`);
  }
  const host = match[1]!.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  const registry: RegistryPolicy = {
    key: registryKey(host, port),
    host,
    port,
    http: fields.get('http')?.boolean() ?? false,
    tokenServiceFor: [],
    tls: { verify: tls.get('verify')?.boolean() ?? policy.defaults.tlsVerify, ...(caFile ? { caFile, caPem } : {}) },
    push: fields.get('push')?.oneOf(['deny', 'bypass'] as const) ?? policy.defaults.push,
    timeouts: parseTimeouts(fields.get('timeouts'), policy.defaults.timeouts),
    manifests: parseManifests(fields.get('manifests') ?? new Cursor(null, '', cursor.source), policy.manifests),
    upstreamProxy: parseUpstreamProxy(fields.get('upstreamProxy'), fields.get('noProxy'), policy.defaults.upstreamProxy, cursor.source.env),
  };
  const auth = fields.get('auth');
  if (auth?.present) {
    const credentials = parseCredentials(auth, resolvePath);
    if (credentials) registry.auth = credentials;
  }
  return registry;
}

/** Returns undefined when the username expands to nothing (e.g. ${DOCKERHUB_USERNAME:-} unset): anonymous. */
function parseCredentials(cursor: Cursor, resolvePath: (p: string) => string): Credentials | undefined {
  const a = cursor.entries(['realm', 'username', 'password', 'passwordFile']);
  const username = a.get('username')?.string() ?? '';
  if (!username) return undefined;
  const password = readPassword(cursor, a.get('password'), a.get('passwordFile'), resolvePath);
  const realmCursor = a.get('realm');
  const realm = realmCursor?.present ? parseRealm(realmCursor.string(), (m) => realmCursor.fail(m)) : undefined;
  return { username, password, ...(realm ? { realm } : {}) };
}

/** "auth.docker.io", "gitlab.example.com:8443" or a URL such as "https://auth.docker.io/token" → host[:port]. */
export function parseRealm(text: string, fail: (message: string) => never): string {
  const hostPort = /^https?:\/\//.test(text) ? new URL(text).host : text;
  const match = /^([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?$/.exec(hostPort);
  if (!match || Number(match[2] ?? 443) > 65535) fail(`"${text}" is not a token service host (examples: auth.docker.io, gitlab.example.com:8443)`);
  return hostPort.toLowerCase();
}

/**
 * Each registry's token service host (auth.realm) is intercepted too, so the central credentials can be
 * put into the token requests of clients that have none. A realm that is not a registry of its own gets
 * an entry with the registry's TLS trust and timeouts (check-config shows it).
 */
export function linkTokenServices(policy: Policy): void {
  for (const registry of [...policy.registries.values()]) {
    if (!registry.auth?.realm) continue;
    const url = new URL(`https://${registry.auth.realm}`);
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const port = Number(url.port || 443);
    const key = registryKey(host, port);
    if (key === registry.key) continue;
    let realm = policy.registries.get(key);
    if (!realm) {
      realm = {
        key,
        host,
        port,
        http: false,
        tokenServiceFor: [],
        tls: { ...registry.tls },
        push: 'deny',
        timeouts: registry.timeouts,
        manifests: registry.manifests,
        ...(registry.upstreamProxy ? { upstreamProxy: registry.upstreamProxy } : {}),
      };
      policy.registries.set(key, realm);
    }
    if (!realm.tokenServiceFor.includes(registry.key)) realm.tokenServiceFor.push(registry.key);
  }
}

const DIRECT: UpstreamProxy = { mode: 'none', noProxy: [] };

/**
 * upstreamProxy and noProxy, of defaults or of a registry: each one not set is inherited (as written:
 * a registry that names its own proxy but no noProxy keeps the defaults' list). Without either the
 * inherited object itself is returned.
 */
function parseUpstreamProxy(proxyCursor: Cursor | undefined, noProxyCursor: Cursor | undefined, inherited: UpstreamProxy, env: NodeJS.ProcessEnv): UpstreamProxy {
  if (!proxyCursor?.present && !noProxyCursor?.present) return inherited;
  const noProxy = noProxyCursor?.present ? parseNoProxyList(noProxyCursor) : inherited.noProxy;
  if (!proxyCursor?.present) return { ...inherited, noProxy };
  const text = proxyCursor.string().trim();
  if (text === '' || text === 'none') return { mode: 'none', noProxy };
  if (text === 'env') return { mode: 'env', ...proxiesFromEnvironment(env), noProxy };
  const url = parseProxyUrl(text, (m) => proxyCursor.fail(m));
  return { mode: 'url', https: url, http: url, noProxy };
}

/**
 * `upstreamProxy: env`: the proxy's own environment as undici's EnvHttpProxyAgent reads it — the
 * lower-case variable first; https:// origins use HTTPS_PROXY, else HTTP_PROXY; http:// ones HTTP_PROXY;
 * NO_PROXY's entries are direct. Read once, here, so that every worker thread goes the same way and
 * check-config shows it.
 */
function proxiesFromEnvironment(env: NodeJS.ProcessEnv): Pick<UpstreamProxy, 'https' | 'http' | 'environmentNoProxy'> {
  const variable = (name: string) => {
    for (const spelling of [name.toLowerCase(), name]) {
      const value = env[spelling]?.trim();
      if (value) return { spelling, value };
    }
    return undefined;
  };
  const fromVariable = (found: { spelling: string; value: string } | undefined) =>
    found ? parseProxyUrl(found.value, (m) => { throw new ConfigError(`${found.spelling} (upstreamProxy: env): ${m}`); }) : undefined;
  const http = fromVariable(variable('HTTP_PROXY'));
  const https = fromVariable(variable('HTTPS_PROXY')) ?? http;
  const noProxyVariable = variable('NO_PROXY');
  const environmentNoProxy = noProxyVariable ? splitNoProxy(noProxyVariable.value) : [];
  for (const entry of environmentNoProxy) {
    const parsed = parseNoProxyPattern(entry);
    if ('error' in parsed) throw new ConfigError(`${noProxyVariable!.spelling} (upstreamProxy: env): ${parsed.error}`);
  }
  return { ...(https ? { https } : {}), ...(http ? { http } : {}), environmentNoProxy };
}

/**
 * A forward proxy's URL: http:// or https://, with user:password@ when it wants credentials (the
 * characters / ? # @ : in them percent-encoded); "host:port" alone means http://host:port. Messages
 * never repeat the password.
 */
function parseProxyUrl(text: string, fail: (message: string) => never): string {
  const shown = proxyUrlForDisplay(text);
  const examples = '(examples: http://proxy.corp.example:3128, https://user:${PROXY_PASSWORD}@proxy.corp.example:3129, env, none)';
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`);
  } catch {
    return fail(`"${shown}" is not a proxy URL ${examples}`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') fail(`"${proxyUrlForDisplay(url.href)}": a forward proxy is reached over http:// or https://, not ${url.protocol}`);
  if (!url.hostname || (url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) fail(`"${proxyUrlForDisplay(url.href)}" is not a proxy URL: scheme, optional user:password@, host and port only ${examples}`);
  if (url.password && !url.username) fail(`"${proxyUrlForDisplay(url.href)}": a password needs a user name before it`);
  try {
    decodeURIComponent(url.username + url.password);
  } catch {
    fail(`"${proxyUrlForDisplay(url.href)}": a % in the user name or password starts no valid escape (write % as %25)`);
  }
  return `${url.protocol}//${url.username ? `${url.username}${url.password ? `:${url.password}` : ''}@` : ''}${url.host}`;
}

/** A YAML list, or one string of entries separated by commas or spaces (as NO_PROXY is: `noProxy: ${NO_PROXY}`). */
function parseNoProxyList(cursor: Cursor): string[] {
  const entries = isSeq(cursor.node) ? cursor.items().map((item) => ({ item, text: item.string().trim() })) : splitNoProxy(cursor.string()).map((text) => ({ item: cursor, text }));
  for (const { item, text } of entries) {
    const parsed = parseNoProxyPattern(text);
    if ('error' in parsed) item.fail(parsed.error);
  }
  return entries.map((e) => e.text);
}

function splitNoProxy(text: string): string[] {
  return text.split(/[\s,]+/).filter(Boolean);
}

function readPassword(owner: Cursor, password: Cursor | undefined, passwordFile: Cursor | undefined, resolvePath: (p: string) => string): string {
  if (password?.present && passwordFile?.present) passwordFile.fail('give either password or passwordFile, not both');
  if (passwordFile?.present) {
    const file = resolvePath(passwordFile.string());
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      passwordFile.fail(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code}`);
    }
  }
  if (password?.present) return password.string();
  return owner.fail('needs password or passwordFile');
}

function parseUser(name: string, cursor: Cursor, resolvePath: (p: string) => string): ProxyUser {
  const u = cursor.entries(['password', 'passwordFile', 'read']);
  return {
    name,
    password: readPassword(cursor, u.get('password'), u.get('passwordFile'), resolvePath),
    read: u.get('read')?.stringList() ?? [],
  };
}
