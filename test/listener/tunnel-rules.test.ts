// The tunnel policy's rules (src/connect.ts) without a network: every spelling of an internal address,
// names that resolve into internal ranges, explicit entries, deny, registry ports and the proxy's own
// listeners. Nothing here connects anywhere: the lookups are stubs, and one that must not be called throws.
import assert from 'node:assert/strict';
import type { LookupFunction } from 'node:net';
import { describe, test } from 'node:test';
import { parsePolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import { decide, internalRange, isOwnListener, parseTarget, resolveTunnel, type Target, type TunnelPlan } from '../../src/connect.ts';
import { createLookup, resolveAll } from '../../src/resolver.ts';

function policyOf(yaml: string): Policy {
  return parsePolicy(yaml, 'proxy.yaml', {}, '/tmp');
}

/** A resolver that knows only `answers`; the test fails if it is asked about anything else. */
function stubLookup(answers: Record<string, string[]>): LookupFunction & { asked: string[] } {
  const asked: string[] = [];
  const lookup = ((hostname: string, options: { all?: boolean }, callback: (...args: unknown[]) => void) => {
    asked.push(hostname);
    const addresses = answers[hostname];
    if (!addresses) return callback(Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' }));
    const list = addresses.map((address) => ({ address, family: address.includes(':') ? 6 : 4 }));
    if (options.all) callback(null, list);
    else callback(null, list[0]!.address, list[0]!.family);
  }) as unknown as LookupFunction & { asked: string[] };
  lookup.asked = asked;
  return lookup;
}

const noLookup = stubLookup({});
const THIS_PROXY = [{ address: '127.0.0.1', port: 3128 }];

/** decide, then (for a tunnel) resolveTunnel: what the front does with a CONNECT. */
async function plan(policy: Policy, text: string, lookup: LookupFunction = noLookup): Promise<TunnelPlan | { kind: 'intercept' }> {
  const target = parseTarget(text);
  assert.ok(!('error' in target), `${text}: ${'error' in target ? target.error : ''}`);
  const decision = decide(policy, target);
  if (decision.kind === 'intercept') return { kind: 'intercept' };
  if (decision.kind === 'deny') return decision;
  return resolveTunnel(policy, target, lookup, THIS_PROXY, 1000);
}

function assertDenied(result: TunnelPlan | { kind: 'intercept' }, reason: RegExp, what: string): void {
  assert.equal(result.kind, 'deny', `${what}: ${JSON.stringify(result)}`);
  assert.match((result as { reason: string }).reason, reason, what);
}

describe('CONNECT targets are read as the address they mean', () => {
  const cases: Array<[string, string]> = [
    ['2852039166:80', '169.254.169.254'],
    ['[::ffff:a9fe:a9fe]:80', '169.254.169.254'],
    ['[::ffff:169.254.169.254]:80', '169.254.169.254'],
    ['167772161:443', '10.0.0.1'],
    ['0:443', '0.0.0.0'],
    ['2130706433:443', '127.0.0.1'],
    ['0x7f.1:443', '127.0.0.1'],
    ['0x7F000001:443', '127.0.0.1'],
    ['0177.0.0.1:443', '127.0.0.1'],
    ['127.1:443', '127.0.0.1'],
    ['10.1:443', '10.0.0.1'],
    ['[0:0:0:0:0:0:0:1]:443', '::1'],
    ['[FD00::0001]:443', 'fd00::1'],
    ['Registry.Example.:443', 'registry.example'],
  ];
  for (const [text, host] of cases) {
    test(`${text} → ${host}`, () => {
      assert.deepEqual(parseTarget(text), { host, port: Number(text.slice(text.lastIndexOf(':') + 1)) });
    });
  }

  test('text that looks numeric but is no address is refused, not looked up as a name', () => {
    for (const text of ['999.1.1.1:443', '1.2.3.4.5:443', 'example.123:443', '0x1g.1:443', '08.1:443']) {
      const target = parseTarget(text);
      assert.ok('error' in target, `${text} → ${JSON.stringify(target)}`);
    }
  });

  test('hosts: overrides in any spelling resolve to the address they mean', async () => {
    const lookup = createLookup(new Map([['odd.test', ['2130706433']], ['mapped.test', ['::ffff:10.0.0.1']]]), true);
    assert.deepEqual(await resolveAll(lookup, 'odd.test'), ['127.0.0.1']);
    assert.deepEqual(await resolveAll(lookup, 'mapped.test'), ['10.0.0.1']);
  });

  test('a hosts: override may give several addresses (every replica behind one name), in order', async () => {
    const policy = parsePolicy('hosts:\n  peers.test: [127.0.0.21, 127.0.0.22, 127.0.0.23]\n  one.test: 127.0.0.9\n', 'proxy.yaml', {}, '/');
    const lookup = createLookup(policy.hosts, true);
    assert.deepEqual(await resolveAll(lookup, 'peers.test'), ['127.0.0.21', '127.0.0.22', '127.0.0.23']);
    assert.deepEqual(await resolveAll(lookup, 'one.test'), ['127.0.0.9']);
    const first = await new Promise<string>((resolve, reject) => lookup('peers.test', {}, (err, address) => (err ? reject(err) : resolve(address as string))));
    assert.equal(first, '127.0.0.21');
    assert.throws(() => parsePolicy('hosts:\n  peers.test: []\n', 'proxy.yaml', {}, '/'), /proxy\.yaml:2:.*lists no address/);
  });
});

describe('the default policy (tunnel.allow: ["*:443"])', () => {
  const policy = policyOf('');

  const internal: Array<[string, RegExp]> = [
    ['169.254.169.254:443', /link-local/],
    ['2852039166:443', /link-local/],
    ['[::ffff:a9fe:a9fe]:443', /link-local/],
    ['[fe80::1]:443', /link-local/],
    ['10.0.0.1:443', /private/],
    ['167772161:443', /private/],
    ['10.96.0.1:443', /private/], // a Kubernetes API service address
    ['172.16.5.4:443', /private/],
    ['172.31.255.255:443', /private/],
    ['192.168.1.1:443', /private/],
    ['[fd00::1]:443', /private/],
    ['[fc00::1]:443', /private/],
    ['100.64.0.1:443', /CGNAT/],
    ['100.127.255.254:443', /CGNAT/],
    ['127.0.0.1:443', /loopback/],
    ['2130706433:443', /loopback/],
    ['0x7f.1:443', /loopback/],
    ['0177.0.0.1:443', /loopback/],
    ['[::1]:443', /loopback/],
    ['[::ffff:127.0.0.1]:443', /loopback/],
    ['0:443', /unspecified/],
    ['0.0.0.0:443', /unspecified/],
    ['[::]:443', /unspecified/],
    ['224.0.0.1:443', /multicast/],
    ['239.255.255.250:443', /multicast/],
    ['[ff02::1]:443', /multicast/],
    ['255.255.255.255:443', /broadcast/],
    ['240.0.0.1:443', /reserved/],
    ['[::7f00:1]:443', /reserved/], // IPv4-compatible ::127.0.0.1
  ];
  for (const [text, reason] of internal) {
    test(`${text} is refused (${reason.source})`, async () => {
      assertDenied(await plan(policy, text), reason, text);
      assertDenied(await plan(policy, text), /tunnel\.allow names them/, text);
    });
  }

  test('names that resolve into internal ranges are refused: the metadata endpoint, the Kubernetes API, localhost', async () => {
    const lookup = stubLookup({
      'metadata.google.internal': ['169.254.169.254'],
      'kubernetes.default.svc': ['10.96.0.1'],
      localhost: ['127.0.0.1', '::1'],
      'rebind.example': ['::ffff:10.0.0.1'],
    });
    for (const name of ['metadata.google.internal', 'kubernetes.default.svc', 'localhost', 'rebind.example']) {
      assertDenied(await plan(policy, `${name}:443`, lookup), new RegExp(`${name.replace(/\./g, '\\.')}:443 resolves to`), name);
    }
  });

  test('an address on the internet passes; another port does not (and is refused without a lookup)', async () => {
    const lookup = stubLookup({ 'registry.example': ['203.0.113.7'] });
    assert.deepEqual(await plan(policy, 'registry.example:443', lookup), { kind: 'tunnel', addresses: ['203.0.113.7'] });
    assert.deepEqual(await plan(policy, '203.0.113.7:443', noLookup), { kind: 'tunnel', addresses: ['203.0.113.7'] });
    lookup.asked.length = 0;
    assertDenied(await plan(policy, 'registry.example:22', lookup), /not in tunnel\.allow/, 'port 22');
    assert.deepEqual(lookup.asked, []);
  });

  test('a name with public and internal addresses is tunnelled to the public ones only', async () => {
    const lookup = stubLookup({ 'mixed.example': ['127.0.0.1', '203.0.113.7', '10.0.0.1', '2001:db8::7'] });
    assert.deepEqual(await plan(policy, 'mixed.example:443', lookup), { kind: 'tunnel', addresses: ['203.0.113.7', '2001:db8::7'] });
  });

  test('a name that does not resolve: 502; one that does not resolve in time: 504', async () => {
    const missing = await plan(policy, 'nowhere.example:443', stubLookup({}));
    assert.equal(missing.kind, 'unreachable');
    assert.equal((missing as { status: number }).status, 502);
    const silent: LookupFunction = () => {};
    const target = parseTarget('slow.example:443') as Target;
    const slow = await resolveTunnel(policy, target, silent, THIS_PROXY, 50);
    assert.deepEqual(slow, { kind: 'unreachable', status: 504, reason: 'cannot resolve slow.example: ETIMEOUT' });
  });
});

describe('explicit entries open internal destinations; globs never do', () => {
  const policy = policyOf(`
tunnel:
  allow: ["*:443", "*.internal.example:443", "git.internal.example:443", "10.20.0.0/16:8443", "127.0.0.1:5000", "[fd00:1::/32]:443", "[::ffff:192.168.7.0/120]:22"]
`);
  const lookup = stubLookup({
    'git.internal.example': ['10.0.0.5'],
    'wiki.internal.example': ['10.0.0.6'],
    'db.internal.example': ['10.20.1.1'],
    'loop.example': ['127.0.0.1'],
  });

  test('an exact name opens what it resolves to, on its port', async () => {
    assert.deepEqual(await plan(policy, 'git.internal.example:443', lookup), { kind: 'tunnel', addresses: ['10.0.0.5'] });
    assertDenied(await plan(policy, 'git.internal.example:22', lookup), /private address/, 'another port');
    assertDenied(await plan(policy, 'git.internal.example:8080', lookup), /not in tunnel\.allow/, 'a port no entry has');
    assertDenied(await plan(policy, '10.0.0.5:443', lookup), /private address/, 'its address, not named');
  });

  test('a glob over names is not explicit', async () => {
    assertDenied(await plan(policy, 'wiki.internal.example:443', lookup), /resolves to 10\.0\.0\.6, a private address.*"10\.0\.0\.6:443" or "wiki\.internal\.example:443"/, 'glob');
  });

  test('an address or a block is explicit, by whatever name or spelling reaches it', async () => {
    assert.deepEqual(await plan(policy, 'db.internal.example:8443', lookup), { kind: 'tunnel', addresses: ['10.20.1.1'] });
    assert.deepEqual(await plan(policy, '10.20.255.1:8443'), { kind: 'tunnel', addresses: ['10.20.255.1'] });
    assertDenied(await plan(policy, '10.21.0.1:8443'), /private/, 'outside the block');
    assert.deepEqual(await plan(policy, 'loop.example:5000', lookup), { kind: 'tunnel', addresses: ['127.0.0.1'] });
    assert.deepEqual(await plan(policy, '2130706433:5000'), { kind: 'tunnel', addresses: ['127.0.0.1'] });
    assertDenied(await plan(policy, '127.0.0.2:5000'), /loopback/, 'the next address');
    assert.deepEqual(await plan(policy, '[fd00:1:2::3]:443'), { kind: 'tunnel', addresses: ['fd00:1:2::3'] });
    assertDenied(await plan(policy, '[fd00:2::3]:443'), /private/, 'outside the IPv6 block');
    assert.deepEqual(await plan(policy, '192.168.7.9:22'), { kind: 'tunnel', addresses: ['192.168.7.9'] });
  });
});

describe('tunnel.deny', () => {
  // The allow entries name the metadata endpoint and 10/8 explicitly: the refusals below are deny's.
  const policy = policyOf(`
tunnel:
  allow: ["*:443", "*:80", "169.254.0.0/16:80", "10.0.0.0/8:443", "[fd00::/8]:443"]
  deny: ["169.254.169.254:*", "10.*:*", "metadata.example:*", "[fd00::/16]:*"]
`);
  const lookup = stubLookup({ 'metadata.example': ['169.254.169.254'], 'looks-harmless.example': ['169.254.169.254'], 'ten.example': ['10.1.1.1'] });

  test('holds against every spelling of an address and every name that resolves to it', async () => {
    for (const text of ['169.254.169.254:80', '2852039166:80', '[::ffff:a9fe:a9fe]:80', '0xa9.0xfe.0xa9.0xfe:80', '0251.0376.0251.0376:80', 'looks-harmless.example:80', 'metadata.example:80']) {
      assertDenied(await plan(policy, text, lookup), /tunnel\.deny \("(169\.254\.169\.254|metadata\.example):\*"\)/, text);
    }
  });

  test('a glob in deny matches the address a name resolves to, as well as the name', async () => {
    for (const text of ['10.0.0.1:443', '167772161:443', 'ten.example:443']) assertDenied(await plan(policy, text, lookup), /tunnel\.deny \("10\.\*:\*"\)/, text);
    assertDenied(await plan(policy, '[fd00::1]:443'), /tunnel\.deny/, 'an IPv6 block');
  });

  test('the next link-local address, not denied, is open as allow names it', async () => {
    assert.deepEqual(await plan(policy, '169.254.169.253:80'), { kind: 'tunnel', addresses: ['169.254.169.253'] });
  });
});

describe("registries' ports", () => {
  const policy = policyOf(`
registries:
  reg.example:5000: {}
  plain.example:5001: { http: true }
`);
  const lookup = stubLookup({ 'other.example': ['203.0.113.8'], 'plain.example': ['203.0.113.9'] });

  test("a registry's port is opened for that registry's host only", async () => {
    assert.deepEqual(await plan(policy, 'reg.example:5000', lookup), { kind: 'intercept' });
    assertDenied(await plan(policy, 'other.example:5000', lookup), /not in tunnel\.allow/, 'another host on an intercepted registry port');
    assertDenied(await plan(policy, '203.0.113.8:5000', lookup), /not in tunnel\.allow/, 'an address');
    // A plain-HTTP registry is not intercepted: a CONNECT to it is a tunnel, to that host only.
    assert.deepEqual(await plan(policy, 'plain.example:5001', lookup), { kind: 'tunnel', addresses: ['203.0.113.9'] });
    assertDenied(await plan(policy, 'other.example:5001', lookup), /not in tunnel\.allow/, 'another host on a plain registry port');
  });
});

describe("the proxy's own listeners", () => {
  const local = () => new Set(['127.0.0.1', '::1', '10.1.2.3', 'fd00::17']);

  test('a listener on 0.0.0.0 or :: is every local address on its port', () => {
    for (const any of ['0.0.0.0', '::']) {
      const listeners = [{ address: any, port: 3128 }];
      for (const address of ['10.1.2.3', 'fd00::17', '127.0.0.1', '127.0.0.53', '::1', '0.0.0.0', '::']) {
        assert.equal(isOwnListener(address, 3128, listeners, local), true, `${address} on ${any}`);
      }
      assert.equal(isOwnListener('10.1.2.4', 3128, listeners, local), false);
      assert.equal(isOwnListener('10.1.2.3', 3129, listeners, local), false);
    }
  });

  test('a listener on one address is that address (and the unspecified one, which reaches this host)', () => {
    const listeners = [{ address: '10.1.2.3', port: 3128 }, { address: '::ffff:127.0.0.1', port: 5000 }];
    assert.equal(isOwnListener('10.1.2.3', 3128, listeners, local), true);
    assert.equal(isOwnListener('0.0.0.0', 3128, listeners, local), true);
    assert.equal(isOwnListener('127.0.0.1', 3128, listeners, local), false);
    assert.equal(isOwnListener('127.0.0.1', 5000, listeners, local), true);
  });

  test('refused even when an entry names the address explicitly', async () => {
    const policy = policyOf('tunnel:\n  allow: ["127.0.0.0/8:*", "self.example:*"]\n');
    const lookup = stubLookup({ 'self.example': ['127.0.0.1'] });
    for (const text of ['127.0.0.1:3128', '2130706433:3128', 'self.example:3128', '0:3128', '[::ffff:7f00:1]:3128']) {
      assertDenied(await plan(policy, text, lookup), /the proxy itself/, text);
    }
    assert.deepEqual(await plan(policy, 'self.example:3129', lookup), { kind: 'tunnel', addresses: ['127.0.0.1'] });
  });
});

describe('internal ranges', () => {
  test('boundaries', () => {
    assert.equal(internalRange('172.15.255.255'), undefined);
    assert.equal(internalRange('172.32.0.0'), undefined);
    assert.equal(internalRange('100.63.255.255'), undefined);
    assert.equal(internalRange('100.128.0.0'), undefined);
    assert.equal(internalRange('169.253.255.255'), undefined);
    assert.equal(internalRange('8.8.8.8'), undefined);
    assert.equal(internalRange('2606:4700::1111'), undefined);
    assert.equal(internalRange('fbff::1'), undefined);
    assert.equal(internalRange('febf::1'), 'a link-local');
  });
});
