// The OCI 1.1 referrers API through the cache, against an in-process registry that serves it (real TLS):
// lists cached as mutable (TTL, stale if error) per artifactType filter, one upstream request for
// concurrent clients, other queries passed through, a registry without the API (404) passed on, and
// a list fetched with a client's credentials kept from clients without them.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { after, before, beforeEach, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { httpOverSocket, tlsThroughProxy } from '../helpers/connect.ts';
import { createTestCa, writePem } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const TTL_MS = 300;
const SIG = 'application/vnd.dev.cosign.artifact.sig.v1+json';
const SBOM = 'application/spdx+json';

interface Seen {
  method: string;
  url: string;
  authorization?: string;
}

const digestOf = (text: string) => `sha256:${createHash('sha256').update(text).digest('hex')}`;

describe('referrers through the cache', () => {
  let server: https.Server;
  let hostPort = '';
  let port = 0;
  let proxy: TestProxy;
  let work: string;
  const seen: Seen[] = [];
  /** Subject digest → its referrers (descriptors with artifactType). */
  const referrers = new Map<string, Array<{ artifactType: string; digest: string }>>();
  let mode: 'ok' | '503' | '429' | 'no-api' = 'ok';
  let delayMs = 0;
  /** Subjects only a client with Authorization may see. */
  const privateSubjects = new Set<string>();

  before(async () => {
    const ca = createTestCa('referrers CA');
    work = makeTempDir('referrers');
    const leaf = ca.issue(['referrers.test']);
    server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
      seen.push({ method: req.method!, url: req.url!, ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}) });
      const answer = () => {
        const url = new URL(req.url!, 'https://x');
        const match = /^\/v2\/(.+)\/(referrers|manifests)\/([^/]+)$/.exec(url.pathname);
        if (url.pathname === '/v2/') return void res.writeHead(200).end('{}');
        if (!match) return void res.writeHead(404).end();
        const [, , kind, reference] = match as unknown as [string, string, string, string];
        if (privateSubjects.has(reference) && !req.headers.authorization) return void res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="referrers"' }).end();
        if (kind === 'manifests') {
          // The subject, and cosign's tag schema for registries without the API.
          const body = JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', annotations: { reference } });
          return void res.writeHead(200, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json', 'Docker-Content-Digest': digestOf(body), 'Content-Length': Buffer.byteLength(body) }).end(req.method === 'HEAD' ? undefined : body);
        }
        if (mode === '503' || mode === '429') return void res.writeHead(Number(mode), { 'Retry-After': '1' }).end('{"errors":[{"code":"UNAVAILABLE"}]}');
        if (mode === 'no-api') return void res.writeHead(404, { 'Content-Type': 'application/json' }).end('{"errors":[{"code":"NAME_UNKNOWN"}]}');
        const filter = url.searchParams.get('artifactType');
        const manifests = (referrers.get(reference) ?? []).filter((r) => filter === null || r.artifactType === filter).map((r) => ({ mediaType: 'application/vnd.oci.image.manifest.v1+json', size: 512, ...r }));
        const body = JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests });
        res.writeHead(200, { 'Content-Type': OCI_INDEX, 'Content-Length': Buffer.byteLength(body), ...(filter !== null ? { 'OCI-Filters-Applied': 'artifactType' } : {}) });
        res.end(req.method === 'HEAD' ? undefined : body);
      };
      if (delayMs > 0) setTimeout(answer, delayMs);
      else answer();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
    hostPort = `referrers.test:${port}`;
    proxy = await startTestProxy(`
registries:
  ${hostPort}:
    tls: { ca: ${writePem(work, 'ca.pem', ca.certPem)} }
    manifests: { defaultTtl: ${TTL_MS}ms, maxStale: 1h }
hosts:
  referrers.test: 127.0.0.1
`);
  });

  beforeEach(() => {
    seen.length = 0;
    mode = 'ok';
    delayMs = 0;
  });

  after(async () => {
    await proxy?.close();
    server?.closeAllConnections();
    await new Promise<void>((resolve) => server?.close(() => resolve()));
    if (work) removeTempDir(work);
  });

  const get = async (path: string, headers: Record<string, string> = {}) => httpOverSocket(await tlsThroughProxy(proxy.port, 'referrers.test', port, proxy.caPem), 'GET', path, hostPort, { Accept: OCI_INDEX, ...headers });
  const listOf = (body: Buffer) => (JSON.parse(body.toString()) as { manifests: Array<{ artifactType: string; digest: string }> }).manifests;
  const upstreamReferrers = () => seen.filter((s) => s.url.includes('/referrers/')).length;
  const newSubject = () => digestOf(randomBytes(8).toString('hex'));

  test('a list is cached for the TTL, per artifactType filter, bytes and headers as upstream sent them', async () => {
    const subject = newSubject();
    referrers.set(subject, [{ artifactType: SIG, digest: digestOf('sig') }, { artifactType: SBOM, digest: digestOf('sbom') }]);
    const first = await get(`/v2/lib/app/referrers/${subject}`);
    const second = await get(`/v2/lib/app/referrers/${subject}`);
    assert.deepEqual([first.status, first.headers['x-cache'], second.headers['x-cache']], [200, 'MISS', 'HIT']);
    assert.deepEqual(second.body, first.body);
    assert.equal(second.headers['content-type'], OCI_INDEX);
    assert.equal(listOf(second.body).length, 2);
    const signatures = await get(`/v2/lib/app/referrers/${subject}?artifactType=${encodeURIComponent(SIG)}`);
    const again = await get(`/v2/lib/app/referrers/${subject}?artifactType=${encodeURIComponent(SIG)}`);
    assert.deepEqual([signatures.headers['x-cache'], again.headers['x-cache'], again.headers['oci-filters-applied']], ['MISS', 'HIT', 'artifactType']);
    assert.deepEqual(listOf(again.body).map((m) => m.artifactType), [SIG]);
    assert.equal(upstreamReferrers(), 2, 'one upstream request per list');
  });

  test('past the TTL the list is asked again (a new signature appears); while upstream fails it is served stale', async () => {
    const subject = newSubject();
    referrers.set(subject, [{ artifactType: SIG, digest: digestOf('one') }]);
    await get(`/v2/lib/app/referrers/${subject}`);
    referrers.set(subject, [{ artifactType: SIG, digest: digestOf('one') }, { artifactType: SIG, digest: digestOf('two') }]);
    await sleep(TTL_MS + 50);
    const refreshed = await get(`/v2/lib/app/referrers/${subject}`);
    assert.deepEqual([refreshed.headers['x-cache'], listOf(refreshed.body).length], ['MISS', 2]);
    for (const failing of ['503', '429'] as const) {
      await sleep(TTL_MS + 50);
      mode = failing;
      const stale = await get(`/v2/lib/app/referrers/${subject}`);
      assert.deepEqual([stale.status, stale.headers['x-cache'], stale.headers.warning, listOf(stale.body).length], [200, 'STALE', '110 pullthrough "Response is Stale"', 2], failing);
    }
    mode = '503';
    const uncached = await get(`/v2/lib/app/referrers/${newSubject()}`);
    assert.equal(uncached.status, 503, 'nothing cached: upstream\'s failure');
  });

  test('8 concurrent clients of an uncached list are one upstream request', async () => {
    const subject = newSubject();
    referrers.set(subject, [{ artifactType: SBOM, digest: digestOf('sbom-c') }]);
    delayMs = 100;
    const answers = await Promise.all(Array.from({ length: 8 }, () => get(`/v2/lib/app/referrers/${subject}`)));
    assert.equal(upstreamReferrers(), 1);
    assert.ok(answers.every((a) => a.status === 200 && listOf(a.body).length === 1));
    assert.deepEqual(answers.map((a) => a.headers['x-cache']).sort(), ['JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'JOINED', 'MISS']);
  });

  test('other queries pass through; a registry without the API answers 404, and the tag schema is cached like any tag', async () => {
    const subject = newSubject();
    for (const _ of [1, 2]) await get(`/v2/lib/app/referrers/${subject}?n=10&last=x`);
    assert.equal(upstreamReferrers(), 2, 'pages are not cached');
    mode = 'no-api';
    const missing = await get(`/v2/lib/app/referrers/${newSubject()}`);
    assert.equal(missing.status, 404);
    const tag = `sha256-${subject.slice('sha256:'.length)}.sig`;
    const sig = await get(`/v2/lib/app/manifests/${tag}`, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
    const sigAgain = await get(`/v2/lib/app/manifests/${tag}`, { Accept: 'application/vnd.oci.image.manifest.v1+json' });
    assert.deepEqual([sig.status, sig.headers['x-cache'], sigAgain.headers['x-cache']], [200, 'MISS', 'HIT']);
    assert.equal(seen.filter((s) => s.url.endsWith(tag)).length, 1);
  });

  test("a list fetched with a client's credentials is not served to a client without them", async () => {
    const subject = newSubject();
    privateSubjects.add(subject);
    referrers.set(subject, [{ artifactType: SIG, digest: digestOf('secret-sig') }]);
    const owner = await get(`/v2/team/secret/referrers/${subject}`, { Authorization: 'Bearer owner' });
    assert.deepEqual([owner.status, owner.headers['x-cache']], [200, 'MISS']);
    const anonymous = await get(`/v2/team/secret/referrers/${subject}`);
    assert.equal(anonymous.status, 401);
    assert.ok(!anonymous.body.includes(digestOf('secret-sig')), 'nothing of the list');
    const ownerAgain = await get(`/v2/team/secret/referrers/${subject}`, { Authorization: 'Bearer owner' });
    assert.deepEqual([ownerAgain.status, ownerAgain.headers['x-cache']], [200, 'HIT']);
  });
});
