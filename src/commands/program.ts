// The pullthrough command: start | check-config | warm | stats | purge | ca. Each command imports what
// it needs when it runs, so that `check-config` or `--version` do not load the proxy's whole graph.
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { describePolicy } from '../../config/describe.ts';
import { ConfigError, loadPolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import { parsePlatform } from '../../config/warm.ts';
import { parseDigest } from '../registry/route.ts';

const VERSION = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

/**
 * On SIGTERM the requests in flight get this long to finish (a layer half sent when a rolling restart
 * stops a replica would make its client start over); the process exits by itself after 10 s at most,
 * within Kubernetes' default grace of 30 s (15 s in deploy/kubernetes).
 */
const DRAIN_GRACE_MS = 8_000;

const program = new Command('pullthrough')
  .description('A caching HTTPS proxy for container registries')
  .version(VERSION)
  .option('-c, --config <file>', 'the policy file (default: $PULLTHROUGH_CONFIG, else ./proxy.yaml, else built-in defaults)')
  // A command called the wrong way (unknown option, missing argument) exits with 2, like an invalid policy.
  .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 2));

program
  .command('start', { isDefault: true })
  .description('start the proxy')
  .action(async () => {
    const policy = loadPolicyOrExit();
    const [{ createLogger }, { startProxy }, { startTracing, tracingEnabled }] = await Promise.all([import('../log.ts'), import('../server.ts'), import('../tracing.ts')]);
    const log = createLogger();
    // OpenTelemetry traces, when OTEL_TRACES_EXPORTER or an OTLP endpoint says so (else nothing is loaded).
    let stopTracing = async () => {};
    if (tracingEnabled()) {
      try {
        stopTracing = await startTracing();
        const env = process.env;
        log.info('tracing: spans are exported', { exporter: env.OTEL_TRACES_EXPORTER ?? 'otlp', protocol: env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? env.OTEL_EXPORTER_OTLP_PROTOCOL ?? 'http/protobuf' });
      } catch (err) {
        log.warn('tracing could not start; running without it', { error: (err as Error).message });
      }
    }
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
      // The last spans are exported before the exit, but a collector that does not answer cannot hold it.
      const flushed = () => Promise.race([stopTracing().catch(() => {}), new Promise((resolve) => setTimeout(resolve, 3_000).unref())]);
      void proxy
        .drain(DRAIN_GRACE_MS)
        .then(({ finished, cut }) => {
          if (!finished) log.warn('stopping with requests still in flight; they are cut', { requests: cut });
        })
        .then(() => proxy.close())
        .then(flushed)
        .then(() => process.exit(0), () => process.exit(1));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });

program
  .command('check-config')
  .description('validate the policy and print it as the proxy will apply it (secrets masked); the output is itself a proxy.yaml')
  .action(() => {
    process.stdout.write(describePolicy(loadPolicyOrExit()));
  });

program
  .command('warm')
  .description('pre-fill the cache: pull images through the running proxy')
  .argument('<image...>', 'images, e.g. alpine:3.20 ghcr.io/org/app@sha256:…')
  .option('--platform <os/arch,…>', 'only these platforms of a multi-platform image, comma-separated or the option repeated (default: all)', (value: string, previous: string[]) => [...previous, ...value.split(',').map((p) => p.trim()).filter(Boolean)], [] as string[])
  .option('--proxy <url>', 'the running proxy (default: $PULLTHROUGH_PROXY, else the listen address of the policy)')
  .action(async (images: string[], options: { platform: string[]; proxy?: string }) => {
    let platforms: string[];
    try {
      platforms = [...new Set(options.platform.map(parsePlatform))];
    } catch (err) {
      usageError('warm', `--platform: ${(err as Error).message}`);
    }
    const proxyUrl = proxyUrlFor(options.proxy);
    const { warm } = await import('./warm.ts');
    try {
      await warm(images, { proxyUrl, platforms, progress: process.stderr.isTTY, out: (line) => process.stdout.write(`${line}\n`) });
    } catch (err) {
      process.stderr.write(`pullthrough warm: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

program
  .command('stats')
  .description('what the dashboard shows: hit ratio, bytes saved, rate limits, recent pulls, largest images')
  .option('--proxy <url>', 'the running proxy (default: $PULLTHROUGH_PROXY, else the listen address of the policy)')
  .option('--json', 'the raw figures')
  .action(async (options: { proxy?: string; json?: boolean }) => {
    const { fetchStats, formatStats } = await import('./stats.ts');
    try {
      const data = await fetchStats(proxyUrlFor(options.proxy));
      process.stdout.write(options.json ? `${JSON.stringify(data, null, 2)}\n` : formatStats(data));
    } catch (err) {
      process.stderr.write(`pullthrough stats: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

program
  .command('purge')
  .description('drop cached blobs and manifests (waits for clients reading them); sends the admin token when one is configured, else works on the proxy host only')
  .option('--registry <host[:port]>', 'everything from this registry')
  .option('--repository <name>', 'everything of this repository (with --registry)')
  .option('--digest <digest>', 'this blob (sha256:<64 hex digits>)')
  .option('--proxy <url>', 'the running proxy (default: $PULLTHROUGH_PROXY, else the listen address of the policy)')
  .action(async (options: { registry?: string; repository?: string; digest?: string; proxy?: string }) => {
    const { proxy, ...what } = options;
    if (what.digest !== undefined && !parseDigest(what.digest)) {
      usageError('purge', `--digest "${what.digest}" is not a digest: expected sha256: and 64 lower-case hex digits (or sha512: and 128), as "docker images --digests" shows them`);
    }
    if (what.repository !== undefined && what.registry === undefined) usageError('purge', '--repository needs --registry (the registry the repository belongs to)');
    if (what.registry === undefined && what.digest === undefined) usageError('purge', 'name what to purge: --registry [--repository], or --digest');
    const proxyUrl = proxyUrlFor(proxy);
    const { adminTokenFor, formatPurge, purgeThroughProxy } = await import('./purge.ts');
    let token: string | undefined;
    try {
      token = adminTokenFor(process.env, loadPolicyOrExit);
    } catch (err) {
      usageError('purge', (err as Error).message);
    }
    try {
      process.stdout.write(formatPurge(await purgeThroughProxy(proxyUrl, what, token)));
    } catch (err) {
      process.stderr.write(`pullthrough purge: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

const ca = program.command('ca').description('print the CA in use: subject, fingerprint, validity and PEM');
ca.action(async () => {
  const { describeCa } = await import('./ca.ts');
  process.stdout.write(describeCa(loadPolicyOrExit().caDir));
});
ca.command('rotate')
  .description('replace the CA with a new one (the old pair is kept beside it) and drop the old leaves')
  .action(async () => {
    const policy = loadPolicyOrExit();
    const { rotateCa } = await import('./ca.ts');
    try {
      process.stdout.write(await rotateCa(policy.caDir, policy.dataDir));
    } catch (err) {
      process.stderr.write(`pullthrough ca rotate: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

/** A mistake in how the command was called: exit code 2, like an invalid policy. */
function usageError(command: string, message: string): never {
  process.stderr.write(`pullthrough ${command}: ${message}\n`);
  process.exit(2);
}

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
