#!/usr/bin/env node
// The pullthrough command's entry (npm start, the container image, `node dist/src/cli.js …`). It only
// checks the Node version, then loads the program (src/commands/program.ts): every other module is
// imported after the check, because undici and others fail obscurely on an older Node, and static
// imports would be loaded before any line of this file ran.
export {};

const major = Number(process.versions.node.split('.')[0]);
if (major < 24) {
  process.stderr.write(
    `pullthrough needs Node 24 (found ${process.version}). In a checkout, \`npm ci\` installs it into node_modules/.bin, ` +
      'which `npm start` and `npx pullthrough` put first on the PATH; elsewhere, install Node 24.\n',
  );
  process.exit(1);
}
await import('./commands/program.ts');
