// A cluster of pullthrough replicas, each its own process (so that /proc shows each one's CPU), laid
// out as test/helpers/cluster.ts lays it out: clients reach replica i on 127.0.0.1:<its port>, peers
// on 127.0.0.(21+i):<one peer port>, a peer name resolves to all of them through the policy's `hosts:`
// (as a Kubernetes headless Service would), and they share one CA directory made before they start.
// The owner of a key is computed here as the replicas compute it (src/cluster/rendezvous.ts over the
// replica ids each keeps in its data directory), so that a benchmark can send a client to the owner or
// to a replica that relays from it; peersOf() says afterwards who really served.
import { mkdirSync, readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { rankFor } from '../../src/cluster/rendezvous.ts';
import { clusterPolicy, freePeerPort, replicaAddress, sharedCaDir, waitForMembers } from '../../test/helpers/cluster.ts';
import { composePolicy, type PolicyEntries } from './origin.ts';
import { startProxyProcess, type ProxyProcess } from './proxy.ts';

export interface ClusterOptions {
  /** A dir of its own (created): the shared CA and each replica's working dir. */
  dir: string;
  replicas: number;
  /** The upstreams every replica intercepts. */
  upstreams: readonly PolicyEntries[];
  /** Extra node options of replica i (e.g. a CPU profile dir of its own). */
  nodeArgs?: (replica: number) => string[];
  /** Another build of the proxy's cli (ProxyOptions.cli). */
  cli?: string;
}

export interface Replica {
  index: number;
  /** What rendezvous ranks: the id the replica made in its data directory at its first start. */
  id: string;
  /** Its peer address: "127.0.0.21:PORT" (what the access log's `peer` names). */
  address: string;
  /** The process; its caFile is the cluster's one CA (what clients must trust). */
  proxy: ProxyProcess;
}

export interface Cluster {
  replicas: Replica[];
  peerPort: number;
  /** The replicas in rendezvous order for a key (blobKey(digest), manifestKey(…)): the owner first. */
  rank(key: string): Replica[];
  /** What the replicas told their operator so far at level warn or error, by replica and message, with counts. */
  warnings(): ClusterWarning[];
  stop(): Promise<void>;
}

export interface ClusterWarning {
  replica: number;
  level: string;
  message: string;
  count: number;
  /** The fields of the first line with this message (peer, error, …). */
  first: Record<string, unknown>;
}

/** Starts the replicas one after the other, and waits until every one knows all of them. */
export async function startCluster(options: ClusterOptions): Promise<Cluster> {
  mkdirSync(options.dir, { recursive: true });
  const caDir = sharedCaDir(options.dir);
  const peerPort = await freePeerPort(options.replicas);
  const replicas: Replica[] = [];
  try {
    for (let i = 0; i < options.replicas; i++) {
      const dir = join(options.dir, `replica-${i}`);
      mkdirSync(dir);
      // The production default for refresh: membership is static here, and it is how long a peer that
      // failed is passed over.
      const { cluster, hostsEntry } = clusterPolicy(i, options.replicas, peerPort, { refresh: '5s' });
      const proxy = await startProxyProcess({
        dir,
        policy: `caDir: ${JSON.stringify(caDir)}\n${cluster}${composePolicy(options.upstreams, [hostsEntry.trimEnd()])}`,
        ...(options.nodeArgs ? { nodeArgs: options.nodeArgs(i) } : {}),
        ...(options.cli ? { cli: options.cli } : {}),
      });
      const id = readFileSync(join(dir, 'data', 'cluster-id'), 'utf8').trim();
      replicas.push({ index: i, id, address: `${replicaAddress(i)}:${peerPort}`, proxy: { ...proxy, caFile: join(caDir, 'ca.crt') } });
    }
    await waitForMembers(replicas.map((r) => r.proxy.url), options.replicas);
  } catch (err) {
    await Promise.all(replicas.map((r) => r.proxy.stop()));
    throw err;
  }
  const byId = new Map(replicas.map((r) => [r.id, r]));
  const ids = replicas.map((r) => r.id);
  return {
    replicas,
    peerPort,
    rank: (key) => rankFor(key, ids).map((id) => byId.get(id)!),
    warnings: () => replicas.flatMap((r) => readWarnings(r.index, r.proxy.stderrFile)),
    stop: async () => {
      await Promise.all(replicas.map((r) => r.proxy.stop()));
    },
  };
}

function readWarnings(replica: number, file: string): ClusterWarning[] {
  const found = new Map<string, ClusterWarning>();
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (!line.startsWith('{')) continue;
    let entry: Record<string, unknown>;
    try {
      entry = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    const { level, message, time: _, ...fields } = entry;
    if (level !== 'warn' && level !== 'error') continue;
    const key = `${String(level)} ${String(message)}`;
    const known = found.get(key);
    if (known) known.count++;
    else found.set(key, { replica, level: String(level), message: String(message), count: 1, first: fields });
  }
  return [...found.values()];
}

/** Where a replica's access log ends now: for peersOf(). */
export function accessLogMark(replica: Replica): number {
  return statSync(replica.proxy.stdoutFile).size;
}

/**
 * Who served each of `count` GETs of `path` that reached `replica` since `mark`, from its access log: the
 * owner's peer address for a request it relayed, '' for one it served itself. Waits up to a second for
 * the lines (a request is logged when its response has ended, which may be just after the client saw it).
 */
export async function peersOf(replica: Replica, mark: number, path: string, count: number): Promise<string[]> {
  let peers: string[] = [];
  for (let waited = 0; waited < 1000; waited += 20) {
    peers = readFileSync(replica.proxy.stdoutFile)
      .subarray(mark)
      .toString('utf8')
      .split('\n')
      .flatMap((line) => {
        if (!line.startsWith('{')) return [];
        const entry = JSON.parse(line) as { method?: string; path?: string; peer?: string };
        return entry.method === 'GET' && entry.path === path ? [entry.peer ?? ''] : [];
      });
    if (peers.length >= count) break;
    await sleep(20);
  }
  return peers;
}
