// Wires the parts together and starts listening: the LMDB index, the CA, the worker pool, the
// upstream agents, the intercepted sessions and the front.
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import type https from 'node:https';
import type net from 'node:net';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { Listen, Policy } from '../config/policy.ts';
import type { MirrorPolicy } from '../config/mirror.ts';
import { dashboardData } from './admin/dashboard.ts';
import { createAdminHandler, type AdminDeps, type PurgeRequest } from './admin/index.ts';
import { purge } from './cache/purge.ts';
import { createMetrics, type Metrics } from './metrics.ts';
import { Stats } from './stats.ts';
import { CertificateAuthority, CertificateError } from './ca.ts';
import { Membership, replicaId } from './cluster/membership.ts';
import { OwnerRouter } from './cluster/owner-router.ts';
import { PeerCopies } from './cluster/peer-copies.ts';
import { rankFor } from './cluster/rendezvous.ts';
import { createPeerServer } from './cluster/peer-server.ts';
import { BlobStore } from './cache/blob-store.ts';
import { Fills } from './cache/fills.ts';
import { openIndex } from './cache/index.ts';
import { ManifestStore } from './cache/manifest-store.ts';
import { createManifestHandler } from './registry/manifests.ts';
import { createReferrersHandler } from './registry/referrers.ts';
import { ReferrersStore } from './cache/referrers-store.ts';
import { RateLimits } from './upstream/rate-limits.ts';
import { cachedOrFilling, createBlobHandler, fillAheadWith } from './registry/blobs.ts';
import { LayerPrefetch } from './registry/prefetch.ts';
import { createFront } from './listener.ts';
import { createMirror, type MirrorFront } from './mirror.ts';
import { errorCode, type AccessEntry, type Logger } from './log.ts';
import { createWorkerPool, type WorkerPool } from './pool.ts';
import { createRegistryHandler } from './registry/handler.ts';
import { createLookup } from './resolver.ts';
import { InFlight } from './in-flight.ts';
import { closeServer } from './leaf-server.ts';
import { InterceptedSessions } from './session.ts';
import { preloadTrust, UpstreamAgents } from './upstream/agents.ts';
import { TokenExchange } from './upstream/token-exchange.ts';
import { ReadAccess } from './registry/read-access.ts';
import { addWarmUser, loopbackUrl, WarmSchedule } from './warm-schedule.ts';
import { UpstreamAuth } from './registry/upstream-auth.ts';

const CA_EXPIRY_WARNING_MS = 30 * 86_400_000;
/** A stopping proxy ends its drain once nothing has been in flight for this long. */
const DRAIN_QUIET_MS = 500;

export interface RunningProxy {
  port: number;
  host: string;
  /** The registry-mirror front's port, when mirror: is configured. */
  mirrorPort?: number;
  /** The cluster peer port, in cluster mode. */
  peerPort?: number;
  ca: CertificateAuthority;
  pool: WorkerPool;
  /** Upstream pull budgets (ratelimit-* headers) by registry, for the metrics and the dashboard. */
  rateLimits: RateLimits;
  metrics: Metrics;
  stats: Stats;
  /**
   * The first half of a graceful stop: not ready any more, no new connection on any port, and the
   * requests being answered get up to `graceMs` to finish. close() follows and cuts what is left.
   */
  drain(graceMs: number): Promise<{ finished: boolean; cut: number }>;
  close(): Promise<void>;
}

export const VERSION: string = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

