// docs/configuration.md against the loader. The keys the loader accepts are read from the loader
// itself: at every mapping level a made-up key is rejected with "unknown key (expected one of: …)",
// and the list is followed down (mappings, lists of mappings, mappings keyed by host or name). The
// reference must document exactly those keys, its full example must use every one of them and load,
// and each default it writes as `code` must be what `check-config` prints.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { isMap, isScalar, isSeq, parse, parseDocument, stringify, type Node as YamlNode } from 'yaml';
import { ConfigError, loadPolicy, parsePolicy } from '../../config/load.ts';
import { createTestCa } from '../helpers/pki.ts';
import { described, sameValue } from './effective.ts';
import { codeBlocks, codeSpans, readDoc, section, tables } from './markdown.ts';

const REFERENCE = readDoc('docs/configuration.md');
const work = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-docs-config-'));
after(() => rmSync(work, { recursive: true, force: true }));

// ---- What the loader accepts ----

/** One step of a path into the policy: a fixed key, an item of a list, an entry of a mapping keyed by name. */
type Step = { kind: 'key'; name: string } | { kind: 'item' } | { kind: 'entry' };

const BOGUS = 'notAKeyOfTheDocsTest';
/** A name valid as a registry (host), a user and a host override alike. */
const ENTRY = 'probe.example';

function nest(steps: Step[], leaf: unknown): unknown {
  return steps.reduceRight<unknown>((inner, step) => (step.kind === 'key' ? { [step.name]: inner } : step.kind === 'item' ? [inner] : { [ENTRY]: inner }), leaf);
}

function pathInMessages(steps: Step[]): string {
  return steps.map((s) => (s.kind === 'key' ? `.${s.name}` : s.kind === 'item' ? '[0]' : `.${ENTRY}`)).join('').replace(/^\./, '');
}

/** The keys the loader accepts in the mapping at `steps`; undefined when that is not a mapping of fixed keys. */
function acceptedKeys(steps: Step[]): string[] | undefined {
  const yaml = stringify(nest(steps, { [BOGUS]: 1 }));
  const where = pathInMessages([...steps, { kind: 'key', name: BOGUS }]);
  try {
    parsePolicy(yaml, 'probe.yaml', {}, work);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    const match = new RegExp(`: ${where.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: unknown key \\(expected one of: (.*)\\)$`).exec(err.message);
    return match ? match[1]!.split(', ') : undefined;
  }
  return undefined;
}

/** Every key path the loader accepts, as the reference writes them: `a.b`, `a[].b`, `a.<>.b`. */
function loaderKeys(): Set<string> {
  const out = new Set<string>();
  const walk = (steps: Step[], prefix: string, keys: string[]) => {
    for (const name of keys) {
      const key: Step[] = [...steps, { kind: 'key', name }];
      const at = prefix ? `${prefix}.${name}` : name;
      out.add(at);
      let inner: string[] | undefined;
      if ((inner = acceptedKeys(key))) walk(key, at, inner);
      else if ((inner = acceptedKeys([...key, { kind: 'item' }]))) walk([...key, { kind: 'item' }], `${at}[]`, inner);
      else if ((inner = acceptedKeys([...key, { kind: 'entry' }]))) walk([...key, { kind: 'entry' }], `${at}.<>`, inner);
    }
  };
  const top = acceptedKeys([]);
  assert.ok(top, 'the loader did not reject an unknown top-level key');
  walk([], '', top);
  return out;
}

const LOADER_KEYS = loaderKeys();
/** Paths under which the loader takes names of the user's choosing (registries.<>, users.<>). */
const NAMED_LEVELS = new Set([...LOADER_KEYS].flatMap((k) => [...k.matchAll(/^(.*?)\.<>/g)].map((m) => m[1]!)));

// ---- What the reference documents ----

interface DocumentedKey {
  path: string;
  defaultCell: string;
}

function documentedKeys(): DocumentedKey[] {
  const keyTables = tables(section(REFERENCE, 'Keys')).filter((t) => t.header[0] === 'Key');
  assert.ok(keyTables.length > 0, 'docs/configuration.md has no tables of keys under "Keys"');
  return keyTables.flatMap((t) => {
    const defaultColumn = t.header.indexOf('Default');
    return t.rows.map((cells) => {
      const [key] = codeSpans(cells[0] ?? '');
      assert.ok(key, `a row of the table at line ${t.line} does not start with a key in code`);
      return { path: key, defaultCell: cells[defaultColumn] ?? '' };
    });
  });
}

/** `registries.<host>.auth` → `registries.<>.auth`. */
const normalise = (key: string) => key.replace(/<[^>]+>/g, '<>');

const DOCUMENTED = documentedKeys();

