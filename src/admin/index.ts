// The admin surface: origin-form requests to the proxy itself. Reading: /ca.crt, /setup/<runtime>,
// /healthz, /metrics, /ui (and ui/data.json). Changing: POST /admin/purge, from this host only.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CertificateAuthority } from '../ca.ts';
import type { Metrics } from '../metrics.ts';
import { DASHBOARD_HTML, type DashboardData } from './dashboard.ts';
import { isRuntime, setupScript } from './setup-scripts.ts';

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
}

export type AdminHandler = (req: IncomingMessage, res: ServerResponse) => Promise<number>;

const MAX_ADMIN_BODY = 64 * 1024;

export function createAdminHandler(deps: AdminDeps): AdminHandler {
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
      case '/metrics':
        return send(res, 200, deps.metrics.registry.contentType, await deps.metrics.registry.metrics());
      case '/ui':
      case '/ui/':
        return send(res, 200, 'text/html; charset=utf-8', DASHBOARD_HTML);
      case '/ui/data.json':
        return send(res, 200, 'application/json', JSON.stringify(await deps.dashboard()) + '\n');
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
    return send(res, 404, 'text/plain; charset=utf-8', 'pullthrough: not found (try /ca.crt, /setup/docker, /healthz, /metrics, /ui)\n');
  };
}

/** POST /admin/purge {"registry"?, "repository"?, "digest"?}: only from this host (the CLI's way in). */
async function purge(req: IncomingMessage, res: ServerResponse, deps: AdminDeps): Promise<number> {
  if (req.method !== 'POST') return send(res, 405, 'text/plain; charset=utf-8', 'POST only\n', { Allow: 'POST' });
  const from = req.socket.remoteAddress ?? '';
  if (!/^(127\.|::1$|::ffff:127\.)/.test(from)) {
    return send(res, 403, 'text/plain; charset=utf-8', 'pullthrough: purge is accepted from the proxy host only (run `pullthrough purge` there)\n');
  }
  let text = '';
  for await (const chunk of req) {
    text += chunk;
    if (text.length > MAX_ADMIN_BODY) return send(res, 413, 'text/plain; charset=utf-8', 'too large\n');
  }
  let request: PurgeRequest;
  try {
    request = JSON.parse(text || '{}') as PurgeRequest;
  } catch {
    return send(res, 400, 'text/plain; charset=utf-8', 'the body is not JSON: {"registry"?, "repository"?, "digest"?}\n');
  }
  if (!request.registry && !request.repository && !request.digest) {
    return send(res, 400, 'text/plain; charset=utf-8', 'name what to purge: registry, repository (with its registry) or digest\n');
  }
  if (request.repository && !request.registry) return send(res, 400, 'text/plain; charset=utf-8', 'a repository needs its registry\n');
  return send(res, 200, 'application/json', JSON.stringify(await deps.purge(request)) + '\n');
}

function send(res: ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): number {
  // Set one by one (not as writeHead's argument) so the access log can read Content-Length back.
  for (const [name, value] of Object.entries({ 'Content-Type': type, 'Content-Length': String(Buffer.byteLength(body)), 'Cache-Control': 'no-store', ...headers })) res.setHeader(name, value);
  res.writeHead(status);
  res.end(res.req.method === 'HEAD' ? undefined : body);
  return status;
}
