// A cluster of pullthrough replicas on loopback: each listens for clients on 127.0.0.1 and for its peers
// on an address of its own (127.0.0.21, .22, …) on one port, and a peer name resolves to all of them
// through the policy's `hosts:`, as a Kubernetes headless Service would. They share one CA directory
// (read-only, as a mounted Secret), made before they start: cluster mode never creates one.
import { chmodSync, mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CertificateAuthority } from '../../src/ca.ts';

export const PEER_NAME = 'peers.cluster.test';
export const CLUSTER_SECRET = 'cluster-test-secret-0123456789';

/** 127.0.0.21 … : the peer address of replica i. */
export function replicaAddress(i: number): string {
  return `127.0.0.${21 + i}`;
}

/** One CA for every replica, in `dir`/ca (the files 0400 and the directory 0500, as a Secret volume). */
export function sharedCaDir(dir: string): string {
  const caDir = path.join(dir, 'ca');
  mkdirSync(caDir, { recursive: true });
  CertificateAuthority.create(caDir);
  for (const file of ['ca.crt', 'ca.key']) chmodSync(path.join(caDir, file), 0o400);
  chmodSync(caDir, 0o500);
  return caDir;
}

/** A port free on every replica address (the peer port is the same on all, as in a StatefulSet). */
export async function freePeerPort(replicas: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 30_000);
    const free = await Promise.all(Array.from({ length: replicas }, (_, i) => isFree(replicaAddress(i), port)));
    if (free.every(Boolean)) return port;
  }
  throw new Error('no free peer port on the replica addresses');
}

function isFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, host, () => server.close(() => resolve(true)));
  });
}

/** The `cluster:` and `hosts:` lines of replica i's policy (hosts: goes last; add more entries after it). */
export function clusterPolicy(i: number, replicas: number, peerPort: number, options: { refresh?: string; peerAddresses?: number } = {}): { cluster: string; hostsEntry: string } {
  // peerAddresses: the peer name may list more addresses than replicas run (one a restarted replica takes).
  const addresses = Array.from({ length: options.peerAddresses ?? replicas }, (_, r) => replicaAddress(r)).join(', ');
  return {
    cluster: `cluster:\n  peers: ${PEER_NAME}:${peerPort}\n  self: ${replicaAddress(i)}:${peerPort}\n  listen: ${replicaAddress(i)}:${peerPort}\n  secret: ${CLUSTER_SECRET}\n  refresh: ${options.refresh ?? '1s'}\n`,
    hostsEntry: `  ${PEER_NAME}: [${addresses}]\n`,
  };
}

/** Until every replica knows all `n` members (they find each other within a moment of starting). */
export async function waitForMembers(metricsUrls: string[], n: number, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const known = await Promise.all(
      metricsUrls.map(async (url) => {
        const text = await (await fetch(`${url}/metrics`)).text();
        return Number(/^pullthrough_cluster_members\{state="known"\} (\d+)$/m.exec(text)?.[1] ?? 0);
      }),
    );
    if (known.every((k) => k === n)) return;
    if (Date.now() > deadline) throw new Error(`the replicas know ${known.join(', ')} members, not ${n}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
