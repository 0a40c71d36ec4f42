// A blind byte tunnel for CONNECTs to hosts the proxy does not intercept: the client's TLS session
// reaches the real server with the real certificate; the proxy sees only bytes.
import net from 'node:net';
import type { Duplex } from 'node:stream';
import type { Target } from './connect.ts';

export interface TunnelOptions {
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

/**
 * Connects to `addresses` (what the tunnel policy checked, in order: the next one when one cannot be
 * reached) on the target's port, then pipes bytes both ways. Only addresses, never a name: nothing
 * is looked up between the policy's check and the connect, so a DNS answer that changes cannot
 * redirect the tunnel.
 */
export function tunnel(client: Duplex, head: Buffer, target: Target, addresses: readonly string[], options: TunnelOptions): Promise<TunnelResult> {
  const name = `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
  return new Promise((resolve) => {
    let attempt: net.Socket | undefined;
    let server: net.Socket | undefined;
    let status = 0;
    let error: string | undefined;
    let clientClosed = false;
    let serverClosed = false;

    const finished = () => {
      if (!clientClosed || (server && !serverClosed)) return;
      clearTimeout(connectTimer);
      resolve({ status: status || 499, sent: server?.bytesWritten ?? 0, received: server?.bytesRead ?? 0, ...(error ? { error } : {}) });
    };
    const refuse = (code: number, message: string) => {
      status = code;
      error = message;
      attempt?.destroy();
      const reason = code === 504 ? 'Gateway Timeout' : 'Bad Gateway';
      client.end(`HTTP/1.1 ${code} ${reason}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npullthrough: ${message}\n`);
    };
    const connectTimer = setTimeout(() => refuse(504, `connect to ${name} timed out`), options.connectTimeoutMs);

    const established = (socket: net.Socket) => {
      clearTimeout(connectTimer);
      server = socket;
      status = 200;
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) socket.write(head);
      socket.setTimeout(options.idleTimeoutMs, () => {
        error = 'idle timeout';
        socket.destroy();
        client.destroy();
      });
      // pipe() ends each side when the other ends, so half-closes pass through as they would direct.
      client.pipe(socket);
      socket.pipe(client);
      socket.on('error', () => client.destroy());
      socket.once('close', () => {
        serverClosed = true;
        // Nothing can pass any more: flush what the server sent, then close the client's side too.
        client.end(() => client.destroy());
        finished();
      });
    };

    const tryAddress = (index: number, lastError: string) => {
      if (status !== 0 || clientClosed) return;
      const address = addresses[index];
      if (address === undefined) {
        clearTimeout(connectTimer);
        refuse(502, `cannot reach ${name}: ${lastError}`);
        return;
      }
      const socket = net.connect({ host: address, port: target.port });
      attempt = socket;
      socket.once('connect', () => {
        socket.removeAllListeners('error');
        if (status !== 0 || clientClosed) socket.destroy();
        else established(socket);
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        socket.destroy();
        const why = err.code ?? err.message;
        tryAddress(index + 1, addresses.length > 1 ? `${address}: ${why}` : why);
      });
    };

    client.on('error', () => server?.destroy());
    client.once('close', () => {
      clientClosed = true;
      attempt?.destroy();
      server?.destroy();
      finished();
    });
    tryAddress(0, 'no address');
  });
}
