// A real forward proxy for tests of the proxy's own upstream traffic (upstreamProxy): Debian's squid on
// a loopback port, with a squid.conf generated into a temp dir. It resolves the test names through a
// hosts file of its own (nothing else), allows every port from loopback, caches nothing, and can
// require Basic proxy authentication from an htpasswd file made by `htpasswd` (apache2-utils), checked
// by squid's basic_ncsa_auth. Its access log — one line per request, a CONNECT logged when its tunnel
// closes — is what tests read: which hosts went through it, with which user.
import type { ChildProcess } from 'node:child_process';
import { chownSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hasCommand, makeTempDir, removeTempDir, run, spawnTracked, stopChild } from './process.ts';
import { freePort } from './ports.ts';

const SQUID_BIN = '/usr/sbin/squid';
const NCSA_AUTH = '/usr/lib/squid/basic_ncsa_auth';
const READY_TIMEOUT_MS = 20_000;
const MAX_START_ATTEMPTS = 3;

export interface SquidOptions {
  /** Names squid resolves (its hosts_file), e.g. a rig's names → 127.0.0.1. */
  hosts?: Record<string, string>;
  /** Require Basic proxy authentication: only this user, with this password. */
  user?: { username: string; password: string };
  /** Speak TLS to clients (an https:// forward proxy) with this certificate, issued for 127.0.0.1. */
  tls?: { certPem: string; keyPem: string };
}

/** One line of squid's access log. */
export interface SquidEntry {
  /** CONNECT, GET, HEAD… */
  method: string;
  /** "host:port" for a CONNECT, the absolute URL of any other request. */
  target: string;
  /** The status squid answered (407 without valid credentials; 200 for a tunnel). */
  status: number;
  /** The authenticated user, or "-". */
  user: string;
}

export interface SquidHandle {
  port: number;
  /** http://127.0.0.1:PORT (https:// with the tls option) */
  url: string;
  /** http://user:password@127.0.0.1:PORT (the configured user), for upstreamProxy. */
  urlWithCredentials(username?: string, password?: string): string;
  /** Every line logged so far. */
  entries(): SquidEntry[];
  /**
   * Waits until the log holds an entry for which `predicate` is true (CONNECTs are logged when their
   * tunnel closes: close the client's connections first) and returns every entry.
   */
  waitFor(what: string, predicate: (entry: SquidEntry) => boolean, timeoutMs?: number): Promise<SquidEntry[]>;
  /** The log's lines as text, for assertion messages. */
  describe(): string;
  stop(): Promise<void>;
}

/** Why the squid tests cannot run here, or undefined when they can. */
export function squidUnavailable(): string | undefined {
  if (!existsSync(SQUID_BIN)) return `${SQUID_BIN} not found: install squid (apt-get install squid)`;
  if (!existsSync(NCSA_AUTH)) return `${NCSA_AUTH} not found: install squid (apt-get install squid)`;
  if (!hasCommand('htpasswd')) return 'htpasswd not found: install apache2-utils';
  return undefined;
}

export async function startSquid(options: SquidOptions = {}): Promise<SquidHandle> {
  let lastError: Error | undefined;
  for (let attempt = 1; attempt <= MAX_START_ATTEMPTS; attempt++) {
    try {
      return await startOnce(options);
    } catch (err) {
      lastError = err as Error; // most likely the port was taken between choosing and binding it
    }
  }
  throw lastError!;
}

