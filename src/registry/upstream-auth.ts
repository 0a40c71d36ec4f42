// Which Authorization a read request sends upstream, and what that makes the answer in the cache.
// A client's own Authorization always wins (R5.2). For a client without one the proxy answers the
// registry's challenge itself: Basic with the central credentials, or a Bearer token from the realm
// (central credentials first, anonymous when they are refused or absent). The registry's challenge is
// learned from the 401s its requests meet, and up front with a GET /v2/ when it has central credentials.
// A client's own token is private unless the proxy saw it issued: with the central credentials it put
// in ('central'), or to a token request without any credentials ('anonymous': public is public).
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Dispatcher } from 'undici';
import type { RegistryPolicy } from '../../config/policy.ts';
import type { Access } from '../cache/blob-store.ts';
import type { Logger } from '../log.ts';
import type { UpstreamAgents, UpstreamConfig } from '../upstream/agents.ts';
import { parseChallenges, preferredChallenge, type Challenge } from '../upstream/challenge.ts';
import { basicAuthorization, type TokenExchange, type TokenRequest } from '../upstream/token-exchange.ts';

export interface AuthDecision {
  /** Sent upstream as Authorization; absent: anonymous. */
  authorization?: string;
  /** How what upstream answers is labelled in the cache (R6). */
  access: Access;
  /** The proxy chose the header (the client sent none): after a 401 a fresh one may be tried. */
  byProxy: boolean;
  /** The cached token behind `authorization`, to forget when the registry refuses it. */
  token?: { request: TokenRequest; value: string };
  /** Only anonymous tokens, never the central credentials: a check of whether an object is public. */
  anonymousOnly?: boolean;
  /**
   * The token service failed (unreachable, 5xx, 429), so the request goes without the token it needed:
   * a 401 to it says the service is down, not that the client may not read (stale-if-error applies).
   */
  tokenFailed?: boolean;
}

export interface UpstreamTarget {
  registry: RegistryPolicy;
  upstream: UpstreamConfig;
  /** Host header upstream. */
  hostHeader: string;
  /** The repository the request is about; undefined for /v2/ itself. */
  repository?: string;
}

/** A challenge learned this long ago is asked again (a registry may change its token service). */
const CHALLENGE_TTL_MS = 3_600_000;
const MAX_ISSUED = 10_000;
/**
 * What the proxy answers a token request with while the token service is down: a placeholder the proxy
 * recognises and drops, so the client's next requests count as coming without credentials (cached
 * public content is served, nothing private is). A client forging one only makes itself anonymous.
 */
export const OFFLINE_TOKEN_PREFIX = 'pullthrough-offline.';

export class UpstreamAuth {
  /** Registry key → its challenge (null: the registry asks for none). */
  private readonly challenges = new Map<string, { challenge: Challenge | null; learnedAt: number }>();
  private readonly learning = new Map<string, Promise<Challenge | null | undefined>>();
  /** Hashes of tokens the proxy saw issued to clients → expiry and what they grant (R6). */
  private readonly issued = new Map<string, { until: number; access: 'central' | 'anonymous' }>();
  private readonly warned = new Set<string>();
  private readonly lastWarned = new Map<string, number>();
  /** Registry key → the realm host its own GET /v2/ named (what the central credentials may go to). */
  private readonly upFrontRealms = new Map<string, string>();
  private readonly tokens: TokenExchange;
  private readonly upstreams: UpstreamAgents;
  private readonly log: Logger;

  constructor(tokens: TokenExchange, upstreams: UpstreamAgents, log: Logger) {
    this.tokens = tokens;
    this.upstreams = upstreams;
    this.log = log;
  }

  /** The Authorization for a read on behalf of this client. */
  async decide(req: IncomingMessage, target: UpstreamTarget): Promise<AuthDecision> {
    const own = clientAuthorization(req);
    if (own) return { authorization: own, access: this.issuedAccess(own) ?? 'client', byProxy: false };
    return this.proxyDecision(target);
  }

  /** Anonymous, whatever credentials the registry has: is this object readable by anyone? */
  async anonymousDecision(target: UpstreamTarget): Promise<AuthDecision> {
    const known = this.challenges.get(target.registry.key);
    return this.answer(target, known?.challenge ?? null, undefined, true);
  }

  /** The proxy's own Authorization: central credentials when the registry has them, else anonymous. */
  async proxyDecision(target: UpstreamTarget): Promise<AuthDecision> {
    const challenge = await this.challengeFor(target);
    return this.answer(target, challenge ?? null);
  }

