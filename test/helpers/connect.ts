// A raw CONNECT through the proxy, as any HTTPS_PROXY client does it, for tests that look at the
// tunnel or the intercepted TLS session themselves.
import net from 'node:net';
import tls from 'node:tls';

export interface ConnectReply {
  status: number;
  head: string;
  socket: net.Socket;
}

/** Sends CONNECT target and resolves with the proxy's status line once its reply head is complete. */
export function sendConnect(proxyPort: number, target: string, extraHeaders = ''): Promise<ConnectReply> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(proxyPort, '127.0.0.1');
    let buffered = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      const end = buffered.indexOf('\r\n\r\n');
      if (end < 0) return;
      socket.off('data', onData);
      const head = buffered.subarray(0, end).toString('latin1');
      const rest = buffered.subarray(end + 4);
      if (rest.length > 0) socket.unshift(rest);
      resolve({ status: Number(head.split(' ')[1]), head, socket });
    };
    socket.on('data', onData);
    socket.once('error', reject);
    socket.once('connect', () => socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${extraHeaders}\r\n`));
  });
}

/** CONNECT, then TLS inside the tunnel trusting only `caPem`; resolves once the handshake is done. */
export async function tlsThroughProxy(proxyPort: number, host: string, port: number, caPem: string): Promise<tls.TLSSocket> {
  const reply = await sendConnect(proxyPort, `${host}:${port}`);
  if (reply.status !== 200) throw new Error(`CONNECT answered ${reply.head}`);
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ socket: reply.socket, servername: net.isIP(host) ? undefined : host, ca: caPem }, () => resolve(secure));
    secure.once('error', reject);
  });
}

/** One HTTP/1.1 request on an established TLS socket; returns status, headers and body. */
export function httpOverSocket(
  socket: tls.TLSSocket,
  method: string,
  path: string,
  host: string,
  headers: Record<string, string> = {},
  body?: Buffer,
): Promise<{ status: number; headers: Record<string, string>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.once('error', reject);
    socket.once('end', () => {
      const all = Buffer.concat(chunks);
      const end = all.indexOf('\r\n\r\n');
      const head = all.subarray(0, end).toString('latin1').split('\r\n');
      const parsed: Record<string, string> = {};
      for (const line of head.slice(1)) {
        const colon = line.indexOf(':');
        parsed[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
      }
      resolve({ status: Number(head[0]!.split(' ')[1]), headers: parsed, body: all.subarray(end + 4) });
    });
    const all = { Host: host, Connection: 'close', ...(body ? { 'Content-Length': String(body.length) } : {}), ...headers };
    const lines = Object.entries(all).map(([k, v]) => `${k}: ${v}\r\n`);
    socket.write(`${method} ${path} HTTP/1.1\r\n${lines.join('')}\r\n`);
    if (body) socket.write(body);
  });
}
