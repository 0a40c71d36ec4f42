// Manifests, tags and push against in-process fake registries over real TLS, for what a real registry
// will not do on demand: answer 429 or 503, lie about a digest, vary the body by Accept, send
// ratelimit headers. Every test counts what reached upstream by method: that count is the point.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { after, before, beforeEach, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { createTestCa, writePem, type TestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';

/** Tags matching short.* are fresh this long on fake.test; everything else for an hour. */
const SHORT_TTL_MS = 150;

interface Manifest {
  mediaType: string;
  body: Buffer;
  digest: string;
}

interface Seen {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/** Takes over a request; true when it answered it. */
type Behaviour = (req: IncomingMessage, res: ServerResponse, seen: Seen) => boolean;

interface FakeRegistry {
  host: string;
  port: number;
  hostPort: string;
  seen: Seen[];
  behave: Behaviour | undefined;
  /** Sent with every answer (ratelimit-* for instance). */
  extraHeaders: Record<string, string>;
  /** Every answer waits this long (so that concurrent clients overlap). */
  delayMs: number;
  /** Points repo:tag at these manifests, in the registry's order of preference by Accept. */
  tag(repository: string, tag: string, ...manifests: Manifest[]): void;
  count(method: string, path?: string): number;
  close(): Promise<void>;
}

function manifest(mediaType: string, content: unknown = { nonce: randomBytes(8).toString('hex') }): Manifest {
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType, ...(content as object) }));
  return { mediaType, body, digest: sha256(body) };
}

function sha256(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/**
 * A registry's manifest endpoints: by tag (the first manifest whose type the client accepts, like
 * distribution choosing between an index and a manifest list) and by digest; a manifest PUT retags.
 */
async function startFakeRegistry(host: string, ca: TestCa): Promise<FakeRegistry> {
  const leaf = ca.issue([host]);
  const tags = new Map<string, Manifest[]>();
  const digests = new Map<string, Manifest>();
  const fake: FakeRegistry = {
    host,
    port: 0,
    hostPort: '',
    seen: [],
    behave: undefined,
    extraHeaders: {},
    delayMs: 0,
    tag(repository, tag, ...manifests) {
      tags.set(`${repository}:${tag}`, manifests);
      for (const m of manifests) digests.set(`${repository}@${m.digest}`, m);
    },
    count: (method, path) => fake.seen.filter((s) => s.method === method && (path === undefined || s.path === path)).length,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  const server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const seen: Seen = { method: req.method!, path: req.url!.split('?')[0]!, headers: req.headers, body: Buffer.concat(chunks) };
      fake.seen.push(seen);
      for (const [name, value] of Object.entries(fake.extraHeaders)) res.setHeader(name, value);
      const answer = () => {
        if (fake.behave?.(req, res, seen)) return;
        serve(req, res, seen);
      };
      if (fake.delayMs > 0) setTimeout(answer, fake.delayMs);
      else answer();
    });
  });

  const serve = (req: IncomingMessage, res: ServerResponse, seen: Seen) => {
    if (seen.path === '/v2/') return void res.writeHead(200, { 'Content-Type': 'application/json' }).end('{}');
    const match = /^\/v2\/(.+)\/manifests\/([^/]+)$/.exec(seen.path);
    if (!match) return void res.writeHead(404).end();
    const [, repository, reference] = match as unknown as [string, string, string];
    if (req.method === 'PUT') {
      const pushed: Manifest = { mediaType: String(req.headers['content-type']), body: seen.body, digest: sha256(seen.body) };
      fake.tag(repository, reference, pushed);
      return void res.writeHead(201, { 'Docker-Content-Digest': pushed.digest, Location: `/v2/${repository}/manifests/${pushed.digest}` }).end();
    }
    const accepted = String(req.headers.accept ?? '').split(',').map((part) => part.split(';')[0]!.trim());
    const found = reference.includes(':')
      ? digests.get(`${repository}@${reference}`)
      : (tags.get(`${repository}:${reference}`) ?? []).find((m) => accepted.includes(m.mediaType));
    if (!found) {
      const body = JSON.stringify({ errors: [{ code: 'MANIFEST_UNKNOWN', message: 'manifest unknown' }] });
      return void res.writeHead(404, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) }).end(req.method === 'HEAD' ? undefined : body);
    }
    res.writeHead(200, { 'Content-Type': found.mediaType, 'Content-Length': found.body.length, 'Docker-Content-Digest': found.digest });
    res.end(req.method === 'HEAD' ? undefined : found.body);
  };

  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  fake.port = (server.address() as AddressInfo).port;
  fake.hostPort = `${host}:${fake.port}`;
  return fake;
}

async function waitUntil(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > until) throw new Error('timed out waiting for a condition');
    await sleep(10);
  }
}

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

