// Intercepted sessions: after a CONNECT to a registry in the policy, the proxy answers 200, terminates
// the client's TLS with a leaf minted for the CONNECT target's name, and serves HTTP/1.1 on it.
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
    // Minted (or found) before the 200: a name that cannot have a certificate refuses the CONNECT.
    const context = this.ca.secureContextFor(target.host);
    socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    // A client may send its ClientHello before reading our 200; those bytes arrived with the CONNECT.
    if (head.length > 0) socket.unshift(head);
    let foreignName: string | undefined;
    const tlsSocket = new tls.TLSSocket(socket, {
      isServer: true,
      // The session goes upstream to the CONNECT target, so only that name is served (IP literals come
      // without SNI and get the target's certificate too). Another SNI fails the handshake: a leaf
      // minted for it would be a certificate, a context and a metric label per name a client makes up
      // (kept for ever in the index), and a client that got one would send what it means for that host
      // to this registry. Handing it the target's certificate instead would fail its name check anyway
      // (or, with verification off, talk to this registry under the name it believes): a refusal that
      // the log explains is clearer.
      secureContext: context,
      SNICallback: (servername, done) => {
        if (normaliseName(servername) === target.host) {
          // The session keeps `context`. Handed it again, Node would put only its last certificate into
          // the session (an SNI context is applied one certificate at a time), and the handshake could no
          // longer choose the ECDSA leaf (see ca.ts).
          done(null);
          return;
        }
        foreignName = servername.slice(0, 253);
        done(new Error(`the TLS server name ${foreignName} is not the CONNECT target ${target.host}`));
      },
      ALPNProtocols: ['http/1.1'],
    });
    const session: SessionInfo = { registry, client, user, requests: 0 };
    let tlsError: string | undefined;
    tlsSocket.on('error', (err: NodeJS.ErrnoException) => (tlsError = err.code ?? err.message));
    tlsSocket.once('close', () => {
      if (foreignName !== undefined) {
        this.log.warn('a client asked for another name (TLS SNI) than the host of its CONNECT: refused', { registry: registry.key, client, sni: foreignName });
        return;
      }
      // With TLS 1.3 the client checks our certificate after the server side has finished, so a client
      // that does not trust the CA just closes before its first request: on its side the classic
      // "x509: certificate signed by unknown authority". Worth a hint to the operator.
      if (session.requests > 0 || this.stopping) return;
      this.log.warn('a client closed its intercepted session before any request (does it trust the proxy CA from /ca.crt?)', {
        registry: registry.key,
        client,
        ...(tlsError ? { error: tlsError } : {}),
      });
    });
    this.sessions.set(tlsSocket, session);
    tlsSocket.once('close', () => socket.destroy());
    this.serveWhenAsked(tlsSocket, registry);
  }

  /**
   * The TLS handshake is the session's head: it must end within clientHeader, as a request's head must.
   * The session then waits up to clientIdle for its first request; the registry's http.Server takes the
   * socket with the first byte of it, so that its header timer (armed by each request's first byte, see
   * serverFor) bounds every request's head and never an idle session.
   */
  private serveWhenAsked(tlsSocket: tls.TLSSocket, registry: RegistryPolicy): void {
    const { clientHeaderMs, clientIdleMs } = registry.timeouts;
    const expire = () => tlsSocket.destroy();
    const handshake = setTimeout(expire, clientHeaderMs);
    tlsSocket.once('close', () => clearTimeout(handshake));
    tlsSocket.once('secure', () => {
      clearTimeout(handshake);
      tlsSocket.setTimeout(clientIdleMs, expire);
    });
    tlsSocket.once('readable', () => {
      clearTimeout(handshake);
      tlsSocket.setTimeout(0);
      tlsSocket.off('timeout', expire);
      // The client ended the session without a request: nothing to serve.
      if (tlsSocket.readableLength === 0) {
        tlsSocket.destroy();
        return;
      }
      this.serverFor(registry).emit('connection', tlsSocket);
    });
  }

  private serverFor(registry: RegistryPolicy): http.Server {
    let server = this.servers.get(registry.key);
    if (!server) {
      const { clientHeaderMs, clientIdleMs, keepAliveMs } = registry.timeouts;
      server = http.createServer(
        {
          maxHeaderSize: 64 * 1024,
          headersTimeout: clientHeaderMs,
          requestTimeout: 0, // uploads may take as long as they take; idle time is what is bounded
          keepAliveTimeout: keepAliveMs,
          // How often slow heads are checked against headersTimeout.
          connectionsCheckingInterval: Math.min(1000, clientHeaderMs),
        },
        (req, res) => {
          const session = this.sessions.get(req.socket)!;
          session.requests++;
          void this.handler(req, res, { registry: session.registry, client: session.client, ...(session.user ? { user: session.user } : {}) });
        },
      );
      server.timeout = clientIdleMs;
      // Node arms headersTimeout only for the connections of a server that listens: its connection
      // list and the timer that checks it are set up on 'listening'. This server never listens (it is
      // handed decrypted sockets), so it is told it does; without that a client that sends half a
      // request line holds its session for clientIdle. test/listener/sessions.test.ts holds it to that.
      server.emit('listening');
      // No 'checkContinue' listener: Node answers a client's Expect: 100-continue itself, and the body
      // is read here; upstream never sees the Expect (upstream/forward.ts).
      server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
        if (!socket.writable || err.code === 'ECONNRESET') {
          socket.destroy();
          return;
        }
        const answer = err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? '408 Request Timeout' : err.code === 'HPE_HEADER_OVERFLOW' ? '431 Request Header Fields Too Large' : '400 Bad Request';
        // Closed once the answer is out, whether or not the client closes its side.
        socket.once('finish', () => socket.destroy());
        socket.end(`HTTP/1.1 ${answer}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
      });
      this.servers.set(registry.key, server);
    }
    return server;
  }

  /** The proxy is stopping: sessions it cuts before their first request are not the client's doing. */
  stopping = false;

  /** Stops the servers' header checks; the sessions themselves end with their sockets (the front's close). */
  close(): void {
    this.stopping = true;
    for (const server of this.servers.values()) server.close();
    this.servers.clear();
  }
}

/** An SNI as a CONNECT target is written: lower case, without a trailing dot. */
function normaliseName(name: string): string {
  return name.toLowerCase().replace(/\.$/, '');
}