export async function startProxy(policy: Policy, baseLog: Logger): Promise<RunningProxy> {
  const startedAt = Date.now();
  // Every access entry also feeds the metrics and the dashboard's stats.
  const stats = new Stats();
  let metrics: Metrics | undefined;
  const logProbes = /^(1|true|yes)$/i.test(process.env.PULLTHROUGH_LOG_PROBES ?? '');
  const log: Logger = {
    ...baseLog,
    access(entry) {
      if (logProbes || !isProbe(entry)) baseLog.access(entry);
      stats.observe(entry);
      metrics?.observe(entry);
    },
  };
  // The cache holds private images: only the proxy's user may look inside, whoever made the directory.
  prepareDataDir(policy.dataDir, log);
  if (policy.cluster) requireSharedCa(policy.caDir);
  const index = openIndex(policy.dataDir, log);
  const { ca, created, copiedFrom } = CertificateAuthority.loadOrCreate(policy.caDir, index.leafCertificates, policy.dataDir);
  log.info(created ? 'created a new CA; clients must trust it (GET /ca.crt)' : copiedFrom ? 'copied the CA of the data directory into caDir' : 'using the CA in caDir', {
    caDir: policy.caDir,
    fingerprint: ca.fingerprint,
    notAfter: ca.notAfter.toISOString(),
  });
  if (ca.notAfter.getTime() - Date.now() < CA_EXPIRY_WARNING_MS) {
    log.warn('the proxy CA expires soon: replace ca.crt/ca.key in caDir and redistribute /ca.crt', { notAfter: ca.notAfter.toISOString() });
  }

  const lookup = createLookup(policy.hosts, policy.ipv6);
  const upstreams = new UpstreamAgents();
  const pool = createWorkerPool(log, policy.workers);
  const store = new BlobStore(policy.dataDir, index.root, log);
  await store.start();
  // metrics is set below, before any fill can run.
  const fills = new Fills(pool, store, policy.cache, log, {
    ended: (registry, outcome) => {
      metrics?.fillEnded(registry, outcome);
      stats.fillEnded(outcome);
    },
    retried: (registry, offset) => metrics?.fillRetried(registry, offset),
  });
  // Before anything reads the users: the warm-up's own, when users are configured.
  const warmUser = addWarmUser(policy);
  let warmSchedule: WarmSchedule | undefined;
  const auth = new UpstreamAuth(new TokenExchange(), upstreams, log);
  const readAccess = new ReadAccess(auth, upstreams, policy.cache.readCheckTtlMs, policy.users.size > 0);
  const blobDeps = { store, fills, upstreams, auth, readAccess, limits: policy.cache, log };
  // Not in cluster mode: a replica would fill ahead blobs that other replicas own.
  const prefetch = policy.cache.prefetch && !policy.cluster ? new LayerPrefetch(fillAheadWith(blobDeps), (digest) => cachedOrFilling(blobDeps, digest), log) : undefined;
  const blobs = createBlobHandler({ ...blobDeps, ...(prefetch ? { prefetch } : {}) });
  const manifestStore = new ManifestStore(index.root);
  const rateLimits = new RateLimits();
  const manifests = createManifestHandler({ store: manifestStore, upstreams, rateLimits, auth, readAccess, log, digestMismatch: (registry) => metrics?.digestMismatch(registry, 'manifest'), ...(prefetch ? { prefetch } : {}) });
  const referrers = createReferrersHandler({ store: new ReferrersStore(index.root), upstreams, auth, readAccess, log });
  // Cluster mode: who the replicas are (this one by the id in its data directory), and the router that
  // sends blobs and manifests to the owner of their key.
  const clusterId = policy.cluster ? replicaId(policy.dataDir) : undefined;
  let owners: OwnerRouter | undefined;
  const membership = policy.cluster && clusterId ? new Membership(policy.cluster, clusterId, lookup, (address) => owners!.askId(address), log) : undefined;
  if (membership && policy.cluster) {
    owners = new OwnerRouter(membership, ca.certPem, policy.cluster.secret, log);
    fills.peerCopies = new PeerCopies(membership, ca.certPem, policy.cluster.secret, policy.defaults.timeouts);
  }
  const purgeHere = (request: PurgeRequest) => purge(request, { store, fills, manifests: manifestStore, log });
  const inFlight = new InFlight();
  let draining = false;
  const registryHandler = createRegistryHandler({ policy, upstreams, blobs, manifests, manifestStore, referrers, auth, log, inFlight, closing: () => draining, ...(owners ? { owners, holdsBlob: (digest) => store.holds(digest) } : {}) });
  // The peer port listens before the front, and only then are the peers asked for their ids: replicas
  // starting together find each other at once (asking for an id makes the one asked look again).
  let peerServer: https.Server | undefined;
  if (policy.cluster && membership) {
    peerServer = createPeerServer({ policy, secret: policy.cluster.secret, id: membership.self, store, heardFrom: (asker) => membership.heardFrom(asker), ca, registryHandler, auth, manifestStore, purge: purgeHere, log });
    await listenOn(peerServer, policy.cluster.listen);
    const at = peerServer.address() as AddressInfo;
    log.info('the cluster peer port is listening', { listen: `${at.address}:${at.port}`, id: membership.self, self: membership.selfAddress });
    await membership.start();
  }
  warnAboutSharedCredentials(policy, log);
  const sessions = new InterceptedSessions(ca, registryHandler, log);
  const listenHost = policy.listen.host;
  metrics = createMetrics({
    fillsInFlight: () => fills.active,
    cacheBytes: () => store.total,
    cacheEntries: () => store.count,
    evictions: () => store.evictions,
    prefetched: () => prefetch?.started ?? 0,
    rateLimits: () => rateLimits.all(),
    caNotAfter: () => ca.notAfter,
    leafExpiries: () => ca.leafExpiries(),
    warm: () => warmSchedule?.status(),
    ...(membership ? { cluster: () => ({ members: membership.members().length, unreachable: membership.members().length - membership.reachable().length, failovers: owners?.failovers ?? 0 }) } : {}),
  });
  const workersHealthy = () => pool.health().then(() => 'ok', (err: Error) => err.message);
  const admin = createAdminHandler({
    ca,
    version: VERSION,
    fallbackHost: `${listenHost}:${policy.listen.port}`,
    metrics,
    dashboard: () => dashboardData({ version: VERSION, startedAt, maxSize: policy.cache.maxSize, stats, store, fills, manifests: manifestStore, rateLimits, workersHealthy, warm: () => warmSchedule?.status() }),
    purge: async (request) => {
      const here = await purgeHere(request);
      return owners ? owners.purgeEverywhere(request, here) : here;
    },
    ...(policy.mirror ? { mirror: mirrorSetupFor(policy, policy.mirror, () => (mirror?.server.address() as AddressInfo | null)?.port) } : {}),
    admin: policy.admin,
    ...(membership ? { notReady: () => membership.notReady() } : {}),
  });
  // Declared before the front: its CONNECT guard asks for the mirror's address (no tunnel into it either).
  let mirror: MirrorFront | undefined;
  const otherListeners = () =>
    [mirror?.server.address(), peerServer?.address()].flatMap((at) => (at && typeof at === 'object' ? [{ address: at.address, port: at.port }] : []));
  const front = createFront({ policy, log, lookup, sessions, registryHandler, admin, otherListeners });

  // A port that cannot be bound stops the start; what listens already is closed again.
  const startFailed = async (err: unknown, listening: Array<Promise<void>> = []): Promise<never> => {
    membership?.close();
    await Promise.all([...listening, peerServer && closeServer(peerServer)]);
    throw err;
  };
  await listenOn(front.server, policy.listen).catch((err: unknown) => startFailed(err));
  const address = front.server.address() as AddressInfo;
  log.info('pullthrough is listening', { listen: `${address.address}:${address.port}`, registries: [...policy.registries.keys()], version: VERSION });
  if (policy.mirror) {
    const mirrorPolicy = policy.mirror;
    mirror = createMirror({ policy, mirror: mirrorPolicy, ca, registryHandler, auth, upstreams, log });
    await listenOn(mirror.server, mirrorPolicy.listen).catch((err: unknown) => startFailed(err, [front.close()]));
    const at = mirror.server.address() as AddressInfo;
    log.info('the registry mirror is listening', { listen: `${at.address}:${at.port}`, tls: mirrorPolicy.tls ? (mirrorPolicy.tls.certFile ? 'own certificate' : mirrorPolicy.tls.names) : false, default: mirrorPolicy.defaultRegistry ?? null });
  }

  // What the first requests would otherwise wait for, once the proxy listens (before listening it delayed
  // that by 0.1–0.5 s on 2 cores): the fill workers' start, and the CA stores that upstream TLS is checked
  // against (~50 ms of reading /etc/ssl/certs).
  pool.warmUp();
  setImmediate(preloadTrust);
  // The policy's warm-up list: through the front, from loopback, a short delay after listening.
  // In cluster mode one replica warms: the first in rendezvous order of a fixed key among the reachable.
  const leads = membership ? () => rankFor('warm-up', membership.reachable())[0] === membership.self : undefined;
  warmSchedule = new WarmSchedule({ warm: policy.warm, proxyUrl: loopbackUrl(policy.listen.host, address.port), caPem: ca.certPem, ...(warmUser ? { user: warmUser } : {}), ...(leads ? { leads } : {}), log });
  warmSchedule.start();

  return {
    port: address.port,
    host: address.address,
    ...(mirror ? { mirrorPort: (mirror.server.address() as AddressInfo).port } : {}),
    ...(peerServer ? { peerPort: (peerServer.address() as AddressInfo).port } : {}),
    ca,
    pool,
    rateLimits,
    metrics,
    stats,
    async drain(graceMs) {
      draining = true;
      sessions.stopping = true;
      prefetch?.stop();
      // Listeners stop accepting; open connections stay, so that requests in flight end whole. Every
      // answer from now on says Connection: close, and the drain ends only once nothing has been in
      // flight for a moment: a client that had just connected sends its request meanwhile.
      for (const server of [front.server, mirror?.server, peerServer]) server?.close();
      const deadline = Date.now() + graceMs;
      for (;;) {
        if (!(await inFlight.idle(Math.max(0, deadline - Date.now())))) return { finished: false, cut: inFlight.count };
        await new Promise((resolve) => setTimeout(resolve, Math.min(DRAIN_QUIET_MS, Math.max(0, deadline - Date.now()))));
        if (inFlight.count === 0) return { finished: true, cut: 0 };
      }
    },
    async close() {
      await warmSchedule?.close();
      membership?.close();
      await Promise.all([front.close(), mirror?.close(), peerServer && closeServer(peerServer)]);
      sessions.close();
      await Promise.all([upstreams.close(), pool.close(), owners?.close()]);
      await index.close();
    },
  };
}

