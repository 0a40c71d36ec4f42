// Ports for servers a test starts and must know before they listen (a proxy port that stays the same
// across restarts, a port written into a configuration file).
import net from 'node:net';

/** A port that was free a moment ago on 127.0.0.1 (another process may take it before it is bound). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
