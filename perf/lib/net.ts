// Loopback ports and readiness probes for the servers a benchmark starts.
import http from 'node:http';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

// The tests' (another process may take the port before the server binds it: callers retry on a failed start).
export { freePort } from '../../test/helpers/ports.ts';

/** True when `probe` succeeds within timeoutMs; probes every 50 ms until then, or until `gaveUp()` says stop. */
export async function waitFor(probe: () => Promise<boolean>, timeoutMs: number, gaveUp: () => boolean = () => false): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline && !gaveUp()) {
    if (await probe()) return true;
    await sleep(50);
  }
  return false;
}

/** True when a TCP connection to <address>:port (default 127.0.0.1) is accepted. */
export function acceptsConnections(port: number, address = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, address);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** True when GET http://127.0.0.1:port<path> answers 200. */
export function answers200(port: number, path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path, timeout: 1000, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.once('timeout', () => req.destroy());
    req.once('error', () => resolve(false));
  });
}
