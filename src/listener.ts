// The front: one HTTP/1.1 listener (:3128) that takes three kinds of request —
//   CONNECT host:port          → intercept (registry in the policy) | tunnel | deny
//   GET http://host/…          → plain-HTTP proxying, only for registries marked `http: true`
//   GET /ca.crt, /healthz, …   → the admin surface
// Everything it needs comes in through FrontDeps (no module state), so that the same front can later
// run in several threads, each listening with reusePort.
import http from 'node:http';
import type { LookupFunction } from 'node:net';
import type { Duplex } from 'node:stream';
import { registryKey, type Policy } from '../config/policy.ts';
import type { AdminHandler } from './admin/index.ts';
import { decide, parseTarget, resolveTunnel, type Listener, type Target } from './connect.ts';
import { pathForLog, type Logger } from './log.ts';
import { authenticateProxyUser } from './proxy-users.ts';
import type { RegistryHandler } from './registry/handler.ts';
import { answerFailure, withErrorAnswers } from './request-failures.ts';
import type { InterceptedSessions } from './session.ts';
import { tunnel } from './tunnel.ts';

export interface FrontDeps {
  policy: Policy;
  log: Logger;
  lookup: LookupFunction;
  sessions: InterceptedSessions;
  registryHandler: RegistryHandler;
  admin: AdminHandler;
  /**
   * The proxy's other listeners (a mirror front, say), which a tunnel must not reach either; this
   * front's own address is always included.
   */
  otherListeners?: () => Listener[];
}

/** Request heads larger than this are refused with 431 (a CONNECT is a few hundred bytes). */
const MAX_HEADER_BYTES = 32 * 1024;

export interface Front {
  server: http.Server;
  /** Stops listening and ends every connection: requests, tunnels and intercepted sessions. */
  close(): Promise<void>;
}

export function createFront(frontDeps: FrontDeps): Front {
  // Every async entry point has an error path: a handler that throws is answered, never left unhandled.
  const deps: FrontDeps = { ...frontDeps, registryHandler: withErrorAnswers(frontDeps.registryHandler, frontDeps.log) };
  const { policy, log } = deps;
  // CONNECT sockets leave the HTTP server's bookkeeping but still hold server.close() open.
  const connectSockets = new Set<Duplex>();
  const timeouts = policy.defaults.timeouts;
  const server = http.createServer({
    maxHeaderSize: MAX_HEADER_BYTES,
    headersTimeout: timeouts.clientHeaderMs,
    requestTimeout: 0,
    keepAliveTimeout: timeouts.keepAliveMs,
    // How often silent or slow clients are checked against headersTimeout.
    connectionsCheckingInterval: Math.min(1000, timeouts.clientHeaderMs),
  });
  server.timeout = timeouts.clientIdleMs;

  server.on('connect', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const started = performance.now();
    const client = req.socket.remoteAddress ?? '';
    socket.on('error', () => socket.destroy()); // a reset client must never take the process down
    connectSockets.add(socket);
    socket.once('close', () => connectSockets.delete(socket));
    const logConnect = (status: number, fields: Record<string, unknown> = {}) =>
      log.access({ method: 'CONNECT', host: req.url ?? '', path: '', status, bytes: 0, client, ms: Math.round(performance.now() - started), ...fields });

    const target = parseTarget(req.url);
    if ('error' in target) {
      refuse(socket, 400, 'Bad Request', target.error);
      logConnect(400, { error: target.error });
      return;
    }
    const proxyAuth = authenticateProxyUser(policy, req.headers['proxy-authorization']);
    if (proxyAuth.kind === 'refused') {
      refuse(socket, 407, 'Proxy Authentication Required', proxyAuth.reason, PROXY_AUTHENTICATE);
      logConnect(407, { error: proxyAuth.reason, ...(proxyAuth.user !== undefined ? { user: proxyAuth.user } : {}) });
      return;
    }
    const user = proxyAuth.kind === 'user' ? proxyAuth.user : undefined;
    const decision = decide(policy, target);
    switch (decision.kind) {
      case 'deny':
        refuse(socket, 403, 'Forbidden', decision.reason);
        logConnect(403, { error: decision.reason });
        return;
      case 'intercept':
        try {
          deps.sessions.accept(socket, head, target, decision.registry, client, user);
        } catch (err) {
          // A certificate that cannot be minted for this name, say: that client is refused, the rest go on.
          log.error('an intercepted session could not start', { host: req.url ?? '', error: (err as Error).message });
          socket.destroy();
        }
        return;
      case 'tunnel':
        void openTunnel(socket, head, target, logConnect, user?.name).catch((err: Error) => {
          socket.destroy();
          log.error('a tunnel failed', { host: req.url ?? '', error: err.message });
        });
        return;
    }
  });

  /**
   * Resolves the target once, keeps the addresses the tunnel policy allows (never this proxy itself:
   * through a tunnel the admin surface would see a loopback client) and connects to exactly those.
   */
  async function openTunnel(socket: Duplex, head: Buffer, target: Target, logConnect: (status: number, fields?: Record<string, unknown>) => void, user: string | undefined): Promise<void> {
    const own = server.address();
    const listeners = [...(own && typeof own === 'object' ? [own] : []), ...(deps.otherListeners?.() ?? [])];
    // tunnel.timeouts.connect covers the lookup and the connect together.
    const deadline = performance.now() + policy.tunnel.connectTimeoutMs;
    const plan = await resolveTunnel(policy, target, deps.lookup, listeners, policy.tunnel.connectTimeoutMs);
    const who = user ? { user } : {};
    if (socket.destroyed) {
      logConnect(499, { error: 'the client left before the tunnel opened', ...who });
      return;
    }
    if (plan.kind === 'deny') {
      refuse(socket, 403, 'Forbidden', plan.reason);
      logConnect(403, { error: plan.reason, ...who });
      return;
    }
    if (plan.kind === 'unreachable') {
      refuse(socket, plan.status, plan.status === 504 ? 'Gateway Timeout' : 'Bad Gateway', plan.reason);
      logConnect(plan.status, { error: plan.reason, ...who });
      return;
    }
    const connectTimeoutMs = Math.max(1, Math.round(deadline - performance.now()));
    const result = await tunnel(socket, head, target, plan.addresses, { connectTimeoutMs, idleTimeoutMs: policy.tunnel.idleTimeoutMs });
    logConnect(result.status, { cache: 'TUNNEL', bytes: result.received, ...who, ...(result.error ? { error: result.error } : {}) });
  }

  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const url = req.url ?? '/';
    if (url.startsWith('/')) {
      const started = performance.now();
      const logAdmin = (status: number, error?: string) =>
        log.access({ method: req.method ?? 'GET', host: 'pullthrough', path: pathForLog(url), status, bytes: error ? 0 : bodyBytes(res), type: 'admin', client: req.socket.remoteAddress ?? '', ms: Math.round(performance.now() - started), ...(error ? { error } : {}) });
      void deps.admin(req, res).then(
        (status) => logAdmin(status),
        (err: unknown) => {
          const failure = answerFailure(req, res, err, log, 'pullthrough');
          logAdmin(failure.status, failure.error);
        },
      );
      return;
    }
    let refused: ReturnType<typeof forwardPlainHttp>;
    try {
      refused = forwardPlainHttp(req, res, deps);
    } catch (err) {
      answerFailure(req, res, err, log, req.headers.host ?? '');
      return;
    }
    if (refused) log.access({ method: req.method ?? 'GET', host: req.headers.host ?? '', path: pathForLog(url), status: refused.status, bytes: 0, type: 'plain-http', client: req.socket.remoteAddress ?? '', ms: 0, error: refused.message });
  });

  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (!socket.writable || err.code === 'ECONNRESET') {
      socket.destroy();
      return;
    }
    const [status, reason] =
      err.code === 'HPE_HEADER_OVERFLOW'
        ? [431, 'Request Header Fields Too Large']
        : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
          ? [408, 'Request Timeout']
          : [400, 'Bad Request'];
    refuse(socket, status, reason, status === 400 ? `malformed request (${err.code ?? 'parse error'})` : reason.toLowerCase());
  });
  return {
    server,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        for (const socket of connectSockets) socket.destroy();
      }),
  };
}

