// The receiving replica's side of cluster mode: a blob or manifest request goes to the owner of its key
// (rendezvous order over the members), which serves it from its cache or its single-flight fill; the
// bytes are relayed as they come. A member that cannot be reached (refused, timed out, gone before it
// answered) is passed over and the next in order asked; when this replica comes first, it serves the
// request itself. Once the owner has answered, a failure cuts the client's connection: a client never
// gets bytes the owner did not send it whole (the owner holds a fill's last byte until its digest
// matches), and its retry goes to the next member.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { pipeline } from 'node:stream/promises';
import { Agent, type Dispatcher } from 'undici';
import type { ProxyUser } from '../../config/policy.ts';
import type { PurgeRequest } from '../admin/index.ts';
import type { PurgeResult } from '../cache/purge.ts';
import { errorCode, type CacheStatus, type Logger } from '../log.ts';
import { requestHeadersForUpstream, responseHeadersForClient } from '../upstream/forward.ts';
import type { Membership } from './membership.ts';
import { formatTokenAccess, PEER_HEADERS, PEER_ID_PATH, PEER_PURGE_PATH, PEER_REFUSED_HEADER, PEER_TLS_NAME, peerPath } from './peer-protocol.ts';
import { rankFor } from './rendezvous.ts';

export interface OwnerRequest {
  /** The rendezvous key: blobKey(digest) or manifestKey(registry, repository). */
  key: string;
  registryKey: string;
  client: string;
  user?: ProxyUser;
  /** How the client's token was issued, when this replica saw it issued. */
  tokenAccess?: { access: 'central' | 'anonymous'; until: number };
}

export interface OwnerResult {
  status: number;
  bytes: number;
  cache?: CacheStatus;
  /** The member that answered. */
  peer: string;
  error?: string;
}

/** Connecting to a peer that is gone should fail over fast (an owner is one hop away). */
const PEER_CONNECT_TIMEOUT_MS = 2_000;
/** An owner may wait on upstream for a while (its own timeouts bound that). */
const PEER_RESPONSE_TIMEOUT_MS = 300_000;
/** Errors of a connection that was open and then closed under the request (not of a replica that is gone). */
const STALE_CONNECTION = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE']);
const CACHE_STATUSES = new Set<CacheStatus>(['HIT', 'MISS', 'STALE', 'REVALIDATED', 'JOINED', 'BYPASS']);

export class OwnerRouter {
  private readonly agent: Agent;
  private readonly membership: Membership;
  private readonly secret: string;
  private readonly log: Logger;
  private readonly refusedBy = new Set<string>();
  /** Requests that went past a member which should have served them: it could not be reached, or refused. */
  failovers = 0;

  constructor(membership: Membership, caPem: string, secret: string, log: Logger) {
    this.membership = membership;
    this.secret = secret;
    this.log = log;
    this.agent = new Agent({
      connect: { ca: caPem, servername: PEER_TLS_NAME, timeout: PEER_CONNECT_TIMEOUT_MS },
      headersTimeout: PEER_RESPONSE_TIMEOUT_MS,
      bodyTimeout: PEER_RESPONSE_TIMEOUT_MS,
      keepAliveTimeout: 30_000,
    });
  }

