# pullthrough: a caching HTTPS proxy for container registries.
#
#   docker run -d -p 3128:3128 -v pullthrough:/data --read-only -e REGISTRIES="quay.io ghcr.io" pullthrough
#
# Everything it writes (the CA ca.crt/ca.key, leaf.key, the LMDB index, the blob store, request-buffering
# spool files under tmp/) lives under /data: mount a volume there. Nothing else is written, so the root
# filesystem can be read-only and no tmpfs is needed (test/e2e/image.test.ts builds the image with podman,
# runs it so and checks both).
# PULLTHROUGH_CA_DIR=/ca moves the CA to a volume of its own (deploy/compose.yaml and deploy/kubernetes
# do): /ca exists for it, owned by the proxy's user, so that a new named volume there is writable. It may
# also be a read-only mount of your own ca.crt and ca.key (key mode 0600 or 0400).
#
# Configure with environment variables alone, as rpardini/docker-registry-proxy was (config/seed-env.ts
# maps them onto /app/proxy.yaml, the default policy):
#   REGISTRIES="quay.io ghcr.io"                       extra registries to intercept and cache
#   AUTH_REGISTRIES="auth.docker.io:user:token quay.io:user:password"
#   AUTH_REGISTRIES_DELIMITER / AUTH_REGISTRY_DELIMITER  separators of the list above (" " and ":")
#   ENABLE_MANIFEST_CACHE=true                          tag caching, with its tiers and default:
#     MANIFEST_CACHE_PRIMARY_REGEX, MANIFEST_CACHE_PRIMARY_TIME, MANIFEST_CACHE_SECONDARY_REGEX,
#     MANIFEST_CACHE_SECONDARY_TIME, MANIFEST_CACHE_DEFAULT_TIME
#   ALLOW_PUSH, VERIFY_SSL, DISABLE_IPV6, CACHE_MAX_SIZE, PROXY_REQUEST_BUFFERING
#   SEND_TIMEOUT, CLIENT_BODY_TIMEOUT, CLIENT_HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, PROXY_READ_TIMEOUT,
#     PROXY_CONNECT_TIMEOUT, PROXY_SEND_TIMEOUT, PROXY_CONNECT_CONNECT_TIMEOUT,
#     PROXY_CONNECT_READ_TIMEOUT, PROXY_CONNECT_SEND_TIMEOUT
# or mount a policy file and point PULLTHROUGH_CONFIG at it (its ${VAR}s read the environment);
# PULLTHROUGH_LISTEN and PULLTHROUGH_DATA_DIR below override its listen and dataDir, PULLTHROUGH_CA_DIR
# (unset: the CA is in the data directory) its caDir.
# Upstream registries are trusted by the system store (Debian's ca-certificates, installed below) and
# Node's own roots. A CA of your own (a private registry, a TLS-intercepting company proxy) is added at
# run time without rebuilding: mount its PEM file into the store, -v ./corp-ca.pem:/etc/ssl/certs/corp-ca.pem:ro
# (every file there is read; no update-ca-certificates needed), or mount it anywhere and set
# NODE_EXTRA_CA_CERTS=/path/corp-ca.pem. OTEL_* turn tracing on.
#
# Podman and buildah build OCI images unless told otherwise, and OCI images have no HEALTHCHECK:
#   podman build --format docker -t pullthrough .
# Building behind a TLS-intercepting proxy (npm ci fails with SELF_SIGNED_CERT_IN_CHAIN): give the build
# the proxy's CA (a PEM bundle; the build machine's own store holds it once it trusts the proxy), and if
# needed an .npmrc (a registry mirror, its token), as build secrets. They are mounted for the npm ci step
# only and are in no layer of the image; either may be left out (BuildKit, i.e. Docker 23 or later, or
# podman/buildah):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt --secret id=npmrc,src=$HOME/.npmrc -t pullthrough .

FROM node:24-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Prebuilt native modules (lmdb, msgpackr-extract) come as optional packages: no install script needed.
RUN --mount=type=secret,id=ca --mount=type=secret,id=npmrc,target=/root/.npmrc \
    if [ -f /run/secrets/ca ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/ca; fi; \
    npm ci --omit=dev --ignore-scripts --no-audit --no-fund
COPY src ./src
COPY config ./config
COPY workers ./workers
# dist/: the sources with their types stripped (no run-time stripping: ~15 MiB less per thread).
RUN node src/build.ts

FROM node:24-slim
# node:24-slim has no system trust store (no /etc/ssl/certs): Node says so on stderr, in plain text, and
# only its own roots are trusted. Debian's ca-certificates is that store (~10 MB with the openssl it
# needs; apt over Debian's plain-HTTP mirror needs no CA), and an image built FROM this one can add a CA
# to it the Debian way (COPY to /usr/local/share/ca-certificates/, RUN update-ca-certificates as root).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# As npm start: 1 MiB semi-spaces keep Buffer garbage short-lived; two malloc arenas stop each thread
# from keeping one of its own at its peak (8 clients on a 4 GiB blob: 396 -> 147 MiB peak RSS). The
# ENTRYPOINT adds the rest of npm start's flags (NODE_OPTIONS refuses --heap-growing-percent).
ENV NODE_ENV=production \
    NODE_OPTIONS=--max-semi-space-size=1 \
    MALLOC_ARENA_MAX=2 \
    PULLTHROUGH_DATA_DIR=/data \
    PULLTHROUGH_LISTEN=0.0.0.0:3128
WORKDIR /app
# Owned by root: the proxy's user can read the application but not change it.
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json proxy.yaml ./
RUN mkdir -p /data /ca && chown 1000:1000 /data /ca
# The image's "node" user, by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 1000:1000
VOLUME ["/data"]
EXPOSE 3128
# The port is taken from PULLTHROUGH_LISTEN, so the check follows it when it is changed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["node", "-e", "const port = (process.env.PULLTHROUGH_LISTEN || '3128').replace(/^.*:/, ''); fetch('http://127.0.0.1:' + port + '/healthz', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# A heap that grows by 20% between full collections, not up to 4x, keeps what 1,000 concurrent requests
# leave behind from piling up (V8 heap 168 -> 66 MiB at their peak).
ENTRYPOINT ["node", "--heap-growing-percent=50", "dist/src/cli.js"]
CMD ["start"]
