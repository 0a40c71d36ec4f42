// Pass-through: what the proxy costs when it forwards a large blob without caching it — client TLS
// terminated with a leaf from the proxy's CA, upstream over TLS with undici — side by side with the
// same clients fetching the same file from the origin directly.
//
//   node perf/passthrough.ts [--size 1GiB] [--repeat 3] [--clients 1,4] [--profile DIR]
//
// nginx serves a file of random bytes over TLS on loopback; the proxy runs as its own process with a
// policy that intercepts the origin; curl clients download the whole file, directly or through the
// proxy, 1 and 4 at once, interleaved (direct, proxy, direct, proxy, …) so that drift in the machine
// hits both sides alike. Figures are medians over the repetitions; see perf/README.md for each one.
//
// Since the blob cache, a blob is forwarded without caching only when the cache has no room: the
// policy asks for more free disk than any disk has (`cache.minFree`), so every download takes that
// path (X-Cache: BYPASS — checked on every one) instead of becoming a cache hit after the first.
import { runSideBySide } from './lib/side-by-side.ts';

await runSideBySide(
  {
    name: 'passthrough',
    repository: 'bench/passthrough',
    policyExtra: ['cache:', '  minFree: 1024TiB'],
    proxyCache: 'BYPASS',
  },
  process.argv.slice(2),
);