/**
 * Cluster mode: every replica must present the same CA to clients (a client may reach any of them), so
 * none creates one of its own; the operator mounts one Secret on all of them.
 */
function requireSharedCa(caDir: string): void {
  if (existsSync(path.join(caDir, 'ca.crt')) && existsSync(path.join(caDir, 'ca.key'))) return;
  throw new CertificateError(
    `cluster mode needs one CA for all replicas, and ${caDir} has no ca.crt and ca.key: mount the same Secret (ca.crt, ca.key) at caDir on every replica. ` +
      'Make one with `PULLTHROUGH_CA_DIR=./ca PULLTHROUGH_DATA_DIR=./ca-scratch pullthrough ca rotate`, then `kubectl create secret generic pullthrough-ca --from-file=ca.crt=./ca/ca.crt --from-file=ca.key=./ca/ca.key` (docs/cluster.md)',
  );
}

function listenOn(server: net.Server, listen: Listen): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listen.port, listen.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/** Polls that answer fine: a line each every few seconds would bury the pulls (PULLTHROUGH_LOG_PROBES=1 keeps them). */
const PROBE_PATHS = new Set(['/healthz', '/readyz', '/ui/data.json', '/metrics']);

function isProbe(entry: AccessEntry): boolean {
  return entry.type === 'admin' && (entry.method === 'GET' || entry.method === 'HEAD') && PROBE_PATHS.has(entry.path) && entry.status < 400;
}

