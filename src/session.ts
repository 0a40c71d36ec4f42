// Intercepted sessions: after a CONNECT to a registry in the policy, the proxy answers 200, terminates
// the client's TLS with a leaf minted for the name the client asked for, and serves HTTP/1.1 on it.
// One http.Server (never listening) per registry carries that registry's client timeouts.
import http from 'node:http';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import type { ProxyUser, RegistryPolicy } from '../config/policy.ts';
import type { CertificateAuthority } from './ca.ts';
import type { Target } from './connect.ts';
import type { Logger } from './log.ts';
import type { RegistryHandler } from './registry/handler.ts';
import { withErrorAnswers } from './request-failures.ts';

interface SessionInfo {
  registry: RegistryPolicy;
  client: string;
  /** Who authenticated the CONNECT, when proxy users are configured. */
  user: ProxyUser | undefined;
  requests: number;
}

export class InterceptedSessions {
  private readonly servers = new Map<string, http.Server>();
  private readonly sessions = new WeakMap<object, SessionInfo>();
  private readonly ca: CertificateAuthority;
  private readonly handler: RegistryHandler;
  private readonly log: Logger;

  constructor(ca: CertificateAuthority, handler: RegistryHandler, log: Logger) {
    this.ca = ca;
    // A handler that throws (an upstream that cuts a manifest, an index that cannot write) is answered
    // with a registry error, the same way as on the front's plain-HTTP path.
    this.handler = withErrorAnswers(handler, log);
    this.log = log;
  }

  accept(socket: Duplex, head: Buffer, target: Target, registry: RegistryPolicy, client: string, user?: ProxyUser): void {
    socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    // A client may send its ClientHello before reading our 200; those bytes arrived with the CONNECT.
    if (head.length > 0) socket.unshift(head);
    const tlsSocket = new tls.TLSSocket(socket, {
      isServer: true,
      // Without SNI (IP literals) the CONNECT target names the certificate; with SNI, the SNI does.
      secureContext: this.ca.secureContextFor(target.host),
      SNICallback: (name, done) => {
        try {
          done(null, this.ca.secureContextFor(name));
        } catch (err) {
          done(err as Error);
        }
      },
      ALPNProtocols: ['http/1.1'],
    });
    const session: SessionInfo = { registry, client, user, requests: 0 };
    let tlsError: string | undefined;
    tlsSocket.on('error', (err: NodeJS.ErrnoException) => (tlsError = err.code ?? err.message));
    tlsSocket.once('close', () => {
      // With TLS 1.3 the client checks our certificate after the server side has finished, so a client
      // that does not trust the CA just closes before its first request: on its side the classic
      // "x509: certificate signed by unknown authority". Worth a hint to the operator.
      if (session.requests > 0) return;
      this.log.warn('a client closed its intercepted session before any request (does it trust the proxy CA from /ca.crt?)', {
        registry: registry.key,
        client,
        ...(tlsError ? { error: tlsError } : {}),
      });
    });
    this.sessions.set(tlsSocket, session);
    tlsSocket.once('close', () => socket.destroy());
    this.serverFor(registry).emit('connection', tlsSocket);
  }

  private serverFor(registry: RegistryPolicy): http.Server {
    let server = this.servers.get(registry.key);
    if (!server) {
      server = http.createServer({ maxHeaderSize: 64 * 1024 }, (req, res) => {
        const session = this.sessions.get(req.socket)!;
        session.requests++;
        void this.handler(req, res, { registry: session.registry, client: session.client, ...(session.user ? { user: session.user } : {}) });
      });
      server.timeout = registry.timeouts.clientIdleMs;
      server.keepAliveTimeout = registry.timeouts.keepAliveMs;
      server.requestTimeout = 0; // uploads may take as long as they take; idle time is what is bounded
      // No 'checkContinue' listener: Node answers a client's Expect: 100-continue itself, and the body
      // is read here; upstream never sees the Expect (upstream/forward.ts).
      server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
        if (socket.writable && err.code !== 'ECONNRESET') socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
        else socket.destroy();
      });
      this.servers.set(registry.key, server);
    }
    return server;
  }

}
