// HTTP/1.1-over-TLS clients for small requests, in this process: undici Pools whose connections are
// opened either straight to a server (the reference) or through the proxy — CONNECT host:port, then
// TLS inside the tunnel with the proxy's CA, as any HTTPS_PROXY client does — and kept alive. Cheaper
// per request than a curl process, so that the load generator takes as little as possible of the
// cores it shares with the proxy.
import net from 'node:net';
import tls from 'node:tls';
import { Pool, type buildConnector } from 'undici';

/** How long opening one connection (TCP, CONNECT, TLS) may take. */
const CONNECT_TIMEOUT_MS = 10_000;

export interface Route {
  /** For messages: "direct" or "through the proxy at …". */
  label: string;
  /** https://host:port — what the Host header and TLS name say. */
  origin: string;
  connect: buildConnector.connector;
}

export interface DirectTarget {
  /** Name for SNI, the certificate and Host, e.g. registry.test. */
  host: string;
  port: number;
  /** PEM the server's certificate must chain to. */
  caPem: string;
}

/** TLS straight to 127.0.0.1:port, named `host`. */
export function directTls(target: DirectTarget): Route {
  return {
    label: 'direct',
    origin: `https://${target.host}:${target.port}`,
    connect: (_options, callback) => {
      const socket = tls.connect({ host: '127.0.0.1', port: target.port, servername: target.host, ca: target.caPem, ALPNProtocols: ['http/1.1'] });
      handshake(socket, socket, callback);
    },
  };
}

/** CONNECT host:port through the proxy on 127.0.0.1:proxyPort, then TLS trusting only the proxy's CA. */
export function throughProxy(target: { host: string; port: number }, proxy: { port: number; caPem: string }): Route {
  return {
    label: `through the proxy on 127.0.0.1:${proxy.port}`,
    origin: `https://${target.host}:${target.port}`,
    connect: (_options, callback) => {
      const raw = net.connect(proxy.port, '127.0.0.1');
      raw.setNoDelay(true);
      const timer = setTimeout(() => raw.destroy(new Error(`CONNECT ${target.host}:${target.port}: no answer within ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
      let head = Buffer.alloc(0);
      const onData = (chunk: Buffer) => {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        raw.off('data', onData);
        raw.off('error', onError);
        clearTimeout(timer);
        const statusLine = head.subarray(0, head.indexOf('\r\n')).toString('latin1');
        if (!/^HTTP\/1\.[01] 200/.test(statusLine)) {
          raw.destroy();
          callback(new Error(`CONNECT ${target.host}:${target.port} answered "${statusLine}"`), null);
          return;
        }
        const rest = head.subarray(end + 4);
        if (rest.length > 0) raw.unshift(rest);
        const socket = tls.connect({ socket: raw, servername: target.host, ca: proxy.caPem, ALPNProtocols: ['http/1.1'] });
        handshake(socket, raw, callback);
      };
      const onError = (err: Error) => {
        clearTimeout(timer);
        callback(err, null);
      };
      raw.on('data', onData);
      raw.once('error', onError);
      raw.once('connect', () => raw.write(`CONNECT ${target.host}:${target.port} HTTP/1.1\r\nHost: ${target.host}:${target.port}\r\n\r\n`));
    },
  };
}

function handshake(socket: tls.TLSSocket, raw: net.Socket, callback: buildConnector.Callback): void {
  const timer = setTimeout(() => socket.destroy(new Error(`TLS handshake: not done within ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
  const onError = (err: Error) => {
    clearTimeout(timer);
    callback(err, null);
  };
  socket.once('error', onError);
  socket.once('secureConnect', () => {
    clearTimeout(timer);
    socket.off('error', onError);
    raw.setNoDelay(true);
    callback(null, socket);
  });
}

export interface PoolOptions {
  /** At most this many connections (opened as requests need them, then kept alive). */
  connections: number;
  /** undici's per-request timeouts (headers, then body). */
  timeoutMs?: number;
}

export function openPool(route: Route, options: PoolOptions): Pool {
  const timeout = options.timeoutMs ?? 10_000;
  return new Pool(route.origin, {
    connections: options.connections,
    pipelining: 1,
    connect: route.connect,
    headersTimeout: timeout,
    bodyTimeout: timeout,
    // The servers hint "timeout=5" (Node) or nothing (nginx): stay connected between requests in a run.
    keepAliveTimeout: 30_000,
    keepAliveMaxTimeout: 60_000,
  });
}
