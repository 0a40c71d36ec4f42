// docs/migration.md against the code: every row of its table of the seed's variables is set as its
// example says, and what changes in the effective policy (describePolicy, what `check-config`
// prints) must be exactly what the row claims. The prose's other claims, the GCR example and the
// commands that keep the seed's CA are checked below the table's tests.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ConfigError, loadPolicy } from '../../config/load.ts';
import { CertificateAuthority } from '../../src/ca.ts';
import { described, flatten, sameValue, withInheritedSettings } from './effective.ts';
import { codeBlocks, codeSpans, readDoc, section, tables } from './markdown.ts';

/** The seed's variables pullthrough maps (R8.1); the table must have a row for each, and no other. */
const SEED_VARIABLES = [
  'REGISTRIES', 'AUTH_REGISTRIES', 'AUTH_REGISTRIES_DELIMITER', 'AUTH_REGISTRY_DELIMITER',
  'ENABLE_MANIFEST_CACHE', 'MANIFEST_CACHE_PRIMARY_REGEX', 'MANIFEST_CACHE_PRIMARY_TIME',
  'MANIFEST_CACHE_SECONDARY_REGEX', 'MANIFEST_CACHE_SECONDARY_TIME', 'MANIFEST_CACHE_DEFAULT_TIME',
  'ALLOW_PUSH', 'CACHE_MAX_SIZE', 'PROXY_REQUEST_BUFFERING', 'VERIFY_SSL', 'DISABLE_IPV6',
  'SEND_TIMEOUT', 'CLIENT_BODY_TIMEOUT', 'CLIENT_HEADER_TIMEOUT', 'KEEPALIVE_TIMEOUT',
  'PROXY_READ_TIMEOUT', 'PROXY_CONNECT_TIMEOUT', 'PROXY_SEND_TIMEOUT',
  'PROXY_CONNECT_CONNECT_TIMEOUT', 'PROXY_CONNECT_READ_TIMEOUT', 'PROXY_CONNECT_SEND_TIMEOUT',
];

/** The policy the table's rows start from, as its introduction says. */
const BASELINE = 'registries:\n  registry.example.com: {}\n';

const MIGRATION = readDoc('docs/migration.md');
const work = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-docs-migration-'));
after(() => rmSync(work, { recursive: true, force: true }));

const policyFiles = new Map<string, string>();

/** One file per policy text, so that `source` and `dataDir` are the same in every comparison. */
function policyFile(yaml: string): string {
  let file = policyFiles.get(yaml);
  if (!file) {
    file = path.join(mkdtempSync(path.join(work, 'policy-')), 'proxy.yaml');
    writeFileSync(file, yaml);
    policyFiles.set(yaml, file);
  }
  return file;
}

/** What check-config prints for this policy and environment, parsed. */
function effective(yaml: string, env: Record<string, string>): unknown {
  const file = policyFile(yaml);
  return described(loadPolicy({ configPath: file, env, cwd: path.dirname(file) }));
}

function changedLeaves(before: Map<string, unknown>, afterwards: Map<string, unknown>): string[] {
  const keys = new Set([...before.keys(), ...afterwards.keys()]);
  return [...keys].filter((k) => JSON.stringify(before.get(k)) !== JSON.stringify(afterwards.get(k))).sort();
}

/** `registries.*.push` matches `registries.registry.example.com:443.push`; a claim covers everything under it. */
function claimMatcher(claimPath: string): RegExp {
  const escaped = claimPath.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.+?');
  return new RegExp(`^${escaped}(?:$|[.[])`);
}

interface Row {
  variable: string;
  assignments: Array<[string, string]>;
  claims: Array<{ path: string; value?: string }>;
}

function migrationRows(): Row[] {
  const table = tables(section(MIGRATION, 'Variables mapped onto the policy')).find((t) => t.header[0] === 'Variable');
  assert.ok(table, 'docs/migration.md has no table of variables under "Variables mapped onto the policy"');
  assert.deepEqual(table.header.slice(0, 3), ['Variable', 'Example', 'Effective policy (`check-config`)']);
  return table.rows.map((cells) => {
    const [variable = ''] = codeSpans(cells[0] ?? '');
    const assignments = codeSpans(cells[1] ?? '').map((span): [string, string] => {
      const eq = span.indexOf('=');
      assert.ok(eq > 0, `${variable}: the example "${span}" is not NAME=value`);
      return [span.slice(0, eq), span.slice(eq + 1)];
    });
    const claims = codeSpans(cells[2] ?? '').map((span) => {
      const colon = span.indexOf(': ');
      return colon < 0 ? { path: span } : { path: span.slice(0, colon), value: span.slice(colon + 2) };
    });
    return { variable, assignments, claims };
  });
}

