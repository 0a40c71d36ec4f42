// Self-test of the token service against the real registry: distribution 2.8 started with token auth
// must accept the tokens the service signs, and refuse anonymous, foreign-audience and expired ones.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request, type Dispatcher } from 'undici';
import { buildOciImage, type BuiltImage } from './oci-image.ts';
import { createTestCa, type TestCa } from './pki.ts';
import { makeTempDir, removeTempDir } from './process.ts';
import { startRegistry, type RegistryHandle } from './registry.ts';
import { pushImage } from './skopeo.ts';
import { startTokenService, type TokenService } from './token-service.ts';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const ALICE = { username: 'alice', password: 'wonder-land-42' };

describe('token service with a token-auth registry', () => {
  let ca: TestCa;
  let tokens: TokenService;
  let registry: RegistryHandle;
  let image: BuiltImage;
  let workDir: string;

  before(async () => {
    ca = createTestCa('pullthrough token test CA');
    tokens = await startTokenService({
      host: 'auth.test',
      ca,
      users: { [ALICE.username]: { password: ALICE.password, access: [{ repository: 'private/*', actions: ['pull'] }] } },
      anonymous: [{ repository: 'public/*', actions: ['pull'] }],
    });
    registry = await startRegistry({ host: 'tokenreg.test', ca, tokenAuth: tokens.registryAuth });
    workDir = makeTempDir('token-service');
    image = await buildOciImage(join(workDir, 'layout'), { layers: [{ files: { 'etc/motd': 'behind a token\n' } }], tag: 'v1' });
    for (const repository of ['private/app', 'public/app']) {
      const registryToken = tokens.mint([{ name: repository, actions: ['pull', 'push'] }]);
      await pushImage(image.layoutDir, 'v1', registry, { repository, registryToken });
    }
  });

  after(async () => {
    await registry?.stop();
    await tokens?.stop();
    if (workDir) removeTempDir(workDir);
  });

  const manifest = (repository: string, bearer?: string) =>
    registry.fetch(`/v2/${repository}/manifests/v1`, { headers: { accept: OCI_MANIFEST }, ...(bearer !== undefined ? { bearer } : {}) });

  test('the registry challenges for a Bearer token from the service', async () => {
    const base = await registry.fetch('/v2/');
    assert.equal(base.status, 401);
    assert.equal(base.headers['www-authenticate'], `Bearer realm="${tokens.url}",service="${tokens.service}"`);
    const denied = await manifest('private/app');
    assert.equal(denied.status, 401);
    assert.match(String(denied.headers['www-authenticate']), /scope="repository:private\/app:pull"/);
  });

  test('minted tokens push and pull; a foreign audience or signer is refused', async () => {
    const pull = [{ name: 'private/app', actions: ['pull'] }];
    const pulled = await manifest('private/app', tokens.mint(pull));
    assert.equal(pulled.status, 200);
    assert.equal(pulled.headers['docker-content-digest'], image.manifestDigest);
    assert.equal((await manifest('private/app', tokens.mint(pull, { audience: 'elsewhere' }))).status, 401);
    const stranger = await startTokenService({ host: 'stranger.test', ca, service: tokens.service, issuer: tokens.issuer });
    try {
      assert.equal((await manifest('private/app', stranger.mint(pull))).status, 401, 'signed by a key outside the root bundle');
    } finally {
      await stranger.stop();
    }
  });

  test("a user's token reads a granted repository with only the granted actions", async () => {
    tokens.resetCounts();
    const res = await tokenRequest(tokens, ca, { query: scopeQuery(tokens, 'repository:private/app:pull,push'), basic: ALICE });
    assert.equal(res.status, 200);
    assert.equal(res.json.token, res.json.access_token);
    assert.equal(res.json.expires_in, 300);
    assert.deepEqual(claims(res.json.token).access, [{ type: 'repository', name: 'private/app', actions: ['pull'] }]);
    assert.equal(claims(res.json.token).sub, 'alice');
    const read = await manifest('private/app', String(res.json.token));
    assert.equal(read.status, 200);
    assert.equal(read.headers['docker-content-digest'], image.manifestDigest);

    const wrong = await tokenRequest(tokens, ca, { query: scopeQuery(tokens, 'repository:private/app:pull'), basic: { ...ALICE, password: 'nope' } });
    assert.equal(wrong.status, 401);
    assert.match(String(wrong.headers['www-authenticate']), /^Basic realm="/);
    assert.equal((wrong.json.errors as Array<{ code: string }>)[0]?.code, 'UNAUTHORIZED');
    assert.deepEqual(
      tokens.requests().map((r) => [r.method, r.path, r.user, r.status, r.scopes, r.service]),
      [
        ['GET', '/token', 'alice', 200, ['repository:private/app:pull,push'], tokens.service],
        ['GET', '/token', 'alice', 401, ['repository:private/app:pull'], tokens.service],
      ],
    );
    assert.equal(tokens.count({ status: 401 }), 1);
  });

  test('an anonymous token reads public repositories only', async () => {
    const res = await tokenRequest(tokens, ca, { query: scopeQuery(tokens, 'repository:private/app:pull', 'repository:public/app:pull') });
    assert.equal(res.status, 200);
    const token = String(res.json.token);
    assert.deepEqual(claims(token).access, [{ type: 'repository', name: 'public/app', actions: ['pull'] }]);
    assert.equal((await manifest('private/app', token)).status, 401);
    assert.equal((await manifest('public/app', token)).status, 200);
  });

  test('a token is refused once its lifetime is over', async () => {
    tokens.tokenTtlSeconds = 2;
    try {
      const res = await tokenRequest(tokens, ca, { query: scopeQuery(tokens, 'repository:private/app:pull'), basic: ALICE });
      assert.equal(res.json.expires_in, 2);
      const token = String(res.json.token);
      assert.equal((await manifest('private/app', token)).status, 200);
      await sleep(3_500);
      assert.equal((await manifest('private/app', token)).status, 401);
    } finally {
      tokens.tokenTtlSeconds = 300;
    }
  });

  test('the OAuth2 form issues access and refresh tokens', async () => {
    const form = { grant_type: 'password', username: ALICE.username, password: ALICE.password, access_type: 'offline', client_id: 'pullthrough-test', service: tokens.service, scope: 'repository:private/app:pull' };
    const res = await tokenRequest(tokens, ca, { form });
    assert.equal(res.status, 200);
    assert.equal(res.json.scope, 'repository:private/app:pull');
    assert.equal((await manifest('private/app', String(res.json.access_token))).status, 200);

    const refreshed = await tokenRequest(tokens, ca, {
      form: { grant_type: 'refresh_token', refresh_token: String(res.json.refresh_token), client_id: 'pullthrough-test', service: tokens.service, scope: 'repository:private/app:pull' },
    });
    assert.equal(refreshed.status, 200);
    assert.equal((await manifest('private/app', String(refreshed.json.access_token))).status, 200);
    assert.equal(tokens.count({ method: 'POST', grantType: 'refresh_token', user: 'alice', status: 200 }), 1);

    const bad = await tokenRequest(tokens, ca, { form: { ...form, password: 'nope' } });
    assert.equal(bad.status, 401);
    assert.equal(bad.json.error, 'invalid_grant');
  });

  test('a method can be switched off', async () => {
    const postOnly = await startTokenService({ host: 'auth2.test', ca, methods: { get: false } });
    const getOnly = await startTokenService({ host: 'auth3.test', ca, methods: { post: false } });
    try {
      const form = { grant_type: 'password', username: 'x', password: 'y', client_id: 'pullthrough-test', service: postOnly.service };
      const get = await tokenRequest(postOnly, ca, { query: scopeQuery(postOnly, 'repository:a/b:pull') });
      assert.equal(get.status, 405);
      assert.equal(get.headers.allow, 'POST');
      assert.equal((await tokenRequest(postOnly, ca, { form })).status, 401, 'POST still answers: unknown user');
      assert.equal((await tokenRequest(getOnly, ca, { form })).status, 405);
      assert.equal((await tokenRequest(getOnly, ca, { query: scopeQuery(getOnly, 'repository:a/b:pull') })).status, 200);
    } finally {
      await Promise.all([postOnly.stop(), getOnly.stop()]);
    }
  });
});

interface TokenRequestInit {
  /** GET with this query string. */
  query?: string;
  /** POST this form instead. */
  form?: Record<string, string>;
  basic?: { username: string; password: string };
}

interface TokenResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: Record<string, unknown>;
}

