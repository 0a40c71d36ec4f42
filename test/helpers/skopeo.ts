// skopeo as a real container client: pushes test images straight into a test registry, and pulls
// through the proxy under test exactly as a Go-based runtime would (HTTPS_PROXY + CONNECT, trusting
// only the proxy's CA). Every run is sealed off from the machine's container configuration.
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { digestBytes, digestFile } from './oci-image.ts';
import { writePem } from './pki.ts';
import { envWithoutProxies, makeTempDir, removeTempDir, requireTool, run, type RunResult } from './process.ts';
import type { Credentials, RegistryHandle } from './registry.ts';

const SKOPEO_BIN = '/usr/bin/skopeo';
const DEFAULT_TIMEOUT_MS = 120_000;

export interface PushOptions {
  /** Repository in the registry, e.g. 'library/alpine'. */
  repository: string;
  /** Tag in the registry; default: the same as the layout tag. */
  destinationTag?: string;
  /** Push every platform of an image index (skopeo --all); needed for multi-arch layouts. */
  all?: boolean;
  /**
   * A Bearer token for a token-auth registry (skopeo --dest-registry-token), e.g. from the token
   * service's mint(): skopeo then never asks the realm, whose test name would not resolve.
   */
  registryToken?: string;
  timeoutMs?: number;
}

