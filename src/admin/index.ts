// The admin surface: origin-form requests to the proxy itself. Reading: /ca.crt, /setup/<runtime>,
// /healthz, /metrics, /ui (and ui/data.json), open to whoever reaches the port. Changing: POST
// /admin/purge, with the admin token (`Authorization: Bearer`) when one is configured, else only
// from a loopback address. Loopback alone is not proof enough where a sidecar proxy (Istio connects
// from 127.0.0.6) or anything else on the host relays outside clients: there, set admin.token.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { readAdminTokenFile } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import type { CertificateAuthority } from '../ca.ts';
import type { Metrics } from '../metrics.ts';
import { DASHBOARD_HTML, type DashboardData } from './dashboard.ts';
import { isRuntime, setupScript } from './setup-scripts.ts';
import { isMirrorRuntime, mirrorSetupScript } from './mirror-setup.ts';
import type { MirroredRegistry } from './mirror-config.ts';

export interface PurgeRequest {
  registry?: string;
  repository?: string;
  digest?: string;
}

export interface AdminDeps {
  ca: CertificateAuthority;
  version: string;
  /** host:port clients reach the proxy at, when a request carries no Host header. */
  fallbackHost: string;
  metrics: Metrics;
  dashboard(): Promise<DashboardData>;
  purge(request: PurgeRequest): Promise<unknown>;
  /** Cluster mode: why this replica should not get clients yet (undefined: it may). */
  notReady?: () => string | undefined;
  /** admin.token / admin.tokenFile; none set (or absent): state changes from loopback clients only. */
  admin?: Policy['admin'];
  /** The registry-mirror front, when configured: for its setup scripts. */
  mirror?: {
    /** The mirror's URL for a client that reached the admin surface by `hostname`. */
    url(hostname: string): string;
    registries: readonly MirroredRegistry[];
  };
}

export type AdminHandler = (req: IncomingMessage, res: ServerResponse) => Promise<number>;

/** A purge request is a few dozen bytes of JSON. */
const MAX_ADMIN_BODY = 4 * 1024;

