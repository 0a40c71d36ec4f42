// Test content: a file of random bytes (so no layer on the way can compress it), placed where a
// registry serves a blob — <root>/v2/<repository>/blobs/sha256:<hex> — under its real digest, since
// the proxy rejects requests for invalid digests and will later verify what it caches.
import { createHash, randomFillSync } from 'node:crypto';
import { mkdirSync, renameSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';

/** Written in 4 MiB pieces: large enough that writing 1 GiB takes about a second. */
const CHUNK_BYTES = 4 * 1024 * 1024;

export interface Blob {
  /** "sha256:<hex>". */
  digest: string;
  size: number;
  /** The file on disk. */
  file: string;
  /** The URL path a registry serves it under: /v2/<repository>/blobs/<digest>. */
  urlPath: string;
}

export async function createRandomBlob(root: string, repository: string, size: number): Promise<Blob> {
  const dir = join(root, 'v2', repository, 'blobs');
  mkdirSync(dir, { recursive: true });
  const partial = join(dir, '.blob.part');
  const hash = createHash('sha256');
  const chunk = Buffer.allocUnsafe(CHUNK_BYTES);
  const handle = await open(partial, 'w');
  try {
    for (let written = 0; written < size; ) {
      const piece = chunk.subarray(0, Math.min(CHUNK_BYTES, size - written));
      randomFillSync(piece);
      hash.update(piece);
      await handle.write(piece);
      written += piece.length;
    }
  } finally {
    await handle.close();
  }
  const digest = `sha256:${hash.digest('hex')}`;
  const file = join(dir, digest);
  renameSync(partial, file);
  return { digest, size, file, urlPath: `/v2/${repository}/blobs/${digest}` };
}
