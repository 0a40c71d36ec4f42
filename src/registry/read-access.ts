// May this client read a cached object (R6)? Anonymous content is public. Content fetched with the
// central credentials is shared with every client of the proxy, or with proxy users only, when users
// are configured. Content fetched with a client's own credentials is served only to a client that
// proves it may read it: a proxy user whose rules grant the repository it came from, or credentials
// (its own, else the proxy's) that upstream accepts for this very object now — a HEAD, whose verdict
// is kept for cache.readCheckTtl under a hash of the credential, never the credential itself.
// Before that, content labelled private is checked once for what it may really be: public. The proxy
// asks for it anonymously (a HEAD with an anonymous token, never the central credentials); when anyone
// may read it, it is relabelled anonymous for good, and no client needs a check for it again.
// Proof is a 2xx: straight from the registry, or at the end of its redirects when that answer names
// the very object (its digest or size) — a login page an SSO gateway redirects to proves nothing.
import type { IncomingMessage } from 'node:http';
import type { ProxyUser } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import { mayRead } from '../proxy-users.ts';
import { endSpan, startUpstreamSpan } from '../tracing.ts';
import type { UpstreamAgents } from '../upstream/agents.ts';
import { requestFollowingRedirects } from '../upstream/redirects.ts';
import { clientAuthorization, credentialHash, type AuthDecision, type UpstreamAuth, type UpstreamTarget } from './upstream-auth.ts';

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
  /** What the object is, so that an answer at the end of redirects can be matched to it. */
  expected?: ExpectedObject;
  /** Called when the object turns out to be public: the caller relabels it in the cache. */
  onPublic?: () => Promise<void>;
}

export interface ExpectedObject {
  digest?: string;
  size?: number;
}

/** The object on the other end of a check, without a client's request. */
export interface ObjectAt {
  target: UpstreamTarget & { repository: string };
  path: string;
  expected?: ExpectedObject;
  /** The Accept to ask a manifest with. */
  accept?: string;
}

const MAX_VERDICTS = 10_000;
/** Objects already asked about anonymously; a public one is relabelled, so this only spares repeats. */
const MAX_PUBLIC_CHECKS = 10_000;
const ALLOWED: ReadVerdict = { allowed: true };

