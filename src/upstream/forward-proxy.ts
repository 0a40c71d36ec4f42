// The forward proxy of a registry's upstream traffic (R2.4; upstreamProxy and noProxy in proxy.yaml).
// A dispatcher that sends each request through undici's ProxyAgent — a CONNECT tunnel for https://
// origins, with the registry's own TLS trust for the upstream inside it; an absolute-form request for
// http:// ones — or, when noProxy names the request's host, through the registry's direct agent. Each
// request is judged by its own origin, so the token service is judged as itself and a redirect to a
// CDN as the CDN. What the forward proxy refuses becomes a ForwardProxyError: a 502 that names the
// forward proxy (never its credentials) and what it answered.
import { STATUS_CODES } from 'node:http';
import { BlockList } from 'node:net';
import type { Duplex } from 'node:stream';
import { Dispatcher, Pool, ProxyAgent, errors as undiciErrors, type Agent } from 'undici';
import { canonicalAddress, parseNoProxyPattern, proxyUrlForDisplay, type NoProxyPattern } from '../../config/policy.ts';

/** What a thread needs to go through the forward proxy: plain data, posted to the fill workers in UpstreamConfig. */
export interface ForwardProxyConfig {
  /** The proxy for https:// origins, credentials included: "http(s)://[user:password@]host:port". Absent: direct. */
  https?: string;
  /** The proxy for http:// origins. Absent: direct. */
  http?: string;
  /** noProxy entries (config/policy.ts parseNoProxyPattern), NO_PROXY's included under `upstreamProxy: env`. */
  noProxy: string[];
}

/** How the registry's agents connect, for the agents that go through the forward proxy. */
export interface ForwardProxyOptions {
  /** Pool options of the registry's agent (timeouts, header size, connections). */
  pool: Pool.Options;
  /** TLS to the upstream inside a tunnel: the registry's trust (tls.ca, tls.verify). */
  upstreamTls: NonNullable<ProxyAgent.Options['requestTls']>;
  /** TLS to an https:// forward proxy (the default trust, always verified), and how its name is resolved. */
  proxyTls: NonNullable<ProxyAgent.Options['proxyTls']>;
  connectTimeoutMs: number;
}

const FORWARD_PROXY_ERROR = Symbol('ForwardProxyError');

/**
 * The forward proxy refused a request or could not be reached: an upstream failure (an UndiciError, so
 * a 502) whose message names the forward proxy. It has no code of its own: error reports that print a
 * code instead of the message (the fill worker's) print the message.
 */
export class ForwardProxyError extends undiciErrors.UndiciError {
  readonly [FORWARD_PROXY_ERROR] = true;

  constructor(message: string) {
    super(message);
    this.name = 'ForwardProxyError';
    delete (this as { code?: string }).code;
  }

  // UndiciError's own test says yes to every undici error.
  static override [Symbol.hasInstance](instance: unknown): boolean {
    return typeof instance === 'object' && instance !== null && FORWARD_PROXY_ERROR in instance;
  }
}

interface Route {
  agent: ProxyAgent;
  /** The forward proxy as messages name it: scheme, host and port, no credentials. */
  label: string;
  withCredentials: boolean;
}

/**
 * Errors of opening a connection (undici's own for a forward proxy among them): on a route whose every
 * connection is to the forward proxy (absolute-form requests), about the forward proxy.
 */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_PRX_CONN', 'UND_ERR_PRX_TLS']);

/** The registry's dispatcher when it has a forward proxy: each request goes through it, or direct for noProxy hosts. */
export class ForwardProxyDispatcher extends Dispatcher {
  private readonly direct: Agent;
  private readonly https: Route | undefined;
  private readonly http: Route | undefined;
  private readonly noProxy: NoProxy;

  constructor(direct: Agent, config: ForwardProxyConfig, options: ForwardProxyOptions) {
    super();
    this.direct = direct;
    this.noProxy = new NoProxy(config.noProxy);
    const routes = new Map<string, Route>();
    const routeFor = (url: string | undefined) => {
      if (!url) return undefined;
      let route = routes.get(url);
      if (!route) routes.set(url, (route = createRoute(url, options)));
      return route;
    };
    this.https = routeFor(config.https);
    this.http = routeFor(config.http);
  }

  override dispatch(options: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandler): boolean {
    const origin = options.origin === undefined ? undefined : URL.parse(String(options.origin));
    const route = origin ? (origin.protocol === 'http:' ? this.http : this.https) : undefined;
    if (!origin || !route || this.noProxy.matches(origin)) return this.direct.dispatch(options, handler);
    return route.agent.dispatch(options, new ForwardProxyAnswers(handler, route, origin, options.method));
  }

