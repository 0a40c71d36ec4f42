// Every relative link in README.md and docs/*.md leads to a file that exists, and every #anchor to a
// heading of the document it names (GitHub's anchors).
import assert from 'node:assert/strict';
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { anchors, links, readDoc, REPO } from './markdown.ts';

const DOCUMENTS = ['README.md', ...readdirSync(path.join(REPO, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

test('the documentation has the pages the README links to', () => {
  assert.ok(DOCUMENTS.length >= 8, DOCUMENTS.join(' '));
});

for (const doc of DOCUMENTS) {
  test(`${doc}: every relative link and anchor resolves`, () => {
    const broken: string[] = [];
    const found = links(readDoc(doc));
    for (const { target, line } of found) {
      if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto: …
      const [file = '', anchor] = target.split('#') as [string, string | undefined];
      const resolved = file === '' ? path.join(REPO, doc) : path.resolve(path.dirname(path.join(REPO, doc)), decodeURIComponent(file));
      if (!resolved.startsWith(REPO + path.sep)) {
        broken.push(`${doc}:${line}: ${target} leaves the repository`);
        continue;
      }
      if (!existsSync(resolved)) {
        broken.push(`${doc}:${line}: ${target}: no such file`);
        continue;
      }
      if (anchor !== undefined) {
        if (!resolved.endsWith('.md') || statSync(resolved).isDirectory()) {
          broken.push(`${doc}:${line}: ${target}: an anchor into a file that is not Markdown`);
          continue;
        }
        const known = anchors(readDoc(path.relative(REPO, resolved)));
        if (!known.has(anchor)) broken.push(`${doc}:${line}: ${target}: no heading with anchor #${anchor} (known: ${[...known].join(', ')})`);
      }
    }
    assert.deepEqual(broken, []);
  });
}
