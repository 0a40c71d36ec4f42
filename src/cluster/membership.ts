// Who the replicas are: the names and addresses of cluster.peers, resolved again every cluster.refresh
// (a Kubernetes headless Service lists every replica), plus this replica itself. Nothing is agreed on:
// two replicas that briefly see different lists rank a few keys differently, which costs a duplicate
// fetch at most (content is addressed and verified by digest). A peer that cannot be reached is passed
// over for a while, so requests go to the next in rendezvous order instead of waiting on it each time.
import type { LookupFunction } from 'node:net';
import { formatPeer, type ClusterPolicy } from '../../config/cluster.ts';
import type { Logger } from '../log.ts';
import { resolveAll } from '../resolver.ts';

export class Membership {
  readonly self: string;
  private current: string[];
  private resolvedOnce = false;
  private readonly down = new Map<string, number>();
  private timer: NodeJS.Timeout | undefined;
  private readonly policy: ClusterPolicy;
  private readonly lookup: LookupFunction;
  private readonly log: Logger;
  private lastProblem = '';

  constructor(policy: ClusterPolicy, lookup: LookupFunction, log: Logger) {
    this.policy = policy;
    this.lookup = lookup;
    this.log = log;
    this.self = formatPeer(policy.self);
    this.current = [this.self];
  }

  /** Every member known now, this replica included, in no particular order. */
  members(): readonly string[] {
    return this.current;
  }

  /** Undefined once the peers have been resolved; else why not yet (what /readyz says). */
  notReady(): string | undefined {
    return this.resolvedOnce ? undefined : `the cluster peers (${this.policy.peers.map(formatPeer).join(', ')}) have not been resolved yet${this.lastProblem ? `: ${this.lastProblem}` : ''}`;
  }

  /** Resolves the peers now, then every refresh interval until close(). */
  async start(): Promise<void> {
    await this.refresh();
    const again = () => {
      this.timer = setTimeout(() => {
        this.refresh().finally(again);
      }, this.policy.refreshMs);
      this.timer.unref();
    };
    again();
  }

  close(): void {
    clearTimeout(this.timer);
  }

  /** A peer that could not be reached: passed over until the next refresh interval has gone by. */
  markDown(member: string): void {
    if (member === this.self) return;
    if (!this.isDown(member)) this.log.warn('a cluster peer cannot be reached; its keys go to the next replica for now', { peer: member, forMs: this.policy.refreshMs });
    this.down.set(member, Date.now() + this.policy.refreshMs);
  }

  isDown(member: string): boolean {
    const until = this.down.get(member);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.down.delete(member);
    return false;
  }

  /** Never throws: a failed resolution keeps the last list (a DNS hiccup must not split the cluster). */
  private async refresh(): Promise<void> {
    try {
      const found = new Set<string>([this.self]);
      for (const peer of this.policy.peers) {
        for (const address of await resolveAll(this.lookup, peer.host)) found.add(formatPeer({ host: address, port: peer.port }));
      }
      const next = [...found].sort();
      if (next.join(' ') !== [...this.current].sort().join(' ')) this.log.info('cluster members', { members: next, self: this.self });
      this.current = next;
      this.resolvedOnce = true;
      this.lastProblem = '';
      for (const member of this.down.keys()) if (!found.has(member)) this.down.delete(member);
    } catch (err) {
      const problem = `${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`;
      if (problem !== this.lastProblem) this.log.warn('cannot resolve the cluster peers; keeping the members known so far', { peers: this.policy.peers.map(formatPeer), error: problem, members: this.current });
      this.lastProblem = problem;
    }
  }
}
