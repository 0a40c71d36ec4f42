// New clients at once: every intercepted connection costs the proxy a full TLS handshake on its primary
// thread, whose one expensive step is the server's signature — RSA-2048 or ECDSA P-256, whichever leaf
// the handshake picked (src/ca.ts offers both). N clients open a connection each at the same moment
// (CONNECT, TLS, GET of a cached blob) and the time to the first byte of each answer is measured; the
// same N clients with the RSA leaf and with the ECDSA one, interleaved.
//
//   node perf/client-handshake.ts [--clients 8,32] [--repeat 20] [--leaves rsa,ecdsa] [--commit REV | --cli PATH] [--profile DIR]
//
// The clients run in this process (Node's TLS, like undici's): each offers only the signature algorithms
// of its leaf type (`sigalgs`), so the server's choice is forced without changing the server. A build
// from before the ECDSA leaves (--commit) has only RSA: measure it with --leaves rsa.
//
// Setup: nginx over TLS as the origin with one small blob (perf/lib/origin.ts), the proxy, the blob
// fetched once (MISS) and awaited as a HIT, and one warm-up burst per leaf type (not measured). Every
// answer must be a 200 with X-Cache: HIT and the blob's exact size.
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { proxiedRoute, runClients, waitForCacheHit } from './lib/curl.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { ORIGIN_HOST, registryPolicy, startOrigin } from './lib/origin.ts';
import { readMainThreadCpu, readCounters, readMachineBusySeconds } from './lib/procfs.ts';
import { startProxyProcess, type ProxyProcess } from './lib/proxy.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';
import { buildCommit, describeCli, describeSource, sourceLine, type SourceState } from './lib/source.ts';

const NAME = 'client-handshake';
const BLOB_SIZE = 4096;
const progress = progressTo(NAME);

type Leaf = 'rsa' | 'ecdsa';
/** What each client offers: one leaf type's signature algorithms only. */
const SIGALGS: Record<Leaf, string> = {
  rsa: 'rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pkcs1_sha256',
  ecdsa: 'ecdsa_secp256r1_sha256',
};

interface Options {
  clients: number[];
  repeat: number;
  leaves: Leaf[];
  commit?: string;
  cli?: string;
  profile?: string;
}

interface Burst {
  leaf: Leaf;
  clients: number;
  repetition: number;
  /** Per client, from the common start: TLS done, first byte of the answer (ms). */
  handshakeMs: number[];
  firstByteMs: number[];
  wallMs: number;
  /** The proxy's CPU (all threads, and its main thread alone) during the burst. */
  proxyCpuMs: number;
  proxyMainThreadCpuMs: number;
  /** This process (the clients' side of the handshakes). */
  clientCpuMs: number;
  machineCores: number;
  /** What the server signed with, as each client saw it. */
  keyTypes: string[];
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      clients: { type: 'string', default: '8,32' },
      repeat: { type: 'string', default: '20' },
      leaves: { type: 'string', default: 'rsa,ecdsa' },
      commit: { type: 'string' },
      cli: { type: 'string' },
      profile: { type: 'string' },
      size: { type: 'string' }, // passed by perf/run.ts to every benchmark; the blob is 4 KiB here
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`usage: node perf/${NAME}.ts [--clients 8,32] [--repeat 20] [--leaves rsa,ecdsa] [--commit REV | --cli PATH] [--profile DIR]\n`);
    process.exit(0);
  }
  const clients = values.clients.split(',').map(Number);
  const leaves = values.leaves.split(',') as Leaf[];
  const repeat = Number(values.repeat);
  if (clients.some((n) => !Number.isInteger(n) || n < 1 || n > 256)) throw new Error(`--clients ${values.clients}: counts of 1–256`);
  if (leaves.some((l) => l !== 'rsa' && l !== 'ecdsa')) throw new Error(`--leaves ${values.leaves}: rsa and/or ecdsa`);
  if (!Number.isInteger(repeat) || repeat < 1) throw new Error(`--repeat ${values.repeat}: a positive integer`);
  return { clients, leaves, repeat, ...(values.commit ? { commit: values.commit } : {}), ...(values.cli ? { cli: values.cli } : {}), ...(values.profile ? { profile: values.profile } : {}) };
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const dir = makeTempDir(NAME);
  const built = options.commit ? buildCommit(options.commit, `${dir}/build`) : undefined;
  const source: SourceState = built?.source ?? (options.cli ? describeCli(options.cli) : describeSource());
  const origin = await startOrigin({ dir, blobs: [{ repository: 'bench/handshake', size: BLOB_SIZE }] });
  const blob = origin.blobs[0]!;
  const proxy = await startProxyProcess({
    dir,
    policy: registryPolicy(origin),
    ...(built ? { cli: built.cli } : options.cli ? { cli: options.cli } : {}),
    ...(options.profile ? { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${options.profile}`] } : {}),
  });
  const environment = describeEnvironment(origin.nginx.version);
  try {
    const route = proxiedRoute({ host: ORIGIN_HOST, port: origin.nginx.port, path: blob.urlPath, proxyUrl: proxy.url, proxyCaFile: proxy.caFile });
    await runClients(1, route, { expectBytes: blob.size, expectCache: ['MISS'] });
    await waitForCacheHit(route);
    const target = { host: ORIGIN_HOST, port: origin.nginx.port, path: blob.urlPath, size: blob.size, caPem: readFileSync(proxy.caFile, 'utf8') };
    for (const leaf of options.leaves) await burst(proxy, target, leaf, Math.max(...options.clients), 0); // warm-up
    const bursts: Burst[] = [];
    for (let repetition = 1; repetition <= options.repeat; repetition++) {
      for (const clients of options.clients) {
        for (const leaf of options.leaves) {
          const b = await burst(proxy, target, leaf, clients, repetition);
          bursts.push(b);
          progress(`${leaf}-${clients} #${repetition}: first byte median ${fixed(median(b.firstByteMs), 1)} ms, max ${fixed(Math.max(...b.firstByteMs), 1)} ms; proxy main thread ${fixed(b.proxyMainThreadCpuMs, 0)} ms CPU`);
        }
      }
    }
    report(options, bursts, environment, source);
  } finally {
    await proxy.stop();
    await origin.nginx.stop();
  }
}

