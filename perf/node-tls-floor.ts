// What Node itself costs per MiB on the cold path, with nothing of pullthrough in it (issue 18): a cold
// blob through the proxy is received over TLS and hashed by a fill worker, and sent over TLS by the
// primary; nginx configured as the seed does the same receive and send in C. This measures the floor
// the proxy's own figures (perf/cold-blob-sizes.ts: "CPU per MiB served cold") stand on:
//
//   receive  nginx (TLS, as the CDN) → a client in this process, per 16 MiB response on one kept-alive
//            connection: a raw TLS socket, undici's request() (the fill's API: a Readable body) and
//            undici's dispatch() (a handler, no stream), each discarding the bytes or hashing them (sha256)
//   send     a Node TLS server in a child process → a raw TLS client here, in 16 KiB and 256 KiB writes
//            (the primary writes up to 256 KiB, and 16 KiB per client when 1,000 share the read budget)
//
//   node perf/node-tls-floor.ts [--size 16MiB] [--repeat 24]
//
// CPU is the process's own (process.cpuUsage: user + system) over the transfers, per MiB. nginx's CPU per
// MiB sending is printed beside (from /proc). Runs alternate their order within each round; medians of
// 3 rounds.
import { fork } from 'node:child_process';
import { createHash, type Hash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { Agent } from 'undici';
import { formatSize, parseSize } from '../config/units.ts';
import { createTestCa } from '../test/helpers/pki.ts';
import { makeTempDir, runBenchmark } from './lib/cleanup.ts';
import { describeEnvironment, environmentLine, progressTo } from './lib/measure.ts';
import { ORIGIN_HOST, startOrigin } from './lib/origin.ts';
import { readCountersOf } from './lib/procfs.ts';
import { fixed, formatTable, median, roundNumbers } from './lib/report.ts';

const NAME = 'node-tls-floor';
const MiB = 1024 * 1024;
const ROUNDS = 3;
const progress = progressTo(NAME);

type Receiver = 'raw' | 'request' | 'dispatch';
const RECEIVERS: Receiver[] = ['raw', 'request', 'dispatch'];

// The child: a Node TLS server that answers each request line with `size` bytes in writes of `write` bytes.
if (process.argv[2] === 'sender') {
  const [size, write] = [Number(process.argv[3]), Number(process.argv[4])];
  const { key, cert } = JSON.parse(process.env.FLOOR_PEM!) as { key: string; cert: string };
  const chunk = Buffer.alloc(write, 7);
  // 'g': send `size` bytes; 'd': the client has them all, report the CPU spent since the 'g'.
  const server = tls.createServer({ key, cert }, (socket) => {
    let before = process.cpuUsage();
    socket.on('data', (command: Buffer) => {
      for (const byte of command.toString('latin1')) {
        if (byte === 'd') {
          const used = process.cpuUsage(before);
          process.send!({ cpuSeconds: (used.user + used.system) / 1e6 });
          continue;
        }
        before = process.cpuUsage();
        let sent = 0;
        const pump = () => {
          while (sent < size) {
            sent += chunk.length;
            if (!socket.write(chunk)) return void socket.once('drain', pump);
          }
        };
        pump();
      }
    });
  });
  server.listen(0, '127.0.0.1', () => process.send!({ port: (server.address() as { port: number }).port }));
} else {
  await runBenchmark(main, progress);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { size: { type: 'string', default: '16MiB' }, repeat: { type: 'string', default: '24' }, clients: { type: 'string' } } });
  const size = parseSize(values.size);
  const repeat = Number(values.repeat);
  if (!(size > 0) || !Number.isInteger(repeat) || repeat < 1) throw new Error('--size: a size; --repeat: a positive integer');
  const dir = makeTempDir(NAME);
  const origin = await startOrigin({ dir, blobs: [{ repository: 'floor/blob', size }], progress });
  const blob = origin.blobs[0]!;
  const expected = readFileSync(blob.file);
  const agent = new Agent({ connect: { ca: readFileSync(origin.caFile, 'utf8'), servername: ORIGIN_HOST }, connections: 1 });
  const url = { origin: `https://127.0.0.1:${origin.nginx.port}`, path: blob.urlPath, headers: { host: `${ORIGIN_HOST}:${origin.nginx.port}` } };
  const caPem = readFileSync(origin.caFile, 'utf8');

  /** One response of `size` bytes per repetition, on one connection; returns this process's CPU seconds. */
  const receive = async (receiver: Receiver, hashing: boolean): Promise<number> => {
    const hashes: Hash[] = [];
    const before = process.cpuUsage();
    if (receiver === 'raw') {
      const socket = tls.connect({ host: '127.0.0.1', port: origin.nginx.port, servername: ORIGIN_HOST, ca: caPem });
      await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
      for (let i = 0; i < repeat; i++) {
        const hash = createHash('sha256');
        hashes.push(hash);
        await new Promise<void>((resolve, reject) => {
          let head = true;
          let got = 0;
          const onData = (data: Buffer) => {
            if (head) {
              const end = data.indexOf('\r\n\r\n');
              if (end < 0) return reject(new Error('a response head split across reads'));
              data = data.subarray(end + 4);
              head = false;
            }
            got += data.length;
            if (hashing) hash.update(data);
            if (got >= size) {
              socket.off('data', onData);
              resolve();
            }
          };
          socket.on('data', onData);
          socket.write(`GET ${url.path} HTTP/1.1\r\nHost: ${url.headers.host}\r\n\r\n`);
        });
      }
      socket.destroy();
    } else {
      for (let i = 0; i < repeat; i++) {
        const hash = createHash('sha256');
        hashes.push(hash);
        if (receiver === 'request') {
          const { body } = await agent.request({ ...url, method: 'GET' });
          for (;;) {
            const chunk = body.read() as Buffer | null;
            if (chunk !== null) {
              if (hashing) hash.update(chunk);
              continue;
            }
            if (body.readableEnded) break;
            await new Promise<void>((resolve) => {
              const done = () => {
                body.off('readable', done).off('end', done);
                resolve();
              };
              body.on('readable', done).on('end', done);
            });
          }
        } else {
          await new Promise<void>((resolve, reject) =>
            agent.dispatch(
              { ...url, method: 'GET' },
              {
                onRequestStart() {},
                onResponseStart() {},
                onResponseData(_controller, chunk: Buffer) {
                  if (hashing) hash.update(chunk);
                },
                onResponseEnd: () => resolve(),
                onResponseError: (_controller, err) => reject(err),
              },
            ),
          );
        }
      }
    }
    const used = process.cpuUsage(before);
    if (hashing && hashes.some((hash) => `sha256:${hash.digest('hex')}` !== blob.digest)) throw new Error(`${receiver}: a body did not hash to ${blob.digest}`);
    return (used.user + used.system) / 1e6;
  };

  /** `repeat` responses of `size` bytes from a Node TLS server in writes of `write` bytes: the sender's CPU seconds. */
  const pem = createTestCa('pullthrough perf floor CA').issue(['127.0.0.1']);
  const send = async (write: number): Promise<number> => {
    const child = fork(new URL(import.meta.url).pathname, ['sender', String(size), String(write)], { env: { ...process.env, FLOOR_PEM: JSON.stringify({ key: pem.keyPem, cert: pem.certPem }) } });
    try {
      const port = await new Promise<number>((resolve) => child.once('message', (m: { port: number }) => resolve(m.port)));
      const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false });
      await new Promise<void>((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
      let seconds = 0;
      for (let i = 0; i < repeat; i++) {
        const figure = new Promise<number>((resolve) => child.once('message', (m: { cpuSeconds: number }) => resolve(m.cpuSeconds)));
        await new Promise<void>((resolve) => {
          let got = 0;
          const onData = (data: Buffer) => {
            got += data.length;
            if (got < size) return;
            socket.off('data', onData);
            resolve();
          };
          socket.on('data', onData);
          socket.write('g');
        });
        socket.write('d');
        seconds += await figure;
      }
      socket.destroy();
      return seconds;
    } finally {
      child.kill();
    }
  };

  const mib = (repeat * size) / MiB;
  const runs: Array<{ round: number; what: string; msPerMiB: number }> = [];
  const measured = async (round: number, what: string, run: () => Promise<number>) => {
    const seconds = await run();
    runs.push({ round, what, msPerMiB: (seconds * 1000) / mib });
    progress(`round ${round}: ${what} ${fixed((seconds * 1000) / mib, 2)} ms/MiB`);
  };
  // Warm-up: connections, code compiled, nginx's file in the page cache.
  await receive('request', true);
  await receive('dispatch', true);
  await receive('raw', true);
  let nginxSeconds = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    const order = round % 2 === 1 ? RECEIVERS : [...RECEIVERS].reverse();
    for (const receiver of order) {
      for (const hashing of [false, true]) {
        const nginxBefore = readCountersOf(origin.nginx.pids()).cpuSeconds;
        await measured(round, `receive ${receiver}${hashing ? ' + sha256' : ''}`, () => receive(receiver, hashing));
        nginxSeconds += readCountersOf(origin.nginx.pids()).cpuSeconds - nginxBefore;
      }
    }
    for (const write of round % 2 === 1 ? [256 * 1024, 16 * 1024] : [16 * 1024, 256 * 1024]) await measured(round, `send, ${formatSize(write)} writes`, () => send(write));
  }
  await agent.close();
  await origin.nginx.stop();

  const whats = [...new Set(runs.map((run) => run.what))];
  const medians = Object.fromEntries(whats.map((what) => [what, median(runs.filter((run) => run.what === what).map((run) => run.msPerMiB))]));
  const nginxSendMsPerMiB = (nginxSeconds * 1000) / (mib * ROUNDS * RECEIVERS.length * 2);
  const environment = describeEnvironment(origin.nginx.version);
  const lines = [
    `${NAME}: Node ${process.version}'s own CPU per MiB over TLS on loopback, ${formatSize(size)} per response, ${repeat} per run, medians of ${ROUNDS} rounds`,
    environmentLine(environment),
    '',
    formatTable(['what', 'CPU ms/MiB'], whats.map((what) => [what, fixed(medians[what], 2)])),
    '',
    `nginx sending the same responses: ${fixed(nginxSendMsPerMiB, 2)} CPU ms/MiB`,
    `the cold path's floor in Node (fill: receive request() + sha256; primary: send in 256 KiB writes): ${fixed(medians['receive request + sha256']! + medians['send, 256KiB writes']!, 2)} CPU ms/MiB, before any disk write or read`,
    '',
  ];
  process.stdout.write(lines.join('\n') + '\n');
  process.stdout.write(JSON.stringify(roundNumbers({ benchmark: NAME, date: new Date().toISOString(), environment, options: { size, repeat }, medians, nginxSendMsPerMiB, runs })) + '\n');
}
