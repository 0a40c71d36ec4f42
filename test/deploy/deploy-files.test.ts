// The deployment files (Dockerfile, deploy/compose.yaml, deploy/kubernetes/) read as text and YAML: a
// non-root user, a read-only root filesystem, data on a volume at the data directory and the CA on one
// of its own (compose, Kubernetes), port 3128, probes on /healthz, a system trust store, build secrets
// that stay out of the image, and a policy and environment the proxy's own loader accepts. No cluster
// runs here; test/e2e/image.test.ts builds the Dockerfile with podman and runs the image as compose
// does, and test/e2e/container.test.ts runs the Dockerfile's command on the host.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parse, parseAllDocuments } from 'yaml';
import { loadPolicy, parsePolicy } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import { parseSize } from '../../config/units.ts';

const ROOT = path.join(import.meta.dirname, '../..');
const read = (file: string) => readFileSync(path.join(ROOT, file), 'utf8');
/** What `npm start` runs after building, and so what the image must run. */
const START = ['dist/src/cli.js', 'start'];
/** The seed's variables (shared/CONFIG.md), each with a value that changes the image's policy. */
const SEED_VARIABLES: Record<string, NodeJS.ProcessEnv> = {
  REGISTRIES: { REGISTRIES: 'registry.example.com' },
  AUTH_REGISTRIES: { AUTH_REGISTRIES: 'quay.io:robot:secret' },
  AUTH_REGISTRIES_DELIMITER: { AUTH_REGISTRIES: 'quay.io:a:b,ghcr.io:c:d', AUTH_REGISTRIES_DELIMITER: ',' },
  AUTH_REGISTRY_DELIMITER: { AUTH_REGISTRIES: 'quay.io|robot|secret', AUTH_REGISTRY_DELIMITER: '|' },
  ENABLE_MANIFEST_CACHE: { ENABLE_MANIFEST_CACHE: 'false' },
  MANIFEST_CACHE_PRIMARY_REGEX: { MANIFEST_CACHE_PRIMARY_REGEX: 'main' },
  MANIFEST_CACHE_PRIMARY_TIME: { MANIFEST_CACHE_PRIMARY_TIME: '7s' },
  MANIFEST_CACHE_SECONDARY_REGEX: { MANIFEST_CACHE_SECONDARY_REGEX: 'v.*' },
  MANIFEST_CACHE_SECONDARY_TIME: { MANIFEST_CACHE_SECONDARY_TIME: '7s' },
  MANIFEST_CACHE_DEFAULT_TIME: { MANIFEST_CACHE_DEFAULT_TIME: '7s' },
  ALLOW_PUSH: { ALLOW_PUSH: 'true' },
  VERIFY_SSL: { VERIFY_SSL: 'false' },
  DISABLE_IPV6: { DISABLE_IPV6: 'true' },
  CACHE_MAX_SIZE: { CACHE_MAX_SIZE: '1g' },
  PROXY_REQUEST_BUFFERING: { PROXY_REQUEST_BUFFERING: 'true' },
  SEND_TIMEOUT: { SEND_TIMEOUT: '7s' },
  CLIENT_BODY_TIMEOUT: { CLIENT_BODY_TIMEOUT: '7s' },
  CLIENT_HEADER_TIMEOUT: { CLIENT_HEADER_TIMEOUT: '7s' },
  KEEPALIVE_TIMEOUT: { KEEPALIVE_TIMEOUT: '7s' },
  PROXY_READ_TIMEOUT: { PROXY_READ_TIMEOUT: '7s' },
  PROXY_CONNECT_TIMEOUT: { PROXY_CONNECT_TIMEOUT: '7s' },
  PROXY_SEND_TIMEOUT: { PROXY_SEND_TIMEOUT: '7s' },
  PROXY_CONNECT_CONNECT_TIMEOUT: { PROXY_CONNECT_CONNECT_TIMEOUT: '7s' },
  PROXY_CONNECT_READ_TIMEOUT: { PROXY_CONNECT_READ_TIMEOUT: '7s' },
  PROXY_CONNECT_SEND_TIMEOUT: { PROXY_CONNECT_SEND_TIMEOUT: '7s' },
};

