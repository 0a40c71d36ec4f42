// Which registry a mirror request means, and the path that registry is asked: the three forms the
// runtimes use (containerd's ?ns=, a registry as the first path segment, dockerd's nothing) and the
// refusals, against a policy loaded the way users write it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parsePolicy } from '../../config/load.ts';
import { mirrorTarget } from '../../src/mirror.ts';

const policy = parsePolicy(
  `
registries:
  registry-1.docker.io: {}
  ghcr.io: {}
  registry.example.com:5443: {}
mirror:
  listen: 127.0.0.1:5000
`,
  'proxy.yaml',
  {},
  '/tmp',
);

function target(path: string): string {
  const result = mirrorTarget(new URL(path, 'http://mirror'), policy, policy.mirror!);
  return 'status' in result ? `${result.status} ${result.code}` : `${result.registry.key} ${result.path}`;
}

test('containerd: ?ns= names the registry; Docker Hub by any of its names', () => {
  assert.equal(target('/v2/team/app/manifests/v1?ns=ghcr.io'), 'ghcr.io:443 /v2/team/app/manifests/v1');
  assert.equal(target('/v2/library/alpine/manifests/3.20?ns=docker.io'), 'registry-1.docker.io:443 /v2/library/alpine/manifests/3.20');
  assert.equal(target('/v2/app/blobs/sha256:abc?ns=registry.example.com:5443'), 'registry.example.com:5443 /v2/app/blobs/sha256:abc');
});

test("containerd's override_path (http://proxy:5000/v2/ghcr.io) with ?ns=: the registry named twice, once used", () => {
  assert.equal(target('/v2/ghcr.io/team/app/manifests/v1?ns=ghcr.io'), 'ghcr.io:443 /v2/team/app/manifests/v1');
  assert.equal(target('/v2/ghcr.io/team/app/manifests/v1?ns=registry.example.com:5443'), '400 NAME_INVALID');
});

test('CRI-O and podman: the registry as the first path segment, its port after an underscore', () => {
  assert.equal(target('/v2/ghcr.io/team/app/manifests/v1'), 'ghcr.io:443 /v2/team/app/manifests/v1');
  assert.equal(target('/v2/registry.example.com_5443/app/tags/list'), 'registry.example.com:5443 /v2/app/tags/list');
  assert.equal(target('/v2/docker.io/alpine/manifests/3'), 'registry-1.docker.io:443 /v2/library/alpine/manifests/3');
});

test("dockerd: no registry named is Docker Hub (the default when it is in the policy), library/ added to one-segment names", () => {
  assert.equal(policy.mirror!.defaultRegistry, 'registry-1.docker.io:443');
  assert.equal(target('/v2/alpine/manifests/3.20'), 'registry-1.docker.io:443 /v2/library/alpine/manifests/3.20');
  assert.equal(target('/v2/library/alpine/blobs/sha256:abc'), 'registry-1.docker.io:443 /v2/library/alpine/blobs/sha256:abc');
  assert.equal(target('/v2/bitnami/redis/manifests/7'), 'registry-1.docker.io:443 /v2/bitnami/redis/manifests/7');
});

test('registries outside the policy, and no default to guess with, are refused', () => {
  assert.equal(target('/v2/x/manifests/1?ns=quay.io'), '404 NAME_UNKNOWN');
  assert.equal(target('/v2/quay.io/x/manifests/1'), '404 NAME_UNKNOWN');
  const noHub = parsePolicy('registries:\n  ghcr.io: {}\nmirror:\n  listen: 5000\n', 'proxy.yaml', {}, '/tmp');
  assert.equal(noHub.mirror!.defaultRegistry, undefined);
  const result = mirrorTarget(new URL('/v2/alpine/manifests/3', 'http://mirror'), noHub, noHub.mirror!);
  assert.ok('status' in result && result.status === 404 && /\?ns=/.test(result.message));
});

test('mirror: in proxy.yaml is validated with file:line', () => {
  assert.throws(() => parsePolicy('mirror:\n  tls: { names: [a] }\n', 'proxy.yaml', {}, '/tmp'), /proxy\.yaml:\d+.*listen/);
  assert.throws(() => parsePolicy('registries:\n  ghcr.io: {}\nmirror:\n  listen: 5000\n  default: quay.io\n', 'proxy.yaml', {}, '/tmp'), /proxy\.yaml:\d+.*quay\.io is not a registry of this policy/);
  assert.throws(() => parsePolicy('mirror:\n  listen: 5000\n  tls: { names: [a], cert: /x }\n', 'proxy.yaml', {}, '/tmp'), /proxy\.yaml:\d+.*cert and key together/);
  assert.throws(() => parsePolicy('mirror:\n  listen: 5000\n  tls: {}\n', 'proxy.yaml', {}, '/tmp'), /proxy\.yaml:\d+.*needs names/);
});