  /**
   * Upstream answered 401 to a header the proxy chose: forget that token, learn the challenge it sent,
   * and return a different header worth one more try (undefined: the client gets the 401).
   */
  async retryAfter401(target: UpstreamTarget, previous: AuthDecision, wwwAuthenticate: string | string[] | undefined): Promise<AuthDecision | undefined> {
    return (await this.afterRefusal(target, previous, wwwAuthenticate)).retry;
  }

  /** retryAfter401, and whether the token service failed on the way (then the 401 is its fault). */
  private async afterRefusal(target: UpstreamTarget, previous: AuthDecision, wwwAuthenticate: string | string[] | undefined): Promise<{ retry?: AuthDecision; tokenFailed?: boolean }> {
    if (!previous.byProxy) return {};
    if (previous.token) this.tokens.forget(previous.token.request, previous.token.value);
    const challenge = preferredChallenge(parseChallenges(wwwAuthenticate));
    if (!challenge) return {};
    this.challenges.set(target.registry.key, { challenge, learnedAt: Date.now() });
    // The registry names the scope it wants (it may ask for more than pull on one repository).
    const scopes = challenge.params.scope?.split(' ').filter(Boolean);
    const next = await this.answer(target, challenge, scopes, previous.anonymousOnly);
    if (next.authorization !== undefined && next.authorization !== previous.authorization) return { retry: next };
    return next.tokenFailed ? { tokenFailed: true } : {};
  }

  /** A request with the decided Authorization, once more with a fresh one after a 401 the proxy caused. */
  async request<R extends Dispatcher.ResponseData & { hops?: number }>(target: UpstreamTarget, decided: AuthDecision, send: (authorization: string | undefined) => Promise<R>): Promise<{ response: R; decision: AuthDecision }> {
    let decision = decided;
    let response = await send(decision.authorization);
    // A 401 from a host a redirect led to (a CDN) says nothing about the registry's challenge: its
    // realm could be anyone's, and must never be sent the central credentials.
    if (response.statusCode === 401 && decision.byProxy && !response.hops) {
      const after = await this.afterRefusal(target, decision, response.headers['www-authenticate']);
      if (after.retry) {
        await response.body.dump();
        decision = after.retry;
        response = await send(after.retry.authorization);
      } else if (after.tokenFailed) {
        decision = { ...decision, tokenFailed: true };
      }
    }
    return { response, decision };
  }

  /**
   * The token endpoint the registry's challenge names (learned up front when it has central
   * credentials): the one place a client's token request may get them injected.
   */
  async tokenEndpoint(target: UpstreamTarget): Promise<{ realm: URL; service?: string } | undefined> {
    const challenge = await this.challengeFor(target);
    if (challenge?.scheme !== 'bearer' || !challenge.params.realm) return undefined;
    try {
      return { realm: new URL(challenge.params.realm), ...(challenge.params.service ? { service: challenge.params.service } : {}) };
    } catch {
      return undefined;
    }
  }

  /**
   * The registry's challenge, asked for now (GET /v2/) when the proxy has not met it yet, whether or
   * not it has central credentials: the mirror front sends clients to this realm through itself.
   */
  async registryChallenge(target: UpstreamTarget): Promise<Challenge | null | undefined> {
    const known = this.challenges.get(target.registry.key);
    if (known && Date.now() - known.learnedAt < CHALLENGE_TTL_MS) return known.challenge;
    let pending = this.learning.get(target.registry.key);
    if (!pending) {
      pending = this.learn(target).finally(() => this.learning.delete(target.registry.key));
      this.learning.set(target.registry.key, pending);
    }
    return (await pending) ?? known?.challenge;
  }

  /**
   * The central Basic login, for a ping of a Basic registry by a client without credentials (so that
   * clients which only log in after a challenge still pull). A Bearer challenge gets nothing: clients
   * fetch their tokens from the realm, where the proxy injects.
   */
  async centralBasic(target: UpstreamTarget): Promise<string | undefined> {
    if (!target.registry.auth) return undefined;
    const challenge = await this.challengeFor(target);
    return challenge?.scheme === 'basic' ? basicAuthorization(target.registry.auth) : undefined;
  }