interface Target {
  host: string;
  port: number;
  path: string;
  size: number;
  caPem: string;
}

/** `count` clients at once, each on a new connection: CONNECT, TLS offering `leaf`'s signatures only, GET. */
async function burst(proxy: ProxyProcess, target: Target, leaf: Leaf, count: number, repetition: number): Promise<Burst> {
  // One context per leaf type for all the clients: as cheap as a client's side of a handshake gets here.
  const secureContext = (contexts[leaf] ??= tls.createSecureContext({ ca: target.caPem, sigalgs: SIGALGS[leaf] }));
  const cpuBefore = readCounters(proxy.pid).cpuSeconds;
  const mainBefore = readMainThreadCpu(proxy.pid);
  const machineBefore = readMachineBusySeconds();
  const clientBefore = process.cpuUsage();
  const start = performance.now();
  const results = await Promise.all(Array.from({ length: count }, () => oneClient(proxy.port, target, leaf, secureContext, start)));
  const wallMs = performance.now() - start;
  const clientCpu = process.cpuUsage(clientBefore);
  return {
    leaf,
    clients: count,
    repetition,
    handshakeMs: results.map((r) => r.handshakeMs),
    firstByteMs: results.map((r) => r.firstByteMs),
    wallMs,
    proxyCpuMs: (readCounters(proxy.pid).cpuSeconds - cpuBefore) * 1000,
    proxyMainThreadCpuMs: (readMainThreadCpu(proxy.pid) - mainBefore) * 1000,
    clientCpuMs: (clientCpu.user + clientCpu.system) / 1000,
    machineCores: (readMachineBusySeconds() - machineBefore) / (wallMs / 1000),
    keyTypes: [...new Set(results.map((r) => r.keyType))],
  };
}

const contexts: Partial<Record<Leaf, tls.SecureContext>> = {};

function oneClient(proxyPort: number, target: Target, leaf: Leaf, secureContext: tls.SecureContext, start: number): Promise<{ handshakeMs: number; firstByteMs: number; keyType: string }> {
  return new Promise((resolve, reject) => {
    const fail = (err: Error) => reject(new Error(`${leaf} client: ${err.message}`));
    const raw = net.connect(proxyPort, '127.0.0.1');
    raw.setNoDelay(true);
    raw.once('error', fail);
    raw.once('connect', () => raw.write(`CONNECT ${target.host}:${target.port} HTTP/1.1\r\nHost: ${target.host}:${target.port}\r\n\r\n`));
    raw.once('data', (chunk: Buffer) => {
      const head = chunk.toString('latin1');
      if (!/^HTTP\/1\.[01] 200/.test(head) || !head.endsWith('\r\n\r\n')) return fail(new Error(`CONNECT answered ${JSON.stringify(head.split('\r\n')[0])}`));
      const socket = tls.connect({ socket: raw, servername: target.host, secureContext, ALPNProtocols: ['http/1.1'] });
      socket.once('error', fail);
      socket.once('secureConnect', () => {
        const handshakeMs = performance.now() - start;
        const keyType = socket.getPeerX509Certificate()?.publicKey.asymmetricKeyType ?? '?';
        socket.write(`GET ${target.path} HTTP/1.1\r\nHost: ${target.host}:${target.port}\r\nConnection: close\r\n\r\n`);
        let firstByteMs: number | undefined;
        let response = '';
        socket.on('data', (data: Buffer) => {
          firstByteMs ??= performance.now() - start;
          if (response.length < 4096) response += data.toString('latin1');
        });
        socket.once('end', () => {
          socket.destroy();
          if (!/^HTTP\/1\.1 200/.test(response) || !/\r\nx-cache: HIT\r\n/i.test(response) || !new RegExp(`\\r\\ncontent-length: ${target.size}\\r\\n`, 'i').test(response)) {
            return fail(new Error(`not a 200 HIT of ${target.size} bytes: ${JSON.stringify(response.split('\r\n\r\n')[0])}`));
          }
          resolve({ handshakeMs, firstByteMs: firstByteMs!, keyType });
        });
      });
    });
  });
}

