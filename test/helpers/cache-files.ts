// What a user finds in the proxy's data directory: verified blobs at blobs/sha256/ab/<hex>, fills in
// progress at tmp/*.part. Tests look at the disk, not at the cache's internals.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export function blobFile(dataDir: string, digest: string): string {
  const [algorithm, hex] = digest.split(':') as [string, string];
  return path.join(dataDir, 'blobs', algorithm, hex.slice(0, 2), hex);
}

export function hasBlobFile(dataDir: string, digest: string): boolean {
  return existsSync(blobFile(dataDir, digest));
}

/** sha256:<hex> of the cached file's content. */
export function digestOfBlobFile(dataDir: string, digest: string): string {
  return 'sha256:' + createHash('sha256').update(readFileSync(blobFile(dataDir, digest))).digest('hex');
}

/** Every file under blobs/, relative to it. */
export function blobFiles(dataDir: string): string[] {
  return listFiles(path.join(dataDir, 'blobs'));
}

/** The .part files in tmp/ with their sizes. */
export function partFiles(dataDir: string): Array<{ name: string; size: number }> {
  return listFiles(path.join(dataDir, 'tmp'))
    .filter((name) => name.endsWith('.part'))
    .map((name) => ({ name, size: statSync(path.join(dataDir, 'tmp', name)).size }));
}

/** Bytes of every file under dir (the LMDB index included). */
export function diskUsage(dir: string): number {
  return listFiles(dir).reduce((sum, name) => sum + statSync(path.join(dir, name)).size, 0);
}

/** Polls until `condition` holds (after `probe`, when given, ran); throws with `what` after `timeoutMs`. */
export async function waitFor(what: string, condition: () => boolean, timeoutMs = 10_000, probe?: () => Promise<void>): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    await probe?.();
    if (condition()) return;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

function listFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => path.relative(dir, path.join(entry.parentPath, entry.name)));
}
