// What to do with a CONNECT: parse its target strictly, then intercept (a registry in the policy),
// tunnel, or deny. A tunnel is decided on the address the name resolves to, never on the text the
// client wrote, and then that very address is connected to (src/tunnel.ts): no second lookup.
//
// The rules, in order, for each address a target resolves to:
//   1. an entry of tunnel.deny that matches the name or the address refuses it;
//   2. a listener of this proxy is never a destination, however it is spelt;
//   3. an internal address (loopback, private, link-local, shared/CGNAT, unspecified, multicast,
//      broadcast, reserved) passes only an entry that names it: an address or block that contains it,
//      or the exact host name the client asked for. A glob (`*:443`, `*.corp.example:*`) never does;
//   4. any other address passes any matching entry of tunnel.allow (default `*:443`).
// A registry the proxy does not intercept (`http: true`) adds an entry for its own host:port.
// A name that resolves to several addresses is tunnelled to those that pass, in the resolver's order.
import { BlockList, isIP, type LookupFunction } from 'node:net';
import os from 'node:os';
import { canonicalAddress, parseTunnelPattern, registryKey, type Policy, type RegistryPolicy, type TunnelPattern } from '../config/policy.ts';
import { errorCode } from './log.ts';
import { resolveAll } from './resolver.ts';

export interface Target {
  /** Lower-case host name, or an IP address in its one spelling (canonicalAddress; no brackets). */
  host: string;
  port: number;
}

export type Decision =
  | { kind: 'intercept'; registry: RegistryPolicy }
  /** Allowed so far by name and port: resolveTunnel decides on the addresses. */
  | { kind: 'tunnel' }
  | { kind: 'deny'; reason: string };

/** Where a tunnel goes: the addresses that passed the policy, or why none did. */
export type TunnelPlan =
  | { kind: 'tunnel'; addresses: string[] }
  | { kind: 'deny'; reason: string }
  /** The name did not resolve (502) or not in time (504). */
  | { kind: 'unreachable'; status: 502 | 504; reason: string };

/** An address and port this proxy listens on (0.0.0.0 / :: meaning every local address). */
export interface Listener {
  address: string;
  port: number;
}

const HOST_NAME = /^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$/;

/** Parses "host:port" or "[v6]:port"; returns a message for anything else. */
export function parseTarget(text: string | undefined): Target | { error: string } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s]+)):(\d{1,5})$/.exec(text ?? '');
  if (!match) return { error: `CONNECT needs host:port, got "${truncate(text ?? '')}"` };
  const port = Number(match[3]);
  if (port < 1 || port > 65535) return { error: `port ${match[3]} is out of range (1-65535)` };
  const host = (match[1] ?? match[2]!).toLowerCase();
  if (match[1] !== undefined ? isIP(host) !== 6 : !(isIP(host) === 4 || HOST_NAME.test(host))) {
    return { error: `"${truncate(host)}" is not a host name or IP address` };
  }
  // "2130706433", "0x7f.1", "::ffff:7f00:1" are 127.0.0.1: every rule below sees that one spelling.
  const address = canonicalAddress(host);
  if (address === null) return { error: `"${truncate(host)}" is not a valid IP address` };
  return { host: address ?? host.replace(/\.$/, ''), port };
}

export function decide(policy: Policy, target: Target): Decision {
  const registry = policy.registries.get(registryKey(target.host, target.port));
  if (registry && !registry.http) return { kind: 'intercept', registry };
  const rules = tunnelRules(policy);
  const denied = rules.deny.find((rule) => portMatches(rule, target.port) && nameMatches(rule, target.host));
  if (denied) return { kind: 'deny', reason: `${hostPort(target)} is denied by tunnel.deny ("${denied.pattern.text}")` };
  // Nothing could allow it whatever it resolves to: refused without a lookup.
  if (!rules.allow.some((rule) => portMatches(rule, target.port) && (rule.pattern.host.kind === 'address' || nameMatches(rule, target.host)))) {
    return { kind: 'deny', reason: `${hostPort(target)} is not in tunnel.allow` };
  }
  return { kind: 'tunnel' };
}

/**
 * Resolves a target `decide` let through (once, with the proxy's resolver and its `hosts:`) and keeps
 * the addresses the policy allows: the tunnel connects to exactly those.
 */