function report(options: Options, bursts: readonly Burst[], environment: Record<string, string | number>, source: SourceState): void {
  const rows: string[][] = [];
  const summaries: Array<Record<string, unknown>> = [];
  for (const clients of options.clients) {
    for (const leaf of options.leaves) {
      const of = bursts.filter((b) => b.clients === clients && b.leaf === leaf);
      const summary = {
        scenario: `${leaf}-${clients}`,
        leaf,
        clients,
        keyTypes: [...new Set(of.flatMap((b) => b.keyTypes))],
        firstByteMedianMs: median(of.map((b) => median(b.firstByteMs))),
        firstByteMaxMs: median(of.map((b) => Math.max(...b.firstByteMs))),
        handshakeMedianMs: median(of.map((b) => median(b.handshakeMs))),
        handshakeMaxMs: median(of.map((b) => Math.max(...b.handshakeMs))),
        proxyMainThreadCpuMsPerClient: median(of.map((b) => b.proxyMainThreadCpuMs / b.clients)),
        proxyCpuMsPerClient: median(of.map((b) => b.proxyCpuMs / b.clients)),
        clientCpuMsPerClient: median(of.map((b) => b.clientCpuMs / b.clients)),
        machineCores: median(of.map((b) => b.machineCores)),
      };
      summaries.push(summary);
      rows.push([
        summary.scenario,
        summary.keyTypes.join('/'),
        fixed(summary.handshakeMedianMs, 1),
        fixed(summary.handshakeMaxMs, 1),
        fixed(summary.firstByteMedianMs, 1),
        fixed(summary.firstByteMaxMs, 1),
        fixed(summary.proxyMainThreadCpuMsPerClient, 2),
        fixed(summary.proxyCpuMsPerClient, 2),
        fixed(summary.clientCpuMsPerClient, 2),
        fixed(summary.machineCores, 2),
      ]);
    }
  }
  const lines = [
    `${NAME}: N new clients at once (CONNECT, TLS, GET of a cached ${BLOB_SIZE}-byte blob), RSA leaf against ECDSA leaf; medians of ${options.repeat}`,
    environmentLine(environment),
    sourceLine(source),
    '',
    formatTable(['scenario', 'leaf', 'TLS done ms median', 'max', 'first byte ms median', 'max', 'proxy main thread CPU-ms/client', 'proxy CPU-ms/client', 'client CPU-ms/client', 'machine cores busy'], rows),
    'times from the moment the N clients start; "max": the slowest client of a burst (median over the bursts); client CPU: this process, the clients\' side of the handshakes',
  ];
  const ratio: string[][] = [];
  for (const clients of options.clients) {
    const of = (leaf: Leaf) => summaries.find((s) => s.leaf === leaf && s.clients === clients) as { firstByteMedianMs: number; firstByteMaxMs: number; proxyMainThreadCpuMsPerClient: number } | undefined;
    const rsa = of('rsa');
    const ecdsa = of('ecdsa');
    if (rsa && ecdsa) ratio.push([`${clients} clients`, fixed(ecdsa.firstByteMedianMs / rsa.firstByteMedianMs, 2), fixed(ecdsa.firstByteMaxMs / rsa.firstByteMaxMs, 2), fixed(ecdsa.proxyMainThreadCpuMsPerClient / rsa.proxyMainThreadCpuMsPerClient, 2)]);
  }
  if (ratio.length > 0) lines.push('', formatTable(['ECDSA / RSA', 'first byte median', 'first byte max', 'proxy main thread CPU per client'], ratio));
  process.stdout.write(lines.join('\n') + '\n');
  process.stdout.write(JSON.stringify(roundNumbers({ benchmark: NAME, date: new Date().toISOString(), environment, source, options, summaries, bursts })) + '\n');
}

await runBenchmark(main, progress);
