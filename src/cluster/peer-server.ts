// The owner's side of cluster mode: an HTTPS listener (a leaf from the cluster's one CA) that serves
// blob and manifest requests of the registries in the policy, from this replica's cache or its
// single-flight fill, to peers that carry the shared secret. It runs the same registry handler as the
// fronts, with what the receiving replica knew about the client, and never forwards a request further:
// it is not a proxy for anyone, and two replicas that rank a key differently cannot bounce it around.
import type https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Policy } from '../../config/policy.ts';
import type { CertificateAuthority } from '../ca.ts';
import { applyClientTimeouts, createLeafServer } from '../leaf-server.ts';
import type { PurgeRequest } from '../admin/index.ts';
import type { BlobStore } from '../cache/blob-store.ts';
import { pumpFile } from '../cache/blob-reader.ts';
import type { ManifestStore } from '../cache/manifest-store.ts';
import type { PurgeResult } from '../cache/purge.ts';
import { readAtMost } from '../upstream/body.ts';
import type { Logger } from '../log.ts';
import type { RegistryHandler } from '../registry/handler.ts';
import { isRouteError, parseDigest, routeRequest } from '../registry/route.ts';
import type { UpstreamAuth } from '../registry/upstream-auth.ts';
import { withErrorAnswers } from '../request-failures.ts';
import { parsePeerPath, parseTokenAccess, PEER_BLOB_PREFIX, PEER_HEADERS, PEER_ID_PATH, PEER_PURGE_PATH, PEER_REFUSED_HEADER, PEER_TLS_NAME, secretMatches } from './peer-protocol.ts';

export interface PeerServerDeps {
  policy: Policy;
  secret: string;
  ca: CertificateAuthority;
  registryHandler: RegistryHandler;
  auth: UpstreamAuth;
  manifestStore: ManifestStore;
  /** This replica's id (what membership ranks). */
  id: string;
  /** Public blobs are handed to an owner that has to fill them. */
  store: BlobStore;
  /** A peer asked for this replica's id (giving its own and its address: "<id> <host:port>"). */
  heardFrom?: (asker: string | undefined) => void;
  /** This replica's own purge (an admin purge made on another replica reaches every one). */
  purge(request: PurgeRequest): Promise<PurgeResult>;
  log: Logger;
}

/** A purge request is a few dozen bytes of JSON. */
const MAX_PURGE_BODY = 4 * 1024;

/** Refusals are logged at most this often per address (a port scan must not flood the log). */
const REFUSAL_LOG_INTERVAL_MS = 60_000;
const MAX_REFUSAL_ADDRESSES = 1_000;

