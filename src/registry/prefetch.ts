// Layer prefetch: once a client asks for a layer of an image whose manifest was served lately, the
// image's other layers that the cache lacks are filled ahead of the client's requests, a few at a time,
// on that client's credentials (its request, as its own requests for them would carry); its requests
// for them then join those fills or hit. A client that pulls one blob at a time (skopeo into a
// directory) or three (containerd, docker) otherwise waits for each fill in turn, and on a cold pull
// the fills of the next layers run while it is busy with this one instead of after.
//
// Triggered by a layer, not by the manifest: a scanner or `skopeo inspect` reads the manifest and the
// config blob, never a layer, and must not make the proxy download the image. Only layers of the same
// registry and repository are fetched ahead, and only in the policy's single-replica mode (a replica of
// a cluster would fill blobs that other replicas own).
import type { IncomingMessage } from 'node:http';
import { baseMediaType, type StoredManifest } from '../cache/manifest-store.ts';
import type { Logger } from '../log.ts';
import type { BlobRequest } from './blobs.ts';
import { parseDigest, type Digest } from './route.ts';

/** Fills started ahead and running at once (a client's own misses are not counted); the rest wait their turn. */
const CONCURRENCY = 2;
/** Layers waiting to be fetched ahead, at most: beyond, the client's own requests fetch them. */
const MAX_QUEUED = 256;
/** Images remembered (the latest served first kept): a manifest is parsed once while it is remembered. */
const MAX_IMAGES = 1024;
/** Layers of one image that are fetched ahead, at most. */
const MAX_LAYERS = 128;
const IMAGE_MANIFEST_TYPES = new Set(['application/vnd.oci.image.manifest.v1+json', 'application/vnd.docker.distribution.manifest.v2+json']);

/**
 * Starts the fill of a blob as the client's own request for it would (unless it is cached, in flight,
 * or the cache has no room) and resolves when that fill ended: src/registry/blobs.ts fillAheadWith.
 */
export type FillAhead = (req: IncomingMessage, blob: BlobRequest) => Promise<void>;

export class LayerPrefetch {
  /** Fills started ahead since start (pullthrough_prefetch_fills_total). */
  started = 0;
  private readonly fillAhead: FillAhead;
  private readonly taken: (digest: Digest) => boolean;
  private readonly log: Logger;
  /** "registry/repository@manifest digest" → that image's layers in order (none: not an image, or one layer), least recently served first. */
  private readonly images = new Map<string, readonly Digest[]>();
  /** "registry/repository@layer" → the image it was last served in (a key of `images`). */
  private readonly imageOfLayer = new Map<string, string>();
  /** The image served last (the last key of `images`). */
  private newest: string | undefined;
  private readonly queue: Array<{ req: IncomingMessage; blob: BlobRequest }> = [];
  private readonly queued = new Set<Digest>();
  private running = 0;
  /** The proxy is stopping: nothing more is started ahead. */
  private stopped = false;

  constructor(fillAhead: FillAhead, taken: (digest: Digest) => boolean, log: Logger) {
    this.fillAhead = fillAhead;
    this.taken = taken;
    this.log = log;
  }

  /**
   * A GET was answered with this manifest of registry/repository: its layers are remembered, not
   * fetched. A hot tag's manifest is parsed once, not per request.
   */
  manifestServed(registry: string, repository: string, manifest: StoredManifest): void {
    const image = `${registry}/${repository}@${manifest.digest}`;
    // A hot tag served again and again, with no other image since: its layers lead to it already.
    if (image === this.newest) return;
    this.newest = image;
    const known = this.images.get(image);
    this.images.delete(image); // re-inserted last: the least recently served are forgotten first
    const layers = known ?? layersOf(manifest);
    this.images.set(image, layers);
    // A layer shared by several images leads to the one served last.
    for (const layer of layers) this.imageOfLayer.set(`${registry}/${repository}@${layer}`, image);
    if (this.images.size <= MAX_IMAGES) return;
    const [oldest, forgotten] = this.images.entries().next().value!;
    this.images.delete(oldest);
    const prefix = oldest.slice(0, oldest.lastIndexOf('@') + 1);
    for (const layer of forgotten) {
      if (this.imageOfLayer.get(prefix + layer) === oldest) this.imageOfLayer.delete(prefix + layer);
    }
  }

  /**
   * A client asked for this blob (GET): when it is a layer of an image served lately, that image's other
   * layers are queued, the ones after it first (the order clients ask in). Never waits, never throws.
   */
  layerRequested(req: IncomingMessage, blob: BlobRequest): void {
    if (this.stopped) return;
    const image = this.imageOfLayer.get(`${blob.registry.key}/${blob.name}@${blob.digest}`);
    const layers = image === undefined ? undefined : this.images.get(image);
    if (!layers) return;
    const at = layers.indexOf(blob.digest);
    for (const digest of [...layers.slice(at + 1), ...layers.slice(0, at)]) {
      if (this.queue.length >= MAX_QUEUED) break;
      if (this.queued.has(digest) || this.taken(digest)) continue;
      this.queued.add(digest);
      this.queue.push({ req, blob: { ...blob, digest } });
    }
    this.next();
  }

  /**
   * The proxy drains: the layers still queued are dropped and none is queued any more. Fills already
   * running go on (a client may be joined to them) until the proxy closes.
   */
  stop(): void {
    this.stopped = true;
    this.queue.length = 0;
    this.queued.clear();
  }

  private next(): void {
    while (this.running < CONCURRENCY && this.queue.length > 0) {
      const { req, blob } = this.queue.shift()!;
      this.queued.delete(blob.digest);
      // Looked at again when its turn comes: the client may have asked for it meanwhile.
      if (this.taken(blob.digest)) continue;
      this.running++;
      this.started++;
      this.fillAhead(req, blob)
        .catch((err: Error) => this.log.warn('a layer fetched ahead of the client failed', { digest: blob.digest, registry: blob.registry.key, repository: blob.name, error: err.message }))
        .finally(() => {
          this.running--;
          this.next();
        });
    }
  }
}

/**
 * The layers an image manifest names, in order: none for an index (which platform a client takes is
 * its own choice), for anything that does not parse, and for foreign layers (`urls`: not served by the
 * registry); none either for an image of one layer (nothing else to fetch once it is asked for). The
 * config blob is not a layer: reading it does not start a pull.
 */
function layersOf(manifest: StoredManifest): Digest[] {
  if (!IMAGE_MANIFEST_TYPES.has(baseMediaType(manifest.mediaType))) return [];
  let parsed: { layers?: unknown };
  try {
    parsed = JSON.parse(manifest.body.toString('utf8')) as { layers?: unknown };
  } catch {
    return [];
  }
  if (!Array.isArray(parsed.layers)) return [];
  const layers: Digest[] = [];
  for (const descriptor of parsed.layers as Array<{ digest?: unknown; urls?: unknown } | null>) {
    if (!descriptor || typeof descriptor.digest !== 'string' || descriptor.urls !== undefined) continue;
    const digest = parseDigest(descriptor.digest);
    if (digest && !layers.includes(digest)) layers.push(digest);
    if (layers.length >= MAX_LAYERS) break;
  }
  return layers.length > 1 ? layers : [];
}
