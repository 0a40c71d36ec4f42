// The deployment files (Dockerfile, deploy/compose.yaml, deploy/kubernetes/) read as text and YAML: a
// non-root user, a read-only root filesystem, data on a volume at the data directory and the CA on one
// of its own (compose) or one Secret for every replica (Kubernetes), port 3128, probes on /healthz and
// /readyz, a system trust store, build secrets that stay out of the image, and a policy and environment
// the proxy's own loader accepts; for Kubernetes, three replicas in cluster mode whose Services, budget
// and policy agree on the pods, the peer port and the peers' name. No cluster runs here; test/e2e/image.test.ts builds the Dockerfile with podman and runs the image as compose
// does, and test/e2e/container.test.ts runs the Dockerfile's command on the host.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
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
const START = ['--heap-growing-percent=50', 'dist/src/cli.js', 'start'];
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
  valueFrom?: { secretKeyRef?: { name: string; key: string; optional?: boolean }; fieldRef?: { fieldPath: string } };
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
  lifecycle?: { preStop?: { sleep?: { seconds: number } } };
  resources?: { requests?: Record<string, string> };
}
interface LabelSelector {
  matchLabels?: Record<string, string>;
}
interface PodAffinityTerm {
  topologyKey: string;
  labelSelector?: LabelSelector;
}
interface Volume {
  name: string;
  configMap?: { name: string };
  secret?: { secretName: string; defaultMode?: number; items?: Array<{ key: string; path: string }> };
}
interface Manifest {
  apiVersion: string;
  kind: string;
  metadata: { name: string };
  data?: Record<string, string>;
  stringData?: Record<string, string>;
  spec?: {
    serviceName?: string;
    replicas?: number;
    podManagementPolicy?: string;
    type?: string;
    clusterIP?: string;
    publishNotReadyAddresses?: boolean;
    maxUnavailable?: number | string;
    minAvailable?: number | string;
    selector?: LabelSelector & Record<string, unknown>;
    podSelector?: LabelSelector;
    policyTypes?: string[];
    ingress?: Array<{ from?: Array<{ podSelector?: LabelSelector } & Record<string, unknown>>; ports?: Array<{ protocol?: string; port: number | string }> }>;
    ports?: Array<{ name?: string; port: number; targetPort: string | number }>;
    template?: {
      metadata: { labels: Record<string, string> };
      spec: {
        securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; fsGroup?: number };
        topologySpreadConstraints?: Array<{ topologyKey: string; maxSkew: number; labelSelector?: LabelSelector }>;
        affinity?: {
          podAntiAffinity?: {
            requiredDuringSchedulingIgnoredDuringExecution?: PodAffinityTerm[];
            preferredDuringSchedulingIgnoredDuringExecution?: Array<{ podAffinityTerm: PodAffinityTerm }>;
          };
        };
        containers: Container[];
        volumes?: Volume[];
      };
    };
    volumeClaimTemplates?: Array<{ metadata: { name: string }; spec: { resources: { requests: { storage: string } } } }>;
  };
}

