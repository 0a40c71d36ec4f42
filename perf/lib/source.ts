// Which sources a benchmark measured: the proxy is built from the working tree (perf/lib/proxy.ts), so
// the commit alone does not say what ran when files under src/, config/ or workers/ are modified.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
/** What dist/ is built from (src/build.ts's SOURCES). */
const BUILT_FROM = ['src', 'config', 'workers'];

export interface SourceState {
  /** What the proxy was built from: the working tree (as `npm start`), one commit (`--commit`), or another build's cli (`--cli`). */
  builtFrom: 'working tree' | 'commit' | 'cli';
  /** The commit built, or HEAD's for the working tree; 'unknown' outside a git checkout. */
  commit: string;
  /** Files under src/, config/, workers/ that differ from HEAD (modified, added, untracked). */
  modified: string[];
}

/** The working tree's state (what perf/lib/proxy.ts builds by default). */
export function describeSource(): SourceState {
  const git = (args: string[]) => spawnSync('git', ['-C', REPO, ...args], { encoding: 'utf8' });
  const head = git(['rev-parse', 'HEAD']);
  if (head.status !== 0) return { builtFrom: 'working tree', commit: 'unknown', modified: [] };
  const status = git(['status', '--porcelain', '--untracked-files=all', '--', ...BUILT_FROM]);
  const modified = (status.stdout ?? '')
    .split('\n')
    .filter((line) => line.length > 3)
    .map((line) => line.slice(3));
  return { builtFrom: 'working tree', commit: head.stdout.trim(), modified };
}

/**
 * Another build of the proxy, run as it is (`--cli PATH`: its dist/src/cli.js): `commit` holds the path,
 * and what it was built from is whatever made it (a BUILD_INFO file beside its dist/, when there is one).
 */
export function describeCli(cli: string): SourceState {
  let info = '';
  try {
    info = readFileSync(join(dirname(dirname(dirname(cli))), 'BUILD_INFO'), 'utf8').trim();
  } catch {
    // no description beside it
  }
  return { builtFrom: 'cli', commit: info ? `${cli} (${info})` : cli, modified: [] };
}

/** "proxy built from commit 1234567890ab", "… working tree at commit …, sources clean" or "… + 2 uncommitted files (…)". */
export function sourceLine(source: SourceState): string {
  if (source.builtFrom === 'commit') return `proxy built from commit ${source.commit.slice(0, 12)} (git archive; the working tree is not used)`;
  if (source.builtFrom === 'cli') return `proxy run from another build: ${source.commit}`;
  const commit = `proxy built from the working tree at commit ${source.commit.slice(0, 12)}`;
  if (source.modified.length === 0) return `${commit}, sources clean`;
  const shown = source.modified.slice(0, 6).join(', ') + (source.modified.length > 6 ? ', …' : '');
  return `${commit} + ${source.modified.length} uncommitted file${source.modified.length === 1 ? '' : 's'} under src/config/workers (${shown})`;
}

/**
 * Builds the proxy of one commit (`git archive` of src/, config/, workers/ and package.json into
 * `dir`, then its own src/build.ts) and returns its cli, for ProxyOptions.cli: the figures are then
 * those of that commit, whatever the working tree holds (other people's edits in progress). The
 * repository's node_modules is linked in, so the commit's dependencies must be the installed ones.
 */
export function buildCommit(revision: string, dir: string): { cli: string; source: SourceState } {
  const commit = spawnSync('git', ['-C', REPO, 'rev-parse', '--verify', `${revision}^{commit}`], { encoding: 'utf8' });
  if (commit.status !== 0) throw new Error(`--commit ${revision}: not a commit (${commit.stderr.trim()})`);
  const sha = commit.stdout.trim();
  mkdirSync(dir, { recursive: true });
  const archive = spawnSync('sh', ['-c', 'git -C "$1" archive "$2" src config workers package.json | tar -x -C "$3"', 'sh', REPO, sha, dir], { encoding: 'utf8' });
  if (archive.status !== 0) throw new Error(`git archive ${sha} failed: ${archive.stderr}`);
  symlinkSync(join(REPO, 'node_modules'), join(dir, 'node_modules'));
  const build = spawnSync(process.execPath, [join(dir, 'src', 'build.ts')], { encoding: 'utf8' });
  if (build.status !== 0) throw new Error(`building ${sha}: ${build.stderr}`);
  return { cli: join(dir, 'dist', 'src', 'cli.js'), source: { builtFrom: 'commit', commit: sha, modified: [] } };
}
