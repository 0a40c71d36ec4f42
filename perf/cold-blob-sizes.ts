// Cold blobs one at a time, by size: how long one client waits for each blob that neither cache holds,
// through nginx configured as the seed and through pullthrough, side by side (issue 18). Where
// multi-layer gives one wall time per image, this says which sizes the time is lost on: a fixed cost
// per blob shows on the small ones, a slow fill path on the large ones.
//
//   node perf/cold-blob-sizes.ts [--sizes 64KiB,128KiB,256KiB,1MiB,4MiB,16MiB] [--repeat 4]
//
// The upstream is Docker-Hub-shaped (perf/lib/hub-origin.ts): the registry answers a blob with a 307 to
// the CDN host over TLS. One image per route and repetition, each with one layer of every size (random
// bytes, so no blob is in either cache). One client in this process, one keep-alive connection per
// route (through the proxy: one CONNECT tunnel, then TLS to the proxy's leaf), asks for the image's
// blobs one after the other, smallest first, with a token (through the proxy, one it got anonymously
// from the token service through the proxy, as skopeo does); the time is from sending the request to
// the last byte. Before the first repetition both routes fetch a warm-up image (connections
// open, code compiled, leaves minted, fill workers started). Repetitions alternate which route goes first.
// Every answer must be 200 with the blob's exact bytes.
// CPU per MiB: what the proxy process (by thread) and the seed's nginx spent over the repetitions, over
// the bytes served; the routes never run at once, so each server's CPU is its own route's.
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { join } from 'node:path';
import { mkdirSync, readFileSync } from 'node:fs';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../config/units.ts';
import { buildOciImage, type BuiltImage } from '../test/helpers/oci-image.ts';
import { createTestCa, writePem } from '../test/helpers/pki.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { HUB_SERVICE, HUB_TOKEN, startHubOrigin, type HubSite } from './lib/hub-origin.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { readCountersOf, readThreadCpu, threadCpuByName } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { startSeedNginx } from './lib/seed-nginx.ts';
import { describeSource, sourceLine } from './lib/source.ts';

const NAME = 'cold-blob-sizes';
const progress = progressTo(NAME);
type Route = 'seed' | 'proxy';