/**
 * dataDir 0700, also when it existed before (an older version's 0755): every blob and manifest in it
 * may be private. One the proxy cannot chmod (a Kubernetes volume owned by root, group fsGroup) is used
 * as it is: what is private in it is private on its own (the index 0700, blob files 0600).
 */
function prepareDataDir(dataDir: string, log: Logger): void {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const { mode } = statSync(dataDir);
  if ((mode & 0o077) === 0) return;
  try {
    chmodSync(dataDir, 0o700);
  } catch (err) {
    log.info('the data directory keeps its mode (it belongs to another user); the index and cached files in it are private on their own', {
      dataDir,
      mode: (mode & 0o777).toString(8).padStart(4, '0'),
      error: errorCode(err),
    });
  }
}

/** R6.2: what central credentials fetch is the operator's to share; say so, once, at start. */
function warnAboutSharedCredentials(policy: Policy, log: Logger): void {
  for (const registry of policy.registries.values()) {
    if (!registry.auth) continue;
    if (policy.users.size > 0) {
      log.info('content fetched with central credentials is served to proxy users whose read rules match', { registry: registry.key });
    } else {
      log.warn('content fetched with central credentials is served to every client of the proxy (configure users: to restrict it)', { registry: registry.key });
    }
  }
}

/**
 * What the mirror setup scripts need: the mirror's URL as a client that reached the admin surface by
 * `hostname` would use it (a TLS mirror by one of its names), and the registries (not the token
 * services, which clients never pull from).
 */
function mirrorSetupFor(policy: Policy, mirror: MirrorPolicy, port: () => number | undefined): NonNullable<AdminDeps['mirror']> {
  return {
    url(hostname) {
      const names = mirror.tls?.names ?? [];
      const host = mirror.tls && names.length > 0 && !names.includes(hostname.toLowerCase()) ? names[0]! : hostname;
      return `${mirror.tls ? 'https' : 'http'}://${host.includes(':') && !host.startsWith('[') ? `[${host}]` : host}:${port() ?? mirror.listen.port}`;
    },
    registries: [...policy.registries.values()].filter((r) => r.tokenServiceFor.length === 0),
  };
}
