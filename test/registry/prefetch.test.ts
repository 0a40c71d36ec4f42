// The layer prefetch's queue (src/registry/prefetch.ts) on its own: what a layer request queues, in
// which order, how many at once, what it never fetches, and that a draining proxy starts nothing more.
// The fills are stand-ins that end when the test says; test/e2e/prefetch.test.ts runs the real ones
// against a Docker-Hub-shaped registry.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { describe, test } from 'node:test';
import type { RegistryPolicy } from '../../config/policy.ts';
import type { StoredManifest } from '../../src/cache/manifest-store.ts';
import type { Logger } from '../../src/log.ts';
import type { BlobRequest } from '../../src/registry/blobs.ts';
import { LayerPrefetch } from '../../src/registry/prefetch.ts';
import type { Digest, RepositoryName } from '../../src/registry/route.ts';
import type { UpstreamConfig } from '../../src/upstream/agents.ts';

const REGISTRY = 'registry.test:443';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

const digestOf = (text: string) => `sha256:${createHash('sha256').update(text).digest('hex')}` as Digest;
const layers = (prefix: string, count: number) => Array.from({ length: count }, (_, i) => digestOf(`${prefix}-${i}`));

function manifest(layerDigests: readonly string[], options: { mediaType?: string; config?: string } = {}): StoredManifest {
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: options.mediaType ?? OCI_MANIFEST, config: { digest: options.config ?? digestOf('config') }, layers: layerDigests.map((digest) => ({ digest, size: 1 })) }));
  return { body, mediaType: options.mediaType ?? OCI_MANIFEST, digest: digestOf(body.toString()), storedAt: Date.now(), access: 'anonymous' };
}

function blob(digest: string, name = 'team/app'): BlobRequest {
  return { digest: digest as Digest, name: name as RepositoryName, registry: { key: REGISTRY } as RegistryPolicy, upstream: { key: REGISTRY } as UpstreamConfig, hostHeader: 'registry.test' };
}

const req = {} as IncomingMessage;

/** A LayerPrefetch whose fills are stand-ins: `started` in order, each ended by `finish(digest)` (or failed); `taken`: cached or in flight. */
function rig(taken = new Set<string>()) {
  const started: string[] = [];
  const endings = new Map<string, { resolve: () => void; reject: (err: Error) => void }>();
  let running = 0;
  let mostAtOnce = 0;
  const warnings: string[] = [];
  const log = { warn: (message: string) => warnings.push(message), info() {}, error() {}, access() {} } as unknown as Logger;
  const prefetch = new LayerPrefetch(
    (_req, b) => {
      started.push(b.digest);
      taken.add(b.digest); // in flight, then cached: as the proxy's fills map and store would say
      mostAtOnce = Math.max(mostAtOnce, ++running);
      return new Promise<void>((resolve, reject) => endings.set(b.digest, { resolve, reject })).finally(() => running--);
    },
    (digest) => taken.has(digest),
    log,
  );
  const settle = () => new Promise((resolve) => setImmediate(resolve));
  return {
    prefetch,
    started,
    warnings,
    taken,
    mostAtOnce: () => mostAtOnce,
    async finish(digest: string) {
      endings.get(digest)!.resolve();
      await settle();
    },
    async fail(digest: string) {
      endings.get(digest)!.reject(new Error('upstream unreachable'));
      await settle();
    },
  };
}

describe('layer prefetch: the queue', () => {
  test('a layer asked for queues the image\'s other layers, the ones after it first, two at a time', async () => {
    const image = layers('a', 5);
    const r = rig(new Set([image[2]!])); // the client's own request fills the layer it asked for
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image));
    r.prefetch.layerRequested(req, blob(image[2]!));
    assert.deepEqual(r.started, [image[3], image[4]], 'two at once, the next layers first');
    await r.finish(image[3]!);
    assert.deepEqual(r.started, [image[3], image[4], image[0]]);
    await r.finish(image[4]!);
    await r.finish(image[0]!);
    assert.deepEqual(r.started, [image[3], image[4], image[0], image[1]], 'then the ones before it; never the one asked for');
    assert.equal(r.mostAtOnce(), 2);
    assert.equal(r.prefetch.started, 4);
    // Asking for the others now queues nothing twice.
    r.prefetch.layerRequested(req, blob(image[3]!));
    assert.equal(r.started.length, 4);
  });

  test('nothing is fetched for a config, another repository, an image list, a one-layer image, or an image not served', async () => {
    const image = layers('b', 3);
    const config = digestOf('b-config');
    const r = rig();
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image, { config }));
    r.prefetch.layerRequested(req, blob(config));
    r.prefetch.layerRequested(req, blob(image[0]!, 'team/other'));
    const listed = layers('c', 3);
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(listed, { mediaType: OCI_INDEX }));
    r.prefetch.layerRequested(req, blob(listed[0]!));
    const single = layers('d', 1);
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(single));
    r.prefetch.layerRequested(req, blob(single[0]!));
    r.prefetch.layerRequested(req, blob(layers('never-served', 1)[0]!));
    assert.deepEqual(r.started, []);
  });

  test('a layer cached or in flight is passed over, when queued and when its turn comes', async () => {
    const image = layers('e', 5);
    const r = rig(new Set([image[1]!]));
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image));
    r.prefetch.layerRequested(req, blob(image[0]!));
    assert.deepEqual(r.started, [image[2], image[3]]);
    r.taken.add(image[4]!); // a client started its fill meanwhile
    await r.finish(image[2]!);
    assert.deepEqual(r.started, [image[2], image[3]], 'the taken layer was skipped at its turn');
  });

  test('a layer shared by two images leads to the image served last', () => {
    const base = digestOf('base');
    const [oldImage, newImage] = [[base, ...layers('old', 2)], [base, ...layers('new', 2)]];
    const r = rig();
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(oldImage));
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(newImage));
    r.prefetch.layerRequested(req, blob(base));
    assert.deepEqual(r.started, newImage.slice(1));
    // Served again after the other, and again (a hot tag): the shared layer leads back to it.
    const again = rig();
    for (const image of [oldImage, newImage, oldImage, oldImage]) again.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image));
    again.prefetch.layerRequested(req, blob(base));
    assert.deepEqual(again.started, oldImage.slice(1));
  });

  test('a fill ahead that fails is logged, and the queue goes on', async () => {
    const image = layers('f', 4);
    const r = rig();
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image));
    r.prefetch.layerRequested(req, blob(image[0]!));
    await r.fail(image[1]!);
    assert.deepEqual(r.warnings, ['a layer fetched ahead of the client failed']);
    assert.deepEqual(r.started, [image[1], image[2], image[3]]);
  });

  test('stop(), when the proxy drains: the queued layers are dropped and nothing more is queued', async () => {
    const image = layers('g', 6);
    const r = rig();
    r.prefetch.manifestServed(REGISTRY, 'team/app', manifest(image));
    r.prefetch.layerRequested(req, blob(image[0]!));
    assert.deepEqual(r.started, [image[1], image[2]]);
    r.prefetch.stop();
    await r.finish(image[1]!);
    await r.finish(image[2]!);
    r.prefetch.layerRequested(req, blob(image[3]!));
    assert.deepEqual(r.started, [image[1], image[2]]);
  });
});