interface Instruction {
  keyword: string;
  args: string;
}

/** The Dockerfile's instructions by stage (continuation lines joined, comments dropped). */
function dockerStages(text: string): Instruction[][] {
  const stages: Instruction[][] = [];
  for (const line of text.replace(/\\\r?\n/g, ' ').split('\n')) {
    const match = /^\s*([A-Za-z]+)\s+(.*?)\s*$/.exec(line);
    if (!match || line.trim().startsWith('#')) continue;
    const instruction = { keyword: match[1]!.toUpperCase(), args: match[2]! };
    if (instruction.keyword === 'FROM') stages.push([]);
    stages.at(-1)!.push(instruction);
  }
  return stages;
}

/** The policy the image's loader builds from its proxy.yaml and `env`. */
function imagePolicy(env: NodeJS.ProcessEnv): Policy {
  return loadPolicy({ configPath: path.join(ROOT, 'proxy.yaml'), env });
}

/** imagePolicy as comparable text, or the error it reports. */
function outcome(env: NodeJS.ProcessEnv): string {
  try {
    return JSON.stringify(imagePolicy(env), (_key, value: unknown) => (value instanceof Map ? [...value] : value instanceof RegExp ? String(value) : value));
  } catch (err) {
    return `error: ${(err as Error).message}`;
  }
}

const dockerfile = read('Dockerfile');
const stages = dockerStages(dockerfile);
const final = stages.at(-1)!;
/** The arguments of the final stage's instructions of one kind. */
const args = (keyword: string) => final.filter((i) => i.keyword === keyword).map((i) => i.args);
const imageEnv: Record<string, string> = Object.fromEntries(args('ENV').flatMap((a) => [...a.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!])));
const [healthcheck = ''] = args('HEALTHCHECK');

