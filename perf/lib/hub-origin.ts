// An upstream shaped like Docker Hub, served by one nginx over TLS on loopback, for the multi-layer
// benchmark: every site is three hosts on ports of their own —
//
//   registry.<site>.test  the registry: GET /v2/ and everything under it answer 401 with a Bearer
//                         challenge (realm on the auth host, service, the repository's pull scope) unless
//                         the request carries the token; manifests by tag and digest with their media
//                         type and Docker-Content-Digest; blobs 307 to a signed-looking CDN URL.
//   auth.<site>.test      the token service: GET /token answers a token (expires_in 300).
//   cdn.<site>.test       Cloudflare's role: the bytes at /registry-v2/docker/registry/v2/blobs/…/data.
//
// nginx, not a Node server, so that the origin costs the same little CPU whoever asks it, and its access
// log (every host's requests, in one file) is the count of what reached upstream. Clients that reach the
// registry by its IP literal (direct clients, nginx as the seed: Go resolves no test name) are named the
// realm and CDN by IP literal too; clients through pullthrough (Host: registry.<site>.test:PORT) by name.
import { join } from 'node:path';
import type { BuiltImage } from '../../test/helpers/oci-image.ts';
import type { TestCa } from '../../test/helpers/pki.ts';
import { startTlsNginx, type NginxOrigin } from './nginx.ts';
import { freePort } from './net.ts';

/** The one token the token service hands out and the registry accepts. */
export const HUB_TOKEN = 'pullthrough-bench-token';
/** The audience in every challenge (Docker Hub: registry.docker.io). */
export const HUB_SERVICE = 'registry.docker.io';
const MANIFEST_TYPE = 'application/vnd.oci.image.manifest.v1+json';

export interface HubSite {
  /** 'hub': registry.hub.test, auth.hub.test, cdn.hub.test. */
  name: string;
  registryPort: number;
  authPort: number;
  cdnPort: number;
  /** 'registry.hub.test:PORT': what clients through the proxy name. */
  registryHostPort: string;
  authHostPort: string;
  cdnHostPort: string;
  /** '127.0.0.1:PORT': what direct clients name. */
  registryAddress: string;
  /** The tags served, repository → tag → image. */
  images: Array<{ repository: string; tag: string; image: BuiltImage }>;
}

export interface HubOrigin {
  nginx: NginxOrigin;
  sites: HubSite[];
  /** Every name of every site → 127.0.0.1: the proxy's `hosts:`. */
  hostNames: string[];
  /** What reached the origin since `mark` (nginx.accessLog.mark()), by kind and host. */
  requestsSince(mark: number): HubRequest[];
}

export type HubRequestKind = 'ping' | 'token' | 'manifest' | 'blob-redirect' | 'download' | 'other';

export interface HubRequest {
  site: string;
  host: 'registry' | 'auth' | 'cdn';
  kind: HubRequestKind;
  method: string;
  uri: string;
  status: number;
  bytes: number;
  seconds: number;
  /** Whether the request came on a connection that had served an earlier one. */
  reused: boolean;
}

export interface HubSiteSpec {
  name: string;
  images: Array<{ repository: string; tag: string; image: BuiltImage }>;
}

/**
 * Starts nginx serving the sites; every image must live in `layoutDir` (one OCI layout: the CDN serves
 * its blobs/sha256 directory).
 */
/**
 * `listenAddress`: where nginx listens (default 127.0.0.1, where clients connect); another loopback
 * address leaves 127.0.0.1:<port> to a delay line in front of it (perf/lib/delay-line.ts).
 */