  /**
   * Serves the request through the key's owner; undefined when this replica is the one to serve it
   * (it comes first in rendezvous order among the members that can be reached).
   */
  async serve(req: IncomingMessage, res: ServerResponse, request: OwnerRequest): Promise<OwnerResult | undefined> {
    const cancel = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) cancel.abort();
    };
    res.once('close', onClose);
    try {
      for (const member of rankFor(request.key, this.membership.members())) {
        if (member === this.membership.self) return undefined;
        const address = this.membership.addressOf(member);
        if (!address || this.membership.isDown(member)) continue;
        let response: Dispatcher.ResponseData;
        try {
          const ask = () =>
            this.agent.request({
              origin: `https://${address}`,
              path: peerPath(request.registryKey, req.url ?? '/'),
              method: req.method === 'HEAD' ? 'HEAD' : 'GET',
              headers: this.headersFor(req, request),
              signal: cancel.signal,
            });
          response = await onceMoreIfStale(ask, cancel.signal);
        } catch (err) {
          if (cancel.signal.aborted) return { status: 499, bytes: 0, peer: address, error: 'the client went away' };
          this.log.warn('a cluster peer failed before it answered; asking the next', { peer: address, error: errorCode(err) });
          this.membership.markDown(member);
          this.failovers++;
          continue;
        }
        if (response.headers[PEER_REFUSED_HEADER] !== undefined) {
          // A wrong secret or a policy without this registry: a misconfigured peer, passed over.
          const reason = await response.body.text().catch(() => '');
          if (!this.refusedBy.has(member)) this.log.error('a cluster peer refused this replica\'s request (is cluster.secret the same on every replica, and the policy?)', { peer: address, status: response.statusCode, reason: reason.slice(0, 200) });
          this.refusedBy.add(member);
          this.membership.markDown(member);
          this.failovers++;
          continue;
        }
        this.refusedBy.delete(member);
        return await this.relay(res, response, address, cancel.signal);
      }
      return undefined;
    } finally {
      res.off('close', onClose);
    }
  }

  /**
   * A tag pushed or deleted through this replica: every member forgets its cached copy (the owner holds
   * it, and a replica that owned it before a membership change may too), so that no pull after the
   * client's 201 is served the old manifest. Best effort: a member that cannot be told keeps its copy
   * until the tag's TTL, as a proxy that missed the push would.
   */
  async forgetTagEverywhere(registryKey: string, repository: string, tag: string): Promise<void> {
    const path = peerPath(registryKey, `/v2/${repository}/manifests/${tag}`);
    await Promise.all(
      this.membership.reachablePeers().map(async ({ address }) => {
        try {
          const response = await this.agent.request({ origin: `https://${address}`, path, method: 'DELETE', headers: { [PEER_HEADERS.secret]: this.secret } });
          await response.body.dump();
          if (response.statusCode !== 204) throw new Error(`answered ${response.statusCode}`);
        } catch (err) {
          this.log.warn('a cluster peer could not be told to forget a pushed tag; it may serve the old manifest until its TTL', { peer: address, repository, tag, error: errorCode(err) });
        }
      }),
    );
  }

  /**
   * An admin purge on this replica, asked of every other member too: the content it names is spread
   * over the owners. What each purged is added up; members that could not be asked are named.
   */
  async purgeEverywhere(request: PurgeRequest, local: PurgeResult): Promise<PurgeResult & { unreachable?: string[] }> {
    const total: PurgeResult = { ...local, busy: [...local.busy] };
    const unreachable: string[] = [];
    await Promise.all(
      this.membership.peers().map(async ({ address }) => {
        try {
          const response = await this.agent.request({ origin: `https://${address}`, path: PEER_PURGE_PATH, method: 'POST', body: JSON.stringify(request), headers: { [PEER_HEADERS.secret]: this.secret, 'content-type': 'application/json' } });
          const text = await response.body.text();
          if (response.statusCode !== 200) throw new Error(`answered ${response.statusCode}`);
          const theirs = JSON.parse(text) as PurgeResult;
          total.blobs += theirs.blobs;
          total.bytes += theirs.bytes;
          total.manifests += theirs.manifests;
          total.tags += theirs.tags;
          total.busy.push(...theirs.busy);
        } catch (err) {
          unreachable.push(address);
          this.log.warn('a cluster peer could not be asked to purge', { peer: address, error: errorCode(err) });
        }
      }),
    );
    return { ...total, ...(unreachable.length ? { unreachable: unreachable.sort() } : {}) };
  }

  close(): Promise<void> {
    return this.agent.close();
  }

  private headersFor(req: IncomingMessage, request: OwnerRequest): Record<string, string | string[]> {
    const headers = requestHeadersForUpstream(req, PEER_TLS_NAME);
    for (const name of Object.values(PEER_HEADERS)) delete headers[name];
    headers[PEER_HEADERS.secret] = this.secret;
    headers[PEER_HEADERS.client] = request.client;
    if (request.user) headers[PEER_HEADERS.user] = request.user.name;
    if (request.tokenAccess) headers[PEER_HEADERS.token] = formatTokenAccess(request.tokenAccess);
    return headers;
  }

  /** Asks the replica at a peer address for its id (membership ranks ids). */
  async askId(address: string): Promise<string> {
    const ask = () =>
      this.agent.request({
        origin: `https://${address}`,
        path: PEER_ID_PATH,
        method: 'GET',
        headers: { [PEER_HEADERS.secret]: this.secret, [PEER_HEADERS.asker]: `${this.membership.self} ${this.membership.selfAddress}` },
        headersTimeout: PEER_CONNECT_TIMEOUT_MS,
        bodyTimeout: PEER_CONNECT_TIMEOUT_MS,
      });
    const response = await onceMoreIfStale(ask);
    const text = await response.body.text();
    if (response.statusCode !== 200) throw new Error(`answered ${response.statusCode}`);
    return String((JSON.parse(text) as { id?: unknown }).id);
  }

  /** The owner's answer as it came; cut, never ended cleanly, when the owner's stream fails. */
  private async relay(res: ServerResponse, response: Dispatcher.ResponseData, member: string, clientGone: AbortSignal): Promise<OwnerResult> {
    const xCache = String(response.headers['x-cache'] ?? '');
    const cache = CACHE_STATUSES.has(xCache as CacheStatus) ? (xCache as CacheStatus) : undefined;
    res.writeHead(response.statusCode, responseHeadersForClient(response.headers));
    let bytes = 0;
    response.body.on('data', (chunk: Buffer) => (bytes += chunk.length));
    try {
      await pipeline(response.body, res);
      return { status: response.statusCode, bytes, peer: member, ...(cache ? { cache } : {}) };
    } catch (err) {
      res.destroy();
      const error = clientGone.aborted ? 'the client went away' : `the stream from cluster peer ${member} failed: ${errorCode(err)}`;
      return { status: response.statusCode, bytes, peer: member, ...(cache ? { cache } : {}), error };
    }
  }
}

/**
 * A kept-alive connection the peer closed as it was reused fails the request: asked once more, on a new
 * connection, before the peer is taken for gone (its keys would go to the next replica, which fetches
 * them again). Not when the client left meanwhile.
 */
function onceMoreIfStale<T>(ask: () => Promise<T>, cancelled?: AbortSignal): Promise<T> {
  return ask().catch((err: NodeJS.ErrnoException) => {
    if (cancelled?.aborted || !STALE_CONNECTION.has(err.code ?? '')) throw err;
    return ask();
  });
}