export class ReadAccess {
  private readonly verdicts = new Map<string, { verdict: ReadVerdict; until: number }>();
  /** registry|path → whether anyone may read it, until when. */
  private readonly publicChecks = new Map<string, { public: boolean; until: number }>();
  private readonly publicInflight = new Map<string, Promise<boolean>>();
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
    if (this.allowedWithoutUpstream(check)) return ALLOWED;
    if (check.access === 'client' && (await this.isPublic({ target: check.target, path: check.path, ...(check.expected ? { expected: check.expected } : {}), ...acceptOf(check.req) }))) {
      await check.onPublic?.();
      return ALLOWED;
    }
    return this.askUpstream(check);
  }

  /**
   * What may be served without asking upstream (all a stale serve may rely on): the policy, or a
   * verdict on the client's own credentials that is still valid.
   */
  allowedWithoutUpstream(check: Omit<ReadCheck, 'req' | 'path' | 'expected'> & { req?: IncomingMessage; path?: string }): boolean {
    const { access, origin, user, target } = check;
    if (access === 'anonymous') return true;
    if (check.req && check.path) {
      const own = clientAuthorization(check.req);
      const known = own ? this.verdicts.get(verdictKey(own, target.registry.key, check.path)) : undefined;
      if (known && known.until > Date.now() && known.verdict.allowed) return true;
    }
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

  /**
   * May anyone read this object? One anonymous HEAD (the proxy's anonymous token, never the central
   * credentials), remembered; concurrent questions share it. False when upstream cannot be asked.
   */
  async isPublic(object: ObjectAt): Promise<boolean> {
    const key = `${object.target.registry.key}|${object.path}`;
    const known = this.publicChecks.get(key);
    if (known && known.until > Date.now()) return known.public;
    let pending = this.publicInflight.get(key);
    if (!pending) {
      pending = this.askAnonymously(object)
        .then((answer) => {
          this.publicChecks.set(key, { public: answer, until: Date.now() + this.ttlMs });
          if (this.publicChecks.size > MAX_PUBLIC_CHECKS) this.publicChecks.delete(this.publicChecks.keys().next().value!);
          return answer;
        })
        .catch(() => false)
        .finally(() => this.publicInflight.delete(key));
      this.publicInflight.set(key, pending);
    }
    return pending;
  }

  private async askAnonymously(object: ObjectAt): Promise<boolean> {
    const decision = await this.auth.anonymousDecision(object.target);
    const verdict = await this.head(object, decision, 'public-check');
    return verdict.allowed;
  }

  /** A HEAD of the object with the client's credentials (or the proxy's, for a client without). */
  private async askUpstream(check: ReadCheck): Promise<ReadVerdict> {
    const decision = await this.auth.decide(check.req, check.target);
    const key = verdictKey(decision.authorization ?? 'anonymous', check.target.registry.key, check.path);
    const known = this.verdicts.get(key);
    if (known && known.until > Date.now()) return known.verdict;
    const verdict = await this.head({ target: check.target, path: check.path, ...(check.expected ? { expected: check.expected } : {}), ...acceptOf(check.req) }, decision, 'read-access');
    // Only answers about access are kept: a 5xx or 429 says nothing about these credentials.
    if (verdict.allowed || verdict.status === 401 || verdict.status === 403 || verdict.status === 404) {
      this.verdicts.set(key, { verdict, until: Date.now() + this.ttlMs });
      if (this.verdicts.size > MAX_VERDICTS) this.verdicts.delete(this.verdicts.keys().next().value!);
    }
    return verdict;
  }

  /** HEAD upstream, following redirects; allowed only on a 2xx that proves it is this object. */
  private async head(object: ObjectAt, decision: AuthDecision, purpose: string): Promise<ReadVerdict> {
    const { target, path, expected } = object;
    const span = startUpstreamSpan('HEAD', () => `${target.upstream.origin}${path}`, { 'pullthrough.purpose': purpose });
    const dispatcher = this.upstreams.for(target.upstream);
    try {
      const { response } = await this.auth.request(target, decision, async (authorization) => {
        const followed = await requestFollowingRedirects(dispatcher, new URL(path, target.upstream.origin), {
          method: 'HEAD',
          headers: { host: target.hostHeader, ...(object.accept ? { accept: object.accept } : {}), ...(authorization ? { authorization } : {}) },
        });
        return Object.assign(followed.response, { hops: followed.hops });
      });
      await response.body.dump();
      const hops = (response as { hops?: number }).hops ?? 0;
      const verdict: ReadVerdict = proves(response, hops, expected) ? ALLOWED : { allowed: false, status: response.statusCode >= 200 && response.statusCode < 400 ? 403 : response.statusCode, headers: refusalHeaders(response.headers) };
      endSpan(span, { 'http.response.status_code': response.statusCode, 'pullthrough.allowed': verdict.allowed, 'pullthrough.hops': hops });
      return verdict;
    } catch (err) {
      endSpan(span, {}, (err as Error).message);
      throw err;
    }
  }
}

/**
 * A 2xx from the registry itself is its word; after redirects the answer must name the object (its
 * digest, or its size), or it may be any page on another host.
 */
function proves(response: { statusCode: number; headers: Record<string, string | string[] | undefined> }, hops: number, expected: ExpectedObject = {}): boolean {
  if (response.statusCode < 200 || response.statusCode > 299) return false;
  if (hops === 0) return true;
  const digest = response.headers['docker-content-digest'];
  if (expected.digest !== undefined && digest === expected.digest) return true;
  const length = response.headers['content-length'];
  return expected.size !== undefined && typeof length === 'string' && Number(length) === expected.size;
}

function verdictKey(authorization: string, registry: string, path: string): string {
  return `${credentialHash(authorization)}|${registry}|${path}`;
}

function acceptOf(req: IncomingMessage): { accept?: string } {
  const accept = req.headers.accept;
  return accept === undefined ? {} : { accept: Array.isArray(accept) ? accept.join(', ') : accept };
}

function refusalHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const kept: Record<string, string | string[]> = {};
  for (const name of ['www-authenticate', 'docker-distribution-api-version']) {
    const value = headers[name];
    if (value !== undefined) kept[name] = value;
  }
  return kept;
}