  /**
   * A token a client got from an intercepted token service: with central credentials the proxy put in
   * ('central'), or for a request that carried no credentials at all ('anonymous': what it reads, anyone
   * may read).
   */
  recordIssued(token: string, expiresAt: number, access: 'central' | 'anonymous'): void {
    this.issued.set(tokenHash(token), { until: expiresAt, access });
    if (this.issued.size > MAX_ISSUED) {
      const now = Date.now();
      for (const [hash, { until }] of this.issued) if (until < now || this.issued.size > MAX_ISSUED) this.issued.delete(hash);
    }
  }

  private issuedAccess(authorization: string): 'central' | 'anonymous' | undefined {
    return this.issuedFor(authorization)?.access;
  }

  /** How a client's Authorization was issued, when the proxy saw it issued (and until when it holds). */
  issuedFor(authorization: string): { access: 'central' | 'anonymous'; until: number } | undefined {
    const match = /^Bearer\s+(\S+)$/i.exec(authorization);
    if (!match) return undefined;
    const known = this.issued.get(tokenHash(match[1]!));
    return known && known.until > Date.now() ? { ...known } : undefined;
  }

  private async answer(target: UpstreamTarget, challenge: Challenge | null, scopes?: string[], anonymousOnly = false): Promise<AuthDecision> {
    const { registry } = target;
    const anonymous: AuthDecision = { access: 'anonymous', byProxy: true, ...(anonymousOnly ? { anonymousOnly } : {}) };
    if (!challenge) return anonymous;
    if (challenge.scheme === 'basic') return registry.auth && !anonymousOnly ? { authorization: basicAuthorization(registry.auth), access: 'central', byProxy: true } : anonymous;
    let realm: URL;
    try {
      realm = new URL(challenge.params.realm ?? '');
      if (realm.protocol !== 'https:' && realm.protocol !== 'http:') return anonymous;
    } catch {
      return anonymous;
    }
    const request: TokenRequest = {
      realm,
      ...(challenge.params.service ? { service: challenge.params.service } : {}),
      scopes: scopes ?? (target.repository ? [`repository:${target.repository}:pull`] : []),
    };
    const dispatcher = this.upstreams.for(target.upstream);
    const realmForLog = `${realm.origin}${realm.pathname}`;
    if (registry.auth && !anonymousOnly && this.mayReceiveCentral(registry, realm)) {
      const central = { ...request, credentials: registry.auth };
      const result = await this.tokens.token(dispatcher, central);
      if (result.ok) return { authorization: `Bearer ${result.token}`, access: 'central', byProxy: true, token: { request: central, value: result.token } };
      if (!serviceFailed(result.status)) {
        this.warnOnce(`refused:${registry.key}:${result.status ?? 'error'}`, `the token service refused the central credentials of ${registry.key}; trying anonymously (check registries.${registry.key}.auth)`, {
          registry: registry.key,
          realm: realmForLog,
          ...(result.status !== undefined ? { status: result.status } : {}),
          error: result.error,
        });
      }
    }
    const result = await this.tokens.token(dispatcher, request);
    if (result.ok) return { ...anonymous, authorization: `Bearer ${result.token}`, token: { request, value: result.token } };
    if (!serviceFailed(result.status)) return anonymous;
    if (this.shouldWarn(`token-failed:${registry.key}`)) this.log.warn('the token service failed; the request goes without a token', { registry: registry.key, realm: realmForLog, ...(result.status !== undefined ? { status: result.status } : {}), error: result.error });
    return { ...anonymous, tokenFailed: true };
  }

  /**
   * The central credentials go to the token service the operator named (auth.realm), or, without one,
   * to the registry's own host or the realm its up-front challenge named; a realm learned otherwise is
   * refused them, with a warning naming the realm.
   */
  private mayReceiveCentral(registry: RegistryPolicy, realm: URL): boolean {
    const registryHost = registry.port === 443 ? registry.host : `${registry.host}:${registry.port}`;
    const allowed = registry.auth?.realm ? [registry.auth.realm] : [registryHost];
    const realmHost = realm.port ? `${realm.hostname}:${realm.port}` : realm.hostname;
    if (allowed.includes(realmHost.toLowerCase()) || (!registry.auth?.realm && this.upFrontRealms.get(registry.key) === realmHost.toLowerCase())) return true;
    this.warnOnce(`foreign-realm:${registry.key}:${realmHost}`, `${registry.key} challenged for the token service ${realmHost}, which is not its configured one: the central credentials are not sent there (set registries.${registry.key}.auth.realm if it is right)`, { registry: registry.key, realm: realmHost });
    return false;
  }

