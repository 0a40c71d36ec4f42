#!/usr/bin/env node
// `pullthrough` in a checkout: what `npx pullthrough …` runs after `npm ci`, and what `npm link` puts on
// the PATH. Plain JavaScript that any Node can read, so that an old Node is told what it needs instead of
// failing inside a dependency. Then, as `npm start` does, dist/ is built when it is missing or was built
// from other sources than the checkout's, and the command runs from it.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const major = Number(process.versions.node.split('.')[0]);
if (major < 24) {
  process.stderr.write(
    `pullthrough needs Node 24 (found ${process.version}). In a checkout, \`npm ci\` installs it into node_modules/.bin, ` +
      'which `npm start` and `npx pullthrough` put first on the PATH; elsewhere, install Node 24.\n',
  );
  process.exit(1);
}

const build = new URL('../src/build.ts', import.meta.url);
if (existsSync(build)) {
  const { upToDate } = await import(build.href);
  if (!upToDate()) {
    // In a process of its own: the build silences a warning of Node's, which this one should still print.
    const run = spawnSync(process.execPath, [fileURLToPath(build)], { stdio: ['ignore', 'inherit', 'inherit'] });
    if (run.status !== 0) process.exit(run.status ?? 1);
  }
}
await import('../dist/src/cli.js');
