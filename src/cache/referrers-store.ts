// Referrers lists (OCI 1.1: the signatures, attestations and SBOMs that point at a manifest), in LMDB.
// A list is mutable — a new signature may be attached at any time — so it is kept like a tag: with
// the time upstream last gave it, served for the registry's tag TTL, then asked again (stale if error).
// Keyed by registry, repository, subject digest and the artifactType filter the client asked for.
import type { Database, RootDatabase } from 'lmdb';
import type { Access } from './blob-store.ts';

export interface StoredReferrers {
  /** The image index exactly as upstream sent it. */
  body: Buffer;
  contentType: string;
  /** OCI-Filters-Applied: whether the registry applied the artifactType filter itself. */
  filtersApplied?: string;
  fetchedAt: number;
  access: Access;
}

export class ReferrersStore {
  private readonly lists: Database<StoredReferrers, string>;

  constructor(index: RootDatabase) {
    this.lists = index.openDB<StoredReferrers, string>({ name: 'referrers', encoding: 'msgpack' });
  }

  get(key: string): StoredReferrers | undefined {
    return this.lists.get(key);
  }

  async put(key: string, entry: StoredReferrers): Promise<void> {
    await this.lists.put(key, entry);
  }

  /** Every list of a registry, or of one repository of it (for purge). */
  async purge(registry: string, repository?: string): Promise<number> {
    const prefix = repository === undefined ? `${registry}/` : `${registry}/${repository}@`;
    const keys = [...this.lists.getKeys({ start: prefix, end: `${prefix}\xff` })];
    await Promise.all(keys.map((key) => this.lists.remove(key)));
    return keys.length;
  }
}

export function referrersKey(registry: string, repository: string, subject: string, artifactType: string | undefined): string {
  return `${registry}/${repository}@${subject}|${artifactType ?? ''}`;
}
