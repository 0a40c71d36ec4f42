import assert from 'node:assert/strict';
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isRuntime, setupScript, type Runtime, type SetupOptions } from '../../src/admin/setup-scripts.ts';

const RUNTIMES: readonly Runtime[] = ['docker', 'containerd', 'podman'];

/** Each runtime's configuration file, relative to ROOT. */
const CONFIG_FILE: Record<Runtime, string> = {
  docker: 'etc/systemd/system/docker.service.d/http-proxy.conf',
  containerd: 'etc/systemd/system/containerd.service.d/http-proxy.conf',
  podman: 'etc/containers/containers.conf.d/pullthrough-proxy.conf',
};

/** What the script runs (and, under ROOT, only prints) once it has changed something. */
const RESTART: Record<Runtime, string> = {
  docker: 'systemctl restart docker.service',
  containerd: 'systemctl restart containerd.service',
  podman: 'systemctl try-restart podman.service',
};

const DEBIAN_CA = 'usr/local/share/ca-certificates/pullthrough-ca.crt';
const REDHAT_CA = 'etc/pki/ca-trust/source/anchors/pullthrough-ca.crt';

/** The host layouts a script is tried on: the marker file faked under ROOT, and where the CA must land. */
const LAYOUTS = [
  { name: 'Debian/Ubuntu', marker: 'etc/debian_version', ca: DEBIAN_CA, refresh: 'update-ca-certificates' },
  { name: 'RHEL/Fedora', marker: 'etc/redhat-release', ca: REDHAT_CA, refresh: 'update-ca-trust extract' },
  { name: 'an unrecognised host', marker: undefined, ca: DEBIAN_CA, refresh: 'update-ca-certificates' },
] as const;

const PROXY = 'http://proxy.example:3128';
const NO_PROXY = 'localhost,127.0.0.0/8,::1,.svc,.cluster.local,169.254.169.254,proxy.example,10.96.0.0/12,.corp.example';

let work: string;
let fakeBin: string;
let caPem: string;

before(() => {
  work = mkdtempSync(join(tmpdir(), 'pullthrough-setup-'));
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=test', '-days', '1',
    '-keyout', join(work, 'ca.key'), '-out', join(work, 'ca.pem'),
  ], { stdio: 'ignore' });
  caPem = readFileSync(join(work, 'ca.pem'), 'utf8');
  // Stand-ins for the commands a dry run must never call: each records the call, then fails.
  fakeBin = join(work, 'bin');
  mkdirSync(fakeBin);
  for (const cmd of ['systemctl', 'update-ca-certificates', 'update-ca-trust']) {
    writeFileSync(join(fakeBin, cmd), `#!/bin/sh\necho "${cmd} $*" >>"${join(work, 'called')}"\nexit 1\n`);
    chmodSync(join(fakeBin, cmd), 0o755);
  }
});

after(() => rmSync(work, { recursive: true, force: true }));

function options(overrides: Partial<SetupOptions> = {}): SetupOptions {
  // Duplicates on purpose: the defaults and each other, in other cases.
  return { proxyUrl: PROXY, caPem, noProxy: ['10.96.0.0/12', 'LOCALHOST', '.corp.example', '10.96.0.0/12'], ...overrides };
}

/** Runs a script the way users do (`curl … | bash`: the script on stdin), with the fake commands first on PATH. */
function runBash(script: string, env: Record<string, string>, wrapper: string[] = []): SpawnSyncReturns<string> {
  const [cmd = 'bash', ...args] = [...wrapper, 'bash'];
  return spawnSync(cmd, args, {
    input: script,
    encoding: 'utf8',
    env: { PATH: `${fakeBin}:${process.env['PATH'] ?? '/usr/bin:/bin'}`, ...env },
  });
}

function newRoot(marker: string | undefined): string {
  const root = mkdtempSync(join(work, 'root-'));
  if (marker !== undefined) {
    mkdirSync(join(root, 'etc'), { recursive: true });
    writeFileSync(join(root, marker), 'test\n');
  }
  return root;
}

/** Every file under dir, by relative path, with its content and modification time. */
function snapshot(dir: string): Map<string, { content: string; mtimeMs: number }> {
  const files = readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((p) => statSync(join(dir, p)).isFile())
    .sort();
  return new Map(files.map((p) => [p, { content: readFileSync(join(dir, p), 'utf8'), mtimeMs: statSync(join(dir, p)).mtimeMs }]));
}

