// The LMDB index: one environment for the whole process under dataDir/index. The primary thread
// writes it; each concern gets its own named database.
import path from 'node:path';
import { open, type Database, type RootDatabase } from 'lmdb';
import type { LeafStore } from '../ca.ts';

export interface CacheIndex {
  root: RootDatabase;
  /** Minted leaf certificates, keyed by "<CA fingerprint>/<host>", so a new CA never reuses old ones. */
  leafCertificates: LeafStore;
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
    close: () => root.close(),
  };
}
