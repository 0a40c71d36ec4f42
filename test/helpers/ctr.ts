// containerd's ctr as a real container client. ctr needs a daemon, so each handle runs a private
// containerd (config, root, state, temp dir and socket all in one temp dir; no CRI, no runtimes, no
// snapshotter but native) that is killed and removed by stop(). ctr resolves and fetches images
// itself, client side, with its own Go HTTP transport, and only streams the content into the
// daemon's store over gRPC: so the proxy environment and the CA belong to ctr, and the daemon runs
// without any (a pull that needed the daemon to reach the registry would fail).
import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { envWithoutProxies, makeTempDir, removeTempDir, run, spawnTracked, stopChild, type RunResult } from './process.ts';
import type { Credentials } from './registry.ts';

const CONTAINERD_BIN = '/usr/bin/containerd';
const CTR_BIN = '/usr/bin/ctr';
const NAMESPACE = 'pullthrough-test';
const SNAPSHOTTER = 'native';
const READY_TIMEOUT_MS = 15_000;
const DEFAULT_TIMEOUT_MS = 120_000;
/** sun_path is 108 bytes on Linux. */
const MAX_SOCKET_PATH = 100;

// Plugins a pull does not need; the overlayfs snapshotter is off so nothing depends on overlay mounts.
const DISABLED_PLUGINS = [
  'io.containerd.grpc.v1.cri',
  'io.containerd.snapshotter.v1.aufs',
  'io.containerd.snapshotter.v1.btrfs',
  'io.containerd.snapshotter.v1.devmapper',
  'io.containerd.snapshotter.v1.overlayfs',
  'io.containerd.snapshotter.v1.zfs',
  'io.containerd.runtime.v1.linux',
  'io.containerd.runtime.v2.task',
  'io.containerd.monitor.v1.cgroups',
  'io.containerd.service.v1.tasks-service',
  'io.containerd.grpc.v1.tasks',
  'io.containerd.internal.v1.restart',
  'io.containerd.internal.v1.opt',
  'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing',
];

let unavailableReason: string | undefined | null = null;

/** Why containerd/ctr cannot run here, or undefined: for `test(..., { skip: ctrUnavailable() })`. */
export function ctrUnavailable(): string | undefined {
  if (unavailableReason !== null) return unavailableReason;
  unavailableReason = probe();
  return unavailableReason;
}