/** A request straight to the token service: connect to 127.0.0.1, verify the certificate for its host. */
async function tokenRequest(service: TokenService, ca: TestCa, init: TokenRequestInit): Promise<TokenResponse> {
  const dispatcher = new Agent({ connect: { ca: ca.certPem, servername: service.host } });
  try {
    const headers: Record<string, string> = { host: service.hostPort };
    if (init.basic) headers.authorization = `Basic ${Buffer.from(`${init.basic.username}:${init.basic.password}`).toString('base64')}`;
    if (init.form) headers['content-type'] = 'application/x-www-form-urlencoded';
    const options = { dispatcher, headers, method: (init.form ? 'POST' : 'GET') as Dispatcher.HttpMethod };
    const url = `https://${service.address}/token${init.form ? '' : `?${init.query ?? ''}`}`;
    const res = await request(url, init.form ? { ...options, body: new URLSearchParams(init.form).toString() } : options);
    return { status: res.statusCode, headers: res.headers, json: (await res.body.json()) as Record<string, unknown> };
  } finally {
    await dispatcher.close();
  }
}

function scopeQuery(service: TokenService, ...scopes: string[]): string {
  return new URLSearchParams([['service', service.service], ...scopes.map((s): [string, string] => ['scope', s])]).toString();
}

function claims(token: unknown): { sub: string; access: unknown } {
  return JSON.parse(Buffer.from(String(token).split('.')[1] ?? '', 'base64url').toString('utf8')) as { sub: string; access: unknown };
}