export async function startHubOrigin(options: { dir: string; ca: TestCa; layoutDir: string; sites: HubSiteSpec[]; listenAddress?: string }): Promise<HubOrigin> {
  const listen = options.listenAddress ?? '127.0.0.1';
  const sites: HubSite[] = [];
  const used = new Set<number>();
  const port = async () => {
    for (;;) {
      const candidate = await freePort();
      if (!used.has(candidate)) {
        used.add(candidate);
        return candidate;
      }
    }
  };
  for (const spec of options.sites) {
    const [registryPort, authPort, cdnPort] = [await port(), await port(), await port()];
    sites.push({
      name: spec.name,
      registryPort,
      authPort,
      cdnPort,
      registryHostPort: `registry.${spec.name}.test:${registryPort}`,
      authHostPort: `auth.${spec.name}.test:${authPort}`,
      cdnHostPort: `cdn.${spec.name}.test:${cdnPort}`,
      registryAddress: `127.0.0.1:${registryPort}`,
      images: spec.images,
    });
  }
  const hostNames = sites.flatMap((site) => ['registry', 'auth', 'cdn'].map((host) => `${host}.${site.name}.test`));
  const q = (path: string) => JSON.stringify(path);
  const blobsDir = join(options.layoutDir, 'blobs', 'sha256');
  // The first site's registry is nginx's own server block; every other host is a server of httpConfig.
  const [first, ...others] = sites;
  if (!first) throw new Error('startHubOrigin: no site');
  const cert = options.ca.issue(['127.0.0.1', ...hostNames]);
  const certFiles = (dir: string) => `ssl_certificate ${q(join(dir, 'server.crt'))};\nssl_certificate_key ${q(join(dir, 'server.key'))};`;
  const nginxDir = join(options.dir, 'hub-origin');
  const maps = sites.map((site) => siteMaps(site)).join('\n');
  const servers = [
    ...others.map((site) => `server {\n  listen ${listen}:${site.registryPort} ssl;\n${indent(certFiles(nginxDir))}\n${indent(registryServer(site))}\n}`),
    ...sites.map((site) => `server {\n  listen ${listen}:${site.authPort} ssl;\n${indent(certFiles(nginxDir))}\n${indent(authServer())}\n}`),
    ...sites.map((site) => `server {\n  listen ${listen}:${site.cdnPort} ssl;\n${indent(certFiles(nginxDir))}\n${indent(cdnServer(blobsDir))}\n}`),
  ];
  const nginx = await startTlsNginx({
    dir: nginxDir,
    root: options.layoutDir,
    ...cert,
    accessLog: true,
    // $connection_requests > 1: the request came on a kept-alive connection.
    accessLogFormat: '$server_port $request_method $request_uri $status $body_bytes_sent $request_time $connection_requests',
    serverConfig: registryServer(first),
    httpConfig: `${maps}\n${servers.join('\n')}`,
    fixedPort: first.registryPort,
    listenAddress: listen,
  });
  const byPort = new Map<number, { site: string; host: HubRequest['host'] }>();
  for (const site of sites) {
    byPort.set(site.registryPort, { site: site.name, host: 'registry' });
    byPort.set(site.authPort, { site: site.name, host: 'auth' });
    byPort.set(site.cdnPort, { site: site.name, host: 'cdn' });
  }
  return {
    nginx,
    sites,
    hostNames,
    requestsSince(mark) {
      return (nginx.accessLog?.linesSince(mark) ?? []).map((line) => {
        const [portText = '', method = '', uri = '', status, bytes, seconds, requests] = line.split(' ');
        const where = byPort.get(Number(portText)) ?? { site: '?', host: 'registry' as const };
        return { ...where, kind: kindOf(where.host, uri), method, uri, status: Number(status), bytes: Number(bytes), seconds: Number(seconds), reused: Number(requests) > 1 };
      });
    },
  };

  function registryServer(site: HubSite): string {
    const auth = `if ($http_authorization != "Bearer ${HUB_TOKEN}") { return 401 '{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}\\n'; }`;
    const common = [
      'add_header Docker-Distribution-API-Version registry/2.0 always;',
      `add_header WWW-Authenticate $challenge_${site.name} always;`,
    ];
    const manifests = site.images.flatMap(({ repository, tag, image }) =>
      [tag, image.manifestDigest].map(
        (reference) => `location = /v2/${repository}/manifests/${reference} {
  set $repository ${repository};
  ${auth}
  ${common.join('\n  ')}
  add_header Docker-Content-Digest ${image.manifestDigest} always;
  types { }
  default_type ${MANIFEST_TYPE};
  alias ${q(join(blobsDir, image.manifestDigest.slice('sha256:'.length)))};
}`,
      ),
    );
    return `default_type application/json;
set $repository "";
location = /v2/ {
  ${auth}
  ${common.join('\n  ')}
  return 200 '{}';
}
${manifests.join('\n')}
location ~ "^/v2/(?<repo>.+)/blobs/sha256:(?<ab>[0-9a-f]{2})(?<rest>[0-9a-f]{62})$" {
  set $repository $repo;
  ${auth}
  ${common.join('\n  ')}
  return 307 "https://$cdn_${site.name}/registry-v2/docker/registry/v2/blobs/sha256/$ab/$ab$rest/data?verify=1767225600-pullthrough-bench";
}
location / {
  ${common.join('\n  ')}
  return 404 '{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}\\n';
}`;
  }
}

/** The realm and CDN a registry names: by IP literal to clients that came by IP, else by name. */
function siteMaps(site: HubSite): string {
  const byAddress = (port: number, name: string) => `map $http_host $${name}_${site.name} {\n  ~^127\\.0\\.0\\.1 127.0.0.1:${port};\n  default ${name}.${site.name}.test:${port};\n}`;
  return [
    byAddress(site.authPort, 'auth'),
    byAddress(site.cdnPort, 'cdn'),
    // Only a 401 carries the challenge (an empty value adds no header).
    `map $status $challenge_${site.name} {\n  401 'Bearer realm="https://$auth_${site.name}/token",service="${HUB_SERVICE}"$scope_${site.name}';\n  default '';\n}`,
    `map $repository $scope_${site.name} {\n  '' '';\n  default ',scope="repository:$repository:pull"';\n}`,
  ].join('\n');
}

function authServer(): string {
  return `location = /token {
  default_type application/json;
  return 200 '{"token":"${HUB_TOKEN}","access_token":"${HUB_TOKEN}","expires_in":300,"issued_at":"$time_iso8601"}\\n';
}
location / { return 404; }`;
}

function cdnServer(blobsDir: string): string {
  return `location ~ "^/registry-v2/docker/registry/v2/blobs/sha256/[0-9a-f]{2}/(?<hex>[0-9a-f]{64})/data$" {
  types { }
  default_type application/octet-stream;
  alias ${JSON.stringify(`${blobsDir}/$hex`)};
}
location / { return 404; }`;
}

function kindOf(host: HubRequest['host'], uri: string): HubRequestKind {
  const path = uri.split('?')[0]!;
  if (host === 'auth') return path === '/token' ? 'token' : 'other';
  if (host === 'cdn') return 'download';
  if (path === '/v2/') return 'ping';
  if (/\/manifests\/[^/]+$/.test(path)) return 'manifest';
  if (/\/blobs\/sha256:[0-9a-f]{64}$/.test(path)) return 'blob-redirect';
  return 'other';
}

function indent(text: string): string {
  return text.replace(/^/gm, '  ');
}