/**
 * Absolute-form requests (what HTTP_PROXY sends): forwarded only to registries marked `http: true`.
 * Returns the refusal when the request was refused.
 */
function forwardPlainHttp(req: http.IncomingMessage, res: http.ServerResponse, deps: FrontDeps): { status: number; message: string } | undefined {
  let url: URL;
  try {
    url = new URL(req.url ?? '');
  } catch {
    return plainRefusal(res, 400, 'the request target is neither a path nor an absolute http:// URL');
  }
  const registry = url.protocol === 'http:' ? deps.policy.registries.get(registryKey(url.hostname.replace(/^\[(.*)\]$/, '$1'), Number(url.port || 80))) : undefined;
  if (!registry?.http) {
    return plainRefusal(
      res,
      403,
      `pullthrough forwards plain HTTP only to registries marked "http: true" in proxy.yaml; ${url.host} is not one. Use HTTPS (CONNECT) instead.`,
    );
  }
  const proxyAuth = authenticateProxyUser(deps.policy, req.headers['proxy-authorization']);
  if (proxyAuth.kind === 'refused') {
    res.setHeader('Proxy-Authenticate', PROXY_AUTHENTICATE_VALUE);
    return plainRefusal(res, 407, proxyAuth.reason);
  }
  req.url = `${url.pathname}${url.search}`;
  // Never rejects: createFront gave it an error path (withErrorAnswers).
  void deps.registryHandler(req, res, { registry, client: req.socket.remoteAddress ?? '', ...(proxyAuth.kind === 'user' ? { user: proxyAuth.user } : {}) });
  return undefined;
}

function plainRefusal(res: http.ServerResponse, status: number, message: string): { status: number; message: string } {
  const body = `pullthrough: ${message}\n`;
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(body), Connection: 'close' });
  res.end(body);
  return { status, message };
}

function bodyBytes(res: http.ServerResponse): number {
  return res.req.method === 'HEAD' ? 0 : Number(res.getHeader('content-length') ?? 0);
}

const PROXY_AUTHENTICATE_VALUE = 'Basic realm="pullthrough", charset="UTF-8"';
const PROXY_AUTHENTICATE = `Proxy-Authenticate: ${PROXY_AUTHENTICATE_VALUE}\r\n`;

/** An error answer on a raw socket (before or instead of any HTTP exchange), then close. */
function refuse(socket: Duplex, status: number, reason: string, message: string, extraHeaders = ''): void {
  const body = `pullthrough: ${message}\n`;
  socket.end(`HTTP/1.1 ${status} ${reason}\r\n${extraHeaders}Content-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}
