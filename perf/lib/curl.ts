// curl clients: a native, widely used client whose own cost is the same whether it talks to the
// origin or through the proxy, so the difference between the two runs is the proxy's. Each client is
// its own process, so N clients use N connections and can use every core.
import { spawnTracked } from './cleanup.ts';

/** Where and how curl connects; the URL is always the origin's (through the proxy, curl sends CONNECT). */
export interface CurlRoute {
  /** For messages: "direct" or "through the proxy at …". */
  label: string;
  url: string;
  args: string[];
}

/** Straight to the origin: the reference. `--noproxy '*'` so that an HTTPS_PROXY in the shell cannot interfere. */
export function directRoute(options: { host: string; port: number; path: string; caFile: string }): CurlRoute {
  return {
    label: 'direct',
    url: `https://${options.host}:${options.port}${options.path}`,
    args: ['--noproxy', '*', '--resolve', `${options.host}:${options.port}:127.0.0.1`, '--cacert', options.caFile],
  };
}

/** Through the proxy with CONNECT; the proxy resolves the host (its policy's `hosts`), curl does not. */
export function proxiedRoute(options: { host: string; port: number; path: string; proxyUrl: string; proxyCaFile: string }): CurlRoute {
  return {
    label: `through the proxy at ${options.proxyUrl}`,
    url: `https://${options.host}:${options.port}${options.path}`,
    args: ['--proxy', options.proxyUrl, '--cacert', options.proxyCaFile],
  };
}

export interface CurlResult {
  status: number;
  bytes: number;
  /** curl's time_total and time_starttransfer (connect, CONNECT, TLS, request, first byte). */
  totalSeconds: number;
  firstByteSeconds: number;
}

export interface ClientsResult {
  /** From spawning the first client to the exit of the last one. */
  wallSeconds: number;
  clients: CurlResult[];
}

export interface ClientsOptions {
  /** Bytes every client must receive (the file's size, or the range's); anything else throws. */
  expectBytes: number;
  /** "0-1023": ask for a byte range (expects 206). */
  range?: string;
  /** Gives up on a client after this long. */
  maxSeconds?: number;
}

const WRITE_OUT = '%{http_code} %{size_download} %{time_total} %{time_starttransfer}';

/** Runs `count` curl clients at once, each downloading the whole of `route.url` to /dev/null. */
export async function runClients(count: number, route: CurlRoute, options: ClientsOptions): Promise<ClientsResult> {
  const started = performance.now();
  const clients = await Promise.all(Array.from({ length: count }, () => runOne(route, options)));
  return { wallSeconds: (performance.now() - started) / 1000, clients };
}

async function runOne(route: CurlRoute, options: ClientsOptions): Promise<CurlResult> {
  const args = [
    '--disable', // must come first: no ~/.curlrc
    '--silent',
    '--show-error',
    '--http1.1',
    '--output',
    '/dev/null',
    '--write-out',
    WRITE_OUT,
    '--max-time',
    String(options.maxSeconds ?? 600),
    ...(options.range ? ['--range', options.range] : []),
    ...route.args,
    route.url,
  ];
  const { code, stdout, stderr } = await capture('curl', args);
  const [status, bytes, total, firstByte] = stdout.trim().split(' ').map(Number);
  const result: CurlResult = { status: status ?? 0, bytes: bytes ?? 0, totalSeconds: total ?? 0, firstByteSeconds: firstByte ?? 0 };
  const expectStatus = options.range ? 206 : 200;
  if (code !== 0 || result.status !== expectStatus || result.bytes !== options.expectBytes) {
    throw new Error(
      `curl ${route.url} (${route.label}) failed: exit ${code}, HTTP ${result.status} (expected ${expectStatus}), ` +
        `${result.bytes} bytes (expected ${options.expectBytes})${stderr ? `: ${stderr.trim()}` : ''}`,
    );
  }
  return result;
}

function capture(command: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawnTracked(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.once('error', (err) => reject(new Error(`cannot run ${command}: ${err.message}`)));
    // 'close', not 'exit': all output has been read by then.
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}
