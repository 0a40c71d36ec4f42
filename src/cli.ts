#!/usr/bin/env node
// The pullthrough command: start | check-config | warm | stats | purge | ca.
import { Command } from 'commander';
import { describePolicy } from '../config/describe.ts';
import { ConfigError, loadPolicy } from '../config/load.ts';
import type { Policy } from '../config/policy.ts';
import { describeCa, rotateCa } from './commands/ca.ts';
import { warm } from './commands/warm.ts';
import { createLogger } from './log.ts';
import { startProxy, VERSION } from './server.ts';

const program = new Command('pullthrough')
  .description('A caching HTTPS proxy for container registries')
  .version(VERSION)
  .option('-c, --config <file>', 'the policy file (default: $PULLTHROUGH_CONFIG, else ./proxy.yaml, else built-in defaults)');

program
  .command('start', { isDefault: true })
  .description('start the proxy')
  .action(async () => {
    const policy = loadPolicyOrExit();
    const log = createLogger();
    let proxy: Awaited<ReturnType<typeof startProxy>>;
    try {
      proxy = await startProxy(policy, log);
    } catch (err) {
      log.error(`cannot start: ${(err as Error).message}`);
      process.exit(1);
    }
    const stop = (signal: string) => {
      log.info('stopping', { signal });
      const forced = setTimeout(() => process.exit(1), 10_000);
      forced.unref();
      void proxy.close().then(() => process.exit(0));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });

program
  .command('check-config')
  .description('validate the policy and print it as the proxy will apply it (secrets masked)')
  .action(() => {
    process.stdout.write(describePolicy(loadPolicyOrExit()));
  });

program
  .command('warm')
  .description('pre-fill the cache: pull images through the running proxy')
  .argument('<image...>', 'images, e.g. alpine:3.20 ghcr.io/org/app@sha256:…')
  .option('--platform <os/arch>', 'only this platform of a multi-platform image (default: all)')
  .option('--proxy <url>', 'the running proxy (default: $PULLTHROUGH_PROXY, else the listen address of the policy)')
  .action(async (images: string[], options: { platform?: string; proxy?: string }) => {
    const proxyUrl = proxyUrlFor(options.proxy);
    try {
      await warm(images, { proxyUrl, ...(options.platform ? { platform: options.platform } : {}), progress: process.stderr.isTTY, out: (line) => process.stdout.write(`${line}\n`) });
    } catch (err) {
      process.stderr.write(`pullthrough warm: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

const ca = program.command('ca').description('print the CA in use: subject, fingerprint, validity and PEM');
ca.action(() => {
  process.stdout.write(describeCa(loadPolicyOrExit().dataDir));
});
ca.command('rotate')
  .description('replace the CA with a new one (the old pair is kept beside it) and drop the old leaves')
  .action(async () => {
    process.stdout.write(await rotateCa(loadPolicyOrExit().dataDir));
  });

/** --proxy, else $PULLTHROUGH_PROXY, else the policy's listen address (0.0.0.0 reached as 127.0.0.1). */
function proxyUrlFor(option: string | undefined): string {
  const explicit = option ?? process.env.PULLTHROUGH_PROXY;
  if (explicit) return explicit.replace(/\/$/, '');
  const { host, port } = loadPolicyOrExit().listen;
  const reachable = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  return `http://${reachable.includes(':') ? `[${reachable}]` : reachable}:${port}`;
}

function loadPolicyOrExit(): Policy {
  try {
    return loadPolicy({ configPath: program.opts<{ config?: string }>().config });
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`pullthrough: invalid configuration: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}

await program.parseAsync();
