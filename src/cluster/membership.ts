// Who the replicas are: the names and addresses of cluster.peers, resolved again every cluster.refresh
// (a Kubernetes headless Service lists every replica), each asked for its id, plus this replica itself.
// A replica's id is made once and kept in its data directory, so ownership follows the cache volume: a
// pod recreated with a new IP but the same volume owns the same keys and finds them in its cache.
// Nothing is agreed on: two replicas that briefly see different lists rank a few keys differently,
// which costs a duplicate fetch at most (content is addressed and verified by digest). A peer that
// cannot be reached is passed over for a while, so requests go to the next in rendezvous order instead
// of waiting on it each time; one that does not answer when asked for its id is no member until it does.
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import type { LookupFunction } from 'node:net';
import path from 'node:path';
import { formatPeer, type ClusterPolicy } from '../../config/cluster.ts';
import { errorCode, type Logger } from '../log.ts';
import { resolveAll } from '../resolver.ts';

/** Asks the replica at a peer address for its id; rejects when it cannot be asked. */
export type AskId = (address: string) => Promise<string>;

const ID_FILE = 'cluster-id';
/** Refreshes for a replica not known yet happen at most this often (a refresh asks every peer). */
const HEARD_REFRESH_MIN_MS = 1_000;
const ID = /^[0-9a-f]{32}$/;

/** This replica's id: read from the data directory, or made there once. */
export function replicaId(dataDir: string): string {
  const file = path.join(dataDir, ID_FILE);
  if (existsSync(file)) {
    const id = readFileSync(file, 'utf8').trim();
    if (ID.test(id)) return id;
  }
  const id = randomBytes(16).toString('hex');
  writeFileSync(file, `${id}\n`, { mode: 0o600 });
  return id;
}

export function isReplicaId(text: string): boolean {
  return ID.test(text);
}

export class Membership {
  /** This replica's id. */
  readonly self: string;
  /** This replica's peer address (cluster.self). */
  readonly selfAddress: string;
  /** id → peer address, this replica included. */
  private addresses: Map<string, string>;
  private resolvedOnce = false;
  private readonly down = new Map<string, number>();
  private timer: NodeJS.Timeout | undefined;
  private readonly policy: ClusterPolicy;
  private readonly lookup: LookupFunction;
  private readonly askId: AskId;
  private readonly log: Logger;
  private lastProblem = '';
  private refreshing: Promise<void> | undefined;
  private lastHeardRefresh = 0;
  private heardTimer: NodeJS.Timeout | undefined;
  private again = false;

  constructor(policy: ClusterPolicy, selfId: string, lookup: LookupFunction, askId: AskId, log: Logger) {
    this.policy = policy;
    this.lookup = lookup;
    this.askId = askId;
    this.log = log;
    this.self = selfId;
    this.selfAddress = formatPeer(policy.self);
    this.addresses = new Map([[selfId, this.selfAddress]]);
  }

  /** The ids of every member known now, this replica included, in no particular order. */
  members(): string[] {
    return [...this.addresses.keys()];
  }

  /** The other members, each with its peer address. */
  peers(): Array<{ id: string; address: string }> {
    return [...this.addresses].filter(([id]) => id !== this.self).map(([id, address]) => ({ id, address }));
  }

  /** The other members not passed over now. */
  reachablePeers(): Array<{ id: string; address: string }> {
    return this.peers().filter(({ id }) => !this.isDown(id));
  }

  /** Every member not passed over now, this replica included. */
  reachable(): string[] {
    return this.members().filter((id) => !this.isDown(id));
  }

  /** Where a member's peer port is. */
  addressOf(id: string): string | undefined {
    return this.addresses.get(id);
  }

  /** Undefined once the peers have been resolved; else why not yet (what /readyz says). */
  notReady(): string | undefined {
    return this.resolvedOnce ? undefined : `the cluster peers (${this.policy.peers.map(formatPeer).join(', ')}) have not been resolved yet${this.lastProblem ? `: ${this.lastProblem}` : ''}`;
  }