  override close(): Promise<void>;
  override close(callback: () => void): void;
  override close(callback?: () => void): Promise<void> | void {
    const closed = Promise.all(this.dispatchers().map((d) => d.close())).then(() => undefined);
    if (!callback) return closed;
    void closed.then(callback, callback);
  }

  override destroy(err: Error | null, callback: () => void): void;
  override destroy(callback: () => void): void;
  override destroy(err: Error | null): Promise<void>;
  override destroy(): Promise<void>;
  override destroy(errOrCallback?: Error | null | (() => void), callback?: () => void): Promise<void> | void {
    const err = typeof errOrCallback === 'function' ? null : (errOrCallback ?? null);
    const done = typeof errOrCallback === 'function' ? errOrCallback : callback;
    const destroyed = Promise.all(this.dispatchers().map((d) => d.destroy(err))).then(() => undefined);
    if (!done) return destroyed;
    void destroyed.then(done, done);
  }

  private dispatchers(): Dispatcher[] {
    return [...new Set<Dispatcher>([this.direct, ...[this.https, this.http].flatMap((r) => (r ? [r.agent] : []))])];
  }
}

/**
 * A ProxyAgent for one forward proxy. Its credentials go in Proxy-Authorization (`token`), not in the
 * URI undici keeps; its CONNECTs go through a client that turns a refusal into a ForwardProxyError.
 */
function createRoute(url: string, options: ForwardProxyOptions): Route {
  const parsed = new URL(url);
  const label = proxyUrlForDisplay(url, '');
  const withCredentials = parsed.username !== '';
  const token = withCredentials ? `Basic ${Buffer.from(`${decodeURIComponent(parsed.username)}:${decodeURIComponent(parsed.password)}`).toString('base64')}` : undefined;
  const agent = new ProxyAgent({
    ...options.pool,
    uri: `${parsed.protocol}//${parsed.host}`,
    ...(token ? { token } : {}),
    requestTls: options.upstreamTls,
    proxyTls: options.proxyTls,
    connectTimeout: options.connectTimeoutMs,
    // The pools to each origin (tunnels) and to the proxy itself (absolute-form requests) get the
    // registry's timeouts and header size too.
    factory: (origin, opts) => new Pool(origin, { ...options.pool, ...opts }),
    clientFactory: (origin, opts) => tunnelClient(origin, opts, label, withCredentials),
  });
  return { agent, label, withCredentials };
}

/**
 * The connection to the forward proxy that CONNECTs are sent on. What goes wrong there is about the
 * forward proxy, so it is said so: its answer other than 200, or why it could not be reached. A
 * timeout stays undici's (a 504) and an abort the caller's.
 */
function tunnelClient(origin: URL, options: object, label: string, withCredentials: boolean): Dispatcher {
  const pool = new Pool(origin, options as Pool.Options);
  const connect = pool.connect.bind(pool) as (o: Dispatcher.ConnectOptions) => Promise<Dispatcher.ConnectData>;
  pool.connect = (async (params: Dispatcher.ConnectOptions) => {
    let data: Dispatcher.ConnectData;
    try {
      data = await connect(params);
    } catch (err) {
      throw isOwnTimeoutOrAbort(err) ? err : unreachable(label, err as Error);
    }
    if (data.statusCode !== 200) {
      data.socket.on('error', () => {}).destroy();
      throw refused(label, data.statusCode, `CONNECT ${params.path}`, withCredentials);
    }
    return data;
  }) as typeof pool.connect;
  return pool;
}

/**
 * The caller's handler, with the forward proxy's failures explained: a 407 to an absolute-form request
 * (undici reports it as an argument error), and connection failures before any answer on routes where
 * every connection is to the forward proxy (absolute-form).
 */
class ForwardProxyAnswers implements Dispatcher.DispatchHandler {
  private readonly inner: Dispatcher.DispatchHandler;
  private readonly route: Route;
  private readonly origin: URL;
  private readonly method: string;
  private answered = false;
  private failed = false;

  constructor(inner: Dispatcher.DispatchHandler, route: Route, origin: URL, method: string) {
    this.inner = inner;
    this.route = route;
    this.origin = origin;
    this.method = method;
  }

  onRequestStart(controller: Dispatcher.DispatchController, context: unknown): void {
    this.inner.onRequestStart?.(controller, context);
  }

  onRequestUpgrade(controller: Dispatcher.DispatchController, statusCode: number, headers: Record<string, string | string[] | undefined>, socket: Duplex): void {
    this.inner.onRequestUpgrade?.(controller, statusCode, headers, socket);
  }