describe('Dockerfile', () => {
  test('builds in a node:24-slim stage and runs in another, with production packages only', () => {
    assert.ok(stages.length >= 2, 'multi-stage');
    for (const stage of stages) assert.match(stage[0]!.args, /^node:24-slim\b/);
    const runs = stages.flat().filter((i) => i.keyword === 'RUN').map((i) => i.args);
    assert.ok(runs.some((r) => /\bnpm ci\b.*--omit=dev\b/.test(r)), 'npm ci --omit=dev');
    assert.ok(!runs.some((r) => /\bnpm (ci|install|i)\b/.test(r) && !r.includes('--omit=dev')), 'no install with devDependencies');
    assert.ok(runs.some((r) => r.includes('node src/build.ts')), 'dist/ is built');
    assert.ok(final.some((i) => i.keyword === 'COPY' && /^--from=\w+\s+\S*dist\b/.test(i.args)), 'the final stage takes dist/ from the build');
  });

  test('copies nothing that .dockerignore leaves out of the build context', () => {
    const ignored = read('.dockerignore').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
    const sources = stages.flat().filter((i) => i.keyword === 'COPY' && !i.args.startsWith('--from')).flatMap((i) => i.args.split(/\s+/).slice(0, -1));
    assert.ok(sources.length > 0);
    for (const source of sources) {
      assert.ok(existsSync(path.join(ROOT, source)), `${source} exists`);
      assert.ok(!ignored.some((pattern) => source === pattern || source.startsWith(`${pattern}/`)), `${source} is in the build context`);
    }
  });

  test('runs as a numeric non-root user with its data in a volume at PULLTHROUGH_DATA_DIR', () => {
    const [user] = args('USER').slice(-1);
    assert.match(user ?? '', /^\d+(:\d+)?$/, 'numeric, so that runAsNonRoot can verify it');
    assert.notEqual(user!.split(':')[0], '0');
    assert.equal(imageEnv.PULLTHROUGH_DATA_DIR, '/data');
    assert.ok(args('VOLUME').some((v) => v.includes('"/data"') || v === '/data'), 'VOLUME /data');
    assert.ok(args('RUN').some((r) => r.includes('chown') && r.includes('/data')), '/data belongs to the user before the volume is declared');
  });

  test('keeps the CA in /data unless PULLTHROUGH_CA_DIR is set, with /ca ready for it', () => {
    // Unset in the image: `docker run -v x:/data` keeps its CA in that one volume (a VOLUME /ca would be
    // an anonymous volume, lost with the container, and with it the CA the clients trust).
    assert.equal(imageEnv.PULLTHROUGH_CA_DIR, undefined);
    assert.equal(imagePolicy({ PULLTHROUGH_DATA_DIR: '/data' }).caDir, '/data');
    assert.ok(!args('VOLUME').some((v) => v.includes('/ca')), 'no anonymous volume for the CA');
    // deploy/compose.yaml and deploy/kubernetes set it to /ca: a new named volume there takes the
    // directory's owner from the image, so it must be the proxy's user.
    const [user] = args('USER').slice(-1);
    assert.ok(args('RUN').some((r) => /\bmkdir\b.*\s\/ca\b/.test(r) && new RegExp(`chown ${user}\\b.*\\s/ca\\b`).test(r)), `/ca is made and given to ${user}`);
  });

  test('has a system trust store: ca-certificates in the final stage, without apt lists left behind', () => {
    const install = args('RUN').find((r) => /\bapt-get install\b.*\bca-certificates\b/.test(r));
    assert.ok(install, 'the final stage installs ca-certificates');
    assert.match(install, /--no-install-recommends/);
    assert.match(install, /rm -rf \/var\/lib\/apt\/lists/);
  });

  test('takes a build-time CA and .npmrc as secret mounts of the npm ci step, and keeps them nowhere else', () => {
    const runs = stages.flat().filter((i) => i.keyword === 'RUN').map((i) => i.args);
    const npmCi = runs.find((r) => /\bnpm ci\b/.test(r));
    assert.match(npmCi ?? '', /--mount=type=secret,id=ca\b/);
    assert.match(npmCi ?? '', /--mount=type=secret,id=npmrc,target=\/root\/\.npmrc\b/);
    assert.match(npmCi ?? '', /NODE_EXTRA_CA_CERTS=\/run\/secrets\/ca\b/, 'the CA is added to Node\'s roots, not put in their place');
    for (const instruction of stages.flat().filter((i) => i.args !== npmCi)) {
      assert.ok(!/\/run\/secrets|\.npmrc/.test(instruction.args), `${instruction.keyword} ${instruction.args} touches no secret`);
    }
    assert.match(dockerfile, /podman build --format docker\b/, 'podman users are told to keep the HEALTHCHECK');
  });

  test('listens on 3128 and checks its health on /healthz', () => {
    assert.equal(imageEnv.PULLTHROUGH_LISTEN, '0.0.0.0:3128');
    assert.deepEqual(args('EXPOSE'), ['3128']);
    assert.match(healthcheck, /\bCMD \[.*\/healthz/);
  });

  test('starts the command npm start runs, from dist/', () => {
    const [entrypoint] = args('ENTRYPOINT');
    const [cmd] = args('CMD');
    const command = [...(JSON.parse(entrypoint!) as string[]), ...(JSON.parse(cmd!) as string[])];
    assert.deepEqual(command, ['node', ...START]);
    const start = (JSON.parse(read('package.json')) as { scripts: Record<string, string> }).scripts.start!;
    assert.ok(start.endsWith(START.join(' ')), start);
    // container.test.ts runs these very instructions: the same WORKDIR holds dist/ there.
    assert.deepEqual(args('WORKDIR'), ['/app']);
  });

  test("documents the seed's variables, and each of them changes the policy", () => {
    const comments = dockerfile.split('\n').filter((l) => l.startsWith('#')).join('\n');
    const baseline = outcome({});
    assert.ok(!baseline.startsWith('error'), baseline);
    for (const [name, sample] of Object.entries(SEED_VARIABLES)) {
      assert.match(comments, new RegExp(`\\b${name}\\b`), `${name} is documented`);
      const without = outcome({ ...sample, [name]: undefined });
      assert.ok(outcome(sample) !== without, `${name} changes the policy`);
    }
  });
});

interface ComposeService {
  image?: string;
  build?: { context: string; dockerfile: string };
  ports?: string[];
  volumes?: string[];
  read_only?: boolean;
  environment?: Record<string, string>;
  env_file?: Array<{ path: string; required?: boolean }>;
  healthcheck?: { test: string[] };
  restart?: string;
}

describe('deploy/compose.yaml', () => {
  const compose = parse(read('deploy/compose.yaml')) as { services: Record<string, ComposeService>; volumes?: Record<string, unknown> };
  const service = compose.services.pullthrough!;

  test('builds the Dockerfile and publishes 3128', () => {
    assert.ok(service.image);
    assert.equal(path.resolve(ROOT, 'deploy', service.build!.context, service.build!.dockerfile), path.join(ROOT, 'Dockerfile'));
    assert.deepEqual(service.ports, ['3128:3128']);
    assert.ok(service.restart === 'unless-stopped' || service.restart === 'always', `restart: ${service.restart}`);
  });

  test('keeps /data and the CA on named volumes of their own and the root filesystem read-only', () => {
    assert.equal(service.read_only, true);
    const caDir = service.environment?.PULLTHROUGH_CA_DIR;
    assert.equal(caDir, '/ca', 'the directory the image has made for it');
    const [data, ca] = ['/data', caDir].map((mountPath) => {
      const volume = service.volumes?.find((v) => v.split(':')[1] === mountPath);
      assert.ok(volume, `a volume at ${mountPath}`);
      assert.ok(compose.volumes && volume.split(':')[0]! in compose.volumes, `a named volume at ${mountPath}, not a host directory`);
      return volume.split(':')[0];
    });
    assert.notEqual(data, ca, 'the CA survives removing the cache volume');
    assert.equal(imagePolicy({ ...imageEnv, ...service.environment }).caDir, caDir);
  });

  test("checks health with the image's own HEALTHCHECK command", () => {
    assert.deepEqual(service.healthcheck?.test, ['CMD', ...(JSON.parse(healthcheck.slice(healthcheck.indexOf('CMD ') + 4)) as string[])]);
  });

  test('its environment is accepted by the loader and keeps credentials in an env file', () => {
    const environment = service.environment ?? {};
    const policy = imagePolicy(environment);
    for (const host of environment.REGISTRIES!.split(/\s+/)) assert.ok(policy.registries.has(`${host}:443`), `${host} is intercepted`);
    assert.ok(!('AUTH_REGISTRIES' in environment), 'no credentials inline');
    assert.ok(service.env_file?.some((f) => f.path.endsWith('.env') && f.required === false));
  });
});

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { secretKeyRef?: { name: string; key: string; optional?: boolean } };
}
interface Probe {
  httpGet?: { path: string; port: string | number };
}
interface Container {
  name: string;
  image: string;
  ports: Array<{ name?: string; containerPort: number }>;
  env?: EnvVar[];
  volumeMounts: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
  securityContext?: { readOnlyRootFilesystem?: boolean; allowPrivilegeEscalation?: boolean; runAsNonRoot?: boolean };
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  resources?: { requests?: Record<string, string> };
}
interface Manifest {
  kind: string;
  metadata: { name: string };
  data?: Record<string, string>;
  stringData?: Record<string, string>;
  spec?: {
    serviceName?: string;
    replicas?: number;
    selector?: { matchLabels?: Record<string, string> } & Record<string, unknown>;
    ports?: Array<{ port: number; targetPort: string | number }>;
    template?: {
      metadata: { labels: Record<string, string> };
      spec: {
        securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; fsGroup?: number };
        containers: Container[];
        volumes?: Array<{ name: string; configMap?: { name: string } }>;
      };
    };
    volumeClaimTemplates?: Array<{ metadata: { name: string }; spec: { resources: { requests: { storage: string } } } }>;
  };
}

