// A registry client's view of one request through the proxy (CONNECT, TLS trusting the proxy CA, then
// node's HTTP client on that socket), that can tell a clean end from a cut: `complete` is false when
// the connection ended before the announced body did. It can also read slowly or leave early.
import http, { type IncomingHttpHeaders } from 'node:http';
import type { TLSSocket } from 'node:tls';
import { tlsThroughProxy } from './connect.ts';
import { sha256 } from './fake-registry.ts';

export interface Fetched {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** The whole announced body arrived and the message ended cleanly. */
  complete: boolean;
  /** sha256:<hex> of the body received. */
  digest: string;
  /** The connection error, if the response was cut. */
  error?: string;
}

export interface FetchOptions {
  method?: string;
  headers?: Record<string, string>;
  /** Called with the body bytes received so far; reading stops until the promise it returns settles. */
  onData?: (received: number) => void | Promise<void>;
  /** The client closes its connection once this many body bytes arrived (a client that leaves). */
  leaveAfter?: number;
  /** A session opened beforehand with connectThroughProxy (to send many requests at the same instant). */
  socket?: TLSSocket;
}

export interface Target {
  proxyPort: number;
  caPem: string;
  host: string;
  port: number;
}

/** CONNECT and TLS to the target through the proxy, ready for a request. */
export function connectThroughProxy(target: Target): Promise<TLSSocket> {
  return tlsThroughProxy(target.proxyPort, target.host, target.port, target.caPem);
}

/** One request to https://host:port<path> through the proxy; never rejects once the response began. */
export async function fetchThroughProxy(target: Target, path: string, options: FetchOptions = {}): Promise<Fetched> {
  const socket = options.socket ?? (await connectThroughProxy(target));
  return new Promise((resolve, reject) => {
    const req = http.request({
      createConnection: () => socket,
      method: options.method ?? 'GET',
      path,
      headers: { host: `${target.host}:${target.port}`, ...options.headers },
    });
    req.once('error', reject);
    req.once('response', (res) => {
      const chunks: Buffer[] = [];
      let received = 0;
      let error: string | undefined;
      const finish = () =>
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          body: Buffer.concat(chunks),
          complete: res.complete && error === undefined,
          digest: sha256(Buffer.concat(chunks)),
          ...(error !== undefined ? { error } : {}),
        });
      res.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        received += chunk.length;
        if (options.leaveAfter !== undefined && received >= options.leaveAfter) {
          error = 'the client left';
          socket.destroy();
          return;
        }
        const waiting = options.onData?.(received);
        if (waiting) {
          res.pause();
          void waiting.then(() => res.resume());
        }
      });
      res.once('error', (err) => (error = err.message));
      res.once('close', finish);
    });
    req.end();
  });
}