  /** Resolves the peers now, then every refresh interval until close(). */
  async start(): Promise<void> {
    await this.refreshNow();
    const again = () => {
      this.timer = setTimeout(() => {
        this.refreshNow().finally(again);
      }, this.policy.refreshMs);
      this.timer.unref();
    };
    again();
  }

  /**
   * A replica asked for this one's id, giving its own and its address: one this replica does not know
   * there has just started,
   * so look again now rather than at the next interval (replicas starting together find each other in
   * a moment). By id, not by the asker's address: behind NAT or a mesh sidecar that is not the peer
   * address, and every question would start a refresh that asks every peer, which asks back.
   */
  heardFrom(asker: string | undefined): void {
    const [id, address] = (asker ?? '').split(' ');
    // Known, at the address it gives: nothing new (a replica back at a new address is new there).
    if (!id || !isReplicaId(id) || this.addresses.get(id) === address) return;
    if (this.heardTimer) return; // one is planned already
    const wait = Math.max(0, this.lastHeardRefresh + HEARD_REFRESH_MIN_MS - Date.now());
    this.heardTimer = setTimeout(() => {
      this.heardTimer = undefined;
      this.lastHeardRefresh = Date.now();
      void this.refreshNow();
    }, wait);
    this.heardTimer.unref();
  }

  /** One refresh at a time; asked during one, another follows it. */
  private refreshNow(): Promise<void> {
    if (this.refreshing) {
      this.again = true;
      return this.refreshing;
    }
    this.refreshing = this.refresh().finally(() => {
      this.refreshing = undefined;
      if (this.again) {
        this.again = false;
        void this.refreshNow();
      }
    });
    return this.refreshing;
  }

  close(): void {
    clearTimeout(this.timer);
    clearTimeout(this.heardTimer);
  }

  /** A peer that could not be reached: passed over until the next refresh interval has gone by. */
  markDown(id: string): void {
    if (id === this.self) return;
    if (!this.isDown(id)) this.log.warn('a cluster peer cannot be reached; its keys go to the next replica for now', { peer: this.addresses.get(id) ?? id, forMs: this.policy.refreshMs });
    this.down.set(id, Date.now() + this.policy.refreshMs);
  }

  isDown(id: string): boolean {
    const until = this.down.get(id);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.down.delete(id);
    return false;
  }

  /** Never throws: a failed resolution keeps the last list (a DNS hiccup must not split the cluster). */
  private async refresh(): Promise<void> {
    let found: Set<string>;
    try {
      found = new Set<string>();
      for (const peer of this.policy.peers) {
        for (const address of await resolveAll(this.lookup, peer.host)) found.add(formatPeer({ host: address, port: peer.port }));
      }
    } catch (err) {
      const problem = errorCode(err);
      if (problem !== this.lastProblem) this.log.warn('cannot resolve the cluster peers; keeping the members known so far', { peers: this.policy.peers.map(formatPeer), error: problem, members: this.describe() });
      this.lastProblem = problem;
      return;
    }
    found.delete(this.selfAddress);
    const next = new Map([[this.self, this.selfAddress]]);
    await Promise.all(
      [...found].map(async (address) => {
        try {
          const id = await this.askId(address);
          if (!isReplicaId(id) || id === this.self) return;
          next.set(id, address);
        } catch {
          // Not serving (yet, or any more): no member until it answers.
        }
      }),
    );
    const before = this.describe();
    this.addresses = next;
    if (this.describe() !== before || !this.resolvedOnce) this.log.info('cluster members', { members: this.describe(), self: `${this.self.slice(0, 8)}@${this.selfAddress}` });
    this.resolvedOnce = true;
    this.lastProblem = '';
    for (const id of this.down.keys()) if (!next.has(id)) this.down.delete(id);
  }

  /** "id-prefix@address", sorted: what the log shows. */
  private describe(): string {
    return [...this.addresses].map(([id, address]) => `${id.slice(0, 8)}@${address}`).sort().join(' ');
  }
}
