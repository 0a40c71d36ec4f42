// The setup of the blob-cache tests: a fake registry "registry.test" and a fake CDN "cdn.test" (one
// test CA, both mapped to 127.0.0.1 by `hosts:`), and a real proxy in this process in front of them.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fetchThroughProxy, type Fetched, type FetchOptions, type Target } from './blob-client.ts';
import { waitFor } from './cache-files.ts';
import { startFakeRegistry, writeCaFile, type FakeRegistry } from './fake-registry.ts';
import { createTestCa } from './pki.ts';
import { startTestProxy, type TestProxy } from './proxy.ts';

export const MiB = 1024 * 1024;

export interface CacheRig {
  registry: FakeRegistry;
  cdn: FakeRegistry;
  proxy: TestProxy;
  /** The proxy's data directory. */
  dataDir: string;
  /** GET (or options.method) /v2/lib/app/blobs/<digest> on registry.test through the proxy. */
  blob(digest: string, options?: FetchOptions): Promise<Fetched>;
  /** Where blob() connects: for connectThroughProxy. */
  target: Target;
  /** Waits until a HEAD of the blob is answered from the cache (its index entry is committed). */
  waitForHit(digest: string): Promise<void>;
  close(): Promise<void>;
}

export interface RigOptions {
  /** YAML for the top-level `cache:` key, e.g. "{ maxSize: 48MiB, minFree: 0 }". */
  cache?: string;
  /** An explicit data directory (a small tmpfs). */
  dataDir?: string;
  /** YAML for registry.test's `timeouts:` key; default "{ headers: 3s, idle: 3s }". */
  timeouts?: string;
}

export async function startCacheRig(options: RigOptions = {}): Promise<CacheRig> {
  const ca = createTestCa('pullthrough cache tests CA');
  const registry = await startFakeRegistry('registry.test', ca);
  const cdn = await startFakeRegistry('cdn.test', ca);
  const caDir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cache-ca-'));
  const caFile = writeCaFile(caDir, ca);
  const proxy = await startTestProxy(
    `${options.cache ? `cache: ${options.cache}\n` : ''}registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
    timeouts: ${options.timeouts ?? '{ headers: 3s, idle: 3s }'}
hosts:
  registry.test: 127.0.0.1
  cdn.test: 127.0.0.1
`,
    {},
    options.dataDir,
  );
  const target = { proxyPort: proxy.port, caPem: proxy.caPem, host: registry.host, port: registry.port };
  const blob = (digest: string, fetchOptions: FetchOptions = {}) => fetchThroughProxy(target, `/v2/lib/app/blobs/${digest}`, fetchOptions);
  return {
    registry,
    cdn,
    proxy,
    dataDir: proxy.dataDir,
    target,
    blob,
    async waitForHit(digest) {
      // The file is renamed into place a moment before the index entry is committed; until then a
      // HEAD is answered by upstream. Those HEADs are no GETs, and tests count GETs.
      let cache: unknown;
      await waitFor(`${digest} to be answered from the cache`, () => cache === 'HIT', 10_000, async () => {
        cache = (await blob(digest, { method: 'HEAD' })).headers['x-cache'];
      });
    },
    async close() {
      await proxy.close();
      await Promise.all([registry.close(), cdn.close()]);
      rmSync(caDir, { recursive: true, force: true });
    },
  };
}