  onResponseStarted(): void {
    this.inner.onResponseStarted?.();
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: Record<string, string | string[] | undefined>, statusMessage?: string): void {
    if (this.failed) return;
    if (statusCode >= 200) this.answered = true;
    this.inner.onResponseStart?.(controller, statusCode, headers, statusMessage);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (this.failed) return; // the body of a 407 undici already reported as an error
    this.inner.onResponseData?.(controller, chunk);
  }

  onResponseEnd(controller: Dispatcher.DispatchController, trailers: Record<string, string | string[] | undefined>): void {
    if (this.failed) return;
    this.inner.onResponseEnd?.(controller, trailers);
  }

  onResponseError(controller: Dispatcher.DispatchController, error: Error): void {
    if (this.failed) return;
    this.failed = true;
    this.inner.onResponseError?.(controller, this.explained(error));
  }

  onBodySent(chunk: Buffer): void {
    this.inner.onBodySent?.(chunk);
  }

  onRequestSent(): void {
    this.inner.onRequestSent?.();
  }

  private explained(error: Error): Error {
    if (error instanceof ForwardProxyError || this.answered) return error;
    if (error instanceof undiciErrors.InvalidArgumentError && error.message.includes('(407)')) {
      return refused(this.route.label, 407, `${this.method} ${this.origin.origin}`, this.route.withCredentials);
    }
    const code = (error as NodeJS.ErrnoException).code;
    if (this.origin.protocol === 'http:' && code !== undefined && (UNREACHABLE.has(code) || isTlsError(code))) return unreachable(this.route.label, error);
    return error;
  }
}

function refused(label: string, status: number, what: string, withCredentials: boolean): ForwardProxyError {
  const advice =
    status === 407
      ? withCredentials
        ? ': it refused the credentials in upstreamProxy'
        : ': it wants credentials; give them in upstreamProxy (http://user:password@host:port, the password from ${VAR})'
      : status === 403
        ? ': its rules do not allow this destination'
        : '';
  const reason = STATUS_CODES[status] ? ` ${STATUS_CODES[status]}` : '';
  return new ForwardProxyError(`the forward proxy ${label} answered ${status}${reason} to ${what}${advice}`);
}

function unreachable(label: string, err: Error): ForwardProxyError {
  const cause = ((err as { cause?: Error }).cause ?? err) as NodeJS.ErrnoException;
  const text = cause.code && !cause.message.includes(cause.code) ? `${cause.message} (${cause.code})` : cause.message;
  const advice = isTlsError(cause.code) ? `; trust its CA with NODE_EXTRA_CA_CERTS` : '';
  return new ForwardProxyError(`cannot reach the forward proxy ${label}: ${text}${advice}`);
}

function isTlsError(code: string | undefined): boolean {
  return /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS|ERR_SSL/.test(code ?? '');
}

function isOwnTimeoutOrAbort(err: unknown): boolean {
  const e = err as { name?: string; code?: string };
  return e.code === 'UND_ERR_CONNECT_TIMEOUT' || e.code === 'UND_ERR_ABORTED' || e.name === 'AbortError';
}

/** noProxy compiled: does a request's origin go direct? */
export class NoProxy {
  private readonly rules: Array<{ pattern: NoProxyPattern; test: (host: string, address: string | undefined) => boolean }>;

  constructor(entries: readonly string[]) {
    this.rules = entries.flatMap((entry) => {
      const pattern = parseNoProxyPattern(entry);
      return 'error' in pattern ? [] : [{ pattern, test: hostTest(pattern.host) }]; // the loader refused bad entries already
    });
  }

  matches(origin: URL): boolean {
    if (this.rules.length === 0) return false;
    const host = origin.hostname.replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '').toLowerCase();
    const address = canonicalAddress(host) ?? undefined;
    const port = Number(origin.port || (origin.protocol === 'http:' ? 80 : 443));
    return this.rules.some(({ pattern, test }) => (pattern.port === undefined || pattern.port === port) && test(host, address));
  }
}

function hostTest(host: NoProxyPattern['host']): (name: string, address: string | undefined) => boolean {
  switch (host.kind) {
    case 'any':
      return () => true;
    case 'name':
      return (name, address) => address === undefined && (name === host.name || name.endsWith(`.${host.name}`));
    case 'glob': {
      const regex = new RegExp(`^${host.glob.split('*').map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`);
      return (name) => regex.test(name);
    }
    case 'address': {
      const block = new BlockList();
      const family = host.family === 4 ? 'ipv4' : 'ipv6';
      block.addSubnet(host.address, host.prefix, family);
      return (_name, address) => address !== undefined && address.includes(':') === (host.family === 6) && block.check(address, family);
    }
  }
}
