// Credential edge cases against in-process fakes (a registry that is also its own token service, and a
// CDN): which Authorization reaches whom. The real-registry flows are in test/e2e/auth.test.ts.
import assert from 'node:assert/strict';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { after, before, beforeEach, describe, test } from 'node:test';
import { parseChallenges, preferredChallenge } from '../../src/upstream/challenge.ts';
import { parseTokenResponse } from '../../src/upstream/token-exchange.ts';
import { fetchThroughProxy, type Target } from '../helpers/blob-client.ts';
import { serveBlob, startFakeRegistry, writeCaFile, type FakeRegistry } from '../helpers/fake-registry.ts';
import { createTestCa } from '../helpers/pki.ts';
import { makeTempDir, removeTempDir } from '../helpers/process.ts';
import { startTestProxy, type TestProxy } from '../helpers/proxy.ts';

const CENTRAL_BASIC = `Basic ${Buffer.from('central:c3ntral-pw').toString('base64')}`;
const MiB = 1024 * 1024;

describe('WWW-Authenticate and token responses', () => {
  test('challenges with quoted commas, escapes, several schemes and a token68', () => {
    const [bearer, basic] = parseChallenges('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push", Basic realm="x \\"y\\""');
    assert.deepEqual(bearer, { scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' } });
    assert.deepEqual(basic, { scheme: 'basic', params: { realm: 'x "y"' } });
    assert.equal(preferredChallenge(parseChallenges(['Basic realm="r"', 'Bearer realm="https://t/"']))?.scheme, 'bearer');
    assert.equal(preferredChallenge(parseChallenges('Bearer service="no realm"')), undefined);
    assert.deepEqual(parseChallenges('Negotiate abc=='), [{ scheme: 'negotiate', params: {} }]);
    assert.deepEqual(parseChallenges(undefined), []);
  });

  test('a token is used until a tenth of its life (at most 30 s) before it expires; 60 s when unsaid', () => {
    assert.deepEqual(parseTokenResponse('{"token":"t","expires_in":300}', 0), { token: 't', expiresAt: 270_000 });
    assert.deepEqual(parseTokenResponse('{"access_token":"a","expires_in":10}', 0), { token: 'a', expiresAt: 9_000 });
    assert.deepEqual(parseTokenResponse('{"token":"t"}', 0), { token: 't', expiresAt: 54_000 });
    assert.equal(parseTokenResponse('{"token":""}'), undefined);
    assert.equal(parseTokenResponse('<html>'), undefined);
  });
});

describe('credentials against fake upstreams', () => {
  let registry: FakeRegistry;
  let cdn: FakeRegistry;
  let proxy: TestProxy;
  let target: Target;
  let work: string;
  let caFile: string;
  /** Bearer tokens the fake's token service issued, by the grant that asked. */
  let issued: Array<{ method: string; authorization?: string; form?: URLSearchParams; scope: string[] }>;

  before(async () => {
    const ca = createTestCa('pullthrough credentials CA');
    registry = await startFakeRegistry('creds.test', ca);
    cdn = await startFakeRegistry('cdn.test', ca);
    work = makeTempDir('credentials');
    caFile = writeCaFile(work, ca);
    proxy = await startTestProxy(`
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { username: central, password: c3ntral-pw }
hosts:
  creds.test: 127.0.0.1
  cdn.test: 127.0.0.1
`);
    target = { proxyPort: proxy.port, caPem: proxy.caPem, host: registry.host, port: registry.port };
  });

  after(async () => {
    await proxy?.close();
    await Promise.all([registry?.close(), cdn?.close()]);
    if (work) removeTempDir(work);
  });

  beforeEach(() => {
    registry.reset();
    cdn.reset();
    issued = [];
  });

  /** The fake as a Basic registry: only the central credentials (or a client's "Bearer client-…") get in. */
  const basicRegistry = (req: IncomingMessage, res: ServerResponse) => {
    const authorization = req.headers.authorization ?? '';
    if (authorization === CENTRAL_BASIC || authorization.startsWith('Bearer client-')) return false;
    res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="fake"', 'Content-Type': 'application/json' });
    res.end('{"errors":[{"code":"UNAUTHORIZED"}]}');
    return true;
  };

  test('central credentials go to the registry, never to the CDN it redirects to', async () => {
    const blob = registry.addBlob(MiB + 7);
    registry.behave = (req, res, seen) => {
      if (basicRegistry(req, res)) return true;
      if (seen.blob !== blob) return false;
      res.writeHead(307, { Location: `https://${cdn.hostPort}/storage/${blob.digest}?sig=abc` });
      res.end();
      return true;
    };
    cdn.behave = (req, res) => {
      serveBlob(req, res, blob);
      return true;
    };
    const fetched = await fetchThroughProxy(target, `/v2/team/app/blobs/${blob.digest}`);
    assert.equal(fetched.status, 200);
    assert.equal(fetched.digest, blob.digest);
    const upstreamGets = registry.seen.filter((s) => s.blob === blob && s.method === 'GET');
    assert.equal(upstreamGets.length, 1);
    assert.equal(upstreamGets[0]!.headers.authorization, CENTRAL_BASIC);
    assert.equal(cdn.seen.length, 1);
    assert.equal(cdn.seen[0]!.headers.authorization, undefined, 'no Authorization at the CDN');
  });

  test("a client's own Authorization wins; empty Basic credentials (\"Og==\") count as none", async () => {
    const blob = registry.addBlob(4096);
    registry.behave = (req, res) => basicRegistry(req, res);
    const own = await fetchThroughProxy(target, `/v2/team/own/blobs/${blob.digest}`, { headers: { Authorization: 'Bearer client-42' } });
    assert.equal(own.status, 200);
    // GETs: beside the fill, the proxy asks once anonymously whether the blob is public (a HEAD).
    assert.deepEqual(registry.seen.filter((s) => s.blob === blob && s.method === 'GET').map((s) => s.headers.authorization), ['Bearer client-42']);

    // skopeo answers a Basic challenge with empty credentials when it has none: the central ones go.
    const other = registry.addBlob(4096);
    const empty = await fetchThroughProxy(target, `/v2/team/own/blobs/${other.digest}`, { headers: { Authorization: 'Basic Og==' } });
    assert.equal(empty.status, 200);
    assert.deepEqual(registry.seen.filter((s) => s.blob === other).map((s) => s.headers.authorization), [CENTRAL_BASIC]);
  });

  test('a token service without GET: the OAuth2 password grant (POST form), the token cached for its scope', async () => {
    // The registry now challenges for Bearer: the proxy learns it from the 401 to its Basic attempt.
    registry.behave = async (req, res, seen) => {
      if (seen.path === '/oauth/token') {
        if (req.method !== 'POST') {
          res.writeHead(405).end();
          issued.push({ method: req.method ?? '', scope: [] });
          return true;
        }
        let body = '';
        for await (const chunk of req) body += chunk;
        const form = new URLSearchParams(body);
        issued.push({ method: 'POST', form, scope: (form.get('scope') ?? '').split(' ') });
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ access_token: `tok-${issued.filter((i) => i.method === 'POST').length}`, expires_in: 300 }));
        return true;
      }
      if (req.headers.authorization?.startsWith('Bearer tok-')) return false;
      res.writeHead(401, { 'WWW-Authenticate': `Bearer realm="https://${registry.hostPort}/oauth/token",service="creds",scope="repository:team/oauth:pull"` });
      res.end();
      return true;
    };
    const first = registry.addBlob(2048);
    const second = registry.addBlob(2048);
    for (const blob of [first, second]) {
      const fetched = await fetchThroughProxy(target, `/v2/team/oauth/blobs/${blob.digest}`);
      assert.equal(fetched.status, 200, fetched.body.toString());
    }
    const posts = issued.filter((i) => i.method === 'POST');
    assert.equal(posts.length, 1, `one token for both blobs: ${JSON.stringify(issued.map((i) => i.method))}`);
    const form = posts[0]!.form!;
    assert.deepEqual(
      [form.get('grant_type'), form.get('username'), form.get('password'), form.get('service'), form.get('scope')],
      ['password', 'central', 'c3ntral-pw', 'creds', 'repository:team/oauth:pull'],
    );
    assert.ok(issued.some((i) => i.method === 'GET'), 'GET was tried first');
    // The Basic challenge learned earlier was answered first; the 401 taught the Bearer one.
    assert.deepEqual(registry.seen.filter((s) => s.blob === first).map((s) => s.headers.authorization), [CENTRAL_BASIC, 'Bearer tok-1']);
    assert.deepEqual(registry.seen.filter((s) => s.blob === second).map((s) => s.headers.authorization), ['Bearer tok-1']);
  });

  test('a 401 at the end of a redirect chain (a CDN naming a realm of its own) never gets the central credentials sent anywhere', async () => {
    registry.behave = (_req, res, seen) => {
      if (!seen.path.startsWith('/v2/team/redirected/manifests/')) return false;
      res.writeHead(307, { Location: `https://${cdn.hostPort}/storage/manifest` }).end();
      return true;
    };
    cdn.behave = (_req, res, seen) => {
      if (seen.path === '/storage/manifest') {
        res.writeHead(401, { 'WWW-Authenticate': `Bearer realm="https://${cdn.hostPort}/steal",service="cdn"` }).end();
        return true;
      }
      res.writeHead(200, { 'Content-Type': 'application/json' }).end('{"token":"stolen"}');
      return true;
    };
    const answer = await fetchThroughProxy(target, '/v2/team/redirected/manifests/v1', { headers: { Accept: 'application/vnd.oci.image.manifest.v1+json' } });
    assert.equal(answer.status, 401);
    assert.deepEqual(cdn.seen.map((s) => [s.path, s.headers.authorization]), [['/storage/manifest', undefined]], 'no token request to the realm the CDN named');
  });

  test("token requests get the central credentials only at the registry's token endpoint, for pull scopes only", async () => {
    // A proxy of its own, so that it learns this challenge up front (GET /v2/) like any new start.
    const fresh = await startTestProxy(`
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { username: central, password: c3ntral-pw }
hosts:
  creds.test: 127.0.0.1
`);
    try {
      const at = { ...target, proxyPort: fresh.port, caPem: fresh.caPem };
      registry.behave = (req, res, seen) => {
        if (seen.path === '/v2/' && !req.headers.authorization) {
          res.writeHead(401, { 'WWW-Authenticate': `Bearer realm="https://${registry.hostPort}/token",service="creds"` }).end();
          return true;
        }
        // Every other path answers with what Authorization it saw: what the proxy put in, if anything.
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ token: 'minted', seen: req.headers.authorization ?? null }));
        return true;
      };
      const seen = async (path: string, headers: Record<string, string> = {}) => JSON.parse((await fetchThroughProxy(at, path, { headers })).body.toString()).seen as string | null;
      assert.equal(await seen('/token?service=creds&scope=repository:team/app:pull'), CENTRAL_BASIC);
      assert.equal(await seen('/token?service=creds&scope=repository:team/app:pull,push'), null, 'never for a push scope');
      assert.equal(await seen('/token?service=creds&scope=repository:team/app:pull', { Authorization: 'Basic b3duOnVzZXI=' }), 'Basic b3duOnVzZXI=', "the client's own credentials win");
      // Not a pull token request of the registry's own token endpoint: nothing injected.
      for (const path of [
        '/token?service=creds',
        '/token?service=creds&scope=repository:team/app:pull&offline_token=true',
        '/token?service=creds&scope=repository:team/app:pull&grant_type=refresh_token',
        '/token?service=other&scope=repository:team/app:pull',
        '/token?service=creds&scope=registry:catalog:*',
        '/api/v4/projects/42/packages/generic/x/1/file?scope=repository:team/app:pull',
        '/group/private.git/info/refs?service=git-upload-pack',
        '/jwt/auth?service=creds&scope=repository:team/app:pull',
      ]) {
        assert.equal(await seen(path), null, path);
      }
      assert.equal(await seen('/v2/_catalog'), null, 'the catalog never gets the central credentials');
    } finally {
      await fresh.close();
    }
  });

});

