// Rendezvous (highest-random-weight) hashing: every replica ranks the members for a key the same way
// from the key and the member list alone, with nothing to agree on. The first is the key's owner, the
// next the one that serves when the owner cannot be reached; a member joining or leaving moves only the
// keys it wins or held (~1/N of them).
import { createHash } from 'node:crypto';

/** The members, best first, for this key. */
export function rankFor(key: string, members: readonly string[]): string[] {
  return members
    .map((member) => ({ member, weight: weight(key, member) }))
    .sort((a, b) => (a.weight === b.weight ? (a.member < b.member ? -1 : 1) : a.weight > b.weight ? -1 : 1))
    .map((ranked) => ranked.member);
}

function weight(key: string, member: string): bigint {
  return createHash('sha256').update(member).update('\0').update(key).digest().readBigUInt64BE(0);
}

/** A blob is owned by its digest alone: a base layer shared by many repositories is fetched once per cluster. */
export function blobKey(digest: string): string {
  return `blob:${digest}`;
}

/**
 * Manifests are owned by their repository: a tag and the digests it resolves to (containerd's HEAD of the
 * tag, then its GET by digest; an index, then its platforms' manifests) meet on one owner, fetched once.
 */
export function manifestKey(registry: string, repository: string): string {
  return `manifests:${registry}/${repository}`;
}
