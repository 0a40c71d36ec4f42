// OpenTelemetry traces (R8.3) as an operator gets them: `pullthrough start` as a child process,
// configured only by OTEL_* variables, exporting OTLP/HTTP JSON to a receiver started here, in front of
// a real registry with htpasswd credentials pulled by skopeo, and a fake one that redirects to a CDN.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startTracing, tracingEnabled } from '../src/tracing.ts';
import { connectThroughProxy, fetchThroughProxy, type Target } from './helpers/blob-client.ts';
import { waitFor } from './helpers/cache-files.ts';
import { serveBlob, startFakeRegistry, writeCaFile, type FakeRegistry } from './helpers/fake-registry.ts';
import { buildOciImage, type BuiltImage } from './helpers/oci-image.ts';
import { startOtlpReceiver, type OtlpReceiver, type ReceivedSpan } from './helpers/otlp-receiver.ts';
import { createTestCa, writePem, type TestCa } from './helpers/pki.ts';
import { startRegistry, type RegistryHandle } from './helpers/registry.ts';
import { pushImage, skopeoCopyThroughProxy, verifyDirCopy } from './helpers/skopeo.ts';
import { startTokenService, type TokenService } from './helpers/token-service.ts';

const CLI = path.join(import.meta.dirname, '../src/cli.ts');
const PASSWORD = 'wonder-land-42';
const BASIC = Buffer.from(`alice:${PASSWORD}`).toString('base64');
const CLIENT_TOKEN = 'client-token-s3cr3t';
const SIGNATURE = 'SIGNED-QUERY-s3cr3t';
const CENTRAL_PASSWORD = 'central-tr4ce-pw';
const CENTRAL_BASIC = Buffer.from(`central:${CENTRAL_PASSWORD}`).toString('base64');
const MiB = 1024 * 1024;

interface CliProxy {
  port: number;
  caPem: string;
  /** The access entries (stdout JSON lines) so far. */
  access(): Array<Record<string, unknown>>;
  output(): string;
  /** SIGTERM, and the exit code once it exited. */
  stop(): Promise<number | null>;
}

/** `pullthrough start --config <file>` on Node 24 with exactly `env` (plus PATH); resolves once it listens. */
async function startCliProxy(configFile: string, env: NodeJS.ProcessEnv, nodeArgs: string[] = []): Promise<CliProxy> {
  const child: ChildProcess = spawn(process.execPath, [...nodeArgs, CLI, 'start', '--config', configFile], { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (c: Buffer) => (stdout += c));
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr!.on('data', (c: Buffer) => {
      stderr += c;
      const match = /"listen":"[^"]*:(\d+)"/.exec(stderr);
      if (match) resolve(Number(match[1]));
    });
    child.once('exit', (code) => reject(new Error(`exited with ${code}: ${stderr}`)));
  });
  const caPem = await (await fetch(`http://127.0.0.1:${port}/ca.crt`)).text();
  return {
    port,
    caPem,
    access: () => stdout.split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line) as Record<string, unknown>),
    output: () => `${stdout}${stderr}`,
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve(child.exitCode);
        child.once('exit', (code) => resolve(code));
        child.kill('SIGTERM');
      }),
  };
}