export async function resolveTunnel(policy: Policy, target: Target, lookup: LookupFunction, listeners: readonly Listener[], timeoutMs: number): Promise<TunnelPlan> {
  let addresses: string[];
  if (isIP(target.host)) {
    addresses = [target.host];
  } else {
    let timer: NodeJS.Timeout | undefined;
    try {
      addresses = await Promise.race([
        resolveAll(lookup, target.host),
        new Promise<never>((_, reject) => (timer = setTimeout(() => reject(Object.assign(new Error('timed out'), { code: 'ETIMEOUT' })), timeoutMs))),
      ]);
    } catch (err) {
      const code = errorCode(err);
      return { kind: 'unreachable', status: code === 'ETIMEOUT' ? 504 : 502, reason: `cannot resolve ${target.host}: ${code}` };
    } finally {
      clearTimeout(timer);
    }
  }
  if (addresses.length === 0) return { kind: 'unreachable', status: 502, reason: `cannot resolve ${target.host}: no address` };
  const allowed: string[] = [];
  const refusals: string[] = [];
  for (const address of addresses) {
    const why = refusal(policy, target, address, listeners);
    if (why) refusals.push(why);
    else allowed.push(address);
  }
  return allowed.length > 0 ? { kind: 'tunnel', addresses: allowed } : { kind: 'deny', reason: refusals[0]! };
}

/** Why a tunnel to `target` may not go to `address` (one it resolves to); undefined when it may. */
export function refusal(policy: Policy, target: Target, address: string, listeners: readonly Listener[]): string | undefined {
  const rules = tunnelRules(policy);
  const where = address === target.host ? hostPort(target) : `${hostPort(target)} (${address})`;
  const denied = rules.deny.find((rule) => portMatches(rule, target.port) && (addressMatches(rule, address) || nameMatches(rule, address)));
  if (denied) return `${where} is denied by tunnel.deny ("${denied.pattern.text}")`;
  if (isOwnListener(address, target.port, listeners)) return `${where} is the proxy itself: a tunnel back into the proxy is never allowed`;
  const allow = rules.allow.filter((rule) => portMatches(rule, target.port));
  const range = internalRange(address);
  if (range) {
    if (allow.some((rule) => addressMatches(rule, address) || namesExactly(rule, target.host))) return undefined;
    const port = target.port;
    const suggestion = address === target.host ? `"${hostPort({ host: address, port })}"` : `"${hostPort({ host: address, port })}" or "${hostPort(target)}"`;
    const resolves = address === target.host ? `${hostPort(target)} is` : `${hostPort(target)} resolves to ${address},`;
    return `${resolves} ${range} address: internal destinations are tunnelled only when tunnel.allow names them (${suggestion}), never by a glob such as "*:${port}"`;
  }
  if (allow.some((rule) => addressMatches(rule, address) || nameMatches(rule, target.host))) return undefined;
  return `${where} is not in tunnel.allow`;
}

// ---- Internal ranges ----