function probe(): string | undefined {
  if (!existsSync(CONTAINERD_BIN) || !existsSync(CTR_BIN)) return `${CONTAINERD_BIN} or ${CTR_BIN} not found: apt-get install containerd`;
  if (process.getuid?.() !== 0) return 'containerd must run as root (rootless containerd needs RootlessKit)';
  const version = spawnSync(CTR_BIN, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (version.status !== 0) return `ctr --version failed: ${(version.stderr || version.error?.message || '').trim()}`;
  return undefined;
}

export interface CtrPullOptions {
  /** 'registry.test:5443/repo:tag' or '...@sha256:...'. */
  image: string;
  /** 'http://127.0.0.1:3128', for HTTPS_PROXY; absent: no proxy (a mirror in hostsDir). */
  proxyUrl?: string;
  /** PEM file with the proxy's CA: the only CA ctr will trust (absent: the hosts.toml files say). */
  caFile?: string;
  /** containerd's certs.d directory (hosts.toml per registry): ctr --hosts-dir. */
  hostsDir?: string;
  /** Upstream registry credentials (ctr --user); default anonymous. */
  credentials?: Credentials;
  architecture?: 'amd64' | 'arm64';
  timeoutMs?: number;
}

export interface CtrResult {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** One line of `ctr images ls`. */
export interface CtrImage {
  ref: string;
  /** Media type of the target. */
  type: string;
  /** Digest of the target (the manifest, or the index for multi-arch images). */
  digest: string;
}

/** One line of `ctr content ls`. */
export interface CtrContent {
  digest: string;
  labels: Record<string, string>;
}

export interface ContainerdHandle {
  /** The daemon's gRPC socket. */
  address: string;
  namespace: string;
  dir: string;
  /** `ctr images pull` through the proxy. Never throws on ctr's failure. */
  pull(options: CtrPullOptions): Promise<CtrResult>;
  /** `ctr images ls` of the test namespace. */
  images(): Promise<CtrImage[]>;
  /** `ctr content ls` of the test namespace. */
  content(): Promise<CtrContent[]>;
  /** Any other ctr command against this daemon (global flags are added). */
  ctr(args: string[], extraEnv?: Record<string, string>, timeoutMs?: number): Promise<RunResult>;
  /** The daemon's own log, for failed tests. */
  logText(): string;
  stop(): Promise<void>;
}

/** Starts a private containerd and waits until it answers `ctr version`. */
export async function startContainerd(): Promise<ContainerdHandle> {
  const reason = ctrUnavailable();
  if (reason) throw new Error(`containerd cannot run here: ${reason}`);
  const dir = makeTempDir('containerd');
  let child: ChildProcess | undefined;
  try {
    const address = join(dir, 'containerd.sock');
    if (Buffer.byteLength(address) > MAX_SOCKET_PATH) throw new Error(`socket path too long for a unix socket: ${address} (set a shorter TMPDIR)`);
    for (const d of ['root', 'state', 'tmp', 'home', 'no-certs']) await mkdir(join(dir, d));
    const configFile = join(dir, 'config.toml');
    writeFileSync(configFile, containerdConfig(dir, address));

    // --config: /etc/containerd/config.toml is never read. No proxy variables: the daemon fetches nothing.
    const env = { ...withoutContainerdEnv(envWithoutProxies()), HOME: join(dir, 'home'), TMPDIR: join(dir, 'tmp') };
    const daemon = spawnTracked(CONTAINERD_BIN, ['--config', configFile], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    child = daemon;
    const logChunks: string[] = [];
    daemon.stderr?.setEncoding('utf8');
    daemon.stderr?.on('data', (chunk: string) => {
      logChunks.push(chunk);
    });
    const logText = (): string => logChunks.join('');

    const ctr = (args: string[], extraEnv: Record<string, string> = {}, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<RunResult> =>
      run(CTR_BIN, ['--address', address, '--namespace', NAMESPACE, ...args], {
        env: { ...withoutContainerdEnv(envWithoutProxies()), HOME: join(dir, 'home'), TMPDIR: join(dir, 'tmp'), ...extraEnv },
        timeoutMs,
      });

    await waitUntilReady(daemon, ctr, logText);

    return {
      address,
      namespace: NAMESPACE,
      dir,
      ctr,
      logText,
      async pull(options: CtrPullOptions): Promise<CtrResult> {
        const args = [
          'images', 'pull',
          '--platform', `linux/${options.architecture ?? 'amd64'}`,
          // Unpacks with plain directory copies: no overlay mounts.
          '--snapshotter', SNAPSHOTTER,
          // The root pool of ctr's transport becomes exactly this CA (not added to the system roots).
          ...(options.caFile ? ['--tlscacert', options.caFile] : []),
          ...(options.hostsDir ? ['--hosts-dir', options.hostsDir] : []),
          ...(options.credentials ? ['--user', `${options.credentials.username}:${options.credentials.password}`] : []),
          options.image,
        ];
        const r = await ctr(
          args,
          {
            ...(options.proxyUrl ? { HTTPS_PROXY: options.proxyUrl, https_proxy: options.proxyUrl } : {}),
            // Belt and braces: were --tlscacert ignored, Go would load only these instead of the system roots.
            SSL_CERT_FILE: options.caFile ?? join(dir, 'no-certs', 'none.pem'),
            SSL_CERT_DIR: join(dir, 'no-certs'),
          },
          options.timeoutMs,
        );
        return { code: r.code, stdout: r.stdout, stderr: r.stderr, timedOut: r.timedOut };
      },
      async images(): Promise<CtrImage[]> {
        const r = await ctr(['images', 'ls']);
        if (r.code !== 0) throw new Error(`ctr images ls failed (${describeExit(r)}):\n${r.stderr}`);
        // REF TYPE DIGEST SIZE PLATFORMS LABELS; refs, types and digests contain no spaces.
        return dataLines(r.stdout).map((line) => {
          const [ref = '', type = '', digest = ''] = line.split(/\s+/);
          return { ref, type, digest };
        });
      },
      async content(): Promise<CtrContent[]> {
        const r = await ctr(['content', 'ls']);
        if (r.code !== 0) throw new Error(`ctr content ls failed (${describeExit(r)}):\n${r.stderr}`);
        // DIGEST SIZE AGE LABELS, tab separated; AGE has a space ('1 second'), labels are a,b=c list.
        return dataLines(r.stdout).map((line) => {
          const fields = line.split('\t');
          const labelField = fields.length > 1 ? (fields[fields.length - 1] ?? '') : '';
          const labels: Record<string, string> = {};
          for (const pair of labelField.trim() === '-' ? [] : labelField.trim().split(',')) {
            const eq = pair.indexOf('=');
            if (eq > 0) labels[pair.slice(0, eq)] = pair.slice(eq + 1);
          }
          return { digest: fields[0]?.trim() ?? '', labels };
        });
      },
      async stop(): Promise<void> {
        await stopChild(daemon, 5000);
        removeTempDir(dir);
      },
    };
  } catch (err) {
    if (child) await stopChild(child);
    removeTempDir(dir);
    throw err;
  }
}

function containerdConfig(dir: string, address: string): string {
  const q = (s: string): string => JSON.stringify(s);
  return [
    'version = 2',
    `root = ${q(join(dir, 'root'))}`,
    `state = ${q(join(dir, 'state'))}`,
    `temp = ${q(join(dir, 'tmp'))}`,
    'plugin_dir = ""',
    'imports = []',
    `disabled_plugins = [${DISABLED_PLUGINS.map(q).join(', ')}]`,
    '',
    '[grpc]',
    `  address = ${q(address)}`,
    '',
    '[ttrpc]',
    `  address = ${q(`${address}.ttrpc`)}`,
    '',
    // No debug socket, no metrics listener.
    '[debug]',
    '  address = ""',
    '  level = "info"',
    '',
    '[metrics]',
    '  address = ""',
    '',
  ].join('\n');
}

async function waitUntilReady(
  daemon: ChildProcess,
  ctr: (args: string[], extraEnv?: Record<string, string>, timeoutMs?: number) => Promise<RunResult>,
  logText: () => string,
): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let last = '';
  while (Date.now() < deadline) {
    if (daemon.exitCode !== null || daemon.signalCode !== null) {
      throw new Error(`containerd exited (${daemon.exitCode ?? daemon.signalCode}) during start:\n${tail(logText())}`);
    }
    // `ctr version` asks the daemon's version service: an answer means the gRPC server is up.
    const r = await ctr(['--timeout', '2s', 'version'], {}, 5_000);
    if (r.code === 0) return;
    last = r.stderr.trim();
    await sleep(50);
  }
  throw new Error(`containerd not ready after ${READY_TIMEOUT_MS} ms: ${last}\n${tail(logText())}`);
}

/** Lines after the header, without blanks. */
function dataLines(stdout: string): string[] {
  return stdout.split('\n').slice(1).filter((l) => l.trim() !== '');
}

/** Drops CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, CONTAINERD_SNAPSHOTTER... of the machine's environment. */
function withoutContainerdEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(env)) {
    if (/^(CONTAINERD_|SSL_CERT_)/.test(key)) continue;
    out[key] = value;
  }
  return out;
}

function tail(text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

function describeExit(r: RunResult): string {
  return r.timedOut ? 'timed out' : `exit ${r.code}`;
}
