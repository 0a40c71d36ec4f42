// podman as a real container client: `podman pull` through the proxy under test the way users run it
// (HTTPS_PROXY + CONNECT, trusting only the proxy's CA), rootful, without any daemon. Every run is
// sealed off from the machine: storage, run and lock dirs in a temp dir, every config file written
// here, and a private mount namespace that hides /etc/containers and /var/lib/containers, which
// podman would otherwise read (registries.conf.d drop-ins) or write (the blob info cache).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { envWithoutProxies, makeTempDir, removeTempDir, run, type RunResult } from './process.ts';
import type { Credentials } from './registry.ts';

const PODMAN_BIN = '/usr/bin/podman';
const UNSHARE_BIN = '/usr/bin/unshare';
const DEFAULT_TIMEOUT_MS = 120_000;

let unavailableReason: string | undefined | null = null;

/**
 * Why podman cannot run here, or undefined when it can: for `test(..., { skip: podmanUnavailable() })`.
 * The helper runs podman rootful (rootless podman needs newuidmap and /etc/subuid ranges) inside a
 * private mount namespace, so it needs root, podman and util-linux's unshare.
 */
export function podmanUnavailable(): string | undefined {
  if (unavailableReason !== null) return unavailableReason;
  unavailableReason = probe();
  return unavailableReason;
}