  /**
   * With central credentials the challenge is asked for up front (GET /v2/), so even the first request
   * carries them; without, a registry's first 401 teaches it (retryAfter401), at no extra request.
   */
  private async challengeFor(target: UpstreamTarget): Promise<Challenge | null | undefined> {
    const known = this.challenges.get(target.registry.key);
    if (known && (Date.now() - known.learnedAt < CHALLENGE_TTL_MS || !target.registry.auth)) return known.challenge;
    if (!target.registry.auth) return null;
    let pending = this.learning.get(target.registry.key);
    if (!pending) {
      pending = this.learn(target).finally(() => this.learning.delete(target.registry.key));
      this.learning.set(target.registry.key, pending);
    }
    return pending;
  }

  /** GET /v2/ without credentials: 200 means no auth, 401 names the scheme; anything else teaches nothing. */
  private async learn(target: UpstreamTarget): Promise<Challenge | null | undefined> {
    try {
      const response = await this.upstreams.for(target.upstream).request({ origin: target.upstream.origin, path: '/v2/', method: 'GET', headers: { host: target.hostHeader } });
      await response.body.dump();
      let challenge: Challenge | null | undefined;
      if (response.statusCode === 200) challenge = null;
      else if (response.statusCode === 401) challenge = preferredChallenge(parseChallenges(response.headers['www-authenticate'])) ?? null;
      if (challenge !== undefined) {
        this.challenges.set(target.registry.key, { challenge, learnedAt: Date.now() });
        this.adviseRealm(target.registry, challenge);
        const realm = challenge?.params.realm ? URL.parse(challenge.params.realm) : null;
        if (realm) this.upFrontRealms.set(target.registry.key, (realm.port ? `${realm.hostname}:${realm.port}` : realm.hostname).toLowerCase());
      }
      return challenge;
    } catch {
      return undefined;
    }
  }

  /** Central credentials on a Bearer registry reach clients' token requests only when the realm is intercepted. */
  private adviseRealm(registry: RegistryPolicy, challenge: Challenge | null): void {
    if (!registry.auth || challenge?.scheme !== 'bearer' || !challenge.params.realm) return;
    let realmHost: string;
    try {
      realmHost = new URL(challenge.params.realm).host;
    } catch {
      return;
    }
    const registryHost = registry.port === 443 ? registry.host : `${registry.host}:${registry.port}`;
    if (registry.auth.realm === realmHost || realmHost === registryHost) return;
    this.warnOnce(`realm:${registry.key}`, `${registry.key} sends clients to the token service ${realmHost}; set registries.${registry.key}.auth.realm: ${realmHost} so that clients without credentials get tokens with the central ones`, { registry: registry.key });
  }

  /** At most one warning a minute per kind: an outage must not flood the log. */
  private shouldWarn(key: string): boolean {
    const now = Date.now();
    if ((this.lastWarned.get(key) ?? 0) > now - 60_000) return false;
    this.lastWarned.set(key, now);
    return true;
  }

  private warnOnce(key: string, message: string, fields: Record<string, unknown>): void {
    if (this.warned.has(key)) return;
    this.warned.add(key);
    this.log.warn(message, fields);
  }
}

/**
 * The client's Authorization, unless it carries nothing: containers/image answers a Basic challenge
 * with empty credentials ("Basic Og==") when it has none, which is the same as sending none.
 */
export function clientAuthorization(req: IncomingMessage): string | undefined {
  const value = req.headers.authorization?.trim();
  if (!value) return undefined;
  if (value.slice(value.indexOf(' ') + 1).trimStart().startsWith(OFFLINE_TOKEN_PREFIX)) return undefined;
  const basic = /^Basic\s+([A-Za-z0-9+/=]*)$/i.exec(value);
  if (basic && Buffer.from(basic[1]!, 'base64').toString('utf8') === ':') return undefined;
  if (/^(Basic|Bearer)\s*$/i.test(value)) return undefined;
  return value;
}

/** A credential's stand-in in memory: what verdicts and minted tokens are keyed by, never the credential. */
export function credentialHash(credential: string): string {
  return createHash('sha256').update(credential).digest('base64url');
}

/** A token service that did not answer, or answered 429/5xx: down, not a refusal of the credentials. */
function serviceFailed(status: number | undefined): boolean {
  return status === undefined || status === 429 || status >= 500;
}

function tokenHash(token: string): string {
  return credentialHash(`Bearer ${token}`);
}