export function createAdminHandler(deps: AdminDeps): AdminHandler {
  // A token file that cannot be read stops the start (a ConfigError), rather than the first purge.
  if (deps.admin?.tokenFile) readAdminTokenFile(deps.admin.tokenFile);
  return async (req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    if (path === '/admin/purge') return purge(req, res, deps);
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return send(res, 405, 'text/plain; charset=utf-8', `${req.method} is not supported here\n`, { Allow: 'GET, HEAD' });
    }
    switch (path) {
      case '/ca.crt':
        return send(res, 200, 'application/x-pem-file', deps.ca.certPem, { 'Content-Disposition': 'attachment; filename="pullthrough-ca.crt"' });
      case '/healthz': {
        const data = await deps.dashboard();
        const body = { status: data.health.status, version: deps.version, uptimeSeconds: data.uptimeSeconds, workers: data.health.workers, caNotAfter: deps.ca.notAfter.toISOString() };
        return send(res, data.health.status === 'ok' ? 200 : 503, 'application/json', JSON.stringify(body) + '\n');
      }
      case '/readyz': {
        // Readiness, as Kubernetes routes clients by it: the workers answer and, in cluster mode, the
        // replica knows its peers. /healthz stays the liveness probe.
        const data = await deps.dashboard();
        const reason = data.health.status !== 'ok' ? `the fill workers do not answer: ${data.health.workers}` : deps.notReady?.();
        return send(res, reason ? 503 : 200, 'application/json', JSON.stringify(reason ? { status: 'not ready', reason } : { status: 'ready' }) + '\n');
      }
      case '/metrics':
        return send(res, 200, deps.metrics.registry.contentType, await deps.metrics.registry.metrics());
      case '/ui':
      case '/ui/':
        return send(res, 200, 'text/html; charset=utf-8', DASHBOARD_HTML);
      case '/ui/data.json':
        return send(res, 200, 'application/json', JSON.stringify(await deps.dashboard()) + '\n');
    }
    const mirrorSetup = /^\/setup\/([a-z]+-mirror)$/.exec(path);
    if (mirrorSetup) {
      const runtime = mirrorSetup[1]!;
      if (!isMirrorRuntime(runtime)) return send(res, 404, 'text/plain; charset=utf-8', 'mirror setup scripts: /setup/containerd-mirror, /setup/podman-mirror, /setup/docker-mirror\n');
      if (!deps.mirror) return send(res, 404, 'text/plain; charset=utf-8', 'the registry mirror is off: set mirror.listen in proxy.yaml\n');
      try {
        const hostname = new URL(`http://${req.headers.host ?? deps.fallbackHost}`).hostname;
        return send(res, 200, 'text/x-shellscript; charset=utf-8', mirrorSetupScript(runtime, { mirrorUrl: deps.mirror.url(hostname), registries: deps.mirror.registries, caPem: deps.ca.certPem }));
      } catch (err) {
        return send(res, 400, 'text/plain; charset=utf-8', `${(err as Error).message}\n`);
      }
    }
    const setup = /^\/setup\/([a-z]+)$/.exec(path);
    if (setup) {
      // "systemd" is the seed's name for the docker script.
      const runtime = setup[1] === 'systemd' ? 'docker' : setup[1]!;
      if (!isRuntime(runtime)) return send(res, 404, 'text/plain; charset=utf-8', 'setup scripts: /setup/docker, /setup/containerd, /setup/podman\n');
      try {
        const proxyUrl = `http://${req.headers.host ?? deps.fallbackHost}`;
        return send(res, 200, 'text/x-shellscript; charset=utf-8', setupScript(runtime, { proxyUrl, caPem: deps.ca.certPem, noProxy: [] }));
      } catch (err) {
        return send(res, 400, 'text/plain; charset=utf-8', `${(err as Error).message}\n`);
      }
    }
    return send(res, 404, 'text/plain; charset=utf-8', 'pullthrough: not found (try /ca.crt, /setup/docker, /healthz, /readyz, /metrics, /ui)\n');
  };
}

/** POST /admin/purge {"registry"?, "repository"?, "digest"?}: with the admin token, or from this host when none is set. */
async function purge(req: IncomingMessage, res: ServerResponse, deps: AdminDeps): Promise<number> {
  if (req.method !== 'POST') return send(res, 405, 'text/plain; charset=utf-8', 'POST only\n', { Allow: 'POST' });
  const refused = changeRefusal(req, deps.admin);
  if (refused) return send(res, refused.status, 'text/plain; charset=utf-8', `pullthrough: ${refused.message}\n`, refused.headers);
  const body = await readBody(req, MAX_ADMIN_BODY);
  if (body === 'cut') {
    // The client closed before its body was whole: nobody is left to answer.
    res.destroy();
    return 499;
  }
  if (body === 'too large') {
    // Connection: close, so that the rest of the body is not read as the next request.
    return send(res, 413, 'text/plain; charset=utf-8', `the body is larger than ${MAX_ADMIN_BODY} bytes\n`, { Connection: 'close' });
  }
  let request: PurgeRequest;
  try {
    request = JSON.parse(body.toString('utf8') || '{}') as PurgeRequest;
  } catch {
    return send(res, 400, 'text/plain; charset=utf-8', 'the body is not JSON: {"registry"?, "repository"?, "digest"?}\n');
  }
  if (typeof request !== 'object' || request === null || Array.isArray(request) || Object.values(request).some((value) => typeof value !== 'string')) {
    return send(res, 400, 'text/plain; charset=utf-8', 'the body must be a JSON object of strings: {"registry"?, "repository"?, "digest"?}\n');
  }
  if (!request.registry && !request.repository && !request.digest) {
    return send(res, 400, 'text/plain; charset=utf-8', 'name what to purge: registry, repository (with its registry) or digest\n');
  }
  if (request.repository && !request.registry) return send(res, 400, 'text/plain; charset=utf-8', 'a repository needs its registry\n');
  return send(res, 200, 'application/json', JSON.stringify(await deps.purge(request)) + '\n');
}

