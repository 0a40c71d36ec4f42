// Name resolution for upstream and tunnel connections: the policy's `hosts` overrides first (like
// curl --resolve; tests and split-horizon setups use it), then the system resolver (/etc/hosts and
// every nameserver, through getaddrinfo), IPv4 only when the policy turns IPv6 off.
import dns from 'node:dns';
import { isIP, type LookupFunction } from 'node:net';
import { canonicalAddress } from '../config/policy.ts';

export function createLookup(hosts: ReadonlyMap<string, readonly string[]>, ipv6: boolean): LookupFunction {
  return (hostname, options, callback) => {
    const written = hosts.get(hostname.toLowerCase());
    if (written) {
      // An override in any IPv4 spelling ("2130706433") is the address it means.
      const addresses = written.map((address) => canonicalAddress(address) ?? address).map((address) => ({ address, family: isIP(address) }));
      if (options.all) (callback as (e: null, a: dns.LookupAddress[]) => void)(null, addresses);
      else callback(null, addresses[0]!.address, addresses[0]!.family);
      return;
    }
    dns.lookup(hostname, { ...options, ...(ipv6 ? {} : { family: 4 }), all: options.all === true }, callback as (
      err: NodeJS.ErrnoException | null,
      address: string | dns.LookupAddress[],
      family?: number,
    ) => void);
  };
}

/**
 * Every address `hostname` resolves to through `lookup`, in its order, each in its one spelling
 * (IPv4-mapped IPv6 as IPv4): what a tunnel decides on, and then connects to without looking up again.
 */
export function resolveAll(lookup: LookupFunction, hostname: string): Promise<string[]> {
  return new Promise((resolve, reject) => {
    lookup(hostname, { all: true }, (err: NodeJS.ErrnoException | null, answer: string | dns.LookupAddress[]) => {
      if (err) return reject(err);
      const addresses = (Array.isArray(answer) ? answer.map((a) => a.address) : [answer]).map((a) => canonicalAddress(a)).filter((a): a is string => typeof a === 'string');
      resolve([...new Set(addresses)]);
    });
  });
}
