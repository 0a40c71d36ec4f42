// A blind byte tunnel for CONNECTs to hosts the proxy does not intercept: the client's TLS session
// reaches the real server with the real certificate; the proxy sees only bytes.
import net, { type LookupFunction } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Target } from './connect.ts';

export interface TunnelOptions {
  lookup: LookupFunction;
  connectTimeoutMs: number;
  idleTimeoutMs: number;
}

export interface TunnelResult {
  /** 200 once the server was reached; otherwise the error status the client got. */
  status: number;
  /** Bytes from the client to the server, and back. */
  sent: number;
  received: number;
  error?: string;
}

export function tunnel(client: Duplex, head: Buffer, target: Target, options: TunnelOptions): Promise<TunnelResult> {
  return new Promise((resolve) => {
    const server = net.connect({ host: target.host, port: target.port, lookup: options.lookup });
    let status = 0;
    let error: string | undefined;
    const refuse = (code: number, message: string) => {
      status = code;
      error = message;
      const reason = code === 504 ? 'Gateway Timeout' : 'Bad Gateway';
      client.end(`HTTP/1.1 ${code} ${reason}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npullthrough: ${message}\n`);
      server.destroy();
    };
    const connectTimer = setTimeout(
      () => refuse(504, `connect to ${target.host}:${target.port} timed out`),
      options.connectTimeoutMs,
    );

    server.once('connect', () => {
      clearTimeout(connectTimer);
      status = 200;
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) server.write(head);
      server.setTimeout(options.idleTimeoutMs, () => {
        error = 'idle timeout';
        server.destroy();
        client.destroy();
      });
      // pipe() ends each side when the other ends, so half-closes pass through as they would direct.
      client.pipe(server);
      server.pipe(client);
    });
    server.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(connectTimer);
      if (status === 0) refuse(502, `cannot reach ${target.host}:${target.port}: ${err.code ?? err.message}`);
      else client.destroy();
    });
    client.on('error', () => server.destroy());

    let open = 2;
    const closed = () => {
      if (--open > 0) return;
      clearTimeout(connectTimer);
      resolve({ status: status || 499, sent: server.bytesWritten, received: server.bytesRead, ...(error ? { error } : {}) });
    };
    server.once('close', () => {
      // Nothing can pass any more: flush what the server sent, then close the client's side too.
      client.end(() => client.destroy());
      closed();
    });
    client.once('close', () => {
      server.destroy();
      closed();
    });
  });
}