describe('deploy/kubernetes', () => {
  const dir = path.join(ROOT, 'deploy/kubernetes');
  const kustomization = parse(readFileSync(path.join(dir, 'kustomization.yaml'), 'utf8')) as { resources: string[]; images?: Array<{ name: string }> };
  const manifests = kustomization.resources.flatMap((file) =>
    parseAllDocuments(readFileSync(path.join(dir, file), 'utf8')).map((doc) => {
      assert.deepEqual(doc.errors, [], file);
      return doc.toJS() as Manifest;
    }),
  );
  const one = (kind: string) => {
    const found = manifests.filter((m) => m.kind === kind);
    assert.equal(found.length, 1, `one ${kind}`);
    return found[0]!;
  };
  const statefulSet = one('StatefulSet');
  const pod = statefulSet.spec!.template!;
  const container = pod.spec.containers[0]!;
  const envValue = (name: string) => container.env?.find((e) => e.name === name)?.value;
  const configMap = one('ConfigMap');
  const secret = one('Secret');

  test('a Service on 3128 reaches the StatefulSet pods on their proxy port', () => {
    const service = one('Service');
    assert.equal(statefulSet.spec!.serviceName, service.metadata.name);
    assert.deepEqual(statefulSet.spec!.selector!.matchLabels, service.spec!.selector);
    for (const [key, value] of Object.entries(service.spec!.selector!)) assert.equal(pod.metadata.labels[key], value);
    const [port] = service.spec!.ports!;
    assert.equal(port!.port, 3128);
    assert.equal(container.ports.find((p) => p.name === port!.targetPort || p.containerPort === port!.targetPort)?.containerPort, 3128);
    assert.ok(kustomization.images?.some((i) => i.name === container.image), 'the image is set by the kustomization');
  });

  test('runs as non-root with a read-only root filesystem and a writable volume group', () => {
    const pss = pod.spec.securityContext!;
    assert.equal(pss.runAsNonRoot, true);
    assert.ok(pss.runAsUser && pss.runAsUser > 0);
    assert.ok(pss.fsGroup && pss.fsGroup > 0, 'fsGroup makes the volume writable by the user');
    assert.equal(container.securityContext?.readOnlyRootFilesystem, true);
    assert.equal(container.securityContext?.allowPrivilegeEscalation, false);
    assert.ok(container.resources?.requests?.cpu && container.resources.requests.memory, 'resource requests');
  });

  test('keeps the data on a claim mounted at the data directory, larger than the cache', () => {
    const claims = statefulSet.spec!.volumeClaimTemplates ?? [];
    const data = container.volumeMounts.find((m) => m.mountPath === (envValue('PULLTHROUGH_DATA_DIR') ?? imageEnv.PULLTHROUGH_DATA_DIR));
    assert.ok(data && claims.some((c) => c.metadata.name === data.name), 'a volumeClaimTemplate at /data');
    const storage = parseSize(claims.find((c) => c.metadata.name === data.name)!.spec.resources.requests.storage.replace(/i$/, 'iB'));
    const policy = parsePolicy(configMap.data!['proxy.yaml']!, 'proxy.yaml', {}, '/etc/pullthrough');
    assert.ok(policy.cache.maxSize + policy.cache.minFree <= storage, 'maxSize + minFree fit in the claim');
  });

  test('keeps the CA on a claim of its own, mounted where PULLTHROUGH_CA_DIR points', () => {
    const claims = statefulSet.spec!.volumeClaimTemplates ?? [];
    const caDir = envValue('PULLTHROUGH_CA_DIR');
    assert.equal(caDir, '/ca', 'the directory the image has made for it');
    const ca = container.volumeMounts.find((m) => m.mountPath === caDir);
    const data = container.volumeMounts.find((m) => m.mountPath === imageEnv.PULLTHROUGH_DATA_DIR);
    assert.ok(ca && claims.some((c) => c.metadata.name === ca.name), `a volumeClaimTemplate at ${caDir}`);
    assert.notEqual(ca.name, data?.name, 'not the data claim: the CA outlives the cache');
    assert.ok(!ca.readOnly, 'writable: the CA is created there at the first start');
    const storage = parseSize(claims.find((c) => c.metadata.name === ca.name)!.spec.resources.requests.storage.replace(/i$/, 'iB'));
    assert.ok(storage >= 1024 ** 2 && storage <= 1024 ** 3, `a small claim (${storage} bytes) for three small files`);
    // The pod's policy: the ConfigMap's proxy.yaml with the image's and the container's environment.
    const configFile = path.join(mkdtempSync(path.join(os.tmpdir(), 'pullthrough-deploy-')), 'proxy.yaml');
    writeFileSync(configFile, configMap.data!['proxy.yaml']!);
    const env = Object.fromEntries((container.env ?? []).filter((e) => e.value !== undefined).map((e) => [e.name, e.value]));
    const policy = loadPolicy({ env: { ...imageEnv, ...env, PULLTHROUGH_CONFIG: configFile } });
    rmSync(path.dirname(configFile), { recursive: true });
    assert.equal(policy.caDir, caDir);
    assert.equal(policy.dataDir, imageEnv.PULLTHROUGH_DATA_DIR);
  });

  test('probes /healthz on the proxy port', () => {
    for (const probe of [container.readinessProbe, container.livenessProbe]) {
      assert.equal(probe?.httpGet?.path, '/healthz');
      const port = probe.httpGet.port;
      assert.equal(typeof port === 'number' ? port : container.ports.find((p) => p.name === port)?.containerPort, 3128);
    }
  });

  test("mounts the ConfigMap's proxy.yaml where PULLTHROUGH_CONFIG points", () => {
    const configPath = envValue('PULLTHROUGH_CONFIG')!;
    const mount = container.volumeMounts.find((m) => m.mountPath === path.dirname(configPath));
    assert.ok(mount?.readOnly, 'a read-only mount of the config directory');
    assert.equal(pod.spec.volumes?.find((v) => v.name === mount.name)?.configMap?.name, configMap.metadata.name);
    assert.ok(configMap.data?.[path.basename(configPath)], `the ConfigMap has ${path.basename(configPath)}`);
  });

  test("fills the policy's ${VAR}s from the Secret, whose keys all exist", () => {
    const text = configMap.data!['proxy.yaml']!;
    const fromSecret = (container.env ?? []).filter((e) => e.valueFrom?.secretKeyRef);
    for (const e of fromSecret) {
      assert.equal(e.valueFrom!.secretKeyRef!.name, secret.metadata.name);
      assert.ok(e.valueFrom!.secretKeyRef!.key in (secret.stringData ?? secret.data ?? {}), `the Secret has ${e.valueFrom!.secretKeyRef!.key}`);
    }
    const set = new Set((container.env ?? []).map((e) => e.name));
    for (const [, name] of text.matchAll(/\$\{(\w+)(?::-[^}]*)?\}/g)) assert.ok(set.has(name!), `\${${name}} is in the container's env`);

    // With every Secret value filled in (they are empty in the file: anonymous pulls), they reach the policy.
    const env = Object.fromEntries(fromSecret.map((e) => [e.name, `test-${e.valueFrom!.secretKeyRef!.key}`]));
    const policy: Policy = parsePolicy(text, 'proxy.yaml', env, '/etc/pullthrough');
    const auth = policy.registries.get('registry-1.docker.io:443')?.auth;
    assert.equal(auth?.username, env.DOCKERHUB_USERNAME);
    assert.equal(auth?.password, env.DOCKERHUB_TOKEN);
    assert.equal(parsePolicy(text, 'proxy.yaml', {}, '/etc/pullthrough').registries.get('registry-1.docker.io:443')?.auth, undefined, 'anonymous without them');
  });
});