async function startOnce(options: SquidOptions): Promise<SquidHandle> {
  const dir = makeTempDir('squid');
  const port = await freePort();
  const file = (name: string) => join(dir, name);
  writeFileSync(file('hosts'), Object.entries(options.hosts ?? {}).map(([name, address]) => `${address} ${name}\n`).join(''));
  if (options.user) {
    const made = await run('htpasswd', ['-b', '-c', '-m', file('htpasswd'), options.user.username, options.user.password]);
    if (made.code !== 0) throw new Error(`htpasswd failed: ${made.stderr}`);
  }
  if (options.tls) {
    writeFileSync(file('proxy.crt'), options.tls.certPem);
    writeFileSync(file('proxy.key'), options.tls.keyPem, { mode: 0o600 });
  }
  const scheme = options.tls ? 'https' : 'http';
  writeFileSync(
    file('squid.conf'),
    [
      options.tls ? `https_port 127.0.0.1:${port} tls-cert=${file('proxy.crt')} tls-key=${file('proxy.key')}` : `http_port 127.0.0.1:${port}`,
      `pid_filename ${file('squid.pid')}`,
      `cache_log ${file('cache.log')}`,
      'logformat pullthrough_test %rm %ru %>Hs %un',
      `access_log stdio:${file('access.log')} pullthrough_test`,
      'buffered_logs off',
      'cache deny all',
      'cache_mem 8 MB',
      `coredump_dir ${dir}`,
      'visible_hostname pullthrough-test-squid',
      `hosts_file ${file('hosts')}`,
      // Only the hosts file: a test name squid cannot find there fails at once, not after a DNS timeout.
      'dns_nameservers 127.0.0.1',
      'pinger_enable off',
      'shutdown_lifetime 0 seconds',
      'acl loopback_clients src 127.0.0.1/32',
      ...(options.user
        ? [
            `auth_param basic program ${NCSA_AUTH} ${file('htpasswd')}`,
            'auth_param basic realm pullthrough-test-squid',
            'auth_param basic children 2',
            'acl authenticated proxy_auth REQUIRED',
            'http_access deny !authenticated',
          ]
        : []),
      'http_access allow loopback_clients',
      'http_access deny all',
      '',
    ].join('\n'),
  );
  // Started as root, squid runs as its cache_effective_user (Debian's "proxy"): it must be able to
  // write its logs and read the htpasswd file.
  if (process.getuid?.() === 0) {
    const proxyUser = await idOf('proxy');
    if (proxyUser) for (const name of ['', ...readdirSync(dir)]) chownSync(join(dir, name), proxyUser.uid, proxyUser.gid);
  }
  const child = spawnTracked(SQUID_BIN, ['-N', '-f', file('squid.conf')], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  try {
    await waitUntilListening(child, port, () => `${output}\n${readIfThere(file('cache.log'))}`);
  } catch (err) {
    await stopChild(child);
    removeTempDir(dir);
    throw err;
  }

  const entries = (): SquidEntry[] =>
    readIfThere(file('access.log'))
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const [method = '', target = '', status = '0', user = '-'] = line.split(' ');
        return { method, target, status: Number(status), user };
      })
      // Connections that sent no request (the readiness probe's): squid logs them as "- error:…".
      .filter((entry) => entry.method !== '-');
  const handle: SquidHandle = {
    port,
    url: `${scheme}://127.0.0.1:${port}`,
    urlWithCredentials(username = options.user?.username ?? '', password = options.user?.password ?? '') {
      return `${scheme}://${encodeURIComponent(username)}:${encodeURIComponent(password)}@127.0.0.1:${port}`;
    },
    entries,
    async waitFor(what, predicate, timeoutMs = 15_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const all = entries();
        if (all.some(predicate)) return all;
        if (Date.now() > deadline) throw new Error(`squid's access log has no entry for ${what}; it has:\n${handle.describe()}`);
        await sleep(100);
      }
    },
    describe() {
      return readIfThere(file('access.log')) || '(empty)';
    },
    async stop() {
      await stopChild(child, 5000);
      removeTempDir(dir);
    },
  };
  return handle;
}

async function waitUntilListening(child: ChildProcess, port: number, output: () => string): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`squid exited (${child.exitCode ?? child.signalCode}):\n${output()}`);
    if (await accepts(port)) return;
    await sleep(100);
  }
  throw new Error(`squid did not listen on 127.0.0.1:${port} within ${READY_TIMEOUT_MS} ms:\n${output()}`);
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}


async function idOf(user: string): Promise<{ uid: number; gid: number } | undefined> {
  const [uid, gid] = await Promise.all([run('id', ['-u', user]), run('id', ['-g', user])]);
  if (uid.code !== 0 || gid.code !== 0) return undefined;
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

function readIfThere(path: string): string {
  try {
    return statSync(path).isFile() ? readFileSync(path, 'utf8') : '';
  } catch {
    return '';
  }
}