function probe(): string | undefined {
  if (!existsSync(PODMAN_BIN)) return `${PODMAN_BIN} not found: apt-get install podman`;
  if (process.getuid?.() !== 0) return 'podman pulls run rootful here and need root (rootless podman needs newuidmap and /etc/subuid ranges)';
  if (!existsSync(UNSHARE_BIN)) return `${UNSHARE_BIN} not found: apt-get install util-linux`;
  const ns = spawnSync(UNSHARE_BIN, ['--mount', '--propagation', 'private', 'true'], { encoding: 'utf8', timeout: 10_000 });
  if (ns.status !== 0) return `cannot create a private mount namespace to sandbox podman (unshare --mount: ${(ns.stderr || ns.error?.message || '').trim()})`;
  const version = spawnSync(PODMAN_BIN, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (version.status !== 0) return `podman --version failed: ${(version.stderr || version.error?.message || '').trim()}`;
  return undefined;
}

export interface PodmanPullOptions {
  /** 'registry.test:5443/repo:tag' or '...@sha256:...' (no transport prefix). */
  image: string;
  /** 'http://127.0.0.1:3128', for HTTPS_PROXY; absent: no proxy (a mirror in registriesConf). */
  proxyUrl?: string;
  /** PEM file with the proxy's CA: the only CA podman will trust (absent: none at all). */
  caFile?: string;
  /** registries.conf content (mirrors); default: no search registries, nothing else. */
  registriesConf?: string;
  /** Upstream registry credentials (podman pull --creds); default anonymous. */
  credentials?: Credentials;
  architecture?: 'amd64' | 'arm64';
  /** For each podman command (the pull, then the inspect). */
  timeoutMs?: number;
}

/** The pulled image as `podman image inspect` reports it. */
export interface PodmanImage {
  /** Image ID: the config blob's hex digest. */
  id: string;
  /** Manifest digest, 'sha256:...'. */
  digest: string;
  repoTags: string[];
  /** 'registry.test:PORT/repo@sha256:...' */
  repoDigests: string[];
  /** RootFS.Layers: the layers' diff IDs (uncompressed digests; equal to the layer digests for uncompressed layers). */
  layers: string[];
  manifestType: string;
}

export interface PodmanPullResult {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  /** Set when the pull succeeded. */
  image?: PodmanImage;
}

/**
 * `podman pull <image>` through the proxy into a throw-away store, then `podman image inspect` of the
 * result; the store is removed before returning. Never throws on the pull's failure (tests of error
 * paths want the exit code and stderr); throws when the pulled image cannot be inspected.
 */
export async function podmanPullThroughProxy(options: PodmanPullOptions): Promise<PodmanPullResult> {
  const sandbox = await makePodmanSandbox();
  try {
    if (options.registriesConf !== undefined) await writeFile(sandbox.env.CONTAINERS_REGISTRIES_CONF!, options.registriesConf);
    const pull = await runPodman(
      sandbox,
      [
        'pull',
        '--quiet',
        '--os', 'linux',
        '--arch', options.architecture ?? 'amd64',
        // Through a proxy every registry is verified; a mirror's registries.conf says itself (insecure = true).
        ...(options.proxyUrl ? ['--tls-verify=true'] : []),
        // An empty cert dir replaces /etc/containers/certs.d (hidden anyway) and /etc/docker/certs.d lookups.
        '--cert-dir', sandbox.emptyCertDir,
        // A policy that accepts anything: signature policy is not under test.
        '--signature-policy', sandbox.policyFile,
        ...(options.credentials ? ['--creds', `${options.credentials.username}:${options.credentials.password}`] : []),
        options.image,
      ],
      {
        ...(options.proxyUrl ? { HTTPS_PROXY: options.proxyUrl, https_proxy: options.proxyUrl } : {}),
        // Go's x509 reads SSL_CERT_FILE instead of the system bundle, but still adds every file in
        // the default cert dirs (/etc/ssl/certs) unless SSL_CERT_DIR points elsewhere: an empty dir.
        SSL_CERT_FILE: options.caFile ?? join(sandbox.emptyCertDir, 'none.pem'),
        SSL_CERT_DIR: sandbox.emptyCertDir,
      },
      options.timeoutMs,
    );
    const result: PodmanPullResult = { code: pull.code, stdout: pull.stdout, stderr: pull.stderr, timedOut: pull.timedOut };
    if (pull.code !== 0) return result;

    const inspect = await runPodman(sandbox, ['image', 'inspect', '--format', '{{json .}}', options.image], {}, options.timeoutMs);
    if (inspect.code !== 0) throw new Error(`podman image inspect ${options.image} failed (${describeExit(inspect)}):\n${inspect.stderr}`);
    result.image = parseInspect(inspect.stdout);
    return result;
  } finally {
    removeTempDir(sandbox.dir);
  }
}

interface InspectJson {
  Id?: string;
  Digest?: string;
  RepoTags?: string[] | null;
  RepoDigests?: string[] | null;
  RootFS?: { Layers?: string[] | null };
  ManifestType?: string;
}

function parseInspect(stdout: string): PodmanImage {
  const parsed = JSON.parse(stdout) as InspectJson | InspectJson[];
  // podman 4 prints an array even with --format '{{json .}}'.
  const image = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!image?.Id || !image.Digest) throw new Error(`unexpected podman image inspect output:\n${stdout}`);
  return {
    id: image.Id,
    digest: image.Digest,
    repoTags: image.RepoTags ?? [],
    repoDigests: image.RepoDigests ?? [],
    layers: image.RootFS?.Layers ?? [],
    manifestType: image.ManifestType ?? '',
  };
}

interface PodmanSandbox {
  dir: string;
  storageDir: string;
  runDir: string;
  tmpDir: string;
  emptyCertDir: string;
  policyFile: string;
  /** Bind-mounted over /var/lib/containers inside podman's mount namespace. */
  varLibContainers: string;
  env: Record<string, string>;
}

