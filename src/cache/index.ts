// The LMDB index: one environment for the whole process under dataDir/index. The primary thread
// writes it; each concern gets its own named database.
import path from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';
import type { LeafStore } from '../ca.ts';

export interface CacheIndex {
  root: RootDatabase;
  /** Minted leaf certificates, keyed by "<CA fingerprint>/<host>", so a new CA never reuses old ones. */
  leafCertificates: LeafStore;
  /** Removes the leaves minted by any other CA; returns how many. */
  dropLeavesExcept(fingerprint: string): Promise<number>;
  close(): Promise<void>;
}

export function openIndex(dataDir: string): CacheIndex {
  const root = open({ path: path.join(dataDir, 'index'), compression: false });
  const certs: Database<string, string> = root.openDB({ name: 'leaf-certificates', encoding: 'string' });
  return {
    root,
    leafCertificates: {
      get: (key) => certs.get(key),
      put: (key, pem) => void certs.put(key, pem),
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