/** The proxy variables a configuration file sets: systemd `Environment="K=V" …` or containers.conf `env = ["K=V", …]`. */
function proxyEnvironment(runtime: Runtime, text: string): Record<string, string> {
  const assignments =
    runtime === 'podman'
      ? [...text.matchAll(/^\s+"([^"]*)",$/gm)].map((m) => m[1] ?? '')
      : text
          .split('\n')
          .filter((l) => l.startsWith('Environment='))
          .flatMap((l) => [...l.matchAll(/"([^"]*)"/g)].map((m) => m[1] ?? ''));
  return Object.fromEntries(assignments.map((a) => [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]));
}

function calledCommands(): string {
  try {
    return readFileSync(join(work, 'called'), 'utf8');
  } catch {
    return '';
  }
}

describe('isRuntime', () => {
  test('accepts the three runtimes and nothing else', () => {
    for (const r of RUNTIMES) assert.ok(isRuntime(r));
    for (const s of ['', 'Docker', 'systemd', 'cri-o', 'toString', '__proto__']) assert.ok(!isRuntime(s), s);
  });
});

describe('setupScript', () => {
  for (const runtime of RUNTIMES) {
    describe(runtime, () => {
      test('is valid bash', () => {
        const r = spawnSync('bash', ['-n'], { input: setupScript(runtime, options()), encoding: 'utf8' });
        assert.equal(r.status, 0, r.stderr);
      });

      for (const layout of LAYOUTS) {
        test(`under ROOT on ${layout.name}: writes exactly the CA and ${CONFIG_FILE[runtime]}, runs nothing`, () => {
          const root = newRoot(layout.marker);
          const script = setupScript(runtime, options());

          const first = runBash(script, { ROOT: root });
          assert.equal(first.status, 0, first.stderr);
          const files = snapshot(root);
          const expected = [layout.marker, layout.ca, CONFIG_FILE[runtime]].filter((p) => p !== undefined);
          assert.deepEqual([...files.keys()].sort(), expected.sort());
          assert.equal(files.get(layout.ca)?.content, caPem);

          const config = files.get(CONFIG_FILE[runtime])?.content ?? '';
          assert.deepEqual(proxyEnvironment(runtime, config), {
            HTTP_PROXY: PROXY, HTTPS_PROXY: PROXY, NO_PROXY,
            http_proxy: PROXY, https_proxy: PROXY, no_proxy: NO_PROXY,
          });
          if (runtime === 'podman') assert.match(config, /^\[containers\]\n(?:#.*\n)*http_proxy = false$/m);
          else assert.match(config, /^\[Service\]$/m);

          assert.equal(calledCommands(), '', 'a dry run called a real command');
          assert.match(first.stdout, new RegExp(`would run: ${layout.refresh}`));
          assert.match(first.stdout, new RegExp(`would run: ${RESTART[runtime]}`));
          if (layout.marker === undefined) assert.match(first.stderr, /warning: .*Debian layout/);

          const second = runBash(script, { ROOT: root });
          assert.equal(second.status, 0, second.stderr);
          assert.deepEqual(snapshot(root), files, 'the second run changed the files');
          assert.match(second.stdout, /nothing changed; .* not restarted/);
          assert.doesNotMatch(second.stdout, /wrote:|systemctl/);
        });
      }

      test('refuses to run without root when ROOT is empty', () => {
        // The test usually runs as root itself: then it drops to nobody for the script.
        const asNobody = process.getuid?.() === 0 ? ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] : [];
        const r = runBash(setupScript(runtime, options()), { ROOT: '' }, asNobody);
        assert.notEqual(r.status, 0);
        assert.match(r.stderr, /error: must run as root: curl -fsSL http:\/\/proxy\.example:3128\/setup\/\w+ \| sudo bash/);
        assert.equal(calledCommands(), '');
      });

      test('leaves credentials in proxyUrl out of the script', () => {
        const script = setupScript(runtime, options({ proxyUrl: 'http://alice:s3cr%40t@proxy.example:3128/' }));
        assert.doesNotMatch(script, /alice|s3cr/);
        assert.match(script, /HTTPS_PROXY=http:\/\/proxy\.example:3128"/);
      });
    });
  }

  test('puts an IPv6 proxy in NO_PROXY without brackets', () => {
    const script = setupScript('docker', options({ proxyUrl: 'http://[fd00::1]:3128', noProxy: [] }));
    assert.match(script, /"HTTPS_PROXY=http:\/\/\[fd00::1\]:3128"/);
    assert.match(script, /"NO_PROXY=localhost,127\.0\.0\.0\/8,::1,\.svc,\.cluster\.local,169\.254\.169\.254,fd00::1"/);
  });

  test('throws on a NO_PROXY entry a shell or systemd could interpret', () => {
    for (const entry of ['$(touch /tmp/pwned)', '`id`', 'a"b', "a'b", 'a b', 'a;b', 'a\nb', '%h', 'a\\b', '']) {
      assert.throws(() => setupScript('docker', options({ noProxy: [entry] })), /NO_PROXY entry .* may only contain/, entry);
    }
  });

  test('throws on a proxyUrl that is not a plain http(s) origin', () => {
    const bad = [
      'http://a$(touch /tmp/pwned)b:3128', 'http://a`id`b', "http://a'b", 'http://a"b', 'http://a;b',
      'ftp://proxy.example:21', 'file:///etc/passwd', 'proxy.example:3128', 'not a url',
      'http://proxy.example:3128/path', 'http://proxy.example:3128/?q=1',
    ];
    for (const proxyUrl of bad) {
      assert.throws(() => setupScript('podman', options({ proxyUrl })), /setup script: proxyUrl/, proxyUrl);
    }
  });

  test('throws on a caPem that is not just certificates', () => {
    for (const pem of ['hello', `${caPem}PULLTHROUGH_EOF\n$(touch /tmp/pwned)\n`, caPem.replace('MII', 'M$(id)')]) {
      assert.throws(() => setupScript('containerd', options({ caPem: pem })), /caPem must be PEM certificates/);
    }
  });
});
