// Name resolution for upstream and tunnel connections: the policy's `hosts` overrides first (like
// curl --resolve; tests and split-horizon setups use it), then the system resolver (/etc/hosts and
// every nameserver, through getaddrinfo), IPv4 only when the policy turns IPv6 off.
import dns from 'node:dns';
import { isIP, type LookupFunction } from 'node:net';

export function createLookup(hosts: ReadonlyMap<string, string>, ipv6: boolean): LookupFunction {
  return (hostname, options, callback) => {
    const override = hosts.get(hostname.toLowerCase());
    if (override) {
      const family = isIP(override);
      if (options.all) (callback as (e: null, a: dns.LookupAddress[]) => void)(null, [{ address: override, family }]);
      else callback(null, override, family);
      return;
    }
    dns.lookup(hostname, { ...options, ...(ipv6 ? {} : { family: 4 }), all: options.all === true }, callback as (
      err: NodeJS.ErrnoException | null,
      address: string | dns.LookupAddress[],
      family?: number,
    ) => void);
  };
}