interface Options {
  sizes: number[];
  repeat: number;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      sizes: { type: 'string', default: '64KiB,128KiB,256KiB,1MiB,4MiB,16MiB' },
      repeat: { type: 'string', default: '4' },
      // Accepted for perf/run.ts, which passes its options to every benchmark.
      size: { type: 'string' },
      clients: { type: 'string' },
    },
  });
  const sizes = values.sizes.split(',').map((size) => parseSize(size));
  const repeat = Number(values.repeat);
  if (sizes.some((size) => !(size > 0))) throw new Error(`--sizes ${values.sizes}: sizes of at least 1 byte`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: a positive integer`);
  return { sizes: [...sizes].sort((a, b) => a - b), repeat };
}

/**
 * GETs over keep-alive connections: straight to the seed, or through the proxy's CONNECT tunnels (one
 * per host), as an HTTPS_PROXY client opens them. Through the proxy, the client first asks the token
 * service for an anonymous token, as skopeo and containerd do: the proxy sees it issued, so what it
 * reads is public and no read check goes upstream. A token it had not seen issued would cost an
 * anonymous HEAD upstream per blob, which the pulls this stands for never send.
 */
async function clientFor(route: Route, target: { seedAddress: string; hub: HubSite; proxy: ProxyProcess; hubCaPem: string }) {
  const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
  let connect: https.RequestOptions;
  if (route === 'seed') {
    const [host, port] = target.seedAddress.split(':') as [string, string];
    connect = { host, port: Number(port), ca: target.hubCaPem, headers: { host: target.seedAddress } };
  } else {
    const proxyCaPem = readFileSync(target.proxy.caFile, 'utf8');
    (agent as unknown as { createConnection: unknown }).createConnection = (options: { host: string; port: number }, done: (err: Error | null, socket?: tls.TLSSocket) => void) => {
      const hostPort = `${options.host}:${options.port}`;
      const request = http.request({ host: '127.0.0.1', port: target.proxy.port, method: 'CONNECT', path: hostPort, headers: { host: hostPort } });
      request.once('connect', (answer, socket) => {
        if (answer.statusCode !== 200) return done(new Error(`CONNECT ${hostPort}: ${answer.statusCode}`));
        done(null, tls.connect({ socket, servername: options.host, ca: proxyCaPem }));
      });
      request.once('error', done);
      request.end();
    };
    const hostPort = target.hub.registryHostPort;
    connect = { host: hostPort.split(':')[0]!, port: target.hub.registryPort, headers: { host: hostPort } };
  }
  const fetchBody = (options: https.RequestOptions) =>
    new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
      const request = https.request({ ...options, agent }, (answer) => {
        const chunks: Buffer[] = [];
        answer.on('data', (chunk: Buffer) => chunks.push(chunk));
        answer.once('error', reject);
        answer.once('end', () => resolve({ status: answer.statusCode ?? 0, body: Buffer.concat(chunks) }));
      });
      request.once('error', reject);
      request.end();
    });
  let token = HUB_TOKEN;
  if (route === 'proxy') {
    const auth = target.hub.authHostPort;
    const answer = await fetchBody({ host: auth.split(':')[0]!, port: Number(auth.split(':')[1]), path: `/token?service=${HUB_SERVICE}&scope=repository:bench/cold-0:pull`, headers: { host: auth } });
    if (answer.status !== 200) throw new Error(`the token service through the proxy answered ${answer.status}`);
    token = (JSON.parse(answer.body.toString('utf8')) as { token: string }).token;
  }
  const get = async (path: string, expected: Buffer) => {
    const started = performance.now();
    const { status, body } = await fetchBody({ ...connect, path, headers: { ...connect.headers, authorization: `Bearer ${token}` } });
    const elapsed = performance.now() - started;
    if (status !== 200 || !body.equals(expected)) throw new Error(`${route} ${path}: ${status}, ${body.length} bytes (expected 200 and ${expected.length} exact bytes)`);
    return elapsed;
  };
  return { get, close: () => agent.destroy() };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const dir = makeTempDir(NAME);
  const ca = createTestCa('pullthrough perf hub CA');
  const caFile = writePem(dir, 'hub-ca.pem', ca.certPem);
  const layoutDir = join(dir, 'layout');
  // Image 0 warms both routes up; then one image per route and repetition.
  const images: BuiltImage[] = [];
  for (let i = 0; i <= options.repeat * 2; i++) {
    images.push(await buildOciImage(layoutDir, { tag: `t${i}`, layers: options.sizes.map((size) => ({ randomBytes: size })), labels: { run: randomUUID() } }));
  }
  const origin = await startHubOrigin({ dir, ca, layoutDir, sites: [{ name: 'hub', images: images.map((image, i) => ({ repository: `bench/cold-${i}`, tag: 'v1', image })) }] });
  const hub = origin.sites[0]!;
  const seed = await startSeedNginx({ dir: join(dir, 'seed'), ca, caFile, site: hub });
  const policy = ['registries:', ...[hub.registryHostPort, hub.authHostPort].map((key) => `  ${JSON.stringify(key)}:\n    tls: { ca: ${JSON.stringify(caFile)} }`), 'hosts:', ...origin.hostNames.map((name) => `  ${name}: 127.0.0.1`), ''].join('\n');
  mkdirSync(join(dir, 'proxy'));
  const proxy = await startProxyProcess({ dir: join(dir, 'proxy'), policy });
  const target = { seedAddress: seed.address, hub, proxy, hubCaPem: ca.certPem };
  const clients = { seed: await clientFor('seed', target), proxy: await clientFor('proxy', target) };
  const blobsOf = (i: number) => images[i]!.layerDigests.map((digest) => ({ digest, bytes: readFileSync(join(layoutDir, 'blobs', 'sha256', digest.slice('sha256:'.length))) }));
  const pull = async (route: Route, i: number) => {
    const times: number[] = [];
    for (const blob of blobsOf(i)) times.push(await clients[route].get(`/v2/bench/cold-${i}/blobs/${blob.digest}`, blob.bytes));
    return times;
  };
  try {
    progress('warm-up: both routes fetch image 0');
    await pull('seed', 0);
    await pull('proxy', 0);
    const runs: Array<{ route: Route; repetition: number; ms: number[] }> = [];
    // The routes never run at once, so what each server spends from here on is its own route's work.
    const seedCpuBefore = readCountersOf(seed.pids()).cpuSeconds;
    const proxyCpuBefore = readThreadCpu(proxy.pid);
    for (let repetition = 1; repetition <= options.repeat; repetition++) {
      const order: Route[] = repetition % 2 === 1 ? ['seed', 'proxy'] : ['proxy', 'seed'];
      for (const [k, route] of order.entries()) {
        const ms = await pull(route, (repetition - 1) * 2 + k + 1);
        runs.push({ route, repetition, ms });
        progress(`${route} #${repetition}: ${ms.map((t) => fixed(t, 1)).join(' ')} ms`);
      }
    }
    const mib = (options.repeat * options.sizes.reduce((sum, size) => sum + size, 0)) / 1024 ** 2;
    const cpuMsPerMiB = {
      seed: ((readCountersOf(seed.pids()).cpuSeconds - seedCpuBefore) * 1000) / mib,
      proxy: Object.fromEntries(Object.entries(threadCpuByName(readThreadCpu(proxy.pid), proxyCpuBefore)).map(([name, seconds]) => [name, (seconds * 1000) / mib])),
    };
    const proxyCpuMsPerMiB = Object.values(cpuMsPerMiB.proxy).reduce((sum, ms) => sum + ms, 0);
    const medians = (route: Route) => options.sizes.map((_, j) => median(runs.filter((run) => run.route === route).map((run) => run.ms[j]!)));
    const seedMs = medians('seed');
    const proxyMs = medians('proxy');
    const environment = describeEnvironment(origin.nginx.version);
    const source = describeSource();
    const lines = [
      `${NAME}: one client, cold blobs one after the other (registry 307 → CDN over TLS), ms from request to last byte, medians of ${options.repeat}`,
      environmentLine(environment),
      sourceLine(source),
      '',
      formatTable(
        ['size', 'seed ms', 'proxy ms', 'proxy / seed', 'proxy − seed ms'],
        options.sizes.map((size, j) => [formatSize(size), fixed(seedMs[j], 1), fixed(proxyMs[j], 1), fixed(proxyMs[j]! / seedMs[j]!, 2), fixed(proxyMs[j]! - seedMs[j]!, 1)]),
      ),
      '',
      `CPU per MiB served cold: seed (nginx) ${fixed(cpuMsPerMiB.seed, 2)} ms, proxy ${fixed(proxyCpuMsPerMiB, 2)} ms (${Object.entries(cpuMsPerMiB.proxy).filter(([, ms]) => ms >= 0.005).sort((a, b) => b[1] - a[1]).map(([name, ms]) => `${name} ${fixed(ms, 2)}`).join(', ')})`,
      '',
    ];
    process.stdout.write(lines.join('\n') + '\n');
    process.stdout.write(JSON.stringify(roundNumbers({ benchmark: NAME, date: new Date().toISOString(), environment, source, options, sizes: options.sizes, medians: { seed: seedMs, proxy: proxyMs }, cpuMsPerMiB, runs })) + '\n');
  } finally {
    clients.seed.close();
    clients.proxy.close();
    await Promise.all([proxy.stop(), seed.stop(), origin.nginx.stop()]);
  }
}

await runBenchmark(main, progress);
