#!/usr/bin/env node
// The pullthrough command: start | check-config (warm, stats, purge and ca come with their issues).
import { Command } from 'commander';
import { describePolicy } from '../config/describe.ts';
import { ConfigError, loadPolicy } from '../config/load.ts';
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

function loadPolicyOrExit() {
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
