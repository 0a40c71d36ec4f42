// A delay line: TCP on 127.0.0.1:<port> relayed to <bindAddress>:<port>, every chunk held back `oneWayMs`
// in each direction, so that an origin on loopback answers like one a round trip of 2 × oneWayMs away
// (a registry and its CDN across the internet, not in the same rack). The kernel's netem would do it
// without a process, but this machine's kernel has none.
//
// It runs in a child process of its own (its CPU is not the benchmark's), and relays the bytes as they
// are (TLS passes through untouched). Bandwidth is not limited: only latency is added.
import { fork, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { addCleanup } from './cleanup.ts';

export interface DelayLine {
  stop(): Promise<void>;
}

/** Relays 127.0.0.1:<port> to `target`:<port> for each port, adding `oneWayMs` each way. */
export async function startDelayLine(ports: readonly number[], target: string, oneWayMs: number): Promise<DelayLine> {
  const child: ChildProcess = fork(fileURLToPath(import.meta.url), ['relay', target, String(oneWayMs), ...ports.map(String)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const removeCleanup = addCleanup(() => child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.once('message', () => resolve());
    child.once('exit', (code) => reject(new Error(`the delay line exited (${code}) before it listened`)));
  });
  return {
    stop: async () => {
      removeCleanup();
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

if (process.argv[2] === 'relay') {
  const [target, delayText, ...portTexts] = process.argv.slice(3) as [string, string, ...string[]];
  const oneWayMs = Number(delayText);
  const listening = portTexts.map(Number).map(
    (port) =>
      new Promise<void>((resolve, reject) => {
        const server = net.createServer((client) => {
          const upstream = net.connect({ host: target, port });
          relay(client, upstream, oneWayMs);
          relay(upstream, client, oneWayMs);
        });
        server.once('error', reject);
        server.listen(port, '127.0.0.1', resolve);
      }),
  );
  Promise.all(listening).then(
    () => process.send!('listening'),
    (err: Error) => {
      process.stderr.write(`delay line: ${err.message}\n`);
      process.exit(1);
    },
  );
  process.once('SIGTERM', () => process.exit(0));
}

/** `from`'s bytes and end reach `to` `ms` later, in order (timers of one duration fire in the order set). */
function relay(from: net.Socket, to: net.Socket, ms: number): void {
  from.on('data', (chunk: Buffer) => setTimeout(() => to.write(chunk), ms));
  from.once('end', () => setTimeout(() => to.end(), ms));
  from.once('error', () => setTimeout(() => to.destroy(), ms));
}