const BEARER_CHALLENGE = { 'WWW-Authenticate': 'Bearer realm="pullthrough-admin"' };

/**
 * Why a state-changing admin request may not proceed; undefined when it may. With a token configured,
 * the request must carry it, whatever its address; without one, it must come from a loopback address.
 */
function changeRefusal(req: IncomingMessage, admin: Policy['admin'] | undefined): { status: number; message: string; headers?: Record<string, string> } | undefined {
  const tokens: string[] = [];
  if (admin?.token) tokens.push(admin.token);
  if (admin?.tokenFile) {
    try {
      // Read at each use, so that a rotated Secret applies without a restart.
      tokens.push(readAdminTokenFile(admin.tokenFile));
    } catch (err) {
      return { status: 503, message: `the admin token cannot be read, so nothing is changed: ${(err as Error).message}` };
    }
  }
  if (tokens.length === 0) {
    const from = req.socket.remoteAddress ?? '';
    if (/^(127\.|::1$|::ffff:127\.)/.test(from)) return undefined;
    return { status: 403, message: 'purge is accepted from the proxy host only (run `pullthrough purge` there), or with the admin token when admin.token is set' };
  }
  const presented = /^Bearer +(\S+) *$/i.exec(req.headers.authorization ?? '')?.[1];
  if (presented === undefined) {
    return { status: 401, message: 'this needs the admin token: Authorization: Bearer <token> (`pullthrough purge` sends $PULLTHROUGH_ADMIN_TOKEN, or the token of proxy.yaml)', headers: BEARER_CHALLENGE };
  }
  // Every token is compared, each in constant time, so that neither a match nor a length leaks by timing.
  const matches = tokens.map((token) => sameSecret(token, presented));
  if (!matches.includes(true)) return { status: 401, message: 'the admin token is not right', headers: BEARER_CHALLENGE };
  return undefined;
}

/** Compares digests (equal length whatever the inputs) with timingSafeEqual. */
function sameSecret(expected: string, presented: string): boolean {
  const digest = (text: string) => createHash('sha256').update(text, 'utf8').digest();
  return timingSafeEqual(digest(expected), digest(presented));
}

/**
 * The request body, up to `max` bytes; 'cut' when the client left before its end. Read by events, not
 * `for await`: leaving that loop early would destroy the request, and with it the socket the 413 needs.
 */
function readBody(req: IncomingMessage, max: number): Promise<Buffer | 'too large' | 'cut'> {
  if (Number(req.headers['content-length'] ?? 0) > max) return Promise.resolve('too large');
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const settle = (result: Buffer | 'too large' | 'cut') => {
      req.off('data', onData).off('end', onEnd).off('error', onCut).off('close', onCut);
      resolve(result);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      chunks.push(chunk);
      if (size > max) {
        req.pause();
        settle('too large');
      }
    };
    const onEnd = () => settle(Buffer.concat(chunks, size));
    // "aborted": fewer bytes than Content-Length, then a close.
    const onCut = () => settle('cut');
    req.on('data', onData).on('end', onEnd).on('error', onCut).on('close', onCut);
  });
}

function send(res: ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): number {
  // Set one by one (not as writeHead's argument) so the access log can read Content-Length back.
  for (const [name, value] of Object.entries({ 'Content-Type': type, 'Content-Length': String(Buffer.byteLength(body)), 'Cache-Control': 'no-store', ...headers })) res.setHeader(name, value);
  res.writeHead(status);
  res.end(res.req.method === 'HEAD' ? undefined : body);
  return status;
}