export interface SkopeoResult {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/**
 * Copies oci:<layoutDir>:<tag> into the registry directly, by IP (Go never proxies loopback and the
 * test name does not resolve), trusting the registry's CA. Throws with skopeo's output on failure.
 * Returns the pushed reference, e.g. '127.0.0.1:40625/library/alpine:3.20'.
 */
export async function pushImage(layoutDir: string, tag: string, registry: RegistryHandle, options: PushOptions): Promise<string> {
  const sandbox = makeSkopeoSandbox();
  try {
    const certDir = join(sandbox.dir, 'dest-certs');
    writePem(certDir, 'ca.crt', registry.caPem);
    const destination = `${registry.address}/${options.repository}:${options.destinationTag ?? tag}`;
    const args = [
      'copy',
      '--retry-times', '0',
      // Without this skopeo gzips uncompressed layers on the way to a docker:// destination, so the
      // registry would hold different digests than the layout.
      '--preserve-digests',
      '--dest-cert-dir', certDir,
      ...(options.registryToken !== undefined
        ? ['--dest-registry-token', options.registryToken]
        : registry.credentials ? ['--dest-creds', credentialArg(registry.credentials)] : []),
      ...(options.all ? ['--all'] : []),
      `oci:${layoutDir}:${tag}`,
      `docker://${destination}`,
    ];
    const result = await runSkopeo(args, sandbox, {}, options.timeoutMs);
    if (result.code !== 0) throw new Error(`skopeo push to ${destination} failed (${describeExit(result)}):\n${result.stderr}`);
    return destination;
  } finally {
    removeTempDir(sandbox.dir);
  }
}

export interface ProxyPushOptions {
  /** Where to push: 'registry.test:5443/repo:tag' (the test name: Go proxies it, never a loopback IP). */
  image: string;
  proxyUrl: string;
  /** PEM file with the proxy's CA: the only CA skopeo will trust. */
  caFile: string;
  credentials?: Credentials;
  all?: boolean;
  timeoutMs?: number;
}

/**
 * Pushes oci:<layoutDir>:<tag> THROUGH the proxy, as `docker push` behind HTTPS_PROXY would. Never
 * throws on skopeo's failure: a denied push is a result to look at.
 */
export async function pushImageThroughProxy(layoutDir: string, tag: string, options: ProxyPushOptions): Promise<SkopeoResult> {
  const sandbox = makeSkopeoSandbox();
  try {
    const emptyCertDir = join(sandbox.dir, 'no-certs');
    await mkdir(emptyCertDir);
    const args = [
      'copy',
      '--retry-times', '0',
      '--preserve-digests',
      '--dest-cert-dir', emptyCertDir,
      ...(options.credentials ? ['--dest-creds', credentialArg(options.credentials)] : []),
      ...(options.all ? ['--all'] : []),
      `oci:${layoutDir}:${tag}`,
      `docker://${options.image}`,
    ];
    const env = { HTTPS_PROXY: options.proxyUrl, https_proxy: options.proxyUrl, SSL_CERT_FILE: options.caFile, SSL_CERT_DIR: emptyCertDir };
    return await runSkopeo(args, sandbox, env, options.timeoutMs);
  } finally {
    removeTempDir(sandbox.dir);
  }
}

export interface ProxyCopyOptions {
  /** 'registry.test:5443/repo:tag' or '...@sha256:...' (no transport prefix). */
  image: string;
  /** 'http://127.0.0.1:3128', optionally with user:password@ for proxy auth. */
  proxyUrl: string;
  /** PEM file with the proxy's CA: the only CA skopeo will trust. */
  caFile: string;
  /** Where skopeo's dir: transport writes manifest.json and the blobs. */
  destDir: string;
  /** Upstream registry credentials (skopeo --src-creds); default anonymous. */
  credentials?: Credentials;
  /** Copy all platforms of an index (--all); default: linux/amd64 only. */
  all?: boolean;
  architecture?: 'amd64' | 'arm64';
  timeoutMs?: number;
}

/**
 * `skopeo copy docker://<image> dir:<destDir>` through the proxy. Never throws on skopeo's failure:
 * tests of error paths want the exit code and stderr.
 */
export async function skopeoCopyThroughProxy(options: ProxyCopyOptions): Promise<SkopeoResult> {
  const sandbox = makeSkopeoSandbox();
  try {
    const emptyCertDir = join(sandbox.dir, 'no-certs');
    await mkdir(emptyCertDir);
    const args = [
      '--override-os', 'linux',
      '--override-arch', options.architecture ?? 'amd64',
      'copy',
      '--retry-times', '0',
      // An empty cert dir replaces /etc/containers/certs.d and /etc/docker/certs.d lookups.
      '--src-cert-dir', emptyCertDir,
      ...(options.credentials ? ['--src-creds', credentialArg(options.credentials)] : ['--src-no-creds']),
      ...(options.all ? ['--all'] : []),
      `docker://${options.image}`,
      `dir:${options.destDir}`,
    ];
    // Go's x509 reads SSL_CERT_FILE instead of the system bundle, but still adds every file in the
    // default cert dirs (/etc/ssl/certs) unless SSL_CERT_DIR points elsewhere: an empty dir.
    const env = {
      HTTPS_PROXY: options.proxyUrl,
      https_proxy: options.proxyUrl,
      SSL_CERT_FILE: options.caFile,
      SSL_CERT_DIR: emptyCertDir,
    };
    return await runSkopeo(args, sandbox, env, options.timeoutMs);
  } finally {
    removeTempDir(sandbox.dir);
  }
}

export interface MirrorCopyOptions {
  /** 'registry.test:5443/repo:tag' (no transport prefix): the name the mirror in registriesConf serves. */
  image: string;
  /** registries.conf content with the mirror; no HTTPS_PROXY is set. */
  registriesConf: string;
  destDir: string;
  /**
   * Credentials for the mirror (host[:port] as in registriesConf's location): containers/image looks a
   * mirror's up by its own name in auth.json, as `podman login <mirror>` stores them; --src-creds would
   * reach only the registry itself.
   */
  mirrorCredentials?: Credentials & { host: string };
  /** The only CA trusted (an HTTPS mirror's); default none. */
  caFile?: string;
  timeoutMs?: number;
}

/** `skopeo copy docker://<image> dir:<destDir>` with a registries.conf mirror and no proxy. Never throws on skopeo's failure. */
export async function skopeoCopyThroughMirror(options: MirrorCopyOptions): Promise<SkopeoResult> {
  const sandbox = makeSkopeoSandbox();
  try {
    const emptyCertDir = join(sandbox.dir, 'no-certs');
    await mkdir(emptyCertDir);
    const args = [
      // skopeo 1.9 reads CONTAINERS_REGISTRIES_CONF for nothing: the flag it is.
      '--registries-conf', sandbox.env.CONTAINERS_REGISTRIES_CONF ?? join(sandbox.dir, 'registries.conf'),
      '--override-os', 'linux',
      '--override-arch', 'amd64',
      'copy',
      '--retry-times', '0',
      '--src-cert-dir', emptyCertDir,
      `docker://${options.image}`,
      `dir:${options.destDir}`,
    ];
    const env = { SSL_CERT_FILE: options.caFile ?? join(emptyCertDir, 'none.pem'), SSL_CERT_DIR: emptyCertDir };
    const login = options.mirrorCredentials;
    const auths = login ? { [login.host]: { auth: Buffer.from(`${login.username}:${login.password}`).toString('base64') } } : {};
    return await runSkopeo(args, sandbox, env, options.timeoutMs, options.registriesConf, JSON.stringify({ auths }) + '\n');
  } finally {
    removeTempDir(sandbox.dir);
  }
}

export interface DirCopy {
  /** Digest of manifest.json as written (skopeo keeps the registry's bytes). */
  manifestDigest: string;
  manifest: unknown;
  mediaType?: string;
  /** Digests of all blob files (layers and configs), sorted. */
  blobDigests: string[];
  /** Per-platform manifests written with --all, by digest. */
  instanceManifestDigests: string[];
}

/**
 * Reads skopeo's dir: output (manifest.json, `version`, one file per blob named by its hex digest,
 * and '<hex>.manifest.json' per platform with --all), checks that every blob file hashes to its
 * name and that every blob the manifest references is there. Throws on any mismatch.
 */
export async function verifyDirCopy(destDir: string): Promise<DirCopy> {
  const names = await readdir(destDir);
  const manifestBytes = await readFile(join(destDir, 'manifest.json'));
  const manifest = JSON.parse(manifestBytes.toString('utf8')) as ManifestLike;
  const blobDigests: string[] = [];
  const instanceManifestDigests: string[] = [];
  for (const name of names) {
    if (name === 'manifest.json' || name === 'version' || name.startsWith('signature-')) continue;
    const instance = /^([0-9a-f]{64})\.manifest\.json$/.exec(name);
    const hex = instance ? instance[1] : /^[0-9a-f]{64}$/.test(name) ? name : undefined;
    if (!hex) throw new Error(`unexpected file in skopeo dir copy: ${name}`);
    const actual = (await digestFile(join(destDir, name))).slice('sha256:'.length);
    if (actual !== hex) throw new Error(`${name} in ${destDir} has sha256 ${actual}: corrupt blob`);
    (instance ? instanceManifestDigests : blobDigests).push(`sha256:${hex}`);
  }
  const manifestFiles = ['manifest.json', ...instanceManifestDigests.map((d) => `${d.slice('sha256:'.length)}.manifest.json`)];
  for (const file of manifestFiles) {
    const parsed = file === 'manifest.json' ? manifest : (JSON.parse(await readFile(join(destDir, file), 'utf8')) as ManifestLike);
    for (const digest of referencedBlobs(parsed)) {
      if (!blobDigests.includes(digest)) throw new Error(`blob ${digest} referenced by ${file} is missing from ${destDir}`);
    }
  }
  return {
    manifestDigest: digestBytes(manifestBytes),
    manifest,
    ...(manifest.mediaType ? { mediaType: manifest.mediaType } : {}),
    blobDigests: blobDigests.sort(),
    instanceManifestDigests: instanceManifestDigests.sort(),
  };
}

interface ManifestLike {
  mediaType?: string;
  config?: { digest?: string };
  layers?: Array<{ digest?: string }>;
}

function referencedBlobs(manifest: ManifestLike): string[] {
  const digests = [manifest.config?.digest, ...(manifest.layers ?? []).map((l) => l.digest)];
  return digests.filter((d): d is string => typeof d === 'string');
}

interface SkopeoSandbox {
  dir: string;
  env: Record<string, string>;
}

/**
 * A throw-away HOME and config for one skopeo run, so ~/.config/containers, ~/.docker/config.json,
 * an auth file or registries.conf mirrors on the machine cannot change what the test sees.
 */
function makeSkopeoSandbox(): SkopeoSandbox {
  requireTool(SKOPEO_BIN, 'skopeo not installed: apt-get install skopeo');
  const dir = makeTempDir('skopeo');
  return {
    dir,
    env: {
      HOME: dir,
      XDG_CONFIG_HOME: join(dir, 'config'),
      XDG_RUNTIME_DIR: dir,
      REGISTRY_AUTH_FILE: join(dir, 'auth.json'),
      DOCKER_CONFIG: join(dir, 'docker'),
      CONTAINERS_REGISTRIES_CONF: join(dir, 'registries.conf'),
      TMPDIR: dir,
    },
  };
}

async function runSkopeo(
  args: string[],
  sandbox: SkopeoSandbox,
  extraEnv: Record<string, string>,
  timeoutMs = DEFAULT_TIMEOUT_MS,
  registriesConf = 'unqualified-search-registries = []\n',
  authFile = '{"auths":{}}\n',
): Promise<SkopeoResult> {
  await writeFile(sandbox.env.REGISTRY_AUTH_FILE ?? join(sandbox.dir, 'auth.json'), authFile);
  await writeFile(sandbox.env.CONTAINERS_REGISTRIES_CONF ?? join(sandbox.dir, 'registries.conf'), registriesConf);
  // --insecure-policy: signature policy is not under test, and /etc/containers/policy.json may be absent.
  const fullArgs = ['--insecure-policy', ...args];
  const env = envWithoutProxies({ ...sandbox.env, ...extraEnv });
  const r: RunResult = await run(SKOPEO_BIN, fullArgs, { env, timeoutMs });
  return { code: r.code, stdout: r.stdout, stderr: r.stderr, timedOut: r.timedOut };
}

function credentialArg(c: Credentials): string {
  return `${c.username}:${c.password}`;
}

function describeExit(r: SkopeoResult): string {
  return r.timedOut ? 'timed out' : `exit ${r.code}`;
}
