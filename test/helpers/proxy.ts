// Starts a real pullthrough in this process on a loopback port, with its policy written as YAML into a
// temporary directory (so the same loader users run is exercised), and captures its log lines.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadPolicy } from '../../config/load.ts';
import type { AccessEntry } from '../../src/log.ts';
import { startProxy, type RunningProxy } from '../../src/server.ts';

export interface TestProxy {
  proxy: RunningProxy;
  port: number;
  /** http://127.0.0.1:<port>, for HTTPS_PROXY. */
  url: string;
  /** The proxy's CA certificate file (PEM), for SSL_CERT_FILE. */
  caFile: string;
  caPem: string;
  dir: string;
  /** The proxy's data directory: `dir`/data unless startTestProxy was given one. */
  dataDir: string;
  access: AccessEntry[];
  /** Every line the proxy logged (access and operator), raw, for secret greps. */
  lines: string[];
  close(): Promise<void>;
}

/**
 * `yaml` is the policy body without `listen`/`dataDir` (both are set here). `dataDir` places the data
 * elsewhere than `dir`/data (a small tmpfs, say); the caller owns it and close() leaves it.
 *
 * Tracing in process: set the OTEL_* variables in process.env (the pool's workers read them when they
 * start, here) and `await startTracing()` from src/tracing.ts before this; call the shutdown it returns
 * after close(). The SDK registers itself for the whole test process, so such a test is best alone in
 * its file; test/tracing.test.ts runs `pullthrough start` as a child instead, as operators do.
 */
export async function startTestProxy(yaml = '', env: NodeJS.ProcessEnv = {}, dataDir?: string): Promise<TestProxy> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-test-'));
  const configFile = path.join(dir, 'proxy.yaml');
  writeFileSync(configFile, `listen: 127.0.0.1:0\ndataDir: ${JSON.stringify(dataDir ?? './data')}\n${yaml}`);
  const policy = loadPolicy({ configPath: configFile, env: { ...env } });
  const access: AccessEntry[] = [];
  const lines: string[] = [];
  const record = (line: string) => {
    lines.push(line);
    if (process.env.PULLTHROUGH_TEST_VERBOSE) process.stderr.write(line + '\n');
  };
  const log = {
    access: (entry: AccessEntry) => {
      access.push(entry);
      record(JSON.stringify(entry));
    },
    info: (message: string, fields?: Record<string, unknown>) => record(JSON.stringify({ level: 'info', message, ...fields })),
    warn: (message: string, fields?: Record<string, unknown>) => record(JSON.stringify({ level: 'warn', message, ...fields })),
    error: (message: string, fields?: Record<string, unknown>) => record(JSON.stringify({ level: 'error', message, ...fields })),
  };
  const proxy = await startProxy(policy, log);
  const caFile = path.join(policy.caDir, 'ca.crt');
  return {
    proxy,
    port: proxy.port,
    url: `http://127.0.0.1:${proxy.port}`,
    caFile,
    caPem: proxy.ca.certPem,
    dir,
    dataDir: policy.dataDir,
    access,
    lines,
    async close() {
      await proxy.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
