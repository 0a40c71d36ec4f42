// May this client read a cached object (R6)? Anonymous content is public. Content fetched with the
// central credentials is shared with every client of the proxy, or with proxy users only, when users
// are configured. Content fetched with a client's own credentials is served only to a client that
// proves it may read it: a proxy user whose rules grant the repository it came from, or credentials
// (its own, else the proxy's) that upstream accepts for this very object now — a HEAD, whose verdict
// is kept for cache.readCheckTtl under a hash of the credential, never the credential itself.
import type { IncomingMessage } from 'node:http';
import type { ProxyUser } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import { mayRead } from '../proxy-users.ts';
import { endSpan, startUpstreamSpan } from '../tracing.ts';
import type { UpstreamAgents } from '../upstream/agents.ts';
import { credentialHash, type UpstreamAuth, type UpstreamTarget } from './upstream-auth.ts';

export type ReadVerdict = { allowed: true } | { allowed: false; status: number; headers: Record<string, string | string[]> };

export interface ReadCheck {
  /** How the cached object was obtained. */
  access: Access;
  /** Where it was obtained, when that can differ from where it is asked for (blobs are shared by digest). */
  origin?: { registry: string; repository: string };
  req: IncomingMessage;
  user: ProxyUser | undefined;
  target: UpstreamTarget & { repository: string };
  /** The object's path upstream: /v2/<name>/blobs/<digest> or /v2/<name>/manifests/<reference>. */
  path: string;
}

const MAX_VERDICTS = 10_000;
const ALLOWED: ReadVerdict = { allowed: true };

export class ReadAccess {
  private readonly verdicts = new Map<string, { verdict: ReadVerdict; until: number }>();
  private readonly auth: UpstreamAuth;
  private readonly upstreams: UpstreamAgents;
  private readonly ttlMs: number;
  private readonly usersConfigured: boolean;

  constructor(auth: UpstreamAuth, upstreams: UpstreamAgents, ttlMs: number, usersConfigured: boolean) {
    this.auth = auth;
    this.upstreams = upstreams;
    this.ttlMs = ttlMs;
    this.usersConfigured = usersConfigured;
  }

  async check(check: ReadCheck): Promise<ReadVerdict> {
    return this.allowedWithoutUpstream(check) ? ALLOWED : this.askUpstream(check);
  }

  /** What the policy allows without asking upstream (all a stale serve may rely on). */
  allowedWithoutUpstream(check: Omit<ReadCheck, 'req' | 'path'>): boolean {
    const { access, origin, user, target } = check;
    if (access === 'anonymous') return true;
    // The handler let this user in for the requested repository; the object came from there, or from a
    // repository the user's rules grant as well.
    const sameRepository = !origin || (origin.registry === target.registry.key && origin.repository === target.repository);
    if (user && (sameRepository || this.userMayReadOrigin(user, origin!))) return true;
    return access === 'central' && !this.usersConfigured && sameRepository;
  }

  private userMayReadOrigin(user: ProxyUser, origin: { registry: string; repository: string }): boolean {
    const colon = origin.registry.lastIndexOf(':');
    const host = origin.registry.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
    return mayRead(user, { host, port: Number(origin.registry.slice(colon + 1)) }, origin.repository);
  }

  /** A HEAD of the object with the client's credentials (or the proxy's, for a client without). */
  private async askUpstream(check: ReadCheck): Promise<ReadVerdict> {
    const decision = await this.auth.decide(check.req, check.target);
    const key = `${credentialHash(decision.authorization ?? 'anonymous')}|${check.target.registry.key}|${check.path}`;
    const known = this.verdicts.get(key);
    if (known && known.until > Date.now()) return known.verdict;
    const span = startUpstreamSpan('HEAD', () => `${check.target.upstream.origin}${check.path}`, { 'pullthrough.purpose': 'read-access' });
    const dispatcher = this.upstreams.for(check.target.upstream);
    const accept = check.req.headers.accept;
    let verdict: ReadVerdict;
    try {
      const { response } = await this.auth.request(check.target, decision, (authorization) =>
        dispatcher.request({
          origin: check.target.upstream.origin,
          path: check.path,
          method: 'HEAD',
          headers: { host: check.target.hostHeader, ...(accept ? { accept } : {}), ...(authorization ? { authorization } : {}) },
        }),
      );
      await response.body.dump();
      // A redirect to the storage means the registry would serve it to these credentials.
      if (response.statusCode === 200 || (response.statusCode >= 301 && response.statusCode <= 308)) verdict = ALLOWED;
      else verdict = { allowed: false, status: response.statusCode, headers: refusalHeaders(response.headers) };
      endSpan(span, { 'http.response.status_code': response.statusCode, 'pullthrough.allowed': verdict.allowed });
    } catch (err) {
      endSpan(span, {}, (err as Error).message);
      throw err;
    }
    // Only answers about access are kept: a 5xx or 429 says nothing about these credentials.
    if (verdict.allowed || verdict.status === 401 || verdict.status === 403 || verdict.status === 404) {
      this.verdicts.set(key, { verdict, until: Date.now() + this.ttlMs });
      if (this.verdicts.size > MAX_VERDICTS) this.verdicts.delete(this.verdicts.keys().next().value!);
    }
    return verdict;
  }
}

function refusalHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const kept: Record<string, string | string[]> = {};
  for (const name of ['www-authenticate', 'docker-distribution-api-version']) {
    const value = headers[name];
    if (value !== undefined) kept[name] = value;
  }
  return kept;
}
