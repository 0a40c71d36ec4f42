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
  /** Everything it printed so far (stdout and stderr). */
  output(): string;
}

/** Resolves once it logs where it listens (and where its mirror listens, with `mirror`). */
export async function startChildProxy(configFile: string, options: { cwd?: string; mirror?: boolean } = {}): Promise<ChildProxy> {
  const child = spawnTracked(process.execPath, [CLI, 'start', '--config', configFile], { ...(options.cwd ? { cwd: options.cwd } : {}), env: { PATH: process.env.PATH }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk));
  const ports = await new Promise<[number, number | undefined]>((resolve, reject) => {
    child.stderr!.on('data', (chunk: Buffer) => {
      output += chunk;
      const proxyAt = /"message":"pullthrough is listening","listen":"[^"]*:(\d+)"/.exec(output);
      const mirrorAt = /"message":"the registry mirror is listening","listen":"[^"]*:(\d+)"/.exec(output);
      if (proxyAt && (!options.mirror || mirrorAt)) resolve([Number(proxyAt[1]), mirrorAt ? Number(mirrorAt[1]) : undefined]);
    });
    child.once('exit', (code, signal) => reject(new Error(`the proxy exited (${code ?? signal}): ${output}`)));
  });
  return { child, port: ports[0], ...(ports[1] !== undefined ? { mirrorPort: ports[1] } : {}), output: () => output };
}