const ROWS = migrationRows();

describe('docs/migration.md: the table of the seed variables', () => {
  test('has one row for each variable pullthrough maps', () => {
    assert.deepEqual(ROWS.map((r) => r.variable).sort(), [...SEED_VARIABLES].sort());
  });

  const baseline = flatten(effective(BASELINE, {}));

  for (const row of ROWS) {
    test(`${row.variable}: the example changes exactly what the row says`, () => {
      assert.ok(row.assignments.some(([name]) => name === row.variable), `the example does not set ${row.variable}`);
      assert.ok(row.claims.length > 0, 'the row names no key path');
      const env = Object.fromEntries(row.assignments);
      const changed = changedLeaves(baseline, flatten(effective(BASELINE, env)));
      const afterwards = flatten(effective(BASELINE, env));

      const uncovered = changed.filter((leaf) => !row.claims.some((claim) => claimMatcher(claim.path).test(leaf)));
      assert.deepEqual(uncovered, [], `${row.variable} also changes keys the row does not name`);
      for (const claim of row.claims) {
        const matched = changed.filter((leaf) => claimMatcher(claim.path).test(leaf));
        assert.ok(matched.length > 0, `${claim.path} does not change (changed: ${changed.join(', ')})`);
        if (claim.value === undefined) continue;
        for (const leaf of matched) {
          assert.ok(sameValue(afterwards.get(leaf), claim.value), `${leaf} is ${JSON.stringify(afterwards.get(leaf))}, the row says ${claim.value}`);
        }
      }

      // The row's own variable matters: without it (the other assignments alone) the outcome differs.
      if (row.assignments.length > 1) {
        const without = Object.fromEntries(row.assignments.filter(([name]) => name !== row.variable));
        let differs: boolean;
        try {
          differs = changedLeaves(afterwards, flatten(effective(BASELINE, without))).length > 0;
        } catch (err) {
          assert.ok(err instanceof ConfigError, String(err));
          differs = true;
        }
        assert.ok(differs, `${row.variable} makes no difference to the other assignments of its example`);
      }
    });
  }
});

