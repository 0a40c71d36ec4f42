// Builds dist/: the same modules with their types stripped (Node's own stripTypeScriptTypes, the very
// transform Node applies when it runs a .ts file) and relative imports pointed at .js. Production runs
// from dist/ because run-time stripping costs ~15 MiB of memory in every thread that loads a .ts file
// (measured: 156 → 109 MiB idle with the primary and two pool workers). Positions are kept (types become
// spaces), so stack traces of dist/ point at the same lines as the sources.
//
// `node src/build.ts` builds; `--if-stale` (npm start's prestart, bin/pullthrough.js) first compares
// dist/.sources, a SHA-256 of the paths and contents dist/ was built from, with the sources there are now
// and does nothing when they match (~50 ms instead of ~400). Contents, not times: a checkout, `cp -p` or
// a tar extraction can give changed files old times. Each file is written beside its place and renamed
// into it, and .sources is written last, so a build that is cut short or runs twice at once never leaves
// a dist/ that claims to be up to date and is not.
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { stripTypeScriptTypes } from 'node:module';
import path from 'node:path';

const root = path.resolve(import.meta.dirname, '..');
const out = path.join(root, 'dist');
const SOURCES = ['src', 'config', 'workers'];
/** Files read at run time next to the module that reads them. */
const ASSETS = new Set(['.html', '.sh']);
const STAMP = path.join(out, '.sources');
const SELF = path.join('src', 'build.ts');

interface Source {
  /** Relative to the repository, e.g. src/cli.ts. */
  relative: string;
  text: Buffer;
}

/** Every file dist/ is made of, in a stable order, and the hash of them all (with this script's own text). */
function readSources(): { files: Source[]; hash: string } {
  const files: Source[] = [];
  for (const dir of SOURCES) {
    for (const entry of readdirSync(path.join(root, dir), { recursive: true, withFileTypes: true })) {
      if (!entry.isFile()) continue;
      const relative = path.relative(root, path.join(entry.parentPath, entry.name));
      const ext = path.extname(entry.name);
      if ((ext === '.ts' && relative !== SELF) || ASSETS.has(ext)) files.push({ relative, text: readFileSync(path.join(root, relative)) });
    }
  }
  files.push({ relative: 'package.json', text: readFileSync(path.join(root, 'package.json')) });
  files.sort((a, b) => (a.relative < b.relative ? -1 : a.relative > b.relative ? 1 : 0));
  const hash = createHash('sha256');
  for (const file of [...files, { relative: SELF, text: readFileSync(path.join(root, SELF)) }]) {
    hash.update(`${file.relative}\0${file.text.length}\0`);
    hash.update(file.text);
  }
  return { files, hash: hash.digest('hex') };
}

/** True when dist/ was built from exactly the sources there are now. */
export function upToDate(): boolean {
  let stamp: string;
  try {
    stamp = readFileSync(STAMP, 'utf8');
  } catch {
    return false;
  }
  return stamp === readSources().hash;
}

/** Builds dist/ from the sources; returns the number of modules. */
export function build(): number {
  const { files, hash } = readSources();
  rmSync(STAMP, { force: true });
  const written = new Set<string>([path.relative(out, STAMP)]);
  let modules = 0;
  for (const { relative, text } of files) {
    let target = relative;
    let data: string | Buffer = text;
    if (relative.endsWith('.ts')) {
      target = relative.replace(/\.ts$/, '.js');
      data = stripTypeScriptTypes(text.toString('utf8'), { mode: 'strip' }).replace(
        /(\bfrom\s+|\bimport\s*\(\s*)(['"])(\.{1,2}\/[^'"]+)\.ts\2/g,
        (_m, lead: string, quote: string, specifier: string) => `${lead}${quote}${specifier}.js${quote}`,
      );
      modules++;
    }
    writeInPlace(path.join(out, target), data);
    written.add(target);
  }
  removeLeftovers(written);
  writeInPlace(STAMP, hash);
  return modules;
}

/** Written beside its place, then renamed: a process loading dist/ meanwhile reads the old file or the new one. */
function writeInPlace(file: string, data: string | Buffer): void {
  mkdirSync(path.dirname(file), { recursive: true });
  const staged = `${file}.${process.pid}.tmp`;
  writeFileSync(staged, data);
  renameSync(staged, file);
}

/** Modules of sources that are gone (a build running at the same time has its *.tmp files left alone). */
function removeLeftovers(written: Set<string>): void {
  for (const entry of readdirSync(out, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || entry.name.endsWith('.tmp')) continue;
    const relative = path.relative(out, path.join(entry.parentPath, entry.name));
    if (!written.has(relative)) rmSync(path.join(out, relative), { force: true });
  }
}

if (import.meta.main) {
  if (process.argv.includes('--if-stale') && upToDate()) process.exit(0);
  process.removeAllListeners('warning'); // stripTypeScriptTypes is "experimental": the build says so once here
  const modules = build();
  // On stderr: `npx pullthrough check-config > proxy.yaml` may build first, and its stdout is the policy.
  process.stderr.write(`pullthrough: built ${modules} modules into dist/\n`);
}