async function makePodmanSandbox(): Promise<PodmanSandbox> {
  const reason = podmanUnavailable();
  if (reason) throw new Error(`podman cannot run here: ${reason}`);
  const dir = makeTempDir('podman');
  const p = (name: string): string => join(dir, name);
  const sandbox: PodmanSandbox = {
    dir,
    storageDir: p('storage'),
    runDir: p('run'),
    tmpDir: p('tmp'),
    emptyCertDir: p('no-certs'),
    policyFile: p('policy.json'),
    varLibContainers: p('var-lib-containers'),
    env: {
      HOME: p('home'),
      XDG_CONFIG_HOME: p('home/.config'),
      XDG_DATA_HOME: p('home/.local/share'),
      XDG_RUNTIME_DIR: p('run'),
      TMPDIR: p('tmp'),
      // The only containers.conf read when set (neither /usr/share/containers nor /etc/containers).
      CONTAINERS_CONF: p('containers.conf'),
      CONTAINERS_REGISTRIES_CONF: p('registries.conf'),
      CONTAINERS_STORAGE_CONF: p('storage.conf'),
      REGISTRY_AUTH_FILE: p('auth.json'),
      DOCKER_CONFIG: p('home/.docker'),
    },
  };
  for (const d of [sandbox.storageDir, sandbox.runDir, sandbox.tmpDir, sandbox.emptyCertDir, sandbox.varLibContainers, p('home'), p('cni')]) {
    await mkdir(d, { recursive: true });
  }
  const q = (s: string): string => JSON.stringify(s);
  await writeFile(
    p('containers.conf'),
    [
      '[engine]',
      // No systemd here: no systemd cgroups, no journald events.
      'cgroup_manager = "cgroupfs"',
      'events_logger = "none"',
      // File locks under tmp_dir instead of the shared /dev/shm/libpod_lock segment.
      'lock_type = "file"',
      `tmp_dir = ${q(sandbox.tmpDir)}`,
      `image_copy_tmp_dir = ${q(sandbox.tmpDir)}`,
      '[network]',
      // Rootful netavark would create /run/containers/networks; CNI only needs its config dir.
      'network_backend = "cni"',
      `network_config_dir = ${q(p('cni'))}`,
      '',
    ].join('\n'),
  );
  await writeFile(
    p('storage.conf'),
    // vfs: plain directory copies, no overlay mounts (which may not work in a sandbox) to leak.
    `[storage]\ndriver = "vfs"\ngraphroot = ${q(sandbox.storageDir)}\nrunroot = ${q(sandbox.runDir)}\n`,
  );
  await writeFile(p('registries.conf'), 'unqualified-search-registries = []\n');
  await writeFile(p('auth.json'), '{"auths":{}}\n');
  await writeFile(sandbox.policyFile, '{"default":[{"type":"insecureAcceptAnything"}]}\n');
  return sandbox;
}

// Run as `sh -c SCRIPT <var-lib-containers> podman args...` inside `unshare --mount`: a tmpfs hides
// /etc/containers (registries.conf.d drop-ins, certs.d, policy.json), and the sandbox's dir replaces
// /var/lib/containers, where rootful c/image keeps its blob info cache whatever --root says. The
// mkdir makes the mount point on machines where no root container tool has run yet; skopeo as root
// would create the same directory.
const NAMESPACE_SCRIPT = [
  'set -e',
  'if [ -d /etc/containers ]; then mount -t tmpfs -o mode=0755,size=1m pullthrough-podman-etc /etc/containers; fi',
  'mkdir -p /var/lib/containers',
  'mount --bind "$0" /var/lib/containers',
  'exec "$@"',
].join('\n');

async function runPodman(
  sandbox: PodmanSandbox,
  args: string[],
  extraEnv: Record<string, string>,
  timeoutMs = DEFAULT_TIMEOUT_MS,
): Promise<RunResult> {
  const env = { ...withoutContainerEnv(envWithoutProxies()), ...sandbox.env, ...extraEnv };
  const podmanArgs = [
    '--root', sandbox.storageDir,
    '--runroot', sandbox.runDir,
    '--storage-driver', 'vfs',
    '--tmpdir', sandbox.tmpDir,
    ...args,
  ];
  // unshare execs sh, which execs podman: a timeout's SIGKILL reaches podman itself.
  return run(
    UNSHARE_BIN,
    ['--mount', '--propagation', 'private', '--', '/bin/sh', '-c', NAMESPACE_SCRIPT, sandbox.varLibContainers, PODMAN_BIN, ...podmanArgs],
    { env, timeoutMs },
  );
}

/** Drops variables of the machine's environment that would point podman elsewhere. */
function withoutContainerEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(env)) {
    if (/^(CONTAINERS_|CONTAINER_HOST$|CONTAINER_CONNECTION$|PODMAN_|STORAGE_DRIVER$|STORAGE_OPTS$|SSL_CERT_)/.test(key)) continue;
    out[key] = value;
  }
  return out;
}

function describeExit(r: RunResult): string {
  return r.timedOut ? 'timed out' : `exit ${r.code}`;
}
