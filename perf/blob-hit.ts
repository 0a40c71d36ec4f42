// Cache hits: what the proxy costs when it serves a blob from its cache — client TLS terminated with a
// leaf from the proxy's CA, the bytes read from the cached file on the primary thread — side by side
// with the same clients fetching the same file from nginx over TLS directly.
//
//   node perf/blob-hit.ts [--size 1GiB] [--repeat 3] [--clients 1,4] [--profile DIR]
//
// Before anything is measured, one download through the proxy fills the cache (X-Cache: MISS; its
// figures are printed as "fill"), and HEAD requests wait until the blob is committed. Every measured
// proxied download must then answer X-Cache: HIT, and nginx's access log must show no GET for the
// blob during the proxy's runs. Then the same interleaved runs and ratios as passthrough; see
// perf/README.md. Goal: throughput proxy / direct ≥ 1.0.
import { runClients, waitForCacheHit } from './lib/curl.ts';
import { GIB, MIB, processFigures, proxyFigures, snapshotProxy } from './lib/measure.ts';
import { originRequestsSince } from './lib/origin.ts';
import { readCountersOf, subtractCounters } from './lib/procfs.ts';
import { fixed, median } from './lib/report.ts';
import { runSideBySide } from './lib/side-by-side.ts';

await runSideBySide(
  {
    name: 'blob-hit',
    repository: 'bench/blob-hit',
    proxyCache: 'HIT',
    countOriginRequests: true,
    async prepare(bench, progress) {
      const { origin, blob, proxy } = bench;
      const logMark = origin.nginx.accessLog!.mark();
      const nginxBefore = readCountersOf(origin.nginx.pids());
      const proxyBefore = snapshotProxy(proxy.pid);
      const fill = await runClients(1, bench.routes.proxy, { expectBytes: blob.size, expectCache: ['MISS'] });
      const proxySpent = proxyFigures(proxy.pid, proxyBefore, blob.size, fill.wallSeconds);
      const nginxSpent = processFigures(subtractCounters(readCountersOf(origin.nginx.pids()), nginxBefore), blob.size, fill.wallSeconds);
      // The fill commits (fsync, rename, index) after its clients got their last byte.
      const commitSeconds = await waitForCacheHit(bench.routes.proxy);
      const upstream = originRequestsSince(origin, blob, logMark);
      if (upstream.get !== 1) throw new Error(`the fill sent ${upstream.get} GETs for the blob to the origin, expected 1`);
      const figures = {
        wallSeconds: fill.wallSeconds,
        mibPerSecond: blob.size / MIB / fill.wallSeconds,
        firstByteMs: median(fill.clients.map((c) => c.firstByteSeconds * 1000)),
        commitSeconds,
        originGets: upstream.get,
        proxyCpuSecondsPerGiB: proxySpent.cpuSecondsPerGiB,
        proxyMainThreadCpuSecondsPerGiB: proxySpent.mainThreadCpuSecondsPerGiB,
        proxyThreads: proxySpent.threads,
        nginxCpuSecondsPerGiB: nginxSpent.cpuSecondsPerGiB,
      };
      progress(`filled the cache: ${fixed(figures.mibPerSecond, 0)} MiB/s, committed ${fixed(commitSeconds, 2)} s after the client finished`);
      return {
        lines: [
          `fill (one MISS, before the runs): ${fixed(figures.wallSeconds, 2)} s, ${fixed(figures.mibPerSecond, 0)} MiB/s, TTFB ${fixed(figures.firstByteMs, 1)} ms, ` +
            `proxy ${fixed(figures.proxyCpuSecondsPerGiB, 2)} CPU-s/GiB (main thread ${fixed(figures.proxyMainThreadCpuSecondsPerGiB, 2)}), ` +
            `${upstream.get} GET at the origin; a HIT ${fixed(commitSeconds, 2)} s after the client finished`,
        ],
        figures: { ...figures, bytes: blob.size, gib: blob.size / GIB },
      };
    },
  },
  process.argv.slice(2),
);
