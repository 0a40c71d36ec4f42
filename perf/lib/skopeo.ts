// skopeo as N real container clients pulling at once: `skopeo copy docker://<image> dir:<dir>`, each
// its own process in a sandbox of its own (HOME, auth file, registries.conf: nothing from the machine),
// through the proxy (HTTPS_PROXY, trusting only the proxy's CA) or straight to the registry. They are
// released at once by the start barrier of perf/lib/curl.ts (each waits in `sh` on a FIFO, then execs
// skopeo), so that the time counts from one instant and skopeo's start-up is inside it.
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnTracked } from './cleanup.ts';
import { StartBarrier } from './curl.ts';

export const SKOPEO_BIN = '/usr/bin/skopeo';
const CLIENT_TIMEOUT_MS = 120_000;

export interface SkopeoRoute {
  /** "registry.test:PORT/repo:tag" through the proxy; "127.0.0.1:PORT/repo:tag" direct. */
  image: string;
  /** Through a proxy: its URL and CA file. */
  proxy?: { url: string; caFile: string };
  /** Direct: the PEM of the CA the registry's certificate chains to. */
  registryCaPem?: string;
}

export interface SkopeoClientResult {
  code: number | null;
  /** From the release to the process's exit. */
  seconds: number;
  stderr: string;
  /** Where it wrote manifest.json and the blobs. */
  destDir: string;
}

export interface SkopeoRun {
  /** From the release to the last exit. */
  wallSeconds: number;
  clients: SkopeoClientResult[];
}

/**
 * `count` skopeo copies of `route.image` into <dir>/client-<i>, released at once. `atRelease` runs just
 * before the release (after the clients were spawned and blocked): where the caller's counters start.
 * `route` may be a function of the client's number (clients spread over a cluster's replicas).
 */
export async function runSkopeoClients(count: number, route: SkopeoRoute | ((client: number) => SkopeoRoute), dir: string, atRelease: () => void = () => {}): Promise<SkopeoRun> {
  const barrier = new StartBarrier();
  try {
    let released = 0;
    const running = Array.from({ length: count }, (_, i) => {
      const { args, env, destDir } = prepareClient(typeof route === 'function' ? route(i) : route, join(dir, `client-${i}`));
      const wrapped = barrier.wrap(SKOPEO_BIN, args);
      return new Promise<SkopeoClientResult>((resolve, reject) => {
        const child = spawnTracked(wrapped.command, wrapped.args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
        if (child.pid !== undefined) barrier.pids.push(child.pid);
        let stderr = '';
        child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text));
        const timer = setTimeout(() => child.kill('SIGKILL'), CLIENT_TIMEOUT_MS);
        child.once('error', (err) => reject(new Error(`cannot run skopeo: ${err.message}`)));
        child.once('close', (code) => {
          clearTimeout(timer);
          resolve({ code, seconds: (performance.now() - released) / 1000, stderr, destDir });
        });
      });
    });
    try {
      await barrier.waitUntilBlocked(count);
    } catch (err) {
      barrier.kill();
      await Promise.allSettled(running);
      throw err;
    }
    atRelease();
    released = performance.now();
    barrier.release();
    const clients = await Promise.all(running);
    return { wallSeconds: Math.max(...clients.map((c) => c.seconds)), clients };
  } finally {
    barrier.remove();
  }
}

/** The args and environment of one client, its sandbox and output dir created under `clientDir`. */
function prepareClient(route: SkopeoRoute, clientDir: string): { args: string[]; env: NodeJS.ProcessEnv; destDir: string } {
  const home = join(clientDir, 'home');
  const certDir = join(clientDir, 'certs');
  const destDir = join(clientDir, 'image');
  mkdirSync(join(home, 'config'), { recursive: true });
  mkdirSync(certDir, { recursive: true });
  // An empty cert dir replaces /etc/containers/certs.d; direct clients find the registry's CA there.
  if (route.registryCaPem) writeFileSync(join(certDir, 'ca.crt'), route.registryCaPem);
  writeFileSync(join(home, 'auth.json'), '{"auths":{}}\n');
  writeFileSync(join(home, 'registries.conf'), 'unqualified-search-registries = []\n');
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: home,
    XDG_CONFIG_HOME: join(home, 'config'),
    XDG_RUNTIME_DIR: home,
    REGISTRY_AUTH_FILE: join(home, 'auth.json'),
    DOCKER_CONFIG: join(home, 'docker'),
    CONTAINERS_REGISTRIES_CONF: join(home, 'registries.conf'),
    TMPDIR: home,
    ...(route.proxy
      ? {
          HTTPS_PROXY: route.proxy.url,
          https_proxy: route.proxy.url,
          // Go reads SSL_CERT_FILE instead of the system bundle, and SSL_CERT_DIR instead of /etc/ssl/certs.
          SSL_CERT_FILE: route.proxy.caFile,
          SSL_CERT_DIR: certDir,
        }
      : {}),
  };
  const args = [
    '--insecure-policy',
    '--override-os', 'linux',
    '--override-arch', 'amd64',
    'copy',
    '--retry-times', '0',
    '--src-cert-dir', certDir,
    '--src-no-creds',
    `docker://${route.image}`,
    `dir:${destDir}`,
  ];
  return { args, env, destDir };
}

export function skopeoVersion(): string {
  const { stdout } = spawnSync(SKOPEO_BIN, ['--version'], { encoding: 'utf8' });
  return /version (\S+)/.exec(stdout ?? '')?.[1] ?? 'unknown';
}
