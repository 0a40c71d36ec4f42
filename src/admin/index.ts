// The admin surface: origin-form requests to the proxy itself (/ca.crt, /setup/<runtime>, /healthz).
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CertificateAuthority } from '../ca.ts';
import type { WorkerPool } from '../pool.ts';
import { isRuntime, setupScript } from './setup-scripts.ts';

export interface AdminDeps {
  ca: CertificateAuthority;
  pool: WorkerPool;
  version: string;
  /** host:port clients reach the proxy at, when a request carries no Host header. */
  fallbackHost: string;
}

export type AdminHandler = (req: IncomingMessage, res: ServerResponse) => Promise<number>;

export function createAdminHandler(deps: AdminDeps): AdminHandler {
  const started = Date.now();
  return async (req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return send(res, 405, 'text/plain; charset=utf-8', `${req.method} is not supported here\n`, { Allow: 'GET, HEAD' });
    }
    if (path === '/ca.crt') {
      return send(res, 200, 'application/x-pem-file', deps.ca.certPem, {
        'Content-Disposition': 'attachment; filename="pullthrough-ca.crt"',
      });
    }
    if (path === '/healthz') {
      const body = { status: 'ok', version: deps.version, uptimeSeconds: Math.round((Date.now() - started) / 1000), workers: 'ok', caNotAfter: deps.ca.notAfter.toISOString() };
      try {
        await deps.pool.health();
      } catch (err) {
        return send(res, 503, 'application/json', JSON.stringify({ ...body, status: 'failing', workers: (err as Error).message }) + '\n');
      }
      return send(res, 200, 'application/json', JSON.stringify(body) + '\n');
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
    return send(res, 404, 'text/plain; charset=utf-8', 'pullthrough: not found (try /ca.crt, /setup/docker, /healthz)\n');
  };
}

function send(res: ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): number {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store', ...headers });
  res.end(res.req.method === 'HEAD' ? undefined : body);
  return status;
}
