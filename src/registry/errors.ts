// Errors that reach a client are registry-style JSON, so docker, podman and containerd print them.
import type { ServerResponse } from 'node:http';

export function sendRegistryError(res: ServerResponse, status: number, code: string, message: string, detail?: unknown): void {
  const body = JSON.stringify({ errors: [{ code, message, ...(detail === undefined ? {} : { detail }) }] }) + '\n';
  if (res.headersSent) {
    res.destroy();
    return;
  }
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    'Docker-Distribution-API-Version': 'registry/2.0',
  });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}
