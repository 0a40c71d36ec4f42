// Which destinations a CONNECT may tunnel to, proven with real servers on loopback addresses: the
// decision is taken on the resolved address (every numeric spelling, IPv4-mapped IPv6 and names that
// resolve to it), internal ranges need an entry that names them, a registry's port is opened for that
// registry only, nothing tunnels into the proxy itself, and the address connected to is the one checked.
import assert from 'node:assert/strict';
import http from 'node:http';
import net, { type AddressInfo, type LookupFunction } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { parsePolicy } from '../../config/load.ts';
import { CertificateAuthority } from '../../src/ca.ts';
import { createFront, type Front } from '../../src/listener.ts';
import type { AccessEntry, Logger } from '../../src/log.ts';
import type { RegistryHandler } from '../../src/registry/handler.ts';
import { InterceptedSessions } from '../../src/session.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

/** A TCP server on one loopback address that greets every connection with its own name. */
interface Destination {
  host: string;
  port: number;
  connections: number;
  close(): Promise<void>;
}

const destinations: Destination[] = [];

async function listenOn(host: string, port = 0): Promise<Destination> {
  const sockets = new Set<net.Socket>();
  const destination: Destination = {
    host,
    port,
    connections: 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
  const server = net.createServer((socket) => {
    destination.connections++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
    socket.write(`hello from ${host}\n`);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  destination.port = (server.address() as AddressInfo).port;
  destinations.push(destination);
  return destination;
}

/** A port of its own: a destination on 127.0.0.1 holds it, so the same port on other addresses is ours too. */
async function freshPort(): Promise<Destination> {
  return listenOn('127.0.0.1');
}

interface ConnectAnswer {
  status: number;
  /** The refusal's text, or what the destination said through the tunnel. */
  text: string;
}

/** CONNECT `target`; a refusal is read until the proxy closes, a tunnel until the destination greets. */
function connectThrough(proxyPort: number, target: string, afterConnect?: (socket: net.Socket) => void): Promise<ConnectAnswer> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(proxyPort, '127.0.0.1', () => socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\n`));
    let buffered = Buffer.alloc(0);
    let status = 0;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`CONNECT ${target}: no answer within 8 s; got ${JSON.stringify(buffered.toString('latin1'))}`));
    }, 8000);
    const finish = (answer: ConnectAnswer) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(answer);
    };
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      const end = buffered.indexOf('\r\n\r\n');
      if (end < 0) return;
      status = Number(buffered.subarray(0, end).toString('latin1').split(' ')[1]);
      const rest = buffered.subarray(end + 4).toString('latin1');
      if (status === 200 && afterConnect) {
        socket.removeAllListeners('data');
        clearTimeout(timer);
        afterConnect(socket);
        resolve({ status, text: rest });
        return;
      }
      if (status === 200 && rest.includes('\n')) finish({ status, text: rest });
    });
    socket.once('close', () => finish({ status, text: buffered.toString('latin1') }));
  });
}

/** Lets any connection attempt the proxy made arrive before counting. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 150));

let hasIpv6Loopback = true;

after(async () => {
  await Promise.all(destinations.map((d) => d.close()));
});

describe('tunnel policy: internal destinations by any spelling', () => {
  let proxy: TestProxy;
  /** Reached only by a glob ("*:T"): loopback, so refused. */
  let loop: Destination;
  let loop6: Destination | undefined;
  /** 127.0.0.9:D is named in tunnel.allow and in tunnel.deny: deny wins, whatever the spelling. */
  let denied: Destination;
  let explicitIp: Destination;
  let explicitName: Destination;
  let explicitNet: Destination;
  let decoys: Destination[];
  let plain: Destination;
  let other: Destination;

  before(async () => {
    loop = await freshPort();
    loop6 = await listenOn('::1', loop.port).catch(() => {
      hasIpv6Loopback = false;
      return undefined;
    });
    const d = await freshPort();
    denied = await listenOn('127.0.0.9', d.port);
    const e = await freshPort();
    const f = await freshPort();
    const g = await freshPort();
    explicitIp = await listenOn('127.0.0.2', e.port);
    explicitName = await listenOn('127.0.0.3', f.port);
    explicitNet = await listenOn('127.0.0.5', g.port);
    // The same ports on addresses no entry names: "exactly that destination" and no more.
    decoys = [e, f, g, await listenOn('127.0.0.2', f.port), await listenOn('127.0.0.3', e.port), await listenOn('127.0.0.8', g.port)];
    const h = await freshPort();
    plain = await listenOn('127.0.0.6', h.port);
    const r = await freshPort();
    other = await listenOn('127.0.0.7', r.port);
    proxy = await startTestProxy(`
registries:
  reg.test:${r.port}: {}
  plain.test:${h.port}: { http: true }
hosts:
  sneaky.test: 127.0.0.1
  deny-me.test: 127.0.0.9
  named.test: 127.0.0.3
  alias.test: 127.0.0.3
  plain.test: 127.0.0.6
  other.test: 127.0.0.7
tunnel:
  allow: ["*:443", "*:${loop.port}", "*:${d.port}", "127.0.0.9:${d.port}", "127.0.0.2:${e.port}", "named.test:${f.port}", "127.0.0.4/30:${g.port}"]
  deny: ["127.0.0.9:*"]
  timeouts: { connect: 2s }
`);
  });

  after(async () => {
    await proxy?.close();
  });

  const refused = async (target: string, destination: Destination, reason: RegExp) => {
    const before = destination.connections;
    const answer = await connectThrough(proxy.port, target);
    assert.equal(answer.status, 403, `CONNECT ${target}: ${answer.text}`);
    assert.match(answer.text, reason, `CONNECT ${target}: the 403 says why`);
    await settle();
    assert.equal(destination.connections, before, `CONNECT ${target}: the destination saw no connection`);
    const logged = proxy.access.findLast((e) => e.method === 'CONNECT' && e.host === target);
    assert.ok(logged && logged.status === 403 && logged.error, `CONNECT ${target}: the refusal is in the access log with its reason`);
  };

  const opened = async (target: string, destination: Destination) => {
    const before = destination.connections;
    const answer = await connectThrough(proxy.port, target);
    assert.equal(answer.status, 200, `CONNECT ${target}: ${answer.text}`);
    assert.equal(answer.text, `hello from ${destination.host}\n`);
    assert.equal(destination.connections, before + 1);
  };

  test('loopback by every spelling is refused when only a glob ("*:port") allows the port', async () => {
    const p = loop.port;
    const spellings = [
      `127.0.0.1:${p}`,
      `2130706433:${p}`,
      `0x7f.1:${p}`,
      `0x7f000001:${p}`,
      `0177.0.0.1:${p}`,
      `127.1:${p}`,
      `0:${p}`,
      `0.0.0.0:${p}`,
      `[::ffff:127.0.0.1]:${p}`,
      `[::ffff:7f00:1]:${p}`,
      `localhost:${p}`,
      `LocalHost.:${p}`,
      `sneaky.test:${p}`,
    ];
    for (const target of spellings) await refused(target, loop, /loopback|unspecified/);
    if (loop6) {
      for (const target of [`[::1]:${p}`, `[::]:${p}`, `[0:0:0:0:0:0:0:1]:${p}`]) await refused(target, loop6, /loopback|unspecified/);
    }
  });

  test('the refusal names the address and how to open it on purpose', async () => {
    const answer = await connectThrough(proxy.port, `sneaky.test:${loop.port}`);
    assert.equal(answer.status, 403);
    assert.match(answer.text, /127\.0\.0\.1/);
    assert.match(answer.text, /tunnel\.allow/);
  });

  test('tunnel.deny holds against every spelling of the address it names, and beats an explicit allow', async () => {
    const p = denied.port;
    for (const target of [`127.0.0.9:${p}`, `2130706441:${p}`, `0x7f.9:${p}`, `0177.0.0.011:${p}`, `127.9:${p}`, `[::ffff:127.0.0.9]:${p}`, `[::ffff:7f00:9]:${p}`, `deny-me.test:${p}`]) {
      await refused(target, denied, /tunnel\.deny/);
    }
  });

  test('an explicit entry opens exactly that destination: an IP, an exact name, a CIDR', async () => {
    const [e, f, g, ipOnF, nameAddressOnE, outsideNet] = decoys as [Destination, Destination, Destination, Destination, Destination, Destination];
    await opened(`127.0.0.2:${e.port}`, explicitIp);
    await opened(`2130706434:${e.port}`, explicitIp); // the same address, spelt otherwise
    // No entry for that port names that address (the one for F names a host): refused before any lookup.
    await refused(`127.0.0.2:${f.port}`, ipOnF, /not in tunnel\.allow/);
    await refused(`127.0.0.1:${e.port}`, e, /loopback/);

    await opened(`named.test:${f.port}`, explicitName);
    await refused(`127.0.0.3:${f.port}`, explicitName, /not in tunnel\.allow/); // the name was named, not its address
    await refused(`alias.test:${f.port}`, explicitName, /not in tunnel\.allow/);
    await refused(`127.0.0.3:${e.port}`, nameAddressOnE, /loopback/);
    await refused(`127.0.0.1:${f.port}`, f, /not in tunnel\.allow/);

    await opened(`127.0.0.5:${g.port}`, explicitNet);
    await refused(`127.0.0.8:${g.port}`, outsideNet, /loopback/);
    await refused(`127.0.0.1:${g.port}`, g, /loopback/);
  });

  test("a registry's port is opened for that registry's host only", async () => {
    // reg.test:R is intercepted; no other host gets port R because of it.
    await refused(`other.test:${other.port}`, other, /not in tunnel\.allow/);
    await refused(`127.0.0.7:${other.port}`, other, /not in tunnel\.allow/);
    // A plain-HTTP registry is not intercepted: a CONNECT to it is tunnelled (it is named in registries).
    await opened(`plain.test:${plain.port}`, plain);
    await refused(`127.0.0.6:${plain.port}`, plain, /not in tunnel\.allow/);
  });
});

describe('tunnel policy: never into the proxy itself', () => {
  let proxy: TestProxy;

  before(async () => {
    // Loopback allowed as widely as an operator could write it: only the self-tunnel rule is left.
    proxy = await startTestProxy(`
hosts:
  self.test: 127.0.0.1
tunnel:
  allow: ["*:*", "127.0.0.0/8:*", "[::]/0:*", "localhost:*", "self.test:*", "[::1]:*", "0.0.0.0:*", "[::]:*"]
`);
  });

  after(async () => {
    await proxy?.close();
  });

  test('every spelling of the listener is refused, so the admin surface never sees a tunnelled client as local', async () => {
    const p = proxy.port;
    const spellings = [
      `127.0.0.1:${p}`,
      `localhost:${p}`,
      `2130706433:${p}`,
      `0x7f.1:${p}`,
      `0177.0.0.1:${p}`,
      `127.1:${p}`,
      `0:${p}`,
      `0.0.0.0:${p}`,
      `[::ffff:127.0.0.1]:${p}`,
      `[::ffff:7f00:1]:${p}`,
      `self.test:${p}`,
    ];
    if (hasIpv6Loopback) spellings.push(`[::]:${p}`);
    for (const target of spellings) {
      let purgeStatus = 0;
      const answer = await connectThrough(proxy.port, target, (socket) => {
        // What the hole would have allowed: purge as a loopback client.
        const req = http.request({ createConnection: () => socket, method: 'POST', path: '/admin/purge', headers: { 'content-type': 'application/json', host: 'x' } }, (res) => {
          purgeStatus = res.statusCode ?? 0;
          res.resume();
        });
        req.on('error', () => {});
        req.end(JSON.stringify({ registry: 'quay.io' }));
      });
      await settle();
      assert.equal(answer.status, 403, `CONNECT ${target} answered ${answer.status}${purgeStatus ? `, and a purge through it answered ${purgeStatus}` : ''}`);
      assert.match(answer.text, /the proxy itself/, target);
    }
  });

  test('the proxy still tunnels to other loopback ports it was told to', async () => {
    const destination = await listenOn('127.0.0.1');
    const answer = await connectThrough(proxy.port, `self.test:${destination.port}`);
    assert.equal(answer.status, 200, answer.text);
    assert.equal(answer.text, 'hello from 127.0.0.1\n');
  });
});

describe('tunnel policy: the address connected to is the address checked (DNS rebinding)', () => {
  let front: Front;
  let port: number;
  let dir: string;
  let allowed: Destination;
  let rebound: Destination;
  const access: AccessEntry[] = [];
  let lookups = 0;

  before(async () => {
    dir = makeTempDir('rebinding');
    allowed = await listenOn('127.0.0.2');
    rebound = await listenOn('127.0.0.3', allowed.port);
    // The first answer is the allowed address; every later one is another: a second lookup between
    // the check and the connect would land on `rebound`.
    const flipping: LookupFunction = (hostname, options, callback) => {
      lookups++;
      const address = lookups === 1 ? '127.0.0.2' : '127.0.0.3';
      if (options.all) (callback as (e: null, a: Array<{ address: string; family: number }>) => void)(null, [{ address, family: 4 }]);
      else callback(null, address, 4);
    };
    const policy = parsePolicy(`listen: 127.0.0.1:0\ntunnel:\n  allow: ["127.0.0.2:${allowed.port}"]\n`, 'proxy.yaml', {}, dir);
    const { ca } = CertificateAuthority.loadOrCreate(dir);
    const quiet = () => {};
    const log: Logger = { access: (entry) => void access.push(entry), info: quiet, warn: quiet, error: quiet };
    const handler: RegistryHandler = async () => {};
    front = createFront({ policy, log, lookup: flipping, sessions: new InterceptedSessions(ca, handler, log), registryHandler: handler, admin: async () => 404 });
    await new Promise<void>((resolve) => front.server.listen(0, '127.0.0.1', resolve));
    port = (front.server.address() as AddressInfo).port;
  });

  after(async () => {
    await front?.close();
    if (dir) removeTempDir(dir);
  });

  test('one lookup; the tunnel reaches the checked address, never the one a second lookup would give', async () => {
    const answer = await connectThrough(port, `flip.test:${allowed.port}`);
    assert.equal(answer.status, 200, answer.text);
    assert.equal(answer.text, 'hello from 127.0.0.2\n');
    await settle();
    assert.equal(lookups, 1, 'the name was resolved once');
    assert.equal(rebound.connections, 0);
    assert.equal(allowed.connections, 1);
  });

  test('a name that resolves elsewhere the next time is refused on that answer', async () => {
    const answer = await connectThrough(port, `flip.test:${allowed.port}`);
    assert.equal(answer.status, 403, answer.text);
    assert.match(answer.text, /127\.0\.0\.3/);
    await settle();
    assert.equal(rebound.connections, 0);
    assert.ok(access.some((e) => e.status === 403 && /127\.0\.0\.3/.test(e.error ?? '')));
  });
});
