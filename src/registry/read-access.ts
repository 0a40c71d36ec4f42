// May this client read a cached blob? Anonymous content is public. Content that upstream gave only to
// a client's credentials is served from the cache only to a client whose own credentials upstream
// accepts for that repository right now: a HEAD with them (cheap, and not counted by Docker Hub).
import type { IncomingMessage } from 'node:http';
import type { Dispatcher } from 'undici';
import type { Access } from '../cache/blob-store.ts';

export type ReadVerdict = { allowed: true } | { allowed: false; status: number; headers: Record<string, string | string[]> };

export async function checkReadAccess(access: Access, req: IncomingMessage, dispatcher: Dispatcher, origin: string, hostHeader: string): Promise<ReadVerdict> {
  if (access === 'anonymous') return { allowed: true };
  const authorization = req.headers.authorization;
  const response = await dispatcher.request({
    origin,
    path: (req.url ?? '/').split('?')[0]!,
    method: 'HEAD',
    headers: { host: hostHeader, ...(authorization ? { authorization } : {}) },
  });
  await response.body.dump();
  // A redirect to the storage means the registry would serve it to these credentials.
  if (response.statusCode === 200 || (response.statusCode >= 301 && response.statusCode <= 308)) return { allowed: true };
  const headers: Record<string, string | string[]> = {};
  for (const name of ['www-authenticate', 'content-type', 'docker-distribution-api-version']) {
    const value = response.headers[name];
    if (value !== undefined) headers[name] = value;
  }
  return { allowed: false, status: response.statusCode, headers };
}