describe('docs/migration.md: the prose around the table', () => {
  test('unset or empty variables change nothing', () => {
    const empty = Object.fromEntries(SEED_VARIABLES.map((name) => [name, '']));
    assert.deepEqual(effective(BASELINE, empty), effective(BASELINE, {}));
  });

  test('a value that cannot be read stops the loader with the variable named', () => {
    assert.throws(() => effective(BASELINE, { SEND_TIMEOUT: 'soon' }), (err: Error) => err instanceof ConfigError && /SEND_TIMEOUT/.test(err.message));
    assert.throws(() => effective(BASELINE, { CACHE_MAX_SIZE: 'huge' }), (err: Error) => err instanceof ConfigError && /CACHE_MAX_SIZE/.test(err.message));
  });

  test('timeouts and MANIFEST_CACHE_* leave a registry with its own alone; ALLOW_PUSH and VERIFY_SSL do not', () => {
    const own = 'registries:\n  own.example.com:\n    push: deny\n    tls: { verify: true }\n    timeouts: { connect: 5s }\n    manifests: { defaultTtl: 5m }\n';
    const printed = effective(own, { PROXY_CONNECT_TIMEOUT: '10s', MANIFEST_CACHE_DEFAULT_TIME: '15m', ALLOW_PUSH: 'true', VERIFY_SSL: 'false' }) as Record<string, unknown>;
    const policy = withInheritedSettings(printed) as {
      registries: Record<string, { push: string; tls: { verify: boolean }; timeouts: { connect: string }; manifests: { defaultTtl: string } }>;
    };
    const registry = policy.registries['own.example.com:443']!;
    assert.equal(registry.timeouts.connect, '5s');
    assert.equal(registry.manifests.defaultTtl, '5m');
    assert.equal(registry.push, 'bypass');
    assert.equal(registry.tls.verify, false);
    // check-config shows the registry's own timeout and TTL under it, the variables' values once, in defaults: and manifests:.
    const printedRegistry = (printed.registries as Record<string, Record<string, unknown>>)['own.example.com:443']!;
    assert.deepEqual(printedRegistry, { timeouts: { connect: '5s' }, manifests: { defaultTtl: '5m' } });
  });

  test('a tier variable leaves exactly two tiers', () => {
    const three = 'manifests:\n  tiers:\n    - { match: a, ttl: 1m }\n    - { match: b, ttl: 2m }\n    - { match: c, ttl: 3m }\n';
    const policy = effective(three, { MANIFEST_CACHE_PRIMARY_TIME: '30m' }) as { manifests: { tiers: Array<{ match: string; ttl: string }> } };
    assert.deepEqual(policy.manifests.tiers, [{ match: 'a', ttl: '30m' }, { match: 'b', ttl: '2m' }]);
  });

  test('the GCR example gives gcr.io the JSON key as its password, spaces and colons included', () => {
    const block = codeBlocks(MIGRATION).find((b) => b.body.includes('_json_key'));
    assert.ok(block, 'no code block with the GCR example');
    const dir = mkdtempSync(path.join(work, 'gcr-'));
    const key = JSON.stringify({ type: 'service_account', private_key: '-----BEGIN PRIVATE KEY-----\nMII abc\n-----END PRIVATE KEY-----\n', client_email: 'a@b.iam.gserviceaccount.com' }, null, 2);
    writeFileSync(path.join(dir, 'key.json'), key);
    // The shell does the quoting and the $(cat …), as it would for a user; `set -a` exports the assignments.
    const shell = spawnSync('bash', ['-c', `set -a\n${block.body}\nenv -0`], { cwd: dir, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, encoding: 'utf8' });
    assert.equal(shell.status, 0, shell.stderr);
    const env = Object.fromEntries(shell.stdout.split('\0').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
    const policy = loadPolicy({ configPath: policyFile(''), env });
    assert.deepEqual(policy.registries.get('gcr.io:443')?.auth, { username: '_json_key', password: key });
    assert.equal(policy.registries.get('registry-1.docker.io:443')?.auth?.username, 'hubuser');
  });

  test("the commands under \"Keeping the seed's CA\" make a seed CA pullthrough's, with the same certificate", () => {
    const dir = mkdtempSync(path.join(work, 'seed-ca-'));
    // The seed's create_ca_cert.sh: an RSA key encrypted with "foobar", a self-signed CA certificate.
    const seed = path.join(dir, 'docker_mirror_certs');
    mkdirSync(seed);
    execFileSync('openssl', ['genrsa', '-des3', '-passout', 'pass:foobar', '-out', path.join(seed, 'ca.key'), '2048'], { stdio: 'ignore' });
    const extensions = path.join(dir, 'ia.cnf');
    writeFileSync(extensions, '[req]\ndistinguished_name = dn\n[dn]\n[IA]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical, digitalSignature, cRLSign, keyCertSign\nsubjectKeyIdentifier = hash\n');
    execFileSync('openssl', ['req', '-new', '-x509', '-days', '1300', '-sha256', '-key', path.join(seed, 'ca.key'), '-out', path.join(seed, 'ca.crt'), '-passin', 'pass:foobar',
      '-subj', '/C=NL/ST=Noord Holland/L=Amsterdam/O=ME/OU=IT/CN=DockerMirrorBox CA Root test', '-extensions', 'IA', '-config', extensions], { stdio: 'ignore' });

    const block = codeBlocks(section(MIGRATION, "Keeping the seed's CA")).find((b) => b.lang === 'sh');
    assert.ok(block, "no sh block under \"Keeping the seed's CA\"");
    const shell = spawnSync('bash', ['-euo', 'pipefail', '-c', block.body], { cwd: dir, encoding: 'utf8' });
    assert.equal(shell.status, 0, shell.stderr);

    const { ca } = CertificateAuthority.loadOrCreate(path.join(dir, 'data'));
    assert.equal(ca.fingerprint, new X509Certificate(readFileSync(path.join(seed, 'ca.crt'))).fingerprint256);
  });
});
