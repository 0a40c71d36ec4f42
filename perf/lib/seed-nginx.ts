// nginx configured as the seed (rpardini/docker-registry-proxy 0.7.0) configures its caching layer, in
// front of one site of perf/lib/hub-origin.ts: the reference the multi-layer benchmark holds pullthrough
// to. From the seed's nginx.conf and nginx.manifest.common.conf, with its defaults (ENABLE_MANIFEST_CACHE
// off, so a manifest by tag always goes upstream; VERIFY_SSL on; worker_processes auto):
// - blobs and manifests by digest: proxy_cache keyed by $uri for 60 days, proxy_cache_lock (a second
//   client waits for the first one's download to finish, then reads the cache), and a 307 to the CDN
//   followed by nginx itself (@handle_redirects) and cached under the registry's URI;
// - manifests by tag: proxy_cache_valid 0s (stale only when upstream fails);
// - everything else (/v2/, the token service) passed through uncached.
//
// What differs: the seed is an HTTPS_PROXY (CONNECT through ngx_http_proxy_connect_module into its own
// TLS server); Debian's nginx has no CONNECT, so clients reach this server directly by its IP literal —
// one round trip and one relay hop less per connection than the seed, a stricter reference. The seed
// intercepts the token service's host; here the registry's challenge is rewritten to name this server's
// /token, which is passed to the token service as the seed passes auth.docker.io.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { TestCa } from '../../test/helpers/pki.ts';
import type { HubSite } from './hub-origin.ts';
import { startTlsNginx, type NginxOrigin } from './nginx.ts';
import { freePort } from './net.ts';

export interface SeedNginxOptions {
  /** Its config, logs and cache live here (created). */
  dir: string;
  /** Issues its certificate (for 127.0.0.1), and signs the origin's: what it verifies upstream with. */
  ca: TestCa;
  caFile: string;
  site: HubSite;
}

export async function startSeedNginx(options: SeedNginxOptions): Promise<NginxOrigin & { address: string }> {
  const { dir, site } = options;
  const q = (path: string) => JSON.stringify(path);
  mkdirSync(join(dir, 'cache'), { recursive: true });
  const registry = `https://127.0.0.1:${site.registryPort}`;
  let nginx: NginxOrigin | undefined;
  // The port is part of the rewritten challenge, so the config is written for the port nginx gets.
  const server = (port: number) => `# The seed's caching layer (nginx.conf "server_name proxy_caching_").
proxy_buffer_size 128k;
proxy_buffers 4 256k;
chunked_transfer_encoding on;
proxy_read_timeout 900;
proxy_cache_lock on;
proxy_cache_lock_timeout 880s;
proxy_cache_valid 200 206 60d;
proxy_force_ranges on;
proxy_ignore_client_abort on;
proxy_cache_revalidate on;
proxy_hide_header Set-Cookie;
proxy_hide_header WWW-Authenticate;
proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;
proxy_set_header Authorization $http_authorization;
proxy_ssl_server_name on;
proxy_ssl_verify on;
proxy_ssl_trusted_certificate ${q(options.caFile)};
proxy_ssl_name registry.${site.name}.test;
proxy_ssl_protocols TLSv1.2 TLSv1.3;
location /v1 { return 405; }
location ~ ^/v2/(.*)/blobs/sha256:(.*) {
${common(registry)}
}
location ~ ^/v2/(.*)/manifests/sha256:(.*) {
${common(registry)}
}
location ~ ^/v2/(.*)/manifests/ {
  proxy_cache_valid 0s;
${common(registry)}
  proxy_cache_use_stale error timeout http_500 http_502 http_504 http_429;
}
location ~ ^/v2/(.*)/blobs/ {
  proxy_cache_valid 0s;
${common(registry)}
  proxy_cache_use_stale error timeout http_500 http_502 http_504 http_429;
}
location @handle_redirects {
  add_header WWW-Authenticate $seed_challenge always;
  set $original_uri $uri;
  set $orig_loc $upstream_http_location;
  proxy_set_header Authorization "";
  proxy_ssl_name cdn.${site.name}.test;
  proxy_pass $orig_loc;
  proxy_cache cache;
  proxy_cache_key $original_uri;
}
location = /token {
  add_header WWW-Authenticate $seed_challenge always;
  proxy_ssl_name auth.${site.name}.test;
  proxy_pass https://127.0.0.1:${site.authPort};
  proxy_cache off;
}
location / {
  add_header WWW-Authenticate $seed_challenge always;
  proxy_pass ${registry};
  proxy_cache off;
}`;
  const http = (port: number) => `proxy_cache_path ${q(join(dir, 'cache'))} levels=1:2 max_size=32g inactive=60d keys_zone=cache:10m use_temp_path=off;
map $upstream_http_www_authenticate $seed_challenge {
  "~^(?<before>.*realm=\\")https://[^/\\"]+(?<after>/token.*)$" "\${before}https://127.0.0.1:${port}\${after}";
  default $upstream_http_www_authenticate;
}`;
  let lastError: Error | undefined;
  for (let attempt = 1; attempt <= 3 && !nginx; attempt++) {
    const port = await freePort();
    try {
      nginx = await startTlsNginx({
        dir,
        root: join(dir, 'empty'),
        ...options.ca.issue(['127.0.0.1']),
        workerProcesses: 'auto',
        serverConfig: server(port),
        httpConfig: http(port),
        fixedPort: port,
      });
    } catch (err) {
      lastError = err as Error;
    }
  }
  if (!nginx) throw lastError!;
  return { ...nginx, address: `127.0.0.1:${nginx.port}` };
}

/** nginx.manifest.common.conf, with the upstream fixed (the seed's https://$targetHost). */
function common(registry: string): string {
  return `  add_header X-Docker-Registry-Proxy-Cache-Upstream-Status "$upstream_cache_status";
  add_header WWW-Authenticate $seed_challenge always;
  proxy_pass ${registry};
  proxy_cache cache;
  proxy_cache_key $uri;
  proxy_intercept_errors on;
  error_page 301 302 307 = @handle_redirects;`;
}
