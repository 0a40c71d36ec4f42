// Cluster mode: where a replica about to fill a blob from upstream may find it within the cluster
// first. The members after this one in the digest's rendezvous order are the likely holders: the one
// that stood in while this replica was away, or the owner before the members changed. Their copies
// are asked for in that order by the fill task (GET /peer-blob/<digest>, public blobs only) and hashed
// like any upstream answer; a copy that does not match its digest is not asked for again.
import type { Timeouts } from '../../config/policy.ts';
import type { PeerSource } from '../cache/fill-protocol.ts';
import type { Membership } from './membership.ts';
import { PEER_BLOB_PREFIX, PEER_HEADERS, PEER_TLS_NAME } from './peer-protocol.ts';
import { blobKey, rankFor } from './rendezvous.ts';

/** Holders asked before the registry: each one that has no copy costs a round trip on a cold miss. */
const MAX_PEERS_ASKED = 2;
/** A peer answers at once whether it holds a copy. */
const PEER_TIMEOUTS = { connectMs: 2_000, headersMs: 5_000 };
const MAX_DISTRUSTED = 1_000;

export class PeerCopies {
  private readonly membership: Membership;
  private readonly caPem: string;
  private readonly secret: string;
  private readonly timeouts: Timeouts;
  /** Digests whose peer copy did not match: filled from upstream from now on. */
  private readonly distrusted = new Set<string>();

  constructor(membership: Membership, caPem: string, secret: string, timeouts: Timeouts) {
    this.membership = membership;
    this.caPem = caPem;
    this.secret = secret;
    this.timeouts = { ...timeouts, ...PEER_TIMEOUTS };
  }

  /** The members to ask for a copy, in order; undefined when there is none to ask. */
  sourcesFor(digest: string): PeerSource[] | undefined {
    if (this.distrusted.has(digest)) return undefined;
    // Ranking the other members alone keeps their order: each member's weight is its own.
    const addresses = new Map(this.membership.reachablePeers().map(({ id, address }) => [id, address]));
    const sources = rankFor(blobKey(digest), [...addresses.keys()])
      .slice(0, MAX_PEERS_ASKED)
      .map((id): PeerSource => {
        const address = addresses.get(id)!;
        return {
          upstream: { key: `cluster-peer ${address}`, origin: `https://${address}`, caPem: this.caPem, verify: true, timeouts: this.timeouts, hosts: [], ipv6: true, peerName: PEER_TLS_NAME },
          path: `${PEER_BLOB_PREFIX}${digest}`,
          headers: { [PEER_HEADERS.secret]: this.secret },
        };
      });
    return sources.length > 0 ? sources : undefined;
  }

  /** A fill from a peer's copy did not match its digest. */
  distrust(digest: string): void {
    this.distrusted.add(digest);
    if (this.distrusted.size > MAX_DISTRUSTED) this.distrusted.delete(this.distrusted.values().next().value!);
  }
}
