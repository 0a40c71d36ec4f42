// The origin every benchmark talks to: a temp dir with a throw-away CA, blobs of random bytes under
// their real digests, and nginx serving them over TLS as `origin.test` on loopback; plus the proxy
// policy that intercepts it and the curl routes to a blob, direct and through a proxy.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { formatSize } from '../../config/units.ts';
import { createTestCa } from '../../test/helpers/pki.ts';
import { createRandomBlob, type Blob } from './blob.ts';
import { directRoute, proxiedRoute, type CurlRoute } from './curl.ts';
import { startTlsNginx, type NginxOrigin } from './nginx.ts';

export const ORIGIN_HOST = 'origin.test';

export interface Origin {
  /** The benchmark's temp dir (removed at exit by cleanup.ts). */
  dir: string;
  /** The test CA's certificate: curl --cacert for direct routes, the proxy's tls.ca for upstream. */
  caFile: string;
  nginx: NginxOrigin;
  /** In the order asked for. */
  blobs: Blob[];
}

export interface OriginOptions {
  /** A temp dir from makeTempDir(). */
  dir: string;
  blobs: ReadonlyArray<{ repository: string; size: number }>;
  /** nginx logs every request (AccessLog): to count the requests that reach the origin. */
  accessLog?: boolean;
  progress?: (message: string) => void;
}

export async function startOrigin(options: OriginOptions): Promise<Origin> {
  const { dir } = options;
  const ca = createTestCa('pullthrough perf origin CA');
  const caFile = join(dir, 'test-ca.pem');
  writeFileSync(caFile, ca.certPem);
  const blobs: Blob[] = [];
  for (const { repository, size } of options.blobs) {
    options.progress?.(`writing ${formatSize(size)} of random bytes for ${repository} to ${dir}`);
    blobs.push(await createRandomBlob(join(dir, 'www'), repository, size));
  }
  const nginx = await startTlsNginx({
    dir: join(dir, 'nginx'),
    root: join(dir, 'www'),
    ...ca.issue([ORIGIN_HOST, '127.0.0.1']),
    ...(options.accessLog ? { accessLog: true } : {}),
  });
  return { dir, caFile, nginx, blobs };
}

/** One upstream's lines of a policy: its entry under `registries:` and its names under `hosts:`, indented. */
export interface PolicyEntries {
  registries: string[];
  hosts: string[];
}

/** The origin's policy lines: intercept it, trust its test CA, resolve its name to loopback. */
export function originPolicyEntries(origin: Origin): PolicyEntries {
  return {
    registries: [`  ${JSON.stringify(`${ORIGIN_HOST}:${origin.nginx.port}`)}:`, `    tls: { ca: ${JSON.stringify(origin.caFile)} }`],
    hosts: [`  ${ORIGIN_HOST}: 127.0.0.1`],
  };
}

/** A policy of several upstreams' entries; `extra` lines are appended after `hosts:` (more hosts, or other keys). */
export function composePolicy(entries: readonly PolicyEntries[], extra: readonly string[] = []): string {
  return ['registries:', ...entries.flatMap((e) => e.registries), 'hosts:', ...entries.flatMap((e) => e.hosts), ...extra, ''].join('\n');
}

/** Intercept the origin, trust its test CA, resolve its name to loopback; `extra` lines are appended. */
export function registryPolicy(origin: Origin, extra: readonly string[] = []): string {
  return composePolicy([originPolicyEntries(origin)], extra);
}

/** curl straight to nginx for this blob. */
export function directBlobRoute(origin: Origin, blob: Blob): CurlRoute {
  return directRoute({ host: ORIGIN_HOST, port: origin.nginx.port, path: blob.urlPath, caFile: origin.caFile });
}

/** curl through a proxy (CONNECT to origin.test) for this blob. */
export function proxiedBlobRoute(origin: Origin, blob: Blob, proxy: { url: string; caFile: string }): CurlRoute {
  return proxiedRoute({ host: ORIGIN_HOST, port: origin.nginx.port, path: blob.urlPath, proxyUrl: proxy.url, proxyCaFile: proxy.caFile });
}

/** Requests nginx logged for this blob's path since `mark` (GETs and HEADs: what reached the origin). */
export function originRequestsSince(origin: Origin, blob: Blob, mark: number): { get: number; head: number; other: number } {
  const entries = origin.nginx.accessLog?.entriesSince(mark) ?? [];
  const forBlob = entries.filter((entry) => entry.uri.split('?')[0] === blob.urlPath);
  return {
    get: forBlob.filter((entry) => entry.method === 'GET').length,
    head: forBlob.filter((entry) => entry.method === 'HEAD').length,
    other: forBlob.filter((entry) => entry.method !== 'GET' && entry.method !== 'HEAD').length,
  };
}