/** Destinations refused unless an entry names them; the first range that contains an address names it. */
const INTERNAL_RANGES: ReadonlyArray<{ name: string; blocks: BlockList }> = [
  ['an unspecified', ['0.0.0.0/8', '::/128']],
  ['a loopback', ['127.0.0.0/8', '::1/128']],
  ['a private', ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7']],
  ['a link-local', ['169.254.0.0/16', 'fe80::/10']],
  ['a shared (CGNAT)', ['100.64.0.0/10']],
  ['a broadcast', ['255.255.255.255/32']],
  ['a multicast', ['224.0.0.0/4', 'ff00::/8']],
  // IETF protocol assignments, benchmarking, the old class E; IPv4-compatible and site-local IPv6, NAT64
  // local use, discard-only. (No ::ffff:0:0/96: BlockList matches every IPv4 address against it, and
  // canonicalAddress has turned IPv4-mapped addresses into IPv4 already.)
  ['a reserved', ['192.0.0.0/24', '198.18.0.0/15', '240.0.0.0/4', '::/96', 'fec0::/10', '64:ff9b:1::/48', '100::/64']],
].map(([name, cidrs]) => ({ name: name as string, blocks: blockList(cidrs as string[]) }));

/** "a loopback", "a private"…, or undefined for an address on the internet. */
export function internalRange(address: string): string | undefined {
  const family = address.includes(':') ? 'ipv6' : 'ipv4';
  return INTERNAL_RANGES.find((range) => range.blocks.check(address, family))?.name;
}

function blockList(cidrs: string[]): BlockList {
  const list = new BlockList();
  for (const cidr of cidrs) {
    const [network, prefix] = cidr.split('/') as [string, string];
    list.addSubnet(network, Number(prefix), network.includes(':') ? 'ipv6' : 'ipv4');
  }
  return list;
}

// ---- The proxy's own listeners ----

/**
 * Whether `address`:`port` reaches one of `listeners`: the same address, or a local one when the
 * listener is on 0.0.0.0 / :: (every address of this host). A connect to 0.0.0.0 or :: reaches this host.
 */
export function isOwnListener(address: string, port: number, listeners: readonly Listener[], local: () => ReadonlySet<string> = localAddresses): boolean {
  const unspecified = (a: string) => a === '0.0.0.0' || a === '::';
  for (const listener of listeners) {
    if (listener.port !== port) continue;
    const bound = canonicalAddress(listener.address) ?? listener.address;
    if (bound === address || unspecified(address)) return true;
    if (unspecified(bound) && (internalRange(address) === 'a loopback' || local().has(address))) return true;
  }
  return false;
}

let interfaces: { at: number; addresses: ReadonlySet<string> } | undefined;

/** This host's interface addresses, read at most every few seconds (a pod's can change, rarely). */
function localAddresses(): ReadonlySet<string> {
  if (!interfaces || performance.now() - interfaces.at > 5000) {
    const addresses = Object.values(os.networkInterfaces()).flatMap((list) => (list ?? []).map((i) => canonicalAddress(i.address.replace(/%.*$/, ''))));
    interfaces = { at: performance.now(), addresses: new Set(addresses.filter((a): a is string => typeof a === 'string')) };
  }
  return interfaces.addresses;
}

// ---- Entries ----

interface Rule {
  pattern: TunnelPattern;
  /** For an address or block. */
  block?: BlockList;
  /** For a name glob. */
  regex?: RegExp;
}

const compiled = new WeakMap<Policy, { allow: Rule[]; deny: Rule[] }>();

/** The policy's entries, compiled once per policy: tunnel.allow plus the non-intercepted registries. */
function tunnelRules(policy: Policy): { allow: Rule[]; deny: Rule[] } {
  let rules = compiled.get(policy);
  if (!rules) {
    const registries = [...policy.registries.values()].filter((r) => r.http).map((r) => registryKey(r.host, r.port));
    rules = { allow: compile([...policy.tunnel.allow, ...registries]), deny: compile(policy.tunnel.deny) };
    compiled.set(policy, rules);
  }
  return rules;
}

function compile(patterns: string[]): Rule[] {
  return patterns.flatMap((text): Rule[] => {
    const pattern = parseTunnelPattern(text);
    if ('error' in pattern) return []; // the loader refused it already
    const { host } = pattern;
    if (host.kind === 'address') {
      const block = new BlockList();
      block.addSubnet(host.address, host.prefix, host.family === 6 ? 'ipv6' : 'ipv4');
      return [{ pattern, block }];
    }
    return [{ pattern, regex: new RegExp(`^${host.glob.split('*').map(escapeRegex).join('.*')}$`) }];
  });
}

function portMatches(rule: Rule, port: number): boolean {
  return rule.pattern.port === '*' || rule.pattern.port === port;
}

/** A name glob against a host name, or against an address's text (`10.*` in tunnel.deny). */
function nameMatches(rule: Rule, host: string): boolean {
  return rule.regex?.test(host) ?? false;
}

function addressMatches(rule: Rule, address: string): boolean {
  return rule.block?.check(address, address.includes(':') ? 'ipv6' : 'ipv4') ?? false;
}

/** An entry naming exactly this host (no glob): the operator chose this destination, whatever it resolves to. */
function namesExactly(rule: Rule, host: string): boolean {
  return rule.pattern.host.kind === 'name' && rule.pattern.host.exact && rule.pattern.host.glob === host;
}

function hostPort(target: Target): string {
  return `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
}

function escapeRegex(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function truncate(text: string): string {
  return text.length > 80 ? `${text.slice(0, 80)}…` : text;
}
