// The registry request handler: one request of the distribution API, however it arrived (an
// intercepted TLS session, a plain-HTTP absolute-form request, later a registry-mirror listener).
// It does not know about sockets or CONNECT; it gets the registry and the request.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { RegistryPolicy } from '../../config/policy.ts';
import { pathForLog, type Logger } from '../log.ts';
import type { UpstreamAgents } from '../upstream/agents.ts';
import { forward } from '../upstream/forward.ts';
import { sendRegistryError } from './errors.ts';
import { isRouteError, routeRequest } from './route.ts';

export interface RegistryRequestContext {
  registry: RegistryPolicy;
  scheme: 'https' | 'http';
  /** Client address, for the access log. */
  client: string;
}

export type RegistryHandler = (req: IncomingMessage, res: ServerResponse, context: RegistryRequestContext) => Promise<void>;

export function createRegistryHandler(deps: { upstreams: UpstreamAgents; log: Logger }): RegistryHandler {
  return async (req, res, { registry, scheme, client }) => {
    const started = performance.now();
    const route = routeRequest(req.url ?? '/');
    const access = { method: req.method ?? 'GET', host: registry.key, path: pathForLog(req.url), client };
    if (isRouteError(route)) {
      sendRegistryError(res, route.status, route.code, route.message);
      deps.log.access({ ...access, status: route.status, bytes: 0, type: 'invalid', ms: elapsed(started), error: route.message });
      return;
    }
    const defaultPort = scheme === 'https' ? 443 : 80;
    const hostPort = registry.port === defaultPort ? registry.host : `${registry.host}:${registry.port}`;
    const result = await forward(
      req,
      res,
      {
        dispatcher: deps.upstreams.for(registry),
        origin: `${scheme}://${registry.host.includes(':') ? `[${registry.host}]` : registry.host}:${registry.port}`,
        hostHeader: hostPort.includes(':') && registry.host.includes(':') ? `[${registry.host}]:${registry.port}` : hostPort,
      },
      { 'X-Cache': 'BYPASS' },
    );
    deps.log.access({ ...access, ...result, cache: 'BYPASS', type: route.kind, ms: elapsed(started) });
  };
}

function elapsed(since: number): number {
  return Math.round(performance.now() - since);
}