describe('tracing', () => {
  test('is off unless an exporter is set, and then the SDK is not even loaded', async () => {
    assert.equal(tracingEnabled({}), false);
    assert.equal(tracingEnabled({ OTEL_SERVICE_NAME: 'pullthrough', OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' }), false);
    assert.equal(tracingEnabled({ OTEL_TRACES_EXPORTER: 'none', OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318' }), false);
    assert.equal(tracingEnabled({ OTEL_SDK_DISABLED: 'true', OTEL_TRACES_EXPORTER: 'otlp' }), false);
    assert.equal(tracingEnabled({ OTEL_TRACES_EXPORTER: 'otlp' }), true);
    assert.equal(tracingEnabled({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318' }), true);
    assert.equal(tracingEnabled({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:4318/v1/traces' }), true);
    // This test process has no OTEL_* variable: startTracing is a no-op.
    if (!tracingEnabled()) await (await startTracing())();

    // The proxy itself, started and stopped with no exporter set: no module of the SDK is resolved,
    // in the primary (the hook below) and nothing reaches a receiver (none is named, so none exists).
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-tracing-off-'));
    try {
      const configFile = path.join(dir, 'proxy.yaml');
      writeFileSync(configFile, `listen: 127.0.0.1:0\ndataDir: ${JSON.stringify(path.join(dir, 'data'))}\n`);
      const hook = `data:text/javascript,${encodeURIComponent(`
        import { registerHooks } from 'node:module';
        registerHooks({ resolve(specifier, context, next) {
          const resolved = next(specifier, context);
          if (resolved.url.includes('/@opentelemetry/')) process.stderr.write('RESOLVED ' + resolved.url + '\\n');
          return resolved;
        } });`)}`;
      for (const env of [{}, { OTEL_TRACES_EXPORTER: 'none', OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:9' }]) {
        const proxy = await startCliProxy(configFile, env, ['--import', hook]);
        const resolved = proxy.output().split('\n').filter((line) => line.startsWith('RESOLVED '));
        assert.equal(await proxy.stop(), 0);
        assert.ok(resolved.length > 0, 'the hook sees the API being resolved');
        assert.deepEqual(resolved.filter((line) => !/\/@opentelemetry\/api\//.test(line)), [], `only @opentelemetry/api with ${JSON.stringify(env)}`);
        assert.ok(!proxy.output().includes('tracing:'), 'no tracing message');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  describe('with an OTLP/HTTP JSON exporter', () => {
    let ca: TestCa;
    let dir: string;
    let registry: RegistryHandle;
    let fake: FakeRegistry;
    let cdn: FakeRegistry;
    let receiver: OtlpReceiver;
    let image: BuiltImage;
    let big: BuiltImage;
    let proxy: CliProxy;
    let spans: ReceivedSpan[];
    let access: Array<Record<string, unknown>>;
    let redirected: string;
    let joinedDigest: string;
    let tokens: TokenService;
    let tokenRegistry: RegistryHandle;
    let centralDigest: string;

    before(async () => {
      ca = createTestCa('pullthrough tracing CA');
      dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-tracing-'));
      receiver = await startOtlpReceiver();
      registry = await startRegistry({ host: 'private.test', ca, htpasswd: { username: 'alice', password: PASSWORD } });
      fake = await startFakeRegistry('fake.test', ca);
      cdn = await startFakeRegistry('cdn.test', ca);
      image = await buildOciImage(path.join(dir, 'layout'), { layers: [{ files: { 'etc/motd': 'traced\n' } }, { randomBytes: 3 * MiB }], tag: 'v1' });
      big = await buildOciImage(path.join(dir, 'big-layout'), { layers: [{ randomBytes: 32 * MiB }], tag: 'v1' });
      await pushImage(image.layoutDir, 'v1', registry, { repository: 'secret/app' });
      await pushImage(big.layoutDir, 'v1', registry, { repository: 'secret/big' });
      tokens = await startTokenService({ host: 'auth.test', ca, users: { central: { password: CENTRAL_PASSWORD, access: [{ repository: 'private/*', actions: ['pull'] }] } } });
      tokenRegistry = await startRegistry({ host: 'tokenreg.test', ca, tokenAuth: tokens.registryAuth });
      const centralImage = await buildOciImage(path.join(dir, 'central-layout'), { layers: [{ randomBytes: MiB }], tag: 'v1' });
      centralDigest = centralImage.layerDigests[0]!;
      await pushImage(centralImage.layoutDir, 'v1', tokenRegistry, { repository: 'private/app', registryToken: tokens.mint([{ name: 'private/app', actions: ['pull', 'push'] }]) });
      const caFile = writeCaFile(dir, ca);
      const configFile = path.join(dir, 'proxy.yaml');
      writeFileSync(
        configFile,
        `listen: 127.0.0.1:0
dataDir: ${JSON.stringify(path.join(dir, 'data'))}
# Every fill under the request that missed: no layer is fetched ahead of the client (cache.prefetch).
cache: { prefetch: false }
registries:
  ${registry.hostPort}:
    tls: { ca: ${caFile} }
  ${fake.hostPort}:
    tls: { ca: ${caFile} }
  ${tokenRegistry.hostPort}:
    tls: { ca: ${caFile} }
    auth: { realm: ${tokens.hostPort}, username: central, password: ${CENTRAL_PASSWORD} }
hosts:
  private.test: 127.0.0.1
  tokenreg.test: 127.0.0.1
  auth.test: 127.0.0.1
  fake.test: 127.0.0.1
  cdn.test: 127.0.0.1
`,
      );
      proxy = await startCliProxy(configFile, {
        OTEL_TRACES_EXPORTER: 'otlp',
        OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
        OTEL_BSP_SCHEDULE_DELAY: '100',
        OTEL_SERVICE_NAME: 'pullthrough-under-test',
      });

      // Two real pulls at once, with the registry's htpasswd credentials.
      const alice = { username: 'alice', password: PASSWORD };
      const proxyCaFile = writePem(dir, 'proxy-ca.pem', proxy.caPem);
      const pulls = await Promise.all(
        [0, 1].map((i) =>
          skopeoCopyThroughProxy({ image: `${registry.hostPort}/secret/app:v1`, proxyUrl: `http://127.0.0.1:${proxy.port}`, caFile: proxyCaFile, destDir: path.join(dir, `pull-${i}`), credentials: alice }),
        ),
      );
      for (const [i, pull] of pulls.entries()) {
        assert.equal(pull.code, 0, pull.stderr);
        assert.equal((await verifyDirCopy(path.join(dir, `pull-${i}`))).manifestDigest, image.manifestDigest);
      }

      // Two requests for one big cold blob sent at the same instant: one fills (MISS), one joins.
      joinedDigest = big.layerDigests[0]!;
      const target: Target = { proxyPort: proxy.port, caPem: proxy.caPem, host: registry.host, port: registry.port };
      const sockets = await Promise.all([connectThroughProxy(target), connectThroughProxy(target)]);
      const both = await Promise.all(sockets.map((socket) => fetchThroughProxy(target, `/v2/secret/big/blobs/${joinedDigest}`, { socket, headers: { Authorization: `Basic ${BASIC}` } })));
      assert.deepEqual(both.map((r) => [r.status, r.complete, r.digest]), [[200, true, joinedDigest], [200, true, joinedDigest]]);
      assert.deepEqual(both.map((r) => r.headers['x-cache']).sort(), ['JOINED', 'MISS']);

      // A blob behind a redirect to a CDN whose URL carries a signature, fetched with a bearer token.
      const blob = fake.addBlob(2 * MiB + 3);
      redirected = blob.digest;
      const hex = blob.digest.slice('sha256:'.length);
      fake.behave = (_req, res, seen) => {
        if (seen.blob !== blob) return false;
        res.writeHead(307, { Location: `https://${cdn.hostPort}/signed/${hex}?X-Amz-Signature=${SIGNATURE}` });
        res.end();
        return true;
      };
      cdn.behave = (req, res, seen) => {
        if (seen.path !== `/signed/${hex}`) return false;
        serveBlob(req, res, blob);
        return true;
      };
      const viaCdn = await fetchThroughProxy({ proxyPort: proxy.port, caPem: proxy.caPem, host: fake.host, port: fake.port }, `/v2/lib/app/blobs/${blob.digest}`, { headers: { Authorization: `Bearer ${CLIENT_TOKEN}` } });
      assert.equal(viaCdn.status, 200);
      assert.equal(viaCdn.digest, blob.digest);

      // A client without credentials: the proxy exchanges the central ones for a token itself.
      const central = await fetchThroughProxy({ proxyPort: proxy.port, caPem: proxy.caPem, host: tokenRegistry.host, port: tokenRegistry.port }, `/v2/private/app/blobs/${centralDigest}`);
      assert.equal(central.status, 200);
      assert.equal(central.digest, centralDigest);

      // A worker exports a fill's spans as the fill ends, just after its clients got their last byte;
      // the proxy's own go out on a graceful stop, before it exits.
      await waitFor('the spans of the last fill', () => receiver.spans().some((s) => s.name === 'upstream GET' && s.attributes['pullthrough.digest'] === redirected));
      assert.equal(await proxy.stop(), 0);
      access = proxy.access().filter((entry) => entry.method !== 'CONNECT' && entry.type !== 'admin');
      spans = receiver.spans();
    });

    after(async () => {
      await proxy?.stop();
      await Promise.all([registry?.stop(), tokenRegistry?.stop(), tokens?.stop(), fake?.close(), cdn?.close(), receiver?.close()]);
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    const byId = () => new Map(spans.map((span) => [span.spanId, span]));
    const childrenOf = (parent: ReceivedSpan) => spans.filter((span) => span.parentSpanId === parent.spanId && span.traceId === parent.traceId);

    test('one root span per client request, in a trace of its own, with its attributes', () => {
      assert.ok(spans.length > 0, 'spans were exported');
      assert.deepEqual(receiver.otherPaths, [], 'traces only: no metrics, no logs');
      const roots = spans.filter((span) => span.parentSpanId === '');
      assert.equal(roots.length, access.length, `roots: ${roots.map((r) => r.name).join(', ')}; access: ${access.map((a) => `${a.method} ${a.type}`).join(', ')}`);
      assert.equal(new Set(roots.map((r) => r.traceId)).size, roots.length, 'a trace per request');
      assert.equal(new Set(spans.map((s) => s.spanId)).size, spans.length, 'every span exported once');
      for (const root of roots) {
        assert.equal(root.kind, 2, `${root.name} is a SERVER span`);
        assert.match(root.name, /^(GET|HEAD) (blob|manifest|ping)$/);
        assert.equal(root.resource['service.name'], 'pullthrough-under-test');
        for (const key of ['pullthrough.registry', 'http.request.method', 'http.response.status_code', 'pullthrough.bytes']) assert.notEqual(root.attributes[key], undefined, `${root.name} has ${key}`);
      }
      // Every span belongs to a root's trace, under a parent that was exported too.
      const ids = byId();
      for (const span of spans.filter((s) => s.parentSpanId !== '')) {
        const parent = ids.get(span.parentSpanId);
        assert.ok(parent, `the parent of ${span.name} was exported`);
        assert.equal(parent.traceId, span.traceId);
      }

      const blobs = roots.filter((r) => r.name === 'GET blob');
      assert.equal(blobs.length, access.filter((a) => a.type === 'blob' && a.method === 'GET').length);
      for (const root of blobs) {
        assert.match(String(root.attributes['pullthrough.digest']), /^sha256:[0-9a-f]{64}$/);
        assert.match(String(root.attributes['pullthrough.repository']), /^(secret\/(app|big)|lib\/app|private\/app)$/);
        assert.match(String(root.attributes['pullthrough.cache']), /^(MISS|JOINED|HIT)$/);
        assert.equal(root.attributes['http.response.status_code'], 200);
      }
      const manifests = roots.filter((r) => r.name.endsWith(' manifest'));
      assert.ok(manifests.length >= 2);
      for (const root of manifests) {
        assert.equal(root.attributes['pullthrough.registry'], registry.hostPort);
        assert.equal(root.attributes['pullthrough.repository'], 'secret/app');
        assert.ok(root.attributes['pullthrough.reference'] === 'v1' || String(root.attributes['pullthrough.reference']).startsWith('sha256:'));
      }
      // The manifest that missed was fetched upstream: a client span under its request.
      const missed = manifests.find((r) => r.attributes['pullthrough.cache'] === 'MISS' && r.name === 'GET manifest')!;
      assert.ok(missed, 'a manifest MISS');
      assert.equal(missed.attributes['pullthrough.upstream.status'], 200);
      const fetched = childrenOf(missed).filter((s) => s.name === 'upstream GET');
      assert.equal(fetched.length, 1);
      assert.equal(fetched[0]!.kind, 3, 'a CLIENT span');
      assert.equal(fetched[0]!.attributes['http.response.status_code'], 200);
      assert.equal(fetched[0]!.attributes['url.full'], `https://${registry.hostPort}/v2/secret/app/manifests/${missed.attributes['pullthrough.reference']}`);
    });

    test("a fill is a child of the missing request's span, and its upstream requests (in a worker thread) children of the fill", () => {
      const misses = spans.filter((s) => s.parentSpanId === '' && s.name === 'GET blob' && s.attributes['pullthrough.cache'] === 'MISS');
      // config + 2 layers of the image, the big layer, the redirected blob, the one fetched with the
      // central credentials: each filled once.
      assert.equal(misses.length, 6, misses.map((m) => m.attributes['pullthrough.digest']).join(' '));
      assert.equal(spans.filter((s) => s.name === 'fill').length, 6);
      for (const miss of misses) {
        const fills = childrenOf(miss).filter((s) => s.name === 'fill');
        assert.equal(fills.length, 1, `one fill under ${miss.attributes['pullthrough.digest']}`);
        const fill = fills[0]!;
        assert.equal(fill.attributes['pullthrough.digest'], miss.attributes['pullthrough.digest']);
        assert.equal(fill.attributes['pullthrough.outcome'], 'committed');
        assert.equal(fill.attributes['pullthrough.upstream.status'], 200);
        assert.equal(typeof fill.attributes['pullthrough.size'], 'number');
        assert.equal(fill.attributes['pullthrough.bytes'], fill.attributes['pullthrough.size']);
        assert.equal(fill.attributes['pullthrough.resumes'], 0);
        const upstream = childrenOf(fill).filter((s) => s.name === 'upstream GET');
        assert.equal(upstream.length, 1, 'the worker thread sent its span under the fill: the context crossed');
        assert.equal(upstream[0]!.attributes['http.response.status_code'], 200);
        assert.equal(upstream[0]!.attributes['pullthrough.bytes'], fill.attributes['pullthrough.size']);
      }
    });

    test('a request that joined a fill links to it', () => {
      const fill = spans.find((s) => s.name === 'fill' && s.attributes['pullthrough.digest'] === joinedDigest)!;
      // Blob requests: a manifest request may have joined another's upstream request too (no fill).
      const joined = spans.filter((s) => s.parentSpanId === '' && s.attributes['pullthrough.cache'] === 'JOINED' && s.attributes['pullthrough.route'] === 'blob');
      assert.ok(joined.length >= 1);
      const joiner = joined.find((s) => s.attributes['pullthrough.digest'] === joinedDigest)!;
      assert.ok(joiner, 'the JOINED request of the big blob');
      assert.notEqual(joiner.traceId, fill.traceId, 'its own trace');
      assert.deepEqual(joiner.links.map((l) => [l.traceId, l.spanId]), [[fill.traceId, fill.spanId]]);
      assert.ok(fill.attributes['pullthrough.joined'] as number >= 1);
      // Every JOINED request (the concurrent skopeo pulls may have made more) links to its digest's fill.
      for (const span of joined) {
        const itsFill = spans.find((s) => s.name === 'fill' && s.attributes['pullthrough.digest'] === span.attributes['pullthrough.digest'])!;
        assert.deepEqual(span.links.map((l) => l.spanId), [itsFill.spanId]);
      }
    });

    test('a redirect is a span under the upstream request, without the signed query', () => {
      const fill = spans.find((s) => s.name === 'fill' && s.attributes['pullthrough.digest'] === redirected)!;
      assert.equal(fill.attributes['pullthrough.hops'], 1);
      const hex = redirected.slice('sha256:'.length);
      assert.equal(fill.attributes['pullthrough.upstream.url'], `https://${cdn.hostPort}/signed/${hex}`);
      const [upstream] = childrenOf(fill);
      assert.equal(upstream!.name, 'upstream GET');
      assert.equal(upstream!.attributes['pullthrough.hops'], 1);
      const redirects = childrenOf(upstream!);
      assert.deepEqual(
        redirects.map((r) => [r.name, r.attributes['http.response.status_code'], r.attributes['url.full'], r.attributes['pullthrough.redirect.location']]),
        [['redirect', 307, `https://${fake.hostPort}/v2/lib/app/blobs/${redirected}`, `https://${cdn.hostPort}/signed/${hex}`]],
      );
    });

    test('a token exchange is a span under the request that needed it, naming the realm and scope, never the token', () => {
      const request = spans.find((s) => s.parentSpanId === '' && s.name === 'GET blob' && s.attributes['pullthrough.digest'] === centralDigest);
      assert.ok(request, 'the request span of the blob fetched with central credentials');
      const exchange = childrenOf(request).find((s) => s.name === 'token');
      assert.ok(exchange, `a token span under it: ${childrenOf(request).map((s) => s.name).join(", ")}`);
      assert.equal(exchange.kind, 3, 'a CLIENT span');
      assert.equal(exchange.attributes['url.full'], `${tokens.url}`);
      assert.equal(exchange.attributes['pullthrough.token.scopes'], 'repository:private/app:pull');
      assert.equal(exchange.attributes['pullthrough.token.identity'], 'central');
      assert.equal(exchange.attributes['http.response.status_code'], 200);
    });

    test('no credential, token or signed URL anywhere in the export', () => {
      const everything = receiver.bodies.join('\n');
      for (const secret of [PASSWORD, BASIC, CLIENT_TOKEN, SIGNATURE, CENTRAL_PASSWORD, CENTRAL_BASIC, 'Bearer', 'Basic ']) assert.ok(!everything.includes(secret), `no ${secret}`);
      assert.ok(!/authorization/i.test(everything), 'no Authorization');
      assert.doesNotMatch(everything, /eyJ[A-Za-z0-9_-]{8,}\.eyJ/, 'no token (JWT)');
    });
  });
});
