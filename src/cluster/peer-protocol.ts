// What a replica's request to the owner of a key carries besides the client's own request: the shared
// secret, and what the receiving replica knows about the client that the owner cannot (its proxy user,
// its address, and whether its token was issued through this cluster as anonymous or central). The
// owner takes these from an authenticated peer only and strips them before anything else sees the request.
import { timingSafeEqual, createHash } from 'node:crypto';

export const PEER_HEADERS = {
  secret: 'x-pullthrough-peer-secret',
  user: 'x-pullthrough-peer-user',
  client: 'x-pullthrough-peer-client',
  /** "anonymous;<until ms>" or "central;<until ms>": the client's token, as the receiving replica saw it issued. */
  token: 'x-pullthrough-peer-token',
  /** The asking replica's own id and peer address ("<id> <host:port>"), on a request for this replica's id. */
  asker: 'x-pullthrough-peer-asker',
} as const;

/** On the owner's refusals of a peer request (a wrong secret, a registry not in its policy): not the registry's answer. */
export const PEER_REFUSED_HEADER = 'x-pullthrough-peer-refused';

/** The name in the peer listener's certificate (from the cluster's one CA); peers connect by address and check this name. */
export const PEER_TLS_NAME = 'pullthrough-peer';

/** A replica's id (GET, answered as JSON { id }): what membership ranks, rather than the address. */
export const PEER_ID_PATH = '/peer-id';

/**
 * A public blob this replica holds, for an owner that has to fill it (GET /peer-blob/<digest>): a
 * replica that stood in for the owner, or owned the digest before the members changed, has it. Only
 * blobs anyone may read are handed over this way (what upstream answered anonymously), so that
 * nothing about who may read a blob is taken on another replica's word; anything else is a 404.
 */
export const PEER_BLOB_PREFIX = '/peer-blob/';

/** An admin purge passed on to every member (POST, the purge request as JSON). */
export const PEER_PURGE_PATH = '/peer-purge';

/** The path prefix of peer requests: /peer/<registry key>/v2/… */
export function peerPath(registryKey: string, path: string): string {
  return `/peer/${encodeURIComponent(registryKey)}${path}`;
}

export function parsePeerPath(url: string): { registryKey: string; path: string } | undefined {
  const match = /^\/peer\/([^/]+)(\/v2\/.*)$/.exec(url);
  if (!match) return undefined;
  try {
    return { registryKey: decodeURIComponent(match[1]!), path: match[2]! };
  } catch {
    return undefined;
  }
}

/** Constant-time: a hash of each side, so that lengths do not leak either. */
export function secretMatches(given: string | string[] | undefined, secret: string): boolean {
  if (typeof given !== 'string') return false;
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(secret).digest();
  return timingSafeEqual(a, b);
}

export function formatTokenAccess(access: { access: 'central' | 'anonymous'; until: number }): string {
  return `${access.access};${access.until}`;
}

export function parseTokenAccess(text: string | string[] | undefined): { access: 'central' | 'anonymous'; until: number } | undefined {
  if (typeof text !== 'string') return undefined;
  const match = /^(central|anonymous);(\d{1,16})$/.exec(text);
  return match ? { access: match[1] as 'central' | 'anonymous', until: Number(match[2]) } : undefined;
}
