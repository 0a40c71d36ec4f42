// Cluster mode (cluster: in proxy.yaml): several replicas, one cache. Who the replicas are (a DNS name
// that resolves to every replica, such as a Kubernetes headless Service, or a list), which of them this
// one is, where it listens for its peers and the secret peer requests carry. Off when absent.
import { isSeq } from 'yaml';
import type { Listen } from './policy.ts';
import type { Cursor } from './yaml-cursor.ts';

export interface PeerAddress {
  host: string;
  port: number;
}

export interface ClusterPolicy {
  /** One name resolved again every `refreshMs` (every address it gives is a replica), or fixed addresses. */
  peers: PeerAddress[];
  /** This replica's peer address as the others reach it (the pod IP and the peer port). */
  self: PeerAddress;
  /** Where the peer listener listens: 0.0.0.0 and self's port unless given. */
  listen: Listen;
  /** Sent with every peer request and required on every one received. */
  secret: string;
  refreshMs: number;
}

export const DEFAULT_PEER_REFRESH_MS = 5_000;

export function parseCluster(cursor: Cursor, parseListen: (text: string, fail: (message: string) => never) => Listen): ClusterPolicy {
  const fields = cursor.entries(['peers', 'self', 'listen', 'secret', 'refresh']);
  const peersCursor = fields.get('peers');
  if (!peersCursor?.present) return cursor.fail('needs peers (a DNS name that resolves to every replica, with the peer port: pullthrough-peers.pullthrough.svc.cluster.local:3129; or a list of host:port)');
  const peerTexts = isSeq(peersCursor.node) ? peersCursor.stringList() : [peersCursor.string()];
  if (peerTexts.length === 0) peersCursor.fail('lists no replica');
  const peers = peerTexts.map((text) => peerAddress(text, (m) => peersCursor.fail(m)));
  const selfCursor = fields.get('self');
  if (!selfCursor?.present || selfCursor.string() === '') return cursor.fail('needs self: this replica\'s peer address as the others reach it (in Kubernetes: ${POD_IP}:3129)');
  const self = peerAddress(selfCursor.string(), (m) => selfCursor.fail(m));
  const secretCursor = fields.get('secret');
  if (!secretCursor?.present || secretCursor.string() === '') return cursor.fail('needs secret: what every peer request carries (the same on every replica; make one with `openssl rand -hex 32`)');
  const secret = secretCursor.string();
  if (!/^[\x21-\x7e]{16,}$/.test(secret)) secretCursor.fail('a peer secret is at least 16 visible ASCII characters, no spaces (make one with `openssl rand -hex 32`)');
  const listenCursor = fields.get('listen');
  const listen = listenCursor?.present ? parseListen(listenCursor.string(), (m) => listenCursor.fail(m)) : { host: '0.0.0.0', port: self.port };
  return { peers, self, listen, secret, refreshMs: fields.get('refresh')?.durationMs() ?? DEFAULT_PEER_REFRESH_MS };
}

/** "name:port", "10.1.2.3:3129", "[fd00::5]:3129": a port is required (the peer port, not the proxy's). */
export function peerAddress(text: string, fail: (message: string) => never): PeerAddress {
  const match = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$/.exec(text.trim());
  const port = Number(match?.[2]);
  if (!match || port < 1 || port > 65535) fail(`"${text}" is not host:port (example: pullthrough-peers.pullthrough.svc.cluster.local:3129)`);
  return { host: match[1]!.replace(/^\[(.*)\]$/, '$1').toLowerCase(), port };
}

export function formatPeer(peer: PeerAddress): string {
  return peer.host.includes(':') ? `[${peer.host}]:${peer.port}` : `${peer.host}:${peer.port}`;
}
