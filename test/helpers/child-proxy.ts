// `pullthrough start --config <file>` as a child process, as users run it: for tests where a crash
// must be seen (in this process it would end the test runner) or a kill -9 must be survived.
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { spawnTracked } from './process.ts';

const CLI = path.join(import.meta.dirname, '../../src/cli.ts');

export interface ChildProxy {
  child: ChildProcess;
  port: number;
  /** The mirror front's port, when started with `mirror: true`. */
  mirrorPort?: number;
  /** The cluster peer port, when started with `peer: true`. */
  peerPort?: number;
  /** Everything it printed so far (stdout and stderr). */
  output(): string;
}

export interface ChildProxyOptions {
  cwd?: string;
  /** Wait for the registry mirror to listen too. */
  mirror?: boolean;
  /** Cluster mode: wait for the cluster peer port to listen too. */
  peer?: boolean;
  /** Added to the child's environment (which is otherwise PATH alone). */
  env?: Record<string, string>;
}

const LISTENING = {
  proxy: /"message":"pullthrough is listening","listen":"[^"]*:(\d+)"/,
  mirror: /"message":"the registry mirror is listening","listen":"[^"]*:(\d+)"/,
  peer: /"message":"the cluster peer port is listening","listen":"[^"]*:(\d+)"/,
};

/** Resolves once it logs where it listens (and where its mirror and peer port listen, when asked). */
export async function startChildProxy(configFile: string, options: ChildProxyOptions = {}): Promise<ChildProxy> {
  const child = spawnTracked(process.execPath, [CLI, 'start', '--config', configFile], {
    ...(options.cwd ? { cwd: options.cwd } : {}),
    env: { PATH: process.env.PATH, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk));
  let operator = '';
  let ready = false;
  const ports = await new Promise<{ proxy: number; mirror?: number; peer?: number }>((resolve, reject) => {
    child.stderr!.on('data', (chunk: Buffer) => {
      output += chunk;
      if (ready) return;
      operator += chunk;
      const found = Object.fromEntries(Object.entries(LISTENING).map(([what, pattern]) => [what, pattern.exec(operator)?.[1]])) as Record<keyof typeof LISTENING, string | undefined>;
      if (found.proxy === undefined || (options.mirror && found.mirror === undefined) || (options.peer && found.peer === undefined)) return;
      ready = true;
      resolve({ proxy: Number(found.proxy), ...(found.mirror ? { mirror: Number(found.mirror) } : {}), ...(found.peer ? { peer: Number(found.peer) } : {}) });
    });
    child.once('exit', (code, signal) => reject(new Error(`the proxy exited (${code ?? signal}): ${output}`)));
  });
  return {
    child,
    port: ports.proxy,
    ...(ports.mirror !== undefined ? { mirrorPort: ports.mirror } : {}),
    ...(ports.peer !== undefined ? { peerPort: ports.peer } : {}),
    output: () => output,
  };
}
