// The registry request handler: one request of the distribution API, however it arrived (an
// intercepted TLS session, a plain-HTTP absolute-form request, later a registry-mirror listener).
// It does not know about sockets or CONNECT; it gets the registry and the request.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Policy, RegistryPolicy } from '../../config/policy.ts';
import { pathForLog, type Logger } from '../log.ts';
import { upstreamConfig, type UpstreamAgents, type UpstreamConfig } from '../upstream/agents.ts';
import { forward } from '../upstream/forward.ts';
import type { ManifestStore } from '../cache/manifest-store.ts';
import type { BlobHandler } from './blobs.ts';
import type { ManifestHandler } from './manifests.ts';
import { sendRegistryError } from './errors.ts';
import { isRouteError, routeRequest } from './route.ts';

export interface RegistryRequestContext {
  registry: RegistryPolicy;
  /** Client address, for the access log. */
  client: string;
}

export type RegistryHandler = (req: IncomingMessage, res: ServerResponse, context: RegistryRequestContext) => Promise<void>;

export interface RegistryHandlerDeps {
  policy: Policy;
  upstreams: UpstreamAgents;
  blobs: BlobHandler;
  manifests: ManifestHandler;
  manifestStore: ManifestStore;
  log: Logger;
}

/** Methods that change a registry: denied unless the registry's policy says push: bypass. */
const WRITES = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

export function createRegistryHandler(deps: RegistryHandlerDeps): RegistryHandler {
  const configs = new Map<string, UpstreamConfig>();
  const configFor = (registry: RegistryPolicy) => {
    let config = configs.get(registry.key);
    if (!config) configs.set(registry.key, (config = upstreamConfig(registry, deps.policy.hosts, deps.policy.ipv6)));
    return config;
  };

  return async (req, res, { registry, client }) => {
    const started = performance.now();
    const route = routeRequest(req.url ?? '/');
    const access = { method: req.method ?? 'GET', host: registry.key, path: pathForLog(req.url), client };
    if (isRouteError(route)) {
      sendRegistryError(res, route.status, route.code, route.message);
      deps.log.access({ ...access, status: route.status, bytes: 0, type: 'invalid', ms: elapsed(started), error: route.message });
      return;
    }
    const upstream = configFor(registry);
    const hostHeader = hostHeaderFor(registry);
    const reading = req.method === 'GET' || req.method === 'HEAD';
    if (route.kind === 'blob' && reading) {
      const result = await deps.blobs(req, res, { digest: route.digest, name: route.name, upstream, hostHeader });
      deps.log.access({ ...access, ...result, type: 'blob', ms: elapsed(started) });
      return;
    }
    if (route.kind === 'manifest' && reading) {
      const result = await deps.manifests(req, res, { registry, upstream, hostHeader, name: route.name, reference: route.reference, byDigest: route.byDigest });
      deps.log.access({ ...access, ...result, type: 'manifest', ms: elapsed(started) });
      return;
    }
    if (WRITES.has(req.method ?? '') && registry.push === 'deny') {
      const message = `pushing through the proxy is disabled for ${registry.key} (push: deny in proxy.yaml; push: bypass or ALLOW_PUSH=true allows it)`;
      // The client may be mid-upload: read nothing more of it.
      res.setHeader('Connection', 'close');
      sendRegistryError(res, 405, 'UNSUPPORTED', message);
      deps.log.access({ ...access, status: 405, bytes: 0, cache: 'BYPASS', type: route.kind, ms: elapsed(started), error: 'push denied' });
      return;
    }
    // Everything else streams through untouched, uploads included (unbuffered, unlimited).
    const result = await forward(req, res, { dispatcher: deps.upstreams.for(upstream), origin: upstream.origin, hostHeader }, { 'X-Cache': 'BYPASS' });
    if (route.kind === 'manifest' && req.method === 'PUT' && result.status >= 200 && result.status < 300 && !route.byDigest) {
      // The next pull of this tag must see what was just pushed.
      await deps.manifestStore.forgetTag(registry.key, route.name, route.reference);
    }
    deps.log.access({ ...access, ...result, cache: 'BYPASS', type: route.kind, ms: elapsed(started) });
  };
}

/** host[:port] as clients write it: the port only when it is not the scheme's default. */
function hostHeaderFor(registry: RegistryPolicy): string {
  const host = registry.host.includes(':') ? `[${registry.host}]` : registry.host;
  return registry.port === (registry.http ? 80 : 443) ? host : `${host}:${registry.port}`;
}

function elapsed(since: number): number {
  return Math.round(performance.now() - since);
}
