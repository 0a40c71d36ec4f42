// The LMDB index: one environment for the whole process under dataDir/index. The primary thread
// writes it; each concern gets its own named database.
import { chmodSync, mkdirSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';
import type { LeafStore } from '../ca.ts';
import { createLogger, errorCode, type Logger } from '../log.ts';

export interface CacheIndex {
  root: RootDatabase;
  /** Minted leaf certificates, keyed by "<CA fingerprint>/<host>", so a new CA never reuses old ones. */
  leafCertificates: LeafStore;
  /** Removes the leaves minted by any other CA; returns how many. */
  dropLeavesExcept(fingerprint: string): Promise<number>;
  close(): Promise<void>;
}

/** `log` hears of writes that fail (a full disk); the CLI's one-off commands may leave it out. */
export function openIndex(dataDir: string, log: Logger = createLogger()): CacheIndex {
  const dir = path.join(dataDir, 'index');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  // eventTurnBatching off: lmdb-js opens a batch per event turn whose promise no caller can reach, and
  // a failed commit (disk or map full) rejects it unhandled — the end of the process however well the
  // write itself was handled. Each put is still atomic; the index has no multi-put invariant outside
  // explicit transactions.
  const root = watchWrites(open({ path: dir, compression: false, eventTurnBatching: false }), new FailedWrites(log, dir));
  keepPrivate(dir, log);
  const certs: Database<string, string> = root.openDB({ name: 'leaf-certificates', encoding: 'string' });
  return {
    root,
    leafCertificates: {
      get: (key) => certs.get(key),
      // Nobody waits for it: a leaf that is not stored is minted again next time (a failure is logged).
      put: (key, pem) => void certs.put(key, pem).catch(() => {}),
    },
    async dropLeavesExcept(fingerprint) {
      let dropped = 0;
      for (const key of certs.getKeys()) {
        if (key.startsWith(`${fingerprint}/`)) continue;
        await certs.remove(key);
        dropped++;
      }
      return dropped;
    },
    close: () => root.close(),
  };
}

/**
 * The index holds what private images the cache has (manifests among them): its directory is 0700 and
 * its files 0600, whatever an older version or another tool left there.
 */
function keepPrivate(dir: string, log: Logger): void {
  const paths = [dir, ...readdirSync(dir).map((name) => path.join(dir, name))];
  for (const [i, file] of paths.entries()) {
    try {
      chmodSync(file, i === 0 ? 0o700 : 0o600);
    } catch (err) {
      log.warn('cannot make the cache index private to the proxy user: other local users may read it', {
        path: file,
        error: errorCode(err),
        fix: `chown the data directory to the proxy user, then chmod 0700 ${dir}`,
      });
    }
  }
}

/** The asynchronous writes of an lmdb-js database: each may end in a failed commit. */
const WRITES = ['put', 'remove', 'ifVersion', 'transactionAsync', 'drop', 'clearAsync'] as const;

/**
 * A failed commit rejects each write of it with "Commit failed" and also rejects error.commitError, with
 * the cause, which lmdb-js never handles (kriszyp/lmdb-js#368): unhandled, it ends the process even when
 * the caller handled its write. Every database of the index, the blob and manifest stores' included
 * (opened from the root), is watched here: commitError is handled and the cause logged once per kind.
 * A caller that waits for its write still gets the rejection; one that does not (a cache hit's access
 * time) no longer ends the process with it.
 */
function watchWrites<T extends RootDatabase | Database>(db: T, failures: FailedWrites): T {
  const target = db as unknown as Record<string, unknown>;
  for (const name of WRITES) {
    const write = target[name];
    if (typeof write !== 'function') continue;
    target[name] = function (this: unknown, ...args: unknown[]) {
      const result: unknown = write.apply(this, args);
      if (result instanceof Promise) result.catch((err: unknown) => failures.report(err));
      return result;
    };
  }
  if ('openDB' in db && typeof db.openDB === 'function') {
    const openDB = db.openDB;
    target.openDB = function (this: unknown, ...args: unknown[]) {
      const opened = (openDB as (...a: unknown[]) => Database | undefined).apply(this, args);
      return opened ? watchWrites(opened, failures) : opened;
    };
  }
  return db;
}

/** Failed commits: the cause once per kind (ENOSPC, MDB_MAP_FULL…), then quiet; the proxy serves on. */
class FailedWrites {
  private readonly log: Logger;
  private readonly dir: string;
  private readonly reported = new Set<string>();

  constructor(log: Logger, dir: string) {
    this.log = log;
    this.dir = dir;
  }

  report(err: unknown): void {
    const commitError = (err as { commitError?: Promise<unknown> } | undefined)?.commitError;
    if (!(commitError instanceof Promise)) {
      this.warn(err);
      return;
    }
    commitError.then(
      () => this.warn(err),
      (cause: unknown) => this.warn(cause),
    );
  }

  private warn(cause: unknown): void {
    const error = cause instanceof Error ? cause : new Error(String(cause));
    const kind = String((error as NodeJS.ErrnoException).code ?? error.message.split(':')[0]);
    if (this.reported.has(kind)) return;
    this.reported.add(kind);
    this.log.warn('a write to the cache index failed: what the proxy learns now (hits, new entries) is not recorded until writes succeed again; it serves on', {
      index: this.dir,
      error: error.message,
      fix: 'free space on the data directory\'s disk (a full disk is the usual cause), or lower cache.maxSize',
    });
  }
}
