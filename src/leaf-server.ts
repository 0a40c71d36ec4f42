// An HTTPS server that presents leaves from the proxy's CA for a few names of its own (the registry-
// mirror front's names, the cluster peer port's), ECDSA and RSA both, whether or not the client sends
// SNI. Node's SNICallback can only swap in a context whose last certificate it keeps (RSA: see
// LEAF_KEY_TYPES in ca.ts), so the first name is the server's default context, kept fresh here, and
// only the other names are swapped in.
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type http from 'node:http';
import type { Timeouts } from '../config/policy.ts';
import type { CertificateAuthority } from './ca.ts';

/** The default context is made again this often: a leaf is renewed a week before its 90 days end. */
const REFRESH_MS = 86_400_000;

export function createLeafServer(ca: CertificateAuthority, names: readonly string[], onRequest: (req: IncomingMessage, res: ServerResponse) => void): https.Server {
  const [first, ...others] = names.map((name) => name.toLowerCase());
  const server = https.createServer(
    {
      ...ca.serverOptionsFor(first!),
      SNICallback: (servername, done) => {
        const name = servername.toLowerCase();
        if (others.includes(name)) done(null, ca.secureContextFor(name));
        else done(null);
      },
    },
    onRequest,
  );
  const refresh = setInterval(() => server.setSecureContext(ca.serverOptionsFor(first!)), REFRESH_MS);
  refresh.unref();
  server.once('close', () => clearInterval(refresh));
  return server;
}

/**
 * The client timeouts of the policy on a registry listener of the proxy's own (the mirror front, the
 * peer port), and a 400 for what does not parse as HTTP.
 */
export function applyClientTimeouts(server: http.Server, timeouts: Timeouts): void {
  server.headersTimeout = timeouts.clientHeaderMs;
  server.requestTimeout = 0; // blobs may take long; idle clients are cut by the socket timeout
  server.keepAliveTimeout = timeouts.keepAliveMs;
  server.timeout = timeouts.clientIdleMs;
  server.on('clientError', (_err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    else socket.destroy();
  });
}

/** Closes a listener of the proxy's own: no new connections, and the open ones cut. */
export function closeServer(server: http.Server): Promise<void> {
  return new Promise<void>((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}
