# pullthrough: a caching HTTPS proxy for container registries.
# Data (cache, index) and the CA live under /data: mount a volume there. The root filesystem can be
# read-only. Configure with /etc/pullthrough/proxy.yaml or environment variables alone.

FROM node:24-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM node:24-slim
ENV NODE_ENV=production \
    PULLTHROUGH_DATA_DIR=/data \
    PULLTHROUGH_LISTEN=0.0.0.0:3128
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY package.json proxy.yaml ./
COPY config ./config
COPY src ./src
COPY workers ./workers
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
EXPOSE 3128
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["node", "-e", "fetch('http://127.0.0.1:3128/healthz').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "src/cli.ts"]
CMD ["start"]