describe('the manifest cache against fake registries', () => {
  let ca: TestCa;
  let work: string;
  /** Default policy: push denied, short.* tags fresh for SHORT_TTL_MS, stale served for an hour. */
  let fake: FakeRegistry;
  /** maxStale of 400ms: past it, upstream's error is what the client gets. */
  let strict: FakeRegistry;
  /** Closed in a test: connection refused. */
  let gone: FakeRegistry;
  /** push: bypass. */
  let pushable: FakeRegistry;
  /** Where regional.test's redirects lead (registry.k8s.io → a regional Artifact Registry host). */
  let regional: FakeRegistry;
  let proxy: TestProxy;

  before(async () => {
    ca = createTestCa('manifest fakes CA');
    work = makeTempDir('manifest-fakes');
    [fake, strict, gone, pushable, regional] = await Promise.all([
      startFakeRegistry('fake.test', ca),
      startFakeRegistry('strict.test', ca),
      startFakeRegistry('gone.test', ca),
      startFakeRegistry('pushable.test', ca),
      startFakeRegistry('regional.test', ca),
    ]);
    const caFile = writePem(work, 'upstream-ca.pem', ca.certPem);
    proxy = await startTestProxy(`
registries:
  ${fake.hostPort}:
    tls: { ca: ${caFile} }
    manifests: { tiers: [{ match: "short.*", ttl: ${SHORT_TTL_MS}ms }], defaultTtl: 1h, maxStale: 1h }
  ${strict.hostPort}:
    tls: { ca: ${caFile} }
    manifests: { defaultTtl: 100ms, maxStale: 400ms }
  ${gone.hostPort}:
    tls: { ca: ${caFile} }
    manifests: { defaultTtl: 100ms, maxStale: 1h }
  ${pushable.hostPort}:
    tls: { ca: ${caFile} }
    push: bypass
hosts:
  fake.test: 127.0.0.1
  strict.test: 127.0.0.1
  gone.test: 127.0.0.1
  pushable.test: 127.0.0.1
  regional.test: 127.0.0.1
`);
  });

  beforeEach(() => {
    for (const f of [fake, strict, gone, pushable, regional]) {
      f.seen = [];
      f.behave = undefined;
      f.extraHeaders = {};
      f.delayMs = 0;
    }
  });

  after(async () => {
    await proxy?.close();
    // Closing one twice (gone) is harmless: close() resolves either way.
    await Promise.all([fake, strict, gone, pushable, regional].map((f) => f?.close()));
    if (work) removeTempDir(work);
  });

  const request = async (to: FakeRegistry, method: string, path: string, headers: Record<string, string> = {}, body?: Buffer): Promise<Answer> =>
    httpOverSocket(await tlsThroughProxy(proxy.port, to.host, to.port, proxy.caPem), method, path, to.hostPort, headers, body);

  const get = (to: FakeRegistry, path: string, accept = OCI_MANIFEST) => request(to, 'GET', path, { Accept: accept });
  const errorCode = (answer: Answer) => (JSON.parse(answer.body.toString()) as { errors: Array<{ code: string }> }).errors[0]!.code;
  const lastLine = () => proxy.access.at(-1)!;

  test('429 past the TTL: STALE with a Warning; uncached: the 429 itself, body and headers, at once', async () => {
    const cached = manifest(OCI_MANIFEST);
    fake.tag('lib/limited', 'short-1', cached);
    assert.equal((await get(fake, '/v2/lib/limited/manifests/short-1')).status, 200);
    await sleep(SHORT_TTL_MS + 50);

    const tooMany = JSON.stringify({ errors: [{ code: 'TOOMANYREQUESTS', message: 'You have reached your pull rate limit.' }] });
    fake.behave = (_req, res) => {
      res.writeHead(429, { 'Content-Type': 'application/json', 'Retry-After': '3600', 'X-Upstream-Said': 'slow down', 'Content-Length': Buffer.byteLength(tooMany) });
      res.end(tooMany);
      return true;
    };
    fake.seen = [];
    const stale = await get(fake, '/v2/lib/limited/manifests/short-1');
    assert.equal(stale.status, 200);
    assert.deepEqual(stale.body, cached.body);
    assert.equal(stale.headers['docker-content-digest'], cached.digest);
    assert.equal(stale.headers['x-cache'], 'STALE');
    assert.match(stale.headers.warning ?? '', /^110 /);
    assert.equal(lastLine().cache, 'STALE');
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0], 'revalidated with one HEAD, which got the 429');

    fake.seen = [];
    const started = performance.now();
    const uncached = await get(fake, '/v2/lib/limited/manifests/never-pulled');
    assert.ok(performance.now() - started < 1000);
    assert.equal(uncached.status, 429);
    assert.equal(uncached.body.toString(), tooMany, "upstream's own body");
    assert.equal(uncached.headers['retry-after'], '3600');
    assert.equal(uncached.headers['x-upstream-said'], 'slow down');
    assert.equal(uncached.headers['content-type'], 'application/json');
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [0, 1]);
  });

  test('503 and a refused connection past the TTL: STALE; past maxStale: the error instead', async () => {
    const cached = manifest(OCI_MANIFEST);
    fake.tag('lib/flaky', 'short-2', cached);
    assert.equal((await get(fake, '/v2/lib/flaky/manifests/short-2')).status, 200);
    await sleep(SHORT_TTL_MS + 50);
    fake.behave = (_req, res) => {
      res.writeHead(503, { 'Content-Type': 'text/plain' }).end('maintenance');
      return true;
    };
    fake.seen = [];
    const stale = await get(fake, '/v2/lib/flaky/manifests/short-2');
    assert.deepEqual([stale.status, stale.headers['x-cache'], stale.body.toString()], [200, 'STALE', cached.body.toString()]);
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0]);

    const onGone = manifest(OCI_MANIFEST);
    gone.tag('lib/app', 'v1', onGone);
    assert.equal((await get(gone, '/v2/lib/app/manifests/v1')).status, 200);
    assert.equal(gone.count('GET'), 1);
    await gone.close();
    await sleep(150);
    const refused = await get(gone, '/v2/lib/app/manifests/v1');
    assert.deepEqual([refused.status, refused.headers['x-cache'], refused.body.toString()], [200, 'STALE', onGone.body.toString()]);
    assert.match(lastLine().error ?? '', /ECONNREFUSED/);
    // Not cached, nothing to fall back on: the connection error, at once.
    const uncached = await get(gone, '/v2/lib/app/manifests/v2');
    assert.equal(uncached.status, 502);
    assert.equal(errorCode(uncached), 'UNAVAILABLE');

    // strict.test: fresh 100ms, then stale-servable for 400ms more.
    const strictly = manifest(OCI_MANIFEST);
    strict.tag('lib/app', 'v1', strictly);
    assert.equal((await get(strict, '/v2/lib/app/manifests/v1')).status, 200);
    strict.behave = (_req, res) => {
      res.writeHead(429, { 'Retry-After': '60', 'Content-Type': 'application/json' }).end();
      return true;
    };
    await sleep(150);
    assert.equal((await get(strict, '/v2/lib/app/manifests/v1')).headers['x-cache'], 'STALE', 'within maxStale');
    await sleep(500);
    strict.seen = [];
    const expired = await get(strict, '/v2/lib/app/manifests/v1');
    assert.equal(expired.status, 429);
    assert.equal(expired.headers['retry-after'], '60');
    assert.notEqual(expired.headers['x-cache'], 'STALE');
    assert.ok(!expired.body.includes(strictly.body), 'not the stale manifest');
    // The 429 came to a HEAD (no body): the client still gets a registry-style reason.
    assert.equal(errorCode(expired), 'TOOMANYREQUESTS');
    assert.deepEqual([strict.count('HEAD'), strict.count('GET')], [1, 0]);
  });

  test("content fetched with a client's credentials is never served stale", async () => {
    const secret = manifest(OCI_MANIFEST);
    fake.tag('team/secret', 'short-3', secret);
    // Private: upstream answers only a client with credentials.
    fake.behave = (req, res) => {
      if (req.headers.authorization) return false;
      res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="fake"' }).end();
      return true;
    };
    const auth = { Accept: OCI_MANIFEST, Authorization: 'Bearer alice' };
    assert.equal((await request(fake, 'GET', '/v2/team/secret/manifests/short-3', auth)).status, 200);
    await sleep(SHORT_TTL_MS + 50);
    // The proxy asked once whether it is public (an anonymous HEAD): it is not.
    assert.deepEqual(fake.seen.map((s) => [s.method, s.headers.authorization]), [['GET', 'Bearer alice'], ['HEAD', undefined]]);
    fake.behave = (_req, res) => {
      res.writeHead(503).end();
      return true;
    };
    fake.seen = [];
    // Upstream cannot say whether this client may read it, so it does not get it.
    const anonymous = await get(fake, '/v2/team/secret/manifests/short-3');
    assert.equal(anonymous.status, 503);
    assert.ok(!anonymous.body.includes(secret.body));
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0]);
  });

  test('bodies vary by Accept: each set gets its own, both are cached, order and parameters do not matter', async () => {
    const index = manifest(OCI_INDEX, { manifests: [] });
    const list = manifest(DOCKER_LIST, { manifests: [] });
    fake.tag('lib/multi', 'latest', index, list);
    const ociAccept = `${OCI_INDEX}, ${OCI_MANIFEST};q=0.9`;
    const dockerAccept = `${DOCKER_LIST}, ${DOCKER_MANIFEST};q=0.5`;
    for (const round of [1, 2]) {
      fake.seen = [];
      const oci = await get(fake, '/v2/lib/multi/manifests/latest', ociAccept);
      const docker = await get(fake, '/v2/lib/multi/manifests/latest', dockerAccept);
      assert.deepEqual([oci.body, oci.headers['content-type'], oci.headers['docker-content-digest']], [index.body, OCI_INDEX, index.digest], `round ${round}`);
      assert.deepEqual([docker.body, docker.headers['content-type'], docker.headers['docker-content-digest']], [list.body, DOCKER_LIST, list.digest], `round ${round}`);
      assert.deepEqual([fake.count('GET'), fake.count('HEAD')], round === 1 ? [2, 0] : [0, 0], `round ${round}`);
    }
    fake.seen = [];
    const reordered = await get(fake, '/v2/lib/multi/manifests/latest', `${OCI_MANIFEST},${OCI_INDEX}`);
    assert.deepEqual([reordered.body, reordered.headers['x-cache']], [index.body, 'HIT']);
    // The client refuses OCI types with q=0: that is the Docker set, not the OCI one.
    const refusing = await get(fake, '/v2/lib/multi/manifests/latest', `${DOCKER_MANIFEST};q=0.5, ${OCI_INDEX};q=0, ${DOCKER_LIST}`);
    assert.deepEqual([refusing.body, refusing.headers['x-cache']], [list.body, 'HIT']);
    // Each body is stored under its digest too.
    for (const m of [index, list]) {
      const byDigest = await get(fake, `/v2/lib/multi/manifests/${m.digest}`, m.mediaType);
      assert.deepEqual([byDigest.body, byDigest.headers['content-type'], byDigest.headers['x-cache']], [m.body, m.mediaType, 'HIT']);
    }
    assert.equal(fake.seen.length, 0, JSON.stringify(fake.seen.map((s) => `${s.method} ${s.path}`)));
  });

  /** What docker, containerd and podman/skopeo send: three different sets that all admit an OCI manifest. */
  const CLIENT_ACCEPTS = {
    docker: `${DOCKER_MANIFEST}, ${DOCKER_LIST}, ${OCI_MANIFEST}, ${OCI_INDEX}`,
    containerd: `${DOCKER_MANIFEST}, ${DOCKER_LIST}, ${OCI_MANIFEST}, ${OCI_INDEX}, */*`,
    podman: `${OCI_MANIFEST}, ${DOCKER_MANIFEST}, application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, ${DOCKER_LIST}, ${OCI_INDEX}`,
  };

  test('a rollout: 12 concurrent GETs and HEADs of a new tag from three kinds of client are one upstream GET', async () => {
    const image = manifest(OCI_MANIFEST);
    fake.tag('lib/rollout', 'v1', image);
    fake.delayMs = 150;
    const kinds = Object.values(CLIENT_ACCEPTS);
    const answers = await Promise.all(
      Array.from({ length: 12 }, (_, i) => request(fake, i % 4 === 3 ? 'HEAD' : 'GET', '/v2/lib/rollout/manifests/v1', { Accept: kinds[i % 3]! })),
    );
    assert.deepEqual([fake.count('GET'), fake.count('HEAD')], [1, 0], 'one upstream request for the tag');
    for (const [i, answer] of answers.entries()) {
      assert.deepEqual([answer.status, answer.headers['docker-content-digest']], [200, image.digest], `client ${i}`);
      assert.deepEqual(answer.body, i % 4 === 3 ? Buffer.alloc(0) : image.body, `client ${i}`);
    }
    const statuses = answers.map((a) => a.headers['x-cache']).sort();
    assert.deepEqual([statuses.filter((c) => c === 'MISS').length, statuses.filter((c) => c === 'JOINED').length], [1, 11]);
    // One entry for every kind of client: each one's next pull is a hit.
    fake.delayMs = 0;
    fake.seen = [];
    for (const accept of kinds) assert.equal((await request(fake, 'GET', '/v2/lib/rollout/manifests/v1', { Accept: accept })).headers['x-cache'], 'HIT');
    assert.equal(fake.seen.length, 0);
  });

  test("concurrent clients share upstream's error too: 8 GETs of an uncached tag answered 429 are one upstream GET", async () => {
    fake.tag('lib/limited-new', 'v1', manifest(OCI_MANIFEST));
    fake.delayMs = 100;
    fake.behave = (_req, res) => {
      const body = JSON.stringify({ errors: [{ code: 'TOOMANYREQUESTS', message: 'slow down' }] });
      res.writeHead(429, { 'Content-Type': 'application/json', 'Retry-After': '30' }).end(body);
      return true;
    };
    const answers = await Promise.all(Array.from({ length: 8 }, () => get(fake, '/v2/lib/limited-new/manifests/v1')));
    assert.equal(fake.count('GET'), 1);
    for (const answer of answers) assert.deepEqual([answer.status, errorCode(answer), answer.headers['retry-after']], [429, 'TOOMANYREQUESTS', '30']);
  });

  test('a stale tag asked for by 8 clients at once is revalidated with one HEAD', async () => {
    const image = manifest(OCI_MANIFEST);
    fake.tag('lib/reval', 'short-r', image);
    await get(fake, '/v2/lib/reval/manifests/short-r');
    await sleep(SHORT_TTL_MS + 50);
    fake.seen = [];
    fake.delayMs = 100;
    const answers = await Promise.all(Array.from({ length: 8 }, () => get(fake, '/v2/lib/reval/manifests/short-r')));
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0]);
    assert.ok(answers.every((a) => a.status === 200 && a.body.equals(image.body)));
    assert.deepEqual(answers.map((a) => a.headers['x-cache']).sort(), ['JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'REVALIDATED']);
  });

  test("a refusal is not shared: a client with rights joining a flight whose credentials were refused gets the manifest", async () => {
    const secret = manifest(OCI_MANIFEST);
    fake.tag('team/shared-refusal', 'v1', secret);
    fake.delayMs = 100;
    fake.behave = (req, res) => {
      if (req.headers.authorization === 'Bearer good') return false;
      res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="fake"', 'Content-Type': 'application/json' }).end('{"errors":[{"code":"UNAUTHORIZED"}]}');
      return true;
    };
    const bad = request(fake, 'GET', '/v2/team/shared-refusal/manifests/v1', { Accept: OCI_MANIFEST, Authorization: 'Bearer bad' });
    await sleep(20);
    const good = request(fake, 'GET', '/v2/team/shared-refusal/manifests/v1', { Accept: OCI_MANIFEST, Authorization: 'Bearer good' });
    const [refused, served] = await Promise.all([bad, good]);
    assert.equal(refused.status, 401);
    assert.deepEqual([served.status, served.body], [200, secret.body]);
  });

  test('a client whose Accept does not admit the cached type goes upstream with its own, and both variants are kept', async () => {
    const oci = manifest(OCI_MANIFEST);
    const docker = manifest(DOCKER_MANIFEST);
    fake.tag('lib/variants', 'v1', oci, docker);
    assert.equal((await get(fake, '/v2/lib/variants/manifests/v1', CLIENT_ACCEPTS.podman)).headers['content-type'], OCI_MANIFEST);
    const old = await get(fake, '/v2/lib/variants/manifests/v1', DOCKER_MANIFEST);
    assert.deepEqual([old.headers['content-type'], old.headers['docker-content-digest'], old.headers['x-cache']], [DOCKER_MANIFEST, docker.digest, 'MISS']);
    assert.equal(fake.seen.at(-1)!.headers.accept, DOCKER_MANIFEST, 'upstream got that client\'s own Accept');
    fake.seen = [];
    assert.deepEqual((await get(fake, '/v2/lib/variants/manifests/v1', DOCKER_MANIFEST)).body, docker.body);
    assert.deepEqual((await get(fake, '/v2/lib/variants/manifests/v1', CLIENT_ACCEPTS.podman)).body, oci.body);
    assert.equal(fake.seen.length, 0);
  });

  test('manifest redirects (registry.k8s.io → a regional host, then a relative hop) are followed and cached under the name asked for', async () => {
    const image = manifest(OCI_MANIFEST);
    regional.tag('k8s/pause', '3.10', image);
    fake.behave = (req, res, seen) => {
      if (!seen.path.startsWith('/v2/k8s/pause/manifests/')) return false;
      res.writeHead(307, { Location: `https://${regional.hostPort}/redirected${seen.path}` }).end();
      return true;
    };
    regional.behave = (req, res, seen) => {
      if (!seen.path.startsWith('/redirected/')) return false;
      res.writeHead(302, { Location: seen.path.slice('/redirected'.length) }).end();
      return true;
    };
    const first = await request(fake, 'GET', '/v2/k8s/pause/manifests/3.10', { Accept: OCI_MANIFEST, Authorization: 'Bearer for-fake-only' });
    assert.deepEqual([first.status, first.body, first.headers['x-cache'], first.headers['docker-content-digest']], [200, image.body, 'MISS', image.digest]);
    // Fetched with a token the proxy did not see issued: it asks once, anonymously, whether it is public.
    await waitUntil(() => regional.count('HEAD') === 2);
    assert.deepEqual(regional.seen.map((s) => [s.method, s.path, s.headers.authorization]), [
      ['GET', '/redirected/v2/k8s/pause/manifests/3.10', undefined],
      ['GET', '/v2/k8s/pause/manifests/3.10', undefined],
      ['HEAD', '/redirected/v2/k8s/pause/manifests/3.10', undefined],
      ['HEAD', '/v2/k8s/pause/manifests/3.10', undefined],
    ], 'the regional host never sees the Authorization');
    assert.deepEqual(fake.seen.map((s) => [s.method, s.headers.authorization]), [['GET', 'Bearer for-fake-only'], ['HEAD', undefined]]);
    fake.seen = [];
    regional.seen = [];
    const second = await request(fake, 'GET', '/v2/k8s/pause/manifests/3.10', { Accept: OCI_MANIFEST, Authorization: 'Bearer for-fake-only' });
    const head = await request(fake, 'HEAD', '/v2/k8s/pause/manifests/3.10', { Accept: OCI_MANIFEST });
    const byDigest = await get(fake, `/v2/k8s/pause/manifests/${image.digest}`);
    assert.deepEqual([second.headers['x-cache'], head.headers['x-cache'], byDigest.headers['x-cache']], ['HIT', 'HIT', 'HIT']);
    assert.deepEqual([fake.seen.length, regional.seen.length], [0, 0]);
  });

  test('the tag moved (HEAD says so) but the GET answers 429 or 503: the cached copy, STALE', async () => {
    const before = manifest(OCI_MANIFEST);
    fake.tag('lib/moved', 'short-m', before);
    await get(fake, '/v2/lib/moved/manifests/short-m');
    fake.tag('lib/moved', 'short-m', manifest(OCI_MANIFEST));
    for (const status of [429, 503]) {
      await sleep(SHORT_TTL_MS + 50);
      fake.seen = [];
      fake.behave = (req, res) => {
        if (req.method !== 'GET') return false;
        res.writeHead(status, { 'Content-Type': 'application/json' }).end('{"errors":[{"code":"TOOMANYREQUESTS"}]}');
        return true;
      };
      const answer = await get(fake, '/v2/lib/moved/manifests/short-m');
      assert.deepEqual([answer.status, answer.body, answer.headers['x-cache'], answer.headers.warning], [200, before.body, 'STALE', '110 pullthrough "Response is Stale"'], `GET answered ${status}`);
      assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 1]);
    }
  });

  test('the token service fails while the token expires: STALE, not the 401', async () => {
    const image = manifest(OCI_MANIFEST);
    fake.tag('lib/tokened', 'short-t', image);
    let valid = 'Bearer first';
    let tokenStatus = 200;
    fake.behave = (req, res) => {
      if (req.headers.authorization === valid) return false;
      res.writeHead(401, { 'WWW-Authenticate': `Bearer realm="https://${regional.hostPort}/token",service="fake.test"` }).end();
      return true;
    };
    regional.behave = (_req, res, seen) => {
      if (seen.path !== '/token') return false;
      res.writeHead(tokenStatus, { 'Content-Type': 'application/json' }).end(tokenStatus === 200 ? '{"token":"first","expires_in":300}' : '');
      return true;
    };
    const first = await get(fake, '/v2/lib/tokened/manifests/short-t');
    assert.deepEqual([first.status, first.headers['x-cache']], [200, 'MISS']);
    await sleep(SHORT_TTL_MS + 50);
    // The registry stops taking the token, and its token service is down.
    valid = 'Bearer second';
    tokenStatus = 503;
    fake.seen = [];
    const stale = await get(fake, '/v2/lib/tokened/manifests/short-t');
    assert.deepEqual([stale.status, stale.body, stale.headers['x-cache']], [200, image.body, 'STALE']);
    assert.deepEqual(fake.seen.map((s) => [s.method, s.headers.authorization]), [['HEAD', 'Bearer first']], 'the cached token; no token to try after the service failed');
    assert.match(proxy.lines.join('\n'), /the token service failed/);
  });

  test('a manifest PUT through push: bypass makes the next pull of that tag ask upstream, within the TTL', async () => {
    const before = manifest(OCI_MANIFEST);
    pushable.tag('lib/app', 'v1', before);
    assert.equal((await get(pushable, '/v2/lib/app/manifests/v1')).headers['docker-content-digest'], before.digest);
    assert.equal((await get(pushable, '/v2/lib/app/manifests/v1')).headers['x-cache'], 'HIT', 'fresh for an hour');

    const pushed = manifest(OCI_MANIFEST);
    pushable.seen = [];
    const put = await request(pushable, 'PUT', '/v2/lib/app/manifests/v1', { 'Content-Type': OCI_MANIFEST }, pushed.body);
    assert.equal(put.status, 201);
    assert.equal(put.headers['docker-content-digest'], pushed.digest);
    assert.deepEqual(pushable.seen.map((s) => [s.method, s.body]), [['PUT', pushed.body]], 'the PUT went up as sent');

    pushable.seen = [];
    const after = await get(pushable, '/v2/lib/app/manifests/v1');
    assert.deepEqual([after.headers['docker-content-digest'], after.headers['x-cache']], [pushed.digest, 'MISS']);
    assert.deepEqual([pushable.count('GET'), pushable.count('HEAD')], [1, 0]);
    assert.equal((await get(pushable, '/v2/lib/app/manifests/v1')).headers['x-cache'], 'HIT');
    assert.equal(pushable.seen.length, 1);
  });

  test('a tag moved back to a manifest already cached costs only the HEAD', async () => {
    const one = manifest(OCI_MANIFEST);
    const two = manifest(OCI_MANIFEST);
    fake.tag('lib/flip', 'short-flip', one);
    await get(fake, '/v2/lib/flip/manifests/short-flip');
    fake.tag('lib/flip', 'short-flip', two);
    await sleep(SHORT_TTL_MS + 50);
    fake.seen = [];
    const moved = await get(fake, '/v2/lib/flip/manifests/short-flip');
    assert.deepEqual([moved.headers['docker-content-digest'], moved.headers['x-cache']], [two.digest, 'MISS']);
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 1]);

    fake.tag('lib/flip', 'short-flip', one);
    await sleep(SHORT_TTL_MS + 50);
    fake.seen = [];
    const back = await get(fake, '/v2/lib/flip/manifests/short-flip');
    assert.deepEqual([back.body, back.headers['x-cache']], [one.body, 'REVALIDATED']);
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0]);
  });

  test('push is denied by default for POST, PUT, PATCH and DELETE: 405 UNSUPPORTED, nothing upstream', async () => {
    const digest = sha256(Buffer.from('x'));
    const writes: Array<[string, string, Buffer | undefined]> = [
      ['POST', '/v2/lib/app/blobs/uploads/', undefined],
      ['PUT', '/v2/lib/app/manifests/v1', manifest(OCI_MANIFEST).body],
      ['PATCH', '/v2/lib/app/blobs/uploads/3f2a9c?_state=abc', randomBytes(64 * 1024)],
      ['DELETE', `/v2/lib/app/manifests/${digest}`, undefined],
      ['DELETE', `/v2/lib/app/blobs/${digest}`, undefined],
    ];
    for (const [method, path, body] of writes) {
      const answer = await request(fake, method, path, body ? { 'Content-Type': 'application/octet-stream' } : {}, body);
      assert.equal(answer.status, 405, `${method} ${path}`);
      assert.match(answer.headers['content-type'] ?? '', /^application\/json/);
      const parsed = JSON.parse(answer.body.toString()) as { errors: Array<{ code: string; message: string }> };
      assert.equal(parsed.errors[0]!.code, 'UNSUPPORTED');
      assert.match(parsed.errors[0]!.message, /push: bypass or ALLOW_PUSH=true/);
      assert.equal(lastLine().status, 405);
    }
    assert.equal(fake.seen.length, 0, JSON.stringify(fake.seen.map((s) => `${s.method} ${s.path}`)));

    // Not a push: a token request on an intercepted realm host (containerd logs in with a POST).
    fake.behave = (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' }).end('{"token":"t"}');
      return true;
    };
    const token = await request(fake, 'POST', '/token', { 'Content-Type': 'application/x-www-form-urlencoded' }, Buffer.from('grant_type=password'));
    assert.equal(token.status, 200);
    assert.deepEqual(fake.seen.map((s) => `${s.method} ${s.path}`), ['POST /token']);
  });

  test('ratelimit-limit and ratelimit-remaining are recorded, from GETs and from revalidating HEADs', async () => {
    fake.tag('lib/counted', 'short-rl', manifest(OCI_MANIFEST));
    fake.extraHeaders = { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '76;w=21600' };
    await get(fake, '/v2/lib/counted/manifests/short-rl');
    assert.deepEqual([fake.count('GET'), fake.count('HEAD')], [1, 0]);
    const limits = proxy.proxy.rateLimits;
    assert.deepEqual({ ...limits.get(fake.hostPort), updatedAt: 0 }, { limit: 100, remaining: 76, windowSeconds: 21600, updatedAt: 0 });

    await sleep(SHORT_TTL_MS + 50);
    fake.extraHeaders = { 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '75;w=21600' };
    fake.seen = [];
    assert.equal((await get(fake, '/v2/lib/counted/manifests/short-rl')).headers['x-cache'], 'REVALIDATED');
    assert.deepEqual([fake.count('GET'), fake.count('HEAD')], [0, 1]);
    assert.equal(limits.get(fake.hostPort)?.remaining, 75);
    assert.equal(limits.get(strict.hostPort), undefined, 'per registry');
  });

  test('a lying upstream: a body that does not hash to the digest asked for is a 502, never cached', async () => {
    const truth = manifest(OCI_MANIFEST);
    const lie = manifest(OCI_MANIFEST);
    const sha512 = `sha512:${createHash('sha512').update(truth.body).digest('hex')}`;
    const honest512 = manifest(OCI_MANIFEST);
    const honest512Digest = `sha512:${createHash('sha512').update(honest512.body).digest('hex')}`;
    fake.behave = (req, res, seen) => {
      const body = seen.path.endsWith(honest512Digest) ? honest512.body : lie.body;
      const reference = seen.path.split('/').pop()!;
      // Whatever it sends, it claims to be what was asked for (the truth, for a tag).
      res.writeHead(200, { 'Content-Type': OCI_MANIFEST, 'Content-Length': body.length, 'Docker-Content-Digest': reference.includes(':') ? reference : truth.digest });
      res.end(req.method === 'HEAD' ? undefined : body);
      return true;
    };
    for (const digest of [truth.digest, sha512]) {
      for (const attempt of [1, 2]) {
        const answer = await get(fake, `/v2/lib/app/manifests/${digest}`);
        assert.equal(answer.status, 502, `${digest} attempt ${attempt}`);
        assert.equal(errorCode(answer), 'MANIFEST_INVALID');
        assert.ok(!answer.body.includes(lie.body));
      }
      assert.equal(fake.count('GET', `/v2/lib/app/manifests/${digest}`), 2, 'asked again: nothing was cached');
    }
    // By tag, a Docker-Content-Digest that the body does not match is the same lie.
    const byTag = await get(fake, '/v2/lib/app/manifests/v1');
    assert.deepEqual([byTag.status, errorCode(byTag)], [502, 'MANIFEST_INVALID']);
    // An honest sha512 is verified as sha512, and cached.
    assert.equal((await get(fake, `/v2/lib/app/manifests/${honest512Digest}`)).status, 200);
    fake.seen = [];
    assert.equal((await get(fake, `/v2/lib/app/manifests/${honest512Digest}`)).headers['x-cache'], 'HIT');
    assert.equal(fake.seen.length, 0);
  });

  test('a manifest over 4 MiB is refused with 502, not relayed as an empty 200', async () => {
    const huge = manifest(OCI_MANIFEST, { padding: 'x'.repeat(5 * 1024 * 1024) });
    fake.tag('lib/huge', 'v1', huge);
    const answer = await get(fake, '/v2/lib/huge/manifests/v1');
    assert.deepEqual([answer.status, errorCode(answer)], [502, 'MANIFEST_INVALID']);
    assert.equal(fake.count('GET'), 1);
  });

  test('HEAD: a cached fresh tag from the cache with the GET\'s exact headers; an uncached tag fetched once with GET, so the digest GET after it is a HIT', async () => {
    const cached = manifest(OCI_MANIFEST);
    fake.tag('lib/head', 'v1', cached);
    const got = await get(fake, '/v2/lib/head/manifests/v1');
    assert.equal(got.status, 200);
    fake.seen = [];
    const head = await request(fake, 'HEAD', '/v2/lib/head/manifests/v1', { Accept: OCI_MANIFEST });
    assert.equal(head.status, 200);
    assert.equal(head.body.length, 0);
    assert.equal(head.headers['x-cache'], 'HIT');
    for (const name of ['content-length', 'docker-content-digest', 'content-type']) {
      assert.equal(head.headers[name], got.headers[name], name);
    }
    assert.equal(head.headers['content-length'], String(cached.body.length));
    assert.equal(fake.seen.length, 0, 'answered from the cache');

    // containerd's resolution: HEAD the tag, then GET by digest. Upstream sees one GET, as a client
    // without the proxy costs one counted pull (HEAD free, GET counted).
    const uncached = manifest(OCI_MANIFEST);
    fake.tag('lib/head', 'v2', uncached);
    const miss = await request(fake, 'HEAD', '/v2/lib/head/manifests/v2', { Accept: OCI_MANIFEST });
    assert.deepEqual([miss.status, miss.headers['docker-content-digest'], miss.headers['content-length'], miss.headers['x-cache'], miss.body.length], [200, uncached.digest, String(uncached.body.length), 'MISS', 0]);
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [0, 1], 'the uncached tag HEAD is one GET upstream');
    fake.seen = [];
    const byDigest = await get(fake, `/v2/lib/head/manifests/${uncached.digest}`);
    assert.deepEqual([byDigest.headers['x-cache'], byDigest.body], ['HIT', uncached.body]);
    const again = await request(fake, 'HEAD', '/v2/lib/head/manifests/v2', { Accept: OCI_MANIFEST });
    assert.deepEqual([again.headers['x-cache'], again.headers['docker-content-digest']], ['HIT', uncached.digest]);
    assert.equal(fake.seen.length, 0, 'nothing more upstream');

    // An uncached digest's HEAD stays a HEAD upstream: it never costs a GET.
    const other = manifest(OCI_MANIFEST);
    fake.tag('lib/head', 'v3', other);
    const digestHead = await request(fake, 'HEAD', `/v2/lib/head/manifests/${other.digest}`, { Accept: OCI_MANIFEST });
    assert.deepEqual([digestHead.status, digestHead.headers['content-length']], [200, String(other.body.length)]);
    assert.deepEqual([fake.count('HEAD'), fake.count('GET')], [1, 0]);
  });
});