describe('docs/configuration.md: the keys', () => {
  test('the loader was probed (sanity check of the probe)', () => {
    for (const key of ['listen', 'cache.maxSize', 'manifests.tiers[].ttl', 'registries.<>.auth.username', 'users.<>.read', 'tunnel.timeouts.idle']) {
      assert.ok(LOADER_KEYS.has(key), `${key} not found: ${[...LOADER_KEYS].join(' ')}`);
    }
  });

  test('documents every key the loader accepts', () => {
    const documented = new Set(DOCUMENTED.map((k) => normalise(k.path)));
    const missing = [...LOADER_KEYS].filter((k) => !documented.has(k));
    assert.deepEqual(missing, [], 'keys the loader accepts but docs/configuration.md does not document');
  });

  test('documents no key the loader rejects', () => {
    // A row for a named level itself (`registries.<host>`) describes its entries, not a key.
    const extra = DOCUMENTED.map((k) => normalise(k.path)).filter((k) => !LOADER_KEYS.has(k) && !(k.endsWith('.<>') && NAMED_LEVELS.has(k.slice(0, -3))));
    assert.deepEqual(extra, [], 'keys docs/configuration.md documents but the loader rejects');
  });

  test('each default written as `code` is what check-config prints when the key is not set', () => {
    const file = path.join(mkdtempSync(path.join(work, 'empty-')), 'proxy.yaml');
    writeFileSync(file, '');
    const effective = described(loadPolicy({ configPath: file, env: {}, cwd: path.dirname(file) }));
    const checked: string[] = [];
    for (const { path: key, defaultCell } of DOCUMENTED) {
      const spans = codeSpans(defaultCell);
      if (key.includes('<') || key.includes('[') || spans.length !== 1 || defaultCell !== `\`${spans[0]}\``) continue;
      const documented = spans[0]!;
      let actual: unknown = effective;
      for (const part of key.split('.')) actual = (actual as Record<string, unknown> | undefined)?.[part];
      assert.notEqual(actual, undefined, `check-config prints no ${key}`);
      const ok =
        typeof actual === 'string' && path.isAbsolute(actual)
          ? actual === path.resolve(path.dirname(file), documented)
          : typeof actual === 'object'
            ? JSON.stringify(actual) === JSON.stringify(parse(documented))
            : sameValue(actual, documented);
      assert.ok(ok, `${key}: the reference says ${documented}, check-config prints ${JSON.stringify(actual)}`);
      checked.push(key);
    }
    assert.ok(checked.length >= 20, `only ${checked.length} defaults checked: ${checked.join(' ')}`);
  });
});

// ---- The full example ----

const EXAMPLE = (() => {
  const block = codeBlocks(section(REFERENCE, 'Full example')).find((b) => b.lang === 'yaml');
  assert.ok(block, 'no yaml block under "Full example"');
  return block.body;
})();

/** Key paths the example uses, normalised like LOADER_KEYS, with the values of its leaves. */
function exampleKeys(): Map<string, unknown[]> {
  const out = new Map<string, unknown[]>();
  const walk = (node: YamlNode | null, at: string) => {
    if (isMap(node)) {
      for (const pair of node.items) {
        const name = String((pair.key as { value?: unknown }).value);
        const child = NAMED_LEVELS.has(at) ? `${at}.<>` : at ? `${at}.${name}` : name;
        if (!NAMED_LEVELS.has(at)) out.set(child, [...(out.get(child) ?? []), isScalar(pair.value) ? pair.value.value : undefined]);
        walk(pair.value as YamlNode, child);
      }
    } else if (isSeq(node)) {
      for (const item of node.items) walk(item as YamlNode, `${at}[]`);
    }
  };
  walk(parseDocument(EXAMPLE).contents as YamlNode, '');
  return out;
}

describe('docs/configuration.md: the full example', () => {
  test('uses every key the loader accepts', () => {
    const used = exampleKeys();
    const unused = [...LOADER_KEYS].filter((k) => !used.has(k));
    assert.deepEqual(unused, [], 'keys missing from the full example');
  });

  test('loads, with its ${VAR}s set and the files it names in place', () => {
    const dir = mkdtempSync(path.join(work, 'example-'));
    // Every file the example names, relative to the policy file's folder as the reference says.
    const used = exampleKeys();
    const ca = createTestCa('docs example CA');
    for (const [key, values] of used) {
      const leaf = key.slice(key.lastIndexOf('.') + 1);
      if (leaf !== 'passwordFile' && !(leaf === 'ca' && key.endsWith('.tls.ca'))) continue;
      for (const file of values) {
        assert.equal(typeof file, 'string');
        assert.ok(!path.isAbsolute(file as string), `${key}: ${String(file)} should be relative, so that the test can provide it`);
        mkdirSync(path.dirname(path.join(dir, file as string)), { recursive: true });
        writeFileSync(path.join(dir, file as string), leaf === 'ca' ? ca.certPem : 'secret\n');
      }
    }
    const env = Object.fromEntries([...EXAMPLE.matchAll(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g)].map((m) => [m[1]!, `value-of-${m[1]}`]));
    const file = path.join(dir, 'proxy.yaml');
    writeFileSync(file, EXAMPLE);
    const policy = loadPolicy({ configPath: file, env, cwd: dir });
    assert.equal(policy.registries.get('registry-1.docker.io:443')?.auth?.password, 'value-of-DOCKERHUB_TOKEN');
    assert.ok(policy.users.size > 0 && policy.hosts.size > 0);
  });
});