export function createPeerServer(deps: PeerServerDeps): https.Server {
  const { policy, log } = deps;
  const handle = withErrorAnswers(deps.registryHandler, log);
  const refusalsLogged = new Map<string, number>();

  const refuse = (req: IncomingMessage, res: ServerResponse, status: number, message: string) => {
    const from = req.socket.remoteAddress ?? '-';
    const last = refusalsLogged.get(from) ?? 0;
    if (Date.now() - last > REFUSAL_LOG_INTERVAL_MS) {
      log.warn('refused a request on the cluster peer port', { from, status, reason: message });
      refusalsLogged.set(from, Date.now());
      if (refusalsLogged.size > MAX_REFUSAL_ADDRESSES) refusalsLogged.delete(refusalsLogged.keys().next().value!);
    }
    const body = JSON.stringify({ errors: [{ code: status === 403 ? 'DENIED' : 'NOT_FOUND', message }] }) + '\n';
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), [PEER_REFUSED_HEADER]: '1', Connection: 'close' });
    res.end(req.method === 'HEAD' ? undefined : body);
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    if (!secretMatches(req.headers[PEER_HEADERS.secret], deps.secret)) return refuse(req, res, 403, 'this is a cluster peer port: requests need the cluster secret');
    if (req.url === PEER_ID_PATH && req.method === 'GET') {
      const asker = req.headers[PEER_HEADERS.asker];
      deps.heardFrom?.(typeof asker === 'string' ? asker : undefined);
      const body = JSON.stringify({ id: deps.id }) + '\n';
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
      return res.end(body);
    }
    if (req.url === PEER_PURGE_PATH && req.method === 'POST') return purgeHere(req, res);
    if (req.url?.startsWith(PEER_BLOB_PREFIX) && req.method === 'GET') {
      servePublicCopy(req.url.slice(PEER_BLOB_PREFIX.length), res).catch(() => res.destroy());
      return;
    }
    const peerRequest = parsePeerPath(req.url ?? '/');
    if (!peerRequest || (req.method !== 'GET' && req.method !== 'HEAD' && req.method !== 'DELETE')) return refuse(req, res, 404, 'a peer serves GET and HEAD of /peer/<registry>/v2/<name>/blobs|manifests/<reference> only');
    const registry = policy.registries.get(peerRequest.registryKey);
    if (!registry) return refuse(req, res, 404, `${peerRequest.registryKey} is not a registry of this replica's policy`);
    const route = routeRequest(peerRequest.path);
    if (isRouteError(route) || (route.kind !== 'blob' && route.kind !== 'manifest')) return refuse(req, res, 404, 'a peer serves blobs and manifests only');
    if (req.method === 'DELETE') {
      // A tag pushed through another replica: forget the cached copy here; nothing goes upstream.
      if (route.kind !== 'manifest' || route.byDigest) return refuse(req, res, 404, 'a peer forgets tags only');
      deps.manifestStore.forgetTag(registry.key, route.name, route.reference).then(
        () => {
          res.writeHead(204);
          res.end();
        },
        () => res.destroy(),
      );
      return;
    }
    const userName = req.headers[PEER_HEADERS.user];
    const user = typeof userName === 'string' ? policy.users.get(userName) : undefined;
    if (userName !== undefined && !user) return refuse(req, res, 403, `no proxy user ${String(userName)} in this replica's policy`);
    // A token the receiving replica saw issued through an intercepted token service: what it grants is
    // known there, and now here too.
    const tokenAccess = parseTokenAccess(req.headers[PEER_HEADERS.token]);
    const bearer = /^Bearer\s+(\S+)$/i.exec(String(req.headers.authorization ?? ''));
    if (tokenAccess && bearer) deps.auth.recordIssued(bearer[1]!, tokenAccess.until, tokenAccess.access);
    const client = `${String(req.headers[PEER_HEADERS.client] ?? '-')} via ${req.socket.remoteAddress ?? '-'}`;
    for (const name of Object.values(PEER_HEADERS)) delete req.headers[name];
    req.url = peerRequest.path;
    handle(req, res, { registry, client, ...(user ? { user } : {}), fromPeer: true }).catch(() => res.destroy());
  };

  /** A verified blob anyone may read, whole, for the owner's fill (which hashes it again); else 404. */
  const servePublicCopy = async (text: string, res: ServerResponse) => {
    const digest = parseDigest(text);
    const entry = digest ? deps.store.lookup(digest) : undefined;
    const opened = digest && entry?.access === 'anonymous' ? await deps.store.open(digest) : undefined;
    if (!digest || !opened) {
      res.writeHead(404, { 'Content-Length': 0 });
      res.end();
      return;
    }
    try {
      deps.store.touch(digest, opened.entry);
      res.writeHead(200, { 'Content-Length': opened.entry.size, 'Content-Type': opened.entry.mediaType ?? 'application/octet-stream', 'Docker-Content-Digest': digest });
      const pumped = await pumpFile(res, opened.handle, 0, opened.entry.size);
      if (pumped.kind === 'complete') res.end();
      else res.destroy();
    } finally {
      await opened.handle.close().catch(() => {});
    }
  };

  /** The purge request was checked by the replica that took it; only its shape is checked again here. */
  const purgeHere = (req: IncomingMessage, res: ServerResponse) => {
    readAtMost(req, MAX_PURGE_BODY)
      .then(async (body) => {
        if (!body) throw new Error(`larger than ${MAX_PURGE_BODY} bytes`);
        const request = JSON.parse(body.toString('utf8')) as PurgeRequest;
        if (typeof request !== 'object' || request === null || Object.values(request).some((value) => typeof value !== 'string')) throw new Error('not a purge request');
        const result = JSON.stringify(await deps.purge(request)) + '\n';
        res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(result) });
        res.end(result);
      })
      .catch((err: unknown) => {
        if (res.headersSent) return res.destroy();
        refuse(req, res, 400, `not a purge request: ${(err as Error).message}`);
      });
  };

  const server = createLeafServer(deps.ca, [PEER_TLS_NAME], onRequest);
  applyClientTimeouts(server, policy.defaults.timeouts);
  return server;
}
