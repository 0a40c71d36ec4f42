import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync, chmodSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { describePolicy } from '../../config/describe.ts';
import { parse } from 'yaml';
import { ConfigError, loadPolicy, parsePolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-config-'));

function policyFrom(yaml: string, env: NodeJS.ProcessEnv = {}): Policy {
  const file = path.join(dir, `p-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, yaml);
  return loadPolicy({ configPath: file, env, cwd: dir });
}

function errorOf(yaml: string, env: NodeJS.ProcessEnv = {}): string {
  try {
    policyFrom(yaml, env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    return err.message;
  }
  assert.fail('the policy was accepted');
}

describe('policy file', () => {
  test('without a file the built-in defaults apply', () => {
    const policy = loadPolicy({ env: {}, cwd: dir });
    assert.equal(policy.source, '(built-in default)');
    assert.deepEqual(policy.listen, { host: '0.0.0.0', port: 3128 });
    assert.equal(policy.dataDir, path.join(dir, 'data'));
    assert.equal(policy.cache.maxSize, 32 * 1024 ** 3);
    assert.equal(policy.cache.prefetch, true, 'layers are fetched ahead unless cache.prefetch says otherwise');
    assert.equal(policy.manifests.defaultTtlMs, 3_600_000);
    assert.deepEqual(policy.tunnel.allow, ['*:443']);
    assert.deepEqual(policy.admin, {}, 'no admin token: state changes from loopback only');
  });

  test('tunnel patterns: name globs, exact names, addresses in any spelling, IPv4 and IPv6 blocks', () => {
    const allow = ['*:443', '*.example.com:*', 'git.internal.example:443', '10.0.0.0/8:443', '127.0.0.1:8443', '2130706433:1', '[fd00::/8]:*', '[fd00::]/8:22', '[::1]:5000', '[::ffff:10.0.0.0/104]:443'];
    const policy = parsePolicy(`tunnel:\n  allow: ${JSON.stringify(allow)}\n  deny: ["10.*:*"]\n`, 'proxy.yaml', {}, dir);
    assert.deepEqual(policy.tunnel.allow, allow, 'kept as written, for check-config');
  });

  test('the shipped proxy.yaml is valid and intercepts Docker Hub anonymously when no token is set', () => {
    const policy = loadPolicy({ configPath: path.join(import.meta.dirname, '../../proxy.yaml'), env: {} });
    const hub = policy.registries.get('registry-1.docker.io:443');
    assert.ok(hub);
    assert.equal(hub.auth, undefined);
    const withToken = loadPolicy({ configPath: path.join(import.meta.dirname, '../../proxy.yaml'), env: { DOCKERHUB_USERNAME: 'me', DOCKERHUB_TOKEN: 't0k' } });
    assert.deepEqual(withToken.registries.get('registry-1.docker.io:443')?.auth, { realm: 'auth.docker.io', username: 'me', password: 't0k' });
  });

  test('registries are keyed by host:port, a bare host meaning 443; paths are relative to the file', () => {
    writeFileSync(path.join(dir, 'extra-ca.pem'), '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n');
    writeFileSync(path.join(dir, 'secret'), 's3cret\n');
    const policy = policyFrom(`
registries:
  Quay.io: {}
  registry.example.com:5443:
    auth: { username: builder, passwordFile: ./secret }
    tls: { ca: extra-ca.pem }
    push: bypass
    manifests: { defaultTtl: 0s }
    timeouts: { connect: 5s }
  "[::1]:5000": { http: true }
`);
    assert.deepEqual([...policy.registries.keys()], ['quay.io:443', 'registry.example.com:5443', '[::1]:5000']);
    const example = policy.registries.get('registry.example.com:5443')!;
    assert.equal(example.auth?.password, 's3cret');
    assert.equal(example.tls.caFile, path.join(dir, 'extra-ca.pem'));
    assert.equal(example.push, 'bypass');
    assert.equal(example.manifests.defaultTtlMs, 0);
    assert.equal(example.manifests.maxStaleMs, policy.manifests.maxStaleMs, 'the rest is inherited');
    assert.equal(example.timeouts.connectMs, 5000);
    assert.equal(example.timeouts.headersMs, 60_000);
    assert.equal(policy.registries.get('[::1]:5000')!.http, true);
  });

  test('${VAR} and ${VAR:-default} read the environment', () => {
    const policy = policyFrom('listen: ${ADDR}:${PORT:-3130}\ndataDir: ${DATA:-/var/cache/pt}\n', { ADDR: '127.0.0.1' });
    assert.deepEqual(policy.listen, { host: '127.0.0.1', port: 3130 });
    assert.equal(policy.dataDir, '/var/cache/pt');
  });

  test('PULLTHROUGH_LISTEN, PULLTHROUGH_DATA_DIR and PULLTHROUGH_CONFIG override', () => {
    const file = path.join(dir, 'env.yaml');
    writeFileSync(file, 'listen: 0.0.0.0:1\n');
    const policy = loadPolicy({ env: { PULLTHROUGH_CONFIG: file, PULLTHROUGH_LISTEN: '127.0.0.1:4000', PULLTHROUGH_DATA_DIR: 'd' }, cwd: dir });
    assert.equal(policy.source, file);
    assert.deepEqual(policy.listen, { host: '127.0.0.1', port: 4000 });
    assert.equal(policy.dataDir, path.join(dir, 'd'));
  });

  test('caDir: relative to the file; without it the CA follows dataDir; PULLTHROUGH_CA_DIR overrides', () => {
    assert.equal(policyFrom('dataDir: /var/pt\ncaDir: ca\n').caDir, path.join(dir, 'ca'));
    assert.equal(policyFrom('dataDir: /var/pt\n').caDir, '/var/pt');
    assert.equal(policyFrom('dataDir: /var/pt\n', { PULLTHROUGH_DATA_DIR: '/data' }).caDir, '/data', 'no caDir: wherever the data goes');
    assert.equal(policyFrom('caDir: /etc/pt-ca\n', { PULLTHROUGH_DATA_DIR: '/data' }).caDir, '/etc/pt-ca');
    assert.equal(policyFrom('caDir: /etc/pt-ca\n', { PULLTHROUGH_CA_DIR: 'secret' }).caDir, path.join(dir, 'secret'), 'relative to the working directory');
    assert.match(errorOf('caDir: [a]\n'), /:1:\d+: caDir: /);
  });

  test('tiers are anchored regexes, first match wins', () => {
    const policy = policyFrom('manifests:\n  tiers:\n    - { match: "v\\\\d+", ttl: 5m }\n    - { match: ".*", ttl: 1d }\n');
    const ttlFor = (tag: string) => policy.manifests.tiers.find((t) => t.regex.test(tag))?.ttlMs;
    assert.equal(ttlFor('v12'), 300_000);
    assert.equal(ttlFor('xv12'), 86_400_000, 'anchored: "xv12" does not match v\\d+');
  });
});

describe('policy errors name file, line and key', () => {
  const cases: Array<[string, string, RegExp]> = [
    ['invalid YAML', 'listen: 0.0.0.0:3128\ncache:\n  maxSize: [1, 2\n', /\.yaml:[34]:\d+: invalid YAML: Flow sequence/],
    ['an unknown key', 'listen: 0.0.0.0:3128\ncahce:\n  maxSize: 1GiB\n', /:2:1: \(top level\)|:2:1: cahce: unknown key/],
    ['a nested unknown key', 'registries:\n  quay.io:\n    pusj: bypass\n', /:3:5: registries\.quay\.io\.pusj: unknown key/],
    ['a bad duration', 'defaults:\n  timeouts: { connect: 30 seconds }\n', /:2:24: defaults\.timeouts\.connect: "30 seconds" is not a duration/],
    ['a bad size', 'cache:\n  maxSize: lots\n', /:2:12: cache\.maxSize: "lots" is not a size/],
    ['a prefetch that is not a boolean', 'cache:\n  prefetch: sometimes\n', /:2:13: cache\.prefetch: /],
    ['a bad push mode', 'defaults:\n  push: allow\n', /:2:9: defaults\.push: expected one of: deny, bypass/],
    ['a bad registry name', 'registries:\n  "bad host:x": {}\n', /:2:17: registries\.bad host:x: "bad host:x" is not a host or host:port/],
    ['a tier without ttl', 'manifests:\n  tiers:\n    - { match: "x" }\n', /:3:7: manifests\.tiers\[0\]: a tier needs/],
    ['an invalid regex', 'manifests:\n  tiers:\n    - { match: "(", ttl: 1m }\n', /:3:16: manifests\.tiers\[0\]\.match: Invalid regular expression/],
    // Wrapped as ^(?:stable)|(v1)$ it would compile, and match any tag that starts with "stable".
    ['a regex that escapes its anchoring', 'manifests:\n  tiers:\n    - { match: "stable)|(v1", ttl: 1m }\n', /:3:16: manifests\.tiers\[0\]\.match: Invalid regular expression: .*Unmatched '\)'.*on its own/],
    ['the same in a registry\'s tiers', 'registries:\n  quay.io:\n    manifests:\n      tiers:\n        - match: "a)|(b"\n          ttl: 1m\n', /:5:18: registries\.quay\.io\.manifests\.tiers\[0\]\.match: Invalid regular expression/],
    ['an unset variable', 'listen: ${NOT_SET_ANYWHERE}\n', /:1:9: listen: environment variable NOT_SET_ANYWHERE is not set/],
    ['an unreadable CA file', 'registries:\n  quay.io:\n    tls: { ca: /nonexistent/ca.pem }\n', /:3:16: registries\.quay\.io\.tls\.ca: cannot read \/nonexistent\/ca\.pem: ENOENT/],
    ['a duplicate key', 'listen: 1\nlisten: 2\n', /:2:1: invalid YAML: Map keys must be unique/],
    ['a bad listen address', 'listen: "nowhere"\n', /:1:9: listen: "nowhere" is not host:port/],
    ['a bad tunnel pattern', 'tunnel:\n  allow: ["*"]\n', /:2:11: tunnel\.allow\[0\]: "\*" is not a host:port pattern/],
    ['a tunnel pattern with no valid address', 'tunnel:\n  deny: ["*:443", "999.1.1.1:*"]\n', /:2:19: tunnel\.deny\[1\]: "999\.1\.1\.1:\*": "999\.1\.1\.1" is not a valid IP address/],
    ['a tunnel block too wide', 'tunnel:\n  allow: ["10.0.0.0/33:443"]\n', /tunnel\.allow\[0\]: .*an IPv4 prefix is at most \/32/],
    ['a prefix on a name', 'tunnel:\n  allow: ["git.example/8:443"]\n', /tunnel\.allow\[0\]: .*a \/prefix needs an IP address/],
    ['a tunnel port out of range', 'tunnel:\n  allow: ["*:0"]\n', /tunnel\.allow\[0\]: .*port 0 is out of range/],
    ['a short admin token', 'admin:\n  token: secret\n', /:2:10: admin\.token: an admin token is at least 16 visible ASCII characters/],
    ['an admin token with a space', 'admin:\n  token: "0123456789 abcdefghij"\n', /admin\.token: an admin token is at least 16 visible ASCII characters, no spaces/],
    ['password and passwordFile together', 'users:\n  ci: { password: a, passwordFile: b, read: [] }\n', /users\.ci\.passwordFile: give either/],
  ];
  for (const [name, yaml, expected] of cases) {
    test(name, () => assert.match(errorOf(yaml), expected));
  }

  test('a manifest cache regex from the environment must be a regex on its own too', () => {
    assert.throws(() => policyFrom('', { MANIFEST_CACHE_PRIMARY_REGEX: 'stable)|(v1' }), /MANIFEST_CACHE_PRIMARY_REGEX="stable\)\|\(v1": Invalid regular expression: .*Unmatched '\)'/);
    assert.throws(() => policyFrom('', { MANIFEST_CACHE_SECONDARY_REGEX: 'x)|(.*' }), /MANIFEST_CACHE_SECONDARY_REGEX=/);
  });

  test('a missing file given explicitly is an error naming it', () => {
    assert.throws(() => loadPolicy({ configPath: '/nonexistent/proxy.yaml', env: {} }), /\/nonexistent\/proxy\.yaml: cannot read the policy file: ENOENT/);
  });

  test('an unreadable file is an error naming it', { skip: process.getuid?.() === 0 && 'root reads every file' }, () => {
    const file = path.join(dir, 'unreadable.yaml');
    writeFileSync(file, 'listen: 1\n');
    chmodSync(file, 0);
    assert.throws(() => loadPolicy({ configPath: file, env: {} }), /EACCES/);
  });
});

describe("the seed's environment variables", () => {
  test('REGISTRIES adds registries, and Docker Hub with its realm is always intercepted', () => {
    const policy = policyFrom('', { REGISTRIES: 'quay.io  gcr.io k8s.gcr.io registry.local:5000' });
    assert.deepEqual([...policy.registries.keys()].sort(), ['auth.docker.io:443', 'gcr.io:443', 'k8s.gcr.io:443', 'quay.io:443', 'registry-1.docker.io:443', 'registry.local:5000']);
  });

  test('AUTH_REGISTRIES with the default delimiters; auth.docker.io means Docker Hub', () => {
    const policy = policyFrom('', { AUTH_REGISTRIES: 'auth.docker.io:hubuser:hub:pass quay.io:robot+ci:tok' });
    assert.deepEqual(policy.registries.get('registry-1.docker.io:443')?.auth, { realm: 'auth.docker.io', username: 'hubuser', password: 'hub:pass' });
    assert.deepEqual(policy.registries.get('quay.io:443')?.auth, { username: 'robot+ci', password: 'tok' });
  });

  test('AUTH_REGISTRIES with custom delimiters carries a _json_key with spaces and colons', () => {
    const jsonKey = '{"type": "service_account", "private_key": "-----BEGIN KEY-----\\nab:cd ef\\n", "client_email": "x@y.iam"}';
    const policy = policyFrom('', {
      AUTH_REGISTRIES: `gcr.io:::_json_key:::${jsonKey};;;ghcr.io:::me:::ghp token`,
      AUTH_REGISTRIES_DELIMITER: ';;;',
      AUTH_REGISTRY_DELIMITER: ':::',
    });
    assert.deepEqual(policy.registries.get('gcr.io:443')?.auth, { username: '_json_key', password: jsonKey });
    assert.deepEqual(policy.registries.get('ghcr.io:443')?.auth, { username: 'me', password: 'ghp token' });
  });

  test('a malformed AUTH_REGISTRIES entry is named', () => {
    assert.throws(() => policyFrom('', { AUTH_REGISTRIES: 'quay.io:onlyuser' }), /AUTH_REGISTRIES: entry 1 is not host:username:password/);
  });

  test('manifest cache variables map onto the tiers', () => {
    const policy = policyFrom('registries:\n  quay.io: {}\n  own.io: { manifests: { defaultTtl: 5m } }\n', {
      ENABLE_MANIFEST_CACHE: 'true',
      MANIFEST_CACHE_PRIMARY_REGEX: '(main|latest)',
      MANIFEST_CACHE_PRIMARY_TIME: '1m',
      MANIFEST_CACHE_SECONDARY_TIME: '30d',
      MANIFEST_CACHE_DEFAULT_TIME: '2h',
    });
    const quay = policy.registries.get('quay.io:443')!.manifests;
    assert.deepEqual(quay.tiers.map((t) => [t.match, t.ttlMs]), [['(main|latest)', 60_000], ['.*\\d.*\\d.*\\d.*', 30 * 86_400_000]]);
    assert.equal(quay.defaultTtlMs, 7_200_000);
    assert.equal(policy.registries.get('own.io:443')!.manifests.defaultTtlMs, 300_000, "a registry's own setting wins");
    assert.equal(policyFrom('', { ENABLE_MANIFEST_CACHE: 'false' }).manifests.enabled, false);
  });

  test('ALLOW_PUSH, VERIFY_SSL, CACHE_MAX_SIZE, DISABLE_IPV6, PROXY_REQUEST_BUFFERING', () => {
    const policy = policyFrom('registries:\n  quay.io: {}\n', { ALLOW_PUSH: 'true', VERIFY_SSL: 'false', CACHE_MAX_SIZE: '10g', DISABLE_IPV6: 'true', PROXY_REQUEST_BUFFERING: 'false' });
    assert.equal(policy.registries.get('quay.io:443')!.push, 'bypass');
    assert.equal(policy.registries.get('quay.io:443')!.tls.verify, false);
    assert.equal(policy.cache.maxSize, 10 * 1024 ** 3);
    assert.equal(policy.ipv6, false);
    assert.equal(policy.requestBuffering, false);
  });

  test('the nginx timeout variables map onto timeouts and tunnel timeouts', () => {
    const policy = policyFrom('registries:\n  quay.io: {}\n', {
      CLIENT_HEADER_TIMEOUT: '10s',
      CLIENT_BODY_TIMEOUT: '20s',
      SEND_TIMEOUT: '25s',
      KEEPALIVE_TIMEOUT: '75s',
      PROXY_CONNECT_TIMEOUT: '5s',
      PROXY_READ_TIMEOUT: '90s',
      PROXY_SEND_TIMEOUT: '95s',
      PROXY_CONNECT_CONNECT_TIMEOUT: '7s',
      PROXY_CONNECT_READ_TIMEOUT: '100s',
      PROXY_CONNECT_SEND_TIMEOUT: '110s',
    });
    const t = policy.registries.get('quay.io:443')!.timeouts;
    assert.deepEqual(t, { clientHeaderMs: 10_000, clientIdleMs: 25_000, keepAliveMs: 75_000, connectMs: 5000, headersMs: 90_000, idleMs: 95_000 });
    assert.equal(policy.tunnel.connectTimeoutMs, 7000);
    assert.equal(policy.tunnel.idleTimeoutMs, 110_000);
  });

  test('a bad value names the variable', () => {
    assert.throws(() => policyFrom('', { PROXY_READ_TIMEOUT: 'forever' }), /PROXY_READ_TIMEOUT="forever": "forever" is not a duration/);
    assert.throws(() => policyFrom('', { ALLOW_PUSH: 'maybe' }), /ALLOW_PUSH="maybe": expected true or false/);
  });
});

describe('check-config output', () => {
  test('fills in defaults and masks every secret', () => {
    writeFileSync(path.join(dir, 'pw'), 'file-secret');
    const policy = policyFrom('registries:\n  quay.io:\n    auth: { username: robot, password: inline-secret }\n  b.io:\n    auth: { username: u, passwordFile: pw }\nusers:\n  ci: { password: user-secret, read: ["quay.io/*"] }\n');
    const text = describePolicy(policy);
    for (const secret of ['inline-secret', 'file-secret', 'user-secret']) assert.ok(!text.includes(secret), `${secret} is masked`);
    assert.match(text, /username: robot/);
    assert.match(text, /password: "\*+"/);
    const effective = parse(text) as { registries: Record<string, unknown>; defaults: { timeouts: { clientIdle: string } } };
    assert.deepEqual(Object.keys(effective.registries), ['quay.io:443', 'b.io:443']);
    assert.equal(effective.defaults.timeouts.clientIdle, '5m', 'defaults are filled in, once');
  });
});
