// The upstream of the manifest benchmarks: a real distribution registry (Debian's docker-registry 2.8,
// started by the end-to-end tests' helper) serving TLS on loopback as `registry.test`, with small OCI
// images pushed into it by skopeo, as test/e2e does. Its own access log is the count of what reached
// upstream: manifest GETs by tag and by digest, HEADs, blob GETs per blob.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { buildOciImage, type BuiltImage, type LayerSpec } from '../../test/helpers/oci-image.ts';
import { createTestCa, writePem, type TestCa } from '../../test/helpers/pki.ts';
import { startRegistry, type RegistryHandle, type ServedRequest } from '../../test/helpers/registry.ts';
import { pushImage } from '../../test/helpers/skopeo.ts';
import { composePolicy, type PolicyEntries } from './origin.ts';

export const REGISTRY_HOST = 'registry.test';

/**
 * What containerd sends when it resolves a tag (remotes/docker/resolver.go): Docker and OCI manifests
 * and indexes, then anything. The proxy keys a cached tag by the Accept it was fetched with.
 */
export const CONTAINERD_ACCEPT = [
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.oci.image.index.v1+json',
  '*/*',
].join(', ');

export interface Upstream {
  registry: RegistryHandle;
  ca: TestCa;
  /** The test CA's certificate: the proxy's tls.ca for the registry, and the direct clients' trust. */
  caFile: string;
  /** e.g. "docker-registry 2.8.2+ds1". */
  version: string;
}

/** Starts the registry (its temp dir and process are the test helper's, removed at exit however it ends). */
export async function startUpstreamRegistry(dir: string): Promise<Upstream> {
  const ca = createTestCa('pullthrough perf registry CA');
  const caFile = writePem(dir, 'registry-ca.pem', ca.certPem);
  const registry = await startRegistry({ host: REGISTRY_HOST, ca });
  return { registry, ca, caFile, version: registryVersion() };
}

/**
 * Builds an image of small layers in an OCI layout under `dir` and pushes it as <repository>:<tag>.
 * `labels` make another config (and so another manifest digest) from the same layers.
 */
export async function pushSmallImage(
  upstream: Upstream,
  dir: string,
  options: { repository: string; tag: string; layers: LayerSpec[]; labels?: Record<string, string> },
): Promise<BuiltImage> {
  const layout = join(dir, `layout-${options.repository.replaceAll('/', '_')}-${options.tag}`);
  const image = await buildOciImage(layout, { layers: options.layers, tag: options.tag, ...(options.labels ? { labels: options.labels } : {}) });
  await pushImage(layout, options.tag, upstream.registry, { repository: options.repository });
  return image;
}

/** The registry's policy lines: intercept it, trust its test CA, resolve its name to loopback. */
export function upstreamPolicyEntries(upstream: Upstream): PolicyEntries {
  return {
    registries: [`  ${JSON.stringify(upstream.registry.hostPort)}:`, `    tls: { ca: ${JSON.stringify(upstream.caFile)} }`],
    hosts: [`  ${REGISTRY_HOST}: 127.0.0.1`],
  };
}

/** The proxy's policy: intercept the registry, trust its test CA, resolve its name to loopback; `extra` appended. */
export function upstreamPolicy(upstream: Upstream, extra: readonly string[] = []): string {
  return composePolicy([upstreamPolicyEntries(upstream)], extra);
}

/** What reached the registry, by the kind of request (from its access log). */
export interface UpstreamCounts {
  /** GET /v2/ */
  pings: number;
  manifestGetsByTag: number;
  manifestHeadsByTag: number;
  manifestGetsByDigest: number;
  manifestHeadsByDigest: number;
  /** GETs per blob digest (every blob the clients fetched, 0 for none). */
  blobGets: Record<string, number>;
  blobHeads: number;
  /** Anything else (uploads, tags lists, …). */
  other: number;
  /** Answers other than 200 (and 307 for blobs), all kinds together. */
  failures: number;
  total: number;
}

export function countUpstream(requests: readonly ServedRequest[], blobDigests: readonly string[] = []): UpstreamCounts {
  const isDigest = (reference: string | undefined) => reference !== undefined && /^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/.test(reference);
  const manifests = requests.filter((r) => r.kind === 'manifest');
  const count = (method: string, byDigest: boolean) => manifests.filter((r) => r.method === method && isDigest(r.reference) === byDigest).length;
  const blobGets: Record<string, number> = Object.fromEntries(blobDigests.map((digest) => [digest, 0]));
  for (const r of requests) {
    if (r.kind === 'blob' && r.method === 'GET' && r.reference) blobGets[r.reference] = (blobGets[r.reference] ?? 0) + 1;
  }
  const known = new Set<ServedRequest>([
    ...requests.filter((r) => r.kind === 'base' || r.kind === 'manifest'),
    ...requests.filter((r) => r.kind === 'blob' && (r.method === 'GET' || r.method === 'HEAD')),
  ]);
  return {
    pings: requests.filter((r) => r.kind === 'base').length,
    manifestGetsByTag: count('GET', false),
    manifestHeadsByTag: count('HEAD', false),
    manifestGetsByDigest: count('GET', true),
    manifestHeadsByDigest: count('HEAD', true),
    blobGets,
    blobHeads: requests.filter((r) => r.kind === 'blob' && r.method === 'HEAD').length,
    other: requests.filter((r) => !known.has(r)).length,
    failures: requests.filter((r) => r.kind !== 'base' && r.status !== 200 && !(r.kind === 'blob' && r.status === 307)).length,
    total: requests.length,
  };
}

function registryVersion(): string {
  // "docker-registry github.com/docker/distribution 2.8.2+ds1"
  const { stdout } = spawnSync('/usr/bin/docker-registry', ['--version'], { encoding: 'utf8' });
  const version = /(\d+\.\d+\S*)\s*$/.exec((stdout ?? '').trim())?.[1];
  return `docker-registry ${version ?? 'unknown'}`;
}
