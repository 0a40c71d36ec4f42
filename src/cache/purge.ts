// `pullthrough purge`: drops cached blobs and manifests by registry, repository or digest. A blob being
// fetched is refused (its fill owns it); one being read is waited for, then skipped and reported.
import { registryKey } from '../../config/policy.ts';
import type { PurgeRequest } from '../admin/index.ts';
import type { Logger } from '../log.ts';
import type { BlobStore } from './blob-store.ts';
import type { Fills } from './fills.ts';
import type { ManifestStore } from './manifest-store.ts';

/** How long a purge waits for clients reading the blobs it names (tests shorten it). */
export const purgeTiming = { waitForReadersMs: 30_000 };

export interface PurgeResult {
  blobs: number;
  bytes: number;
  manifests: number;
  tags: number;
  /** Blobs left in place: still being read after the wait, or being fetched. */
  busy: string[];
}

export async function purge(request: PurgeRequest, parts: { store: BlobStore; fills: Fills; manifests: ManifestStore; log: Logger }): Promise<PurgeResult> {
  const registry = request.registry ? normaliseRegistry(request.registry) : undefined;
  const fetching = request.digest && parts.fills.get(request.digest) ? [request.digest] : [];
  const blobs = await parts.store.purge(
    (digest, entry) =>
      !fetching.includes(digest) &&
      (request.digest === undefined || digest === request.digest) &&
      (registry === undefined || entry.registry === registry) &&
      (request.repository === undefined || entry.repository === request.repository),
    purgeTiming.waitForReadersMs,
  );
  const manifests = registry ? await parts.manifests.purge(registry, request.repository) : { manifests: 0, tags: 0 };
  const result = { ...blobs, ...manifests, busy: [...blobs.busy, ...fetching] };
  parts.log.info('purged from the cache', { ...request, ...result });
  return result;
}

/** "quay.io" → "quay.io:443"; "host:5000" stays. */
function normaliseRegistry(text: string): string {
  const match = /^(.*?)(?::(\d+))?$/.exec(text.trim().toLowerCase())!;
  return registryKey(match[1]!, match[2] ? Number(match[2]) : 443);
}
