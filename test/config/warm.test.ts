// warm: in proxy.yaml (config/warm.ts): what it means, each mistake refused with file:line, registries
// that are not the policy's refused with what to do, and check-config's output loading back as the
// same list.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { describePolicy } from '../../config/describe.ts';
import { loadPolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import { addWarmUser, loopbackUrl } from '../../src/warm-schedule.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-warm-config-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function policyFrom(yaml: string, env: NodeJS.ProcessEnv = {}): Policy {
  const file = path.join(dir, `p-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, yaml);
  return loadPolicy({ configPath: file, env, cwd: dir });
}

const REGISTRIES = 'registries:\n  registry-1.docker.io: {}\n  ghcr.io: {}\n  registry.example.com:5443: {}\n  legacy.example.com:5000: { http: true }\n';

describe('warm: in proxy.yaml', () => {
  test('absent: nothing to warm, with the defaults', () => {
    const { warm } = policyFrom('');
    assert.deepEqual(warm, { intervalMs: 6 * 3_600_000, delayMs: 10_000, platforms: [], images: [] });
  });

  test('images as references or with their own platforms; the list\'s platforms for the others', () => {
    const { warm } = policyFrom(`${REGISTRIES}warm:\n  interval: 30m\n  delay: 1s\n  platforms: [linux/amd64, Linux/ARM64/v8]\n  images:\n    - alpine:3.20\n    - docker.io/bitnami/redis:7.2\n    - { image: ghcr.io/org/app:1, platforms: [linux/arm/v7] }\n    - registry.example.com:5443/team/app@sha256:${'a'.repeat(64)}\n`);
    assert.equal(warm.intervalMs, 1_800_000);
    assert.equal(warm.delayMs, 1000);
    assert.deepEqual(warm.platforms, ['linux/amd64', 'linux/arm64/v8']);
    assert.deepEqual(
      warm.images.map((i) => [i.image, i.registry, i.platforms]),
      [
        ['alpine:3.20', 'registry-1.docker.io:443', undefined],
        ['docker.io/bitnami/redis:7.2', 'registry-1.docker.io:443', undefined],
        ['ghcr.io/org/app:1', 'ghcr.io:443', ['linux/arm/v7']],
        [`registry.example.com:5443/team/app@sha256:${'a'.repeat(64)}`, 'registry.example.com:5443', undefined],
      ],
    );
    assert.deepEqual(warm.images[0]!.ref, { registry: 'registry-1.docker.io', repository: 'library/alpine', reference: '3.20' });
  });

  test('mistakes name the file, line and key', () => {
    const refused = (yaml: string, message: RegExp) => assert.throws(() => policyFrom(`${REGISTRIES}${yaml}`), (err: Error) => {
      assert.match(err.message, message);
      return true;
    });
    refused('warm:\n  images:\n    - Bad/Name\n', /\.yaml:8:7: warm\.images\[0\]: "Bad\/Name" is not an image reference/);
    refused('warm:\n  platforms: [linux]\n', /\.yaml:7:15: warm\.platforms\[0\]: "linux" is not a platform: expected os\/arch/);
    refused('warm:\n  images:\n    - { platforms: [linux/amd64] }\n', /warm\.images\[0\]: needs image/);
    refused('warm:\n  images:\n    - { image: alpine, platform: linux/amd64 }\n', /warm\.images\[0\]\.platform: unknown key \(expected one of: image, platforms\)/);
    refused('warm:\n  every: 1h\n', /warm\.every: unknown key \(expected one of: interval, delay, platforms, images\)/);
    refused('warm:\n  interval: often\n', /warm\.interval: "often" is not a duration/);
  });

  test('a registry that is not the policy\'s, or plain HTTP, is refused with what to do', () => {
    assert.throws(() => policyFrom(`${REGISTRIES}warm:\n  images:\n    - alpine\n    - quay.io/org/app:1\n`), /\.yaml:9:7: warm\.images\[1\]: quay\.io is not a registry of this policy: add it under registries: to warm quay\.io\/org\/app:1/);
    assert.throws(() => policyFrom('registries:\n  ghcr.io: {}\nwarm:\n  images: [alpine]\n'), /warm\.images\[0\]: Docker Hub \(registry-1\.docker\.io\) is not a registry of this policy: add it under registries:/);
    assert.throws(() => policyFrom(`${REGISTRIES}warm:\n  images: [legacy.example.com:5000/app:1]\n`), /legacy\.example\.com:5000 is a plain-HTTP registry/);
    // A registry the seed's REGISTRIES adds counts as the policy's.
    assert.equal(policyFrom('warm:\n  images: [quay.io/org/app:1]\n', { REGISTRIES: 'quay.io' }).warm.images.length, 1);
  });

  test('check-config prints it, and its output loads back as the same list', () => {
    const policy = policyFrom(`${REGISTRIES}warm:\n  interval: 2h\n  platforms: [linux/amd64]\n  images:\n    - alpine:3.20\n    - { image: ghcr.io/org/app:1, platforms: [linux/arm64, linux/amd64] }\n`);
    const text = describePolicy(policy);
    assert.match(text, /^warm:\n {2}interval: 2h\n {2}delay: 10s\n {2}platforms:\n {4}- linux\/amd64\n {2}images:\n {4}- alpine:3\.20\n {4}- image: ghcr\.io\/org\/app:1\n/m);
    const again = policyFrom(text);
    const strip = (p: Policy) => ({ ...p.warm, images: p.warm.images.map(({ where: _where, ...rest }) => rest) });
    assert.deepEqual(strip(again), strip(policy));
    // An empty list is printed too (every default is), and loads.
    assert.deepEqual(policyFrom(describePolicy(policyFrom(''))).warm.images, []);
  });
});

describe('the warm-up\'s place in the running proxy', () => {
  test('an internal user only when users are configured and there is something to warm; never one of theirs', () => {
    assert.equal(addWarmUser(policyFrom(`${REGISTRIES}warm:\n  images: [alpine]\n`)), undefined, 'no users: no user');
    assert.equal(addWarmUser(policyFrom('users:\n  ci: { password: x, read: ["*"] }\n')), undefined, 'nothing to warm: no user');
    const policy = policyFrom(`${REGISTRIES}users:\n  pullthrough-warm: { password: theirs, read: [] }\nwarm:\n  images: [alpine]\n`);
    const user = addWarmUser(policy)!;
    assert.match(user.name, /^pullthrough-warm-[0-9a-f]{8}$/);
    assert.match(user.password, /^[0-9a-f]{64}$/);
    assert.deepEqual(user.read, ['*']);
    assert.equal(policy.users.get('pullthrough-warm')!.password, 'theirs');
    assert.equal(policy.users.get(user.name), user);
  });

  test('the listen address as reached from the proxy itself', () => {
    assert.equal(loopbackUrl('0.0.0.0', 3128), 'http://127.0.0.1:3128');
    assert.equal(loopbackUrl('::', 3128), 'http://[::1]:3128');
    assert.equal(loopbackUrl('10.0.0.5', 3128), 'http://10.0.0.5:3128');
    assert.equal(loopbackUrl('fd00::5', 3128), 'http://[fd00::5]:3128');
  });
});