/** The `kubectl create secret generic` commands in a text (continued lines joined): the Secret's name, its keys and the files they are read from. */
function secretCommands(text: string): Array<{ name: string; keys: Set<string>; files: Map<string, string> }> {
  return text
    .replace(/\\\n\s*/g, ' ')
    .split('\n')
    .flatMap((line) => {
      const match = /kubectl create secret generic ([\w.-]+)(.*)/.exec(line);
      if (!match) return [];
      const keys = new Set<string>();
      const files = new Map<string, string>();
      for (const [, kind, first, rest] of match[2]!.matchAll(/--from-(file|literal)=([^\s="]+)(?:=(\S+))?/g)) {
        // --from-file=path names the key after the file; --from-file=key=path and --from-literal=key=value name it.
        const key = kind === 'file' && rest === undefined ? path.basename(first!) : first!;
        keys.add(key);
        if (kind === 'file') files.set(key, rest ?? first!);
      }
      return [{ name: match[1]!, keys, files }];
    });
}

describe('deploy/kubernetes', () => {
  const dir = path.join(ROOT, 'deploy/kubernetes');
  const kustomization = parse(readFileSync(path.join(dir, 'kustomization.yaml'), 'utf8')) as { namespace?: string; resources: string[]; images?: Array<{ name: string }> };
  // YAML 1.1, as Kubernetes reads it: `defaultMode: 0400` is octal.
  const manifests = kustomization.resources.flatMap((file) =>
    parseAllDocuments(readFileSync(path.join(dir, file), 'utf8'), { version: '1.1' }).map((doc) => {
      assert.deepEqual(doc.errors, [], file);
      return doc.toJS() as Manifest;
    }),
  );
  const one = (kind: string, which: (m: Manifest) => boolean = () => true) => {
    const found = manifests.filter((m) => m.kind === kind && which(m));
    assert.equal(found.length, 1, `one ${kind}`);
    return found[0]!;
  };
  const statefulSet = one('StatefulSet');
  const pod = statefulSet.spec!.template!;
  const container = pod.spec.containers[0]!;
  const envValue = (name: string) => container.env?.find((e) => e.name === name)?.value;
  const configMap = one('ConfigMap');
  const credentials = one('Secret');
  const peersService = one('Service', (s) => s.spec?.clusterIP === 'None');
  const clientService = one('Service', (s) => s.spec?.clusterIP !== 'None');
  /** A container port by the name or number a Service or probe gives. */
  const containerPort = (port: string | number | undefined) => (typeof port === 'number' ? port : container.ports.find((p) => p.name === port)?.containerPort);
  /** True when a selector picks exactly the StatefulSet's pods: its labels are the StatefulSet's selector. */
  const selectsThePods = (labels: Record<string, string> | undefined) => {
    assert.ok(labels && Object.keys(labels).length > 0, 'a selector with labels');
    assert.deepEqual(labels, statefulSet.spec!.selector!.matchLabels);
    for (const [key, value] of Object.entries(labels)) assert.equal(pod.metadata.labels[key], value, `the pods have ${key}=${value}`);
    return true;
  };
  const namespace = kustomization.namespace ?? 'pullthrough';
  const podIp = '10.244.1.7';
  const peerSecret = 'a'.repeat(64);
  /** What the pod's environment holds: the values, the downward API's fields as a pod in `namespace` has them, and the Secrets' values. */
  const podEnv = (): NodeJS.ProcessEnv =>
    Object.fromEntries(
      (container.env ?? []).map((e) => {
        const field = e.valueFrom?.fieldRef?.fieldPath;
        const value = e.value ?? (field === 'status.podIP' ? podIp : field === 'metadata.namespace' ? namespace : e.valueFrom?.secretKeyRef?.key === 'PULLTHROUGH_PEER_SECRET' ? peerSecret : `test-${e.name}`);
        return [e.name, value];
      }),
    );
  /** The pod's policy: the ConfigMap's proxy.yaml loaded as the pod loads it, with the image's and the pod's environment. */
  const podPolicy = (): Policy => {
    const configFile = path.join(mkdtempSync(path.join(os.tmpdir(), 'pullthrough-deploy-')), 'proxy.yaml');
    writeFileSync(configFile, configMap.data!['proxy.yaml']!);
    try {
      return loadPolicy({ env: { ...imageEnv, ...podEnv(), PULLTHROUGH_CONFIG: configFile } });
    } finally {
      rmSync(path.dirname(configFile), { recursive: true });
    }
  };

  test('runs three replicas, started in parallel, spread across nodes', () => {
    assert.equal(statefulSet.spec!.replicas, 3, 'one node down leaves two');
    assert.equal(statefulSet.spec!.podManagementPolicy, 'Parallel', 'replicas need not wait for each other to start');
    const spread = pod.spec.topologySpreadConstraints?.find((c) => c.topologyKey === 'kubernetes.io/hostname');
    const antiAffinity = pod.spec.affinity?.podAntiAffinity;
    const antiTerms = [...(antiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? []), ...(antiAffinity?.preferredDuringSchedulingIgnoredDuringExecution ?? []).map((t) => t.podAffinityTerm)];
    const anti = antiTerms.find((t) => t.topologyKey === 'kubernetes.io/hostname');
    assert.ok(spread || anti, 'a topology spread constraint or a pod anti-affinity on kubernetes.io/hostname');
    if (spread) {
      assert.equal(spread.maxSkew, 1);
      selectsThePods(spread.labelSelector?.matchLabels);
    }
    if (anti) selectsThePods(anti.labelSelector?.matchLabels);
  });

  test('a ClusterIP Service on 3128 reaches the ready pods on their proxy port', () => {
    assert.equal(clientService.metadata.name, 'pullthrough', 'the name docs/setup.md gets the ClusterIP of');
    assert.ok(clientService.spec!.type === undefined || clientService.spec!.type === 'ClusterIP');
    assert.ok(!clientService.spec!.publishNotReadyAddresses, 'clients reach ready replicas only');
    selectsThePods(clientService.spec!.selector as Record<string, string>);
    const [port] = clientService.spec!.ports!;
    assert.equal(port!.port, 3128);
    assert.equal(containerPort(port!.targetPort), 3128);
    assert.ok(kustomization.images?.some((i) => i.name === container.image), 'the image is set by the kustomization');
  });

  test('a headless Service lists every replica, ready or not, on the peer port, and governs the StatefulSet', () => {
    assert.equal(peersService.spec!.clusterIP, 'None', 'headless: its name resolves to the pod IPs');
    assert.equal(peersService.spec!.publishNotReadyAddresses, true, 'a replica is ready only once it has found its peers');
    selectsThePods(peersService.spec!.selector as Record<string, string>);
    assert.equal(statefulSet.spec!.serviceName, peersService.metadata.name);
    const [port] = peersService.spec!.ports!;
    assert.equal(port!.port, 3129);
    // Peers connect to pod IPs directly: the Service's port must be the container's.
    assert.equal(containerPort(port!.targetPort), port!.port);
  });

  test('a PodDisruptionBudget lets one replica at a time be evicted', () => {
    const pdb = one('PodDisruptionBudget');
    assert.equal(pdb.apiVersion, 'policy/v1');
    assert.equal(pdb.spec!.maxUnavailable, 1);
    assert.equal(pdb.spec!.minAvailable, undefined);
    selectsThePods(pdb.spec!.selector!.matchLabels);
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

  test('keeps each replica\'s data on a claim mounted at the data directory, larger than the cache', () => {
    const claims = statefulSet.spec!.volumeClaimTemplates ?? [];
    const data = container.volumeMounts.find((m) => m.mountPath === (envValue('PULLTHROUGH_DATA_DIR') ?? imageEnv.PULLTHROUGH_DATA_DIR));
    assert.ok(data && claims.some((c) => c.metadata.name === data.name), 'a volumeClaimTemplate at /data');
    const storage = parseSize(claims.find((c) => c.metadata.name === data.name)!.spec.resources.requests.storage.replace(/i$/, 'iB'));
    const policy = podPolicy();
    assert.ok(policy.cache.maxSize + policy.cache.minFree <= storage, 'maxSize + minFree fit in the claim');
    assert.equal(policy.dataDir, imageEnv.PULLTHROUGH_DATA_DIR);
  });

  test('mounts one CA for all replicas: the Secret pullthrough-ca, read-only where PULLTHROUGH_CA_DIR points, on no claim', () => {
    const caDir = envValue('PULLTHROUGH_CA_DIR');
    assert.equal(caDir, '/ca', 'the directory the image has made for it');
    assert.equal(podPolicy().caDir, caDir);
    const mount = container.volumeMounts.find((m) => m.mountPath === caDir);
    assert.ok(mount?.readOnly, `a read-only mount at ${caDir}`);
    const volume = pod.spec.volumes?.find((v) => v.name === mount.name);
    assert.equal(volume?.secret?.secretName, 'pullthrough-ca', 'the same Secret on every replica');
    assert.ok(!volume.secret.items || ['ca.crt', 'ca.key'].every((f) => volume.secret!.items!.some((i) => i.path === f)), 'ca.crt and ca.key in it');
    const mode = volume.secret.defaultMode ?? 0o644;
    assert.equal(mode & 0o007, 0, `ca.key readable by no other user (mode ${mode.toString(8)})`);
    assert.deepEqual((statefulSet.spec!.volumeClaimTemplates ?? []).map((c) => c.metadata.name), [container.volumeMounts.find((m) => m.mountPath === imageEnv.PULLTHROUGH_DATA_DIR)!.name], 'no claim but data: no CA of its own per replica');
  });

  test('probes readiness on /readyz and liveness on /healthz, on the proxy port', () => {
    assert.equal(container.readinessProbe?.httpGet?.path, '/readyz', 'ready once the replica knows its peers');
    assert.equal(container.livenessProbe?.httpGet?.path, '/healthz');
    for (const probe of [container.readinessProbe, container.livenessProbe]) assert.equal(containerPort(probe?.httpGet?.port), 3128);
  });

  test('stops gracefully: a preStop pause while the Services let go, then the proxy\'s own drain (8 s, exit by 10 s), within the grace period', () => {
    const pause = container.lifecycle?.preStop?.sleep?.seconds ?? 0;
    assert.ok(pause >= 3, 'kube-proxy needs a moment to stop sending clients to a stopping pod');
    const grace = (pod.spec as { terminationGracePeriodSeconds?: number }).terminationGracePeriodSeconds ?? 30;
    assert.ok(grace >= pause + 10, `terminationGracePeriodSeconds ${grace} leaves the proxy its 10 s after the ${pause} s pause`);
  });

  test("mounts the ConfigMap's proxy.yaml where PULLTHROUGH_CONFIG points", () => {
    const configPath = envValue('PULLTHROUGH_CONFIG')!;
    const mount = container.volumeMounts.find((m) => m.mountPath === path.dirname(configPath));
    assert.ok(mount?.readOnly, 'a read-only mount of the config directory');
    assert.equal(pod.spec.volumes?.find((v) => v.name === mount.name)?.configMap?.name, configMap.metadata.name);
    assert.ok(configMap.data?.[path.basename(configPath)], `the ConfigMap has ${path.basename(configPath)}`);
  });

  test('takes the pod IP and namespace from the downward API and the peer secret from a Secret', () => {
    const from = (name: string) => container.env?.find((e) => e.name === name)?.valueFrom;
    assert.equal(from('POD_IP')?.fieldRef?.fieldPath, 'status.podIP');
    assert.equal(from('POD_NAMESPACE')?.fieldRef?.fieldPath, 'metadata.namespace');
    const ref = from('PULLTHROUGH_PEER_SECRET')?.secretKeyRef;
    assert.deepEqual(ref && { name: ref.name, key: ref.key, optional: ref.optional ?? false }, { name: 'pullthrough-peer', key: 'PULLTHROUGH_PEER_SECRET', optional: false });
  });

  test("the policy's cluster section names the peers Service, its port and this pod", () => {
    const cluster = podPolicy().cluster;
    assert.ok(cluster, 'cluster mode is on');
    const peerPort = peersService.spec!.ports![0]!.port;
    assert.deepEqual(cluster.peers, [{ host: `${peersService.metadata.name}.${namespace}.svc.cluster.local`, port: peerPort }]);
    assert.deepEqual(cluster.self, { host: podIp, port: peerPort }, 'self is the address the peers Service resolves to for this pod');
    assert.equal(cluster.listen.port, container.ports.find((p) => p.name === 'peer')?.containerPort, 'the peer listener is on the declared container port');
    assert.equal(cluster.secret, peerSecret);
  });

  test("fills the policy's ${VAR}s from the pod's env, and every Secret it reads exists or is made as the docs say", () => {
    const text = configMap.data!['proxy.yaml']!;
    const set = new Set((container.env ?? []).map((e) => e.name));
    for (const [, name] of text.matchAll(/\$\{(\w+)(?::-[^}]*)?\}/g)) assert.ok(set.has(name!), `\${${name}} is in the container's env`);

    // The Secrets and their keys the pod reads.
    const needed = new Map<string, Set<string>>();
    const need = (name: string, key: string) => needed.set(name, new Set([...(needed.get(name) ?? []), key]));
    for (const e of container.env ?? []) if (e.valueFrom?.secretKeyRef) need(e.valueFrom.secretKeyRef.name, e.valueFrom.secretKeyRef.key);
    for (const v of pod.spec.volumes ?? []) if (v.secret) for (const file of ['ca.crt', 'ca.key']) need(v.secret.secretName, file);
    // Those not in the kustomization (applying a placeholder would overwrite them) are made by the
    // commands in docs/cluster.md and in secret.yaml's comments.
    const kustomized = manifests.filter((m) => m.kind === 'Secret').map((m) => ({ name: m.metadata.name, keys: new Set(Object.keys(m.stringData ?? m.data ?? {})) }));
    const secretYamlComments = readFileSync(path.join(dir, 'secret.yaml'), 'utf8').split('\n').filter((l) => l.startsWith('#')).map((l) => l.replace(/^# ?/, '')).join('\n');
    for (const [name, keys] of needed) {
      const makers: Record<string, Array<{ name: string; keys: Set<string> }>> = kustomized.some((m) => m.name === name)
        ? { 'kustomization.yaml': kustomized }
        : { 'docs/cluster.md': secretCommands(read('docs/cluster.md')), 'secret.yaml': secretCommands(secretYamlComments) };
      for (const [where, made] of Object.entries(makers)) {
        const these = made.filter((m) => m.name === name);
        assert.ok(these.length > 0, `${where} makes the Secret ${name}`);
        for (const secret of these) for (const key of keys) assert.ok(secret.keys.has(key), `the Secret ${name} made by ${where} has ${key}`);
      }
    }
    assert.ok(needed.has(credentials.metadata.name));

    // With the credentials filled in (they are empty in the file: anonymous pulls), they reach the policy.
    const env = { ...podEnv(), DOCKERHUB_USERNAME: 'test-user', DOCKERHUB_TOKEN: 'test-token' };
    const policy: Policy = parsePolicy(text, 'proxy.yaml', env, '/etc/pullthrough');
    const auth = policy.registries.get('registry-1.docker.io:443')?.auth;
    assert.equal(auth?.username, env.DOCKERHUB_USERNAME);
    assert.equal(auth?.password, env.DOCKERHUB_TOKEN);
    const anonymous = { ...env, DOCKERHUB_USERNAME: undefined, DOCKERHUB_TOKEN: undefined };
    assert.equal(parsePolicy(text, 'proxy.yaml', anonymous, '/etc/pullthrough').registries.get('registry-1.docker.io:443')?.auth, undefined, 'anonymous without them');
  });

  test('the CA command in docs/cluster.md makes the ca.crt and ca.key the Secret is made from', () => {
    const docs = read('docs/cluster.md');
    const command = docs.split('\n').find((l) => /\bpullthrough ca rotate\b/.test(l) && /PULLTHROUGH_CA_DIR=/.test(l));
    assert.ok(command, 'docs/cluster.md has a `PULLTHROUGH_CA_DIR=… pullthrough ca rotate` command');
    const env = Object.fromEntries([...command.matchAll(/\b(PULLTHROUGH_\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));
    const [secret] = secretCommands(docs.slice(docs.indexOf(command))).filter((c) => c.name === 'pullthrough-ca');
    assert.deepEqual([...(secret?.files.keys() ?? [])].sort(), ['ca.crt', 'ca.key'], 'the Secret is made from the files the command writes');
    // Run where the docs run it, in a directory of its own (no proxy.yaml there: the built-in policy).
    const work = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-deploy-ca-'));
    try {
      execFileSync(process.execPath, [path.join(ROOT, 'src/cli.ts'), 'ca', 'rotate'], { cwd: work, env: { PATH: process.env.PATH, ...env }, stdio: 'pipe' });
      for (const file of secret!.files.values()) assert.ok(existsSync(path.join(work, file)), `${file} exists after the command`);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });

  test('the NetworkPolicy, if listed, keeps the proxy port open and the peer port to the pods themselves', (t) => {
    const policies = manifests.filter((m) => m.kind === 'NetworkPolicy');
    if (policies.length === 0) return t.skip('no NetworkPolicy in the kustomization');
    const [policy] = policies;
    selectsThePods(policy!.spec!.podSelector!.matchLabels);
    assert.deepEqual(policy!.spec!.policyTypes, ['Ingress'], 'egress (upstream registries, peers) untouched');
    const rules = policy!.spec!.ingress ?? [];
    const open = rules.filter((r) => !r.from || r.from.length === 0).flatMap((r) => r.ports?.map((p) => containerPort(p.port)) ?? [undefined]);
    assert.ok(open.includes(3128), 'the proxy port from anywhere (nodes reach it through the ClusterIP)');
    assert.ok(!open.includes(3129) && !open.includes(undefined), 'the peer port not from anywhere');
    const peerRules = rules.filter((r) => r.ports?.some((p) => containerPort(p.port) === 3129));
    assert.ok(peerRules.length > 0, 'a rule for the peer port');
    for (const rule of peerRules) {
      assert.ok(rule.from && rule.from.length > 0);
      for (const source of rule.from) {
        assert.deepEqual(Object.keys(source), ['podSelector'], 'pods of this namespace only');
        selectsThePods(source.podSelector!.matchLabels);
      }
    }
  });
});
