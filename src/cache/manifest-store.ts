// The manifest cache, in LMDB. Bodies are kept by digest, exactly as received (bytes, type), per
// registry and repository. A tag is kept once per registry, repository and tag, whatever client asked:
// it holds the variants upstream gave (one per media type, usually one), each with the Accept set that
// fetched it and the time upstream last confirmed it. A client is served a variant its Accept admits,
// so docker, containerd and podman share one entry. A digest never expires; a tag is fresh for its TTL
// tier and then revalidated.
import type { Database, RootDatabase } from 'lmdb';
import type { Access } from './blob-store.ts';

export interface StoredManifest {
  body: Buffer;
  mediaType: string;
  digest: string;
  storedAt: number;
  access: Access;
}

export interface TagEntry {
  /** The normalised Accept set of the request that fetched this variant. */
  accept: string;
  digest: string;
  mediaType: string;
  size: number;
  /** When upstream last confirmed that the tag points at this digest (GET or HEAD). */
  validatedAt: number;
  access: Access;
}

export class ManifestStore {
  private readonly bodies: Database<StoredManifest, string>;
  private readonly tags: Database<TagEntry[], string>;
  /** The largest tags as last counted, patched as tags are stored and dropped. */
  private largest = new Largest();
  /** The count of every tag under way, slice by slice: where it is, and what it found so far. */
  private recount: { after: string | undefined; largest: Largest } | undefined;
  private recountTimer: NodeJS.Timeout | undefined;
  /** Something changed that a patch cannot account for: another count is due. */
  private recountDue = false;
  private lastRecountAt = -Infinity;
  /**
   * Platform manifests named by the indexes of tags stored lately ("<registry>/<repository>@<digest>" →
   * those tags), so that such a tag's size grows as its platform manifests arrive: a client fetches
   * them by digest right after the index.
   */
  private readonly awaitedPlatforms = new Map<string, Set<string>>();

  constructor(index: RootDatabase) {
    // Cached (lmdb's weak-reference LRU, kept coherent with this process's writes: only the primary
    // thread opens these): a tag resolved over and over is decoded once, not at every request. What a
    // get returns is shared, so it is never modified in place (a change is a new object, put).
    this.bodies = index.openDB<StoredManifest, string>({ name: 'manifests', encoding: 'msgpack', cache: true });
    // 'tags' held one entry per Accept set; these keys hold every variant of a tag.
    this.tags = index.openDB<TagEntry[], string>({ name: 'tag-variants', encoding: 'msgpack', cache: true });
    this.recountSoon();
  }

  body(registry: string, repository: string, digest: string): StoredManifest | undefined {
    return this.bodies.get(`${registry}/${repository}@${digest}`);
  }

  /** The variant of a tag to serve to a client with this (normalised) Accept, if one is cached. */
  tag(registry: string, repository: string, tag: string, accept: string): TagEntry | undefined {
    return chooseVariant(this.tags.get(tagKey(registry, repository, tag)) ?? [], accept);
  }

  async putBody(registry: string, repository: string, manifest: StoredManifest): Promise<void> {
    const key = `${registry}/${repository}@${manifest.digest}`;
    await this.bodies.put(key, manifest);
    const tags = this.awaitedPlatforms.get(key);
    if (tags) {
      this.awaitedPlatforms.delete(key);
      for (const tag of tags) this.countTag(tag);
    } else if (!INDEX_TYPES.has(baseMediaType(manifest.mediaType))) {
      // It may be the platform manifest of an index some tag holds, which it makes larger: counted again, later.
      this.recountSoon();
    }
  }

  /** Records what upstream said the tag is for this variant's media type (replacing the one it had). */
  async putTag(registry: string, repository: string, tag: string, entry: TagEntry): Promise<void> {
    const key = tagKey(registry, repository, tag);
    await this.tags.transaction(() => {
      const others = (this.tags.get(key) ?? []).filter((v) => v.mediaType !== entry.mediaType && v.accept !== entry.accept);
      return this.tags.put(key, [entry, ...others].slice(0, MAX_VARIANTS));
    });
    this.countTag(key, entry.digest);
  }

  /** A cached object turned out to be readable anonymously: every copy of it is labelled public. */
  async markPublic(registry: string, repository: string, digest: string, tag?: string): Promise<void> {
    const bodyKey = `${registry}/${repository}@${digest}`;
    await this.bodies.transaction(() => {
      const stored = this.bodies.get(bodyKey);
      if (stored && stored.access !== 'anonymous') this.bodies.put(bodyKey, { ...stored, access: 'anonymous' });
      if (tag === undefined) return;
      const key = tagKey(registry, repository, tag);
      const variants = this.tags.get(key);
      if (variants?.some((v) => v.digest === digest && v.access !== 'anonymous')) {
        this.tags.put(key, variants.map((v) => (v.digest === digest ? { ...v, access: 'anonymous' as const } : v)));
      }
    });
  }

  /** Whether any manifest of this registry is cached: then a failing upstream still leaves something to serve. */
  holdsAny(registry: string): boolean {
    // '0' sorts right after '/': the range is exactly the keys under "<registry>/".
    for (const _ of this.bodies.getKeys({ start: `${registry}/`, end: `${registry}0`, limit: 1 })) return true;
    return false;
  }

  /**
   * The cached tags with the most bytes behind them: the layers and config their manifest names, or
   * for an index the sum over the platform manifests that are cached too. Served from a snapshot, never
   * by reading the cache (a request must not do work that grows with it: 20,000 tags took 0.5–0.9 s):
   * each tag stored or dropped patches it at once, and a count of every tag, in slices of a few
   * milliseconds off the request path, finds what patches cannot (a tag that shrank out of the top, the
   * platform manifests of an index arriving long after it), at most every RECOUNT_INTERVAL_MS.
   */
  largestImages(limit: number): ImageSize[] {
    return this.largest.top(limit);
  }

  /** Counts one tag's bytes into the snapshot (and into the count under way). */
  private countTag(key: string, digest?: string): void {
    try {
      const variant = digest ?? this.tags.get(key)?.[0]?.digest;
      if (variant === undefined) return;
      const bytes = this.bytesBehind(key.slice(0, key.lastIndexOf(':')), variant, 0, key);
      this.largest.offer(key, bytes);
      this.recount?.largest.offer(key, bytes);
    } catch {
      // The index closed under us (the proxy stopping), or a body that cannot be read: the count finds it.
    }
  }

  /** Drops tags from the snapshot (and from the count under way); the next count fills the gap. */
  private uncount(matches: (key: string) => boolean): void {
    this.largest.drop(matches);
    this.recount?.largest.drop(matches);
    this.recountSoon();
  }

  private recountSoon(): void {
    this.recountDue = true;
    if (this.recount || this.recountTimer) return; // the count under way starts another when it ends
    const wait = Math.max(0, this.lastRecountAt + RECOUNT_INTERVAL_MS - Date.now());
    this.recountTimer = setTimeout(() => {
      this.recountTimer = undefined;
      this.recountDue = false;
      this.lastRecountAt = Date.now();
      this.recount = { after: undefined, largest: new Largest() };
      this.recountSlice();
    }, wait).unref();
  }

  /** Counts tags for RECOUNT_SLICE_MS, then yields to the event loop; publishes the count when done. */
  private recountSlice(): void {
    const recount = this.recount!;
    const deadline = performance.now() + RECOUNT_SLICE_MS;
    let finished = true;
    try {
      // No read transaction is held between slices: each slice reads from where the last one ended.
      for (const { key, value } of this.tags.getRange(recount.after === undefined ? {} : { start: recount.after })) {
        if (key === recount.after) continue;
        recount.after = key;
        const variant = value[0];
        if (variant) recount.largest.offer(key, this.bytesBehind(key.slice(0, key.lastIndexOf(':')), variant.digest, 0));
        if (performance.now() > deadline) {
          finished = false;
          break;
        }
      }
    } catch {
      // The index closed (the proxy stopping): nothing left to count for.
      this.recount = undefined;
      return;
    }
    if (!finished) {
      setImmediate(() => this.recountSlice()).unref();
      return;
    }
    this.largest = recount.largest;
    this.recount = undefined;
    if (this.recountDue) this.recountSoon();
  }

  /** `tag`: the tag whose index this is, to count again as its platform manifests arrive. */
  private bytesBehind(repositoryKey: string, digest: string, depth: number, tag?: string): number {
    const stored = this.bodies.get(`${repositoryKey}@${digest}`);
    if (!stored || depth > 1) {
      if (!stored && depth === 1 && tag !== undefined) this.awaitPlatform(`${repositoryKey}@${digest}`, tag);
      return 0;
    }
    let manifest: { manifests?: Array<{ digest: string }>; config?: { size?: number }; layers?: Array<{ size?: number }> };
    try {
      manifest = JSON.parse(stored.body.toString('utf8'));
    } catch {
      return 0;
    }
    if (manifest.manifests) return manifest.manifests.reduce((sum, m) => sum + this.bytesBehind(repositoryKey, m.digest, depth + 1, tag), 0);
    return (manifest.config?.size ?? 0) + (manifest.layers ?? []).reduce((sum, l) => sum + (l.size ?? 0), 0);
  }

  private awaitPlatform(bodyKey: string, tag: string): void {
    const tags = this.awaitedPlatforms.get(bodyKey) ?? new Set();
    this.awaitedPlatforms.delete(bodyKey);
    this.awaitedPlatforms.set(bodyKey, tags.add(tag));
    if (tags.size > MAX_TAGS_PER_PLATFORM) tags.delete(tags.values().next().value!);
    if (this.awaitedPlatforms.size > MAX_AWAITED_PLATFORMS) this.awaitedPlatforms.delete(this.awaitedPlatforms.keys().next().value!);
  }

  /**
   * Every manifest and tag of a registry, or of one repository of it (for purge): "team/app" is not
   * "team/app/sub", a repository of its own.
   */
  async purge(registry: string, repository?: string): Promise<ManifestPurge> {
    const prefix = repository === undefined ? `${registry}/` : `${registry}/${repository}`;
    const matches = (key: string) => repository === undefined || key.startsWith(`${prefix}@`) || key.startsWith(`${prefix}:`);
    const bodies = [...this.bodies.getKeys({ start: prefix, end: `${prefix}\xff` })].filter(matches);
    const tags = [...this.tags.getKeys({ start: prefix, end: `${prefix}\xff` })].filter(matches);
    await Promise.all([...bodies.map((k) => this.bodies.remove(k)), ...tags.map((k) => this.tags.remove(k))]);
    this.uncount((key) => key.startsWith(prefix) && matches(key));
    return { manifests: bodies.length, tags: tags.length };
  }

  /** Every variant of a tag: after a push, the next pull must ask upstream. */
  async forgetTag(registry: string, repository: string, tag: string): Promise<void> {
    const key = tagKey(registry, repository, tag);
    await this.tags.remove(key);
    this.uncount((k) => k === key);
  }
}

/** How many of the largest tags the snapshot keeps: more than the dashboard shows, so a purge leaves the next ones. */
const LARGEST_KEPT = 32;
/** A slice of the count of every tag takes about this long (~100 tags); then the event loop gets its turn. */
const RECOUNT_SLICE_MS = 4;
/** A count of every tag starts at most this often, and only after a change a patch cannot account for. */
const RECOUNT_INTERVAL_MS = 30_000;
/** Bounds on the platform manifests awaited for the indexes of recent tags. */
const MAX_AWAITED_PLATFORMS = 4096;
const MAX_TAGS_PER_PLATFORM = 64;

/** The largest tags by bytes (then by name), at most LARGEST_KEPT. */
class Largest {
  private readonly entries: Array<{ key: string; bytes: number }> = [];

  offer(key: string, bytes: number): void {
    const known = this.entries.findIndex((e) => e.key === key);
    if (known >= 0) this.entries.splice(known, 1);
    let at = this.entries.findIndex((e) => e.bytes < bytes || (e.bytes === bytes && e.key > key));
    if (at < 0) at = this.entries.length;
    if (at >= LARGEST_KEPT) return;
    this.entries.splice(at, 0, { key, bytes });
    if (this.entries.length > LARGEST_KEPT) this.entries.pop();
  }

  drop(matches: (key: string) => boolean): void {
    for (let i = this.entries.length - 1; i >= 0; i--) if (matches(this.entries[i]!.key)) this.entries.splice(i, 1);
  }

  top(limit: number): ImageSize[] {
    return this.entries.slice(0, limit).map(({ key, bytes }) => ({ image: key.replace(/:443\//, '/'), bytes }));
  }
}

export interface ImageSize {
  image: string;
  bytes: number;
}

export interface ManifestPurge {
  manifests: number;
  tags: number;
}

/** A tag rarely has more than one variant (an old client that refuses the type upstream prefers). */
const MAX_VARIANTS = 4;

function tagKey(registry: string, repository: string, tag: string): string {
  return `${registry}/${repository}:${tag}`;
}

/** Manifest lists and indexes: what a registry answers first to a client that accepts them. */
const INDEX_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);

/**
 * Which variant upstream would have given this client: the one fetched with the very same Accept set;
 * else one whose type the client accepts, an index first (a registry prefers it when it is accepted),
 * then the most recently confirmed. A client that names no type gets only what was fetched for such a
 * client (a registry may convert for it).
 */
export function chooseVariant(variants: readonly TagEntry[], accept: string): TagEntry | undefined {
  const exact = variants.find((v) => v.accept === accept);
  if (exact || accept === '') return exact;
  const accepted = new Set(accept.split(','));
  if (accepted.has('*/*')) return variants.find((v) => INDEX_TYPES.has(v.mediaType)) ?? variants[0];
  const admitted = variants.filter((v) => accepted.has(baseMediaType(v.mediaType)));
  return admitted.find((v) => INDEX_TYPES.has(v.mediaType)) ?? admitted.sort((a, b) => b.validatedAt - a.validatedAt)[0];
}

/**
 * The Accept header as a set: media types without parameters, lower-cased, sorted, deduplicated, so
 * that clients listing the same types in another order share an entry while a client that accepts
 * other types (and may get another body from the registry) does not. A type with q=0 is one the
 * client refuses (RFC 9110 §12.4.2), so it is not in the set.
 */
export function normaliseAccept(header: string | string[] | undefined): string {
  const values = Array.isArray(header) ? header.join(',') : (header ?? '');
  // Clients send the same few Accept headers over and over (a tag resolved at 2,000 requests/s).
  const known = normalisedAccepts.get(values);
  if (known !== undefined) return known;
  const normalised = parseAccept(values);
  if (values.length <= MAX_REMEMBERED_ACCEPT_LENGTH) {
    if (normalisedAccepts.size >= MAX_REMEMBERED_ACCEPTS) normalisedAccepts.delete(normalisedAccepts.keys().next().value!);
    normalisedAccepts.set(values, normalised);
  }
  return normalised;
}

/** A media type without its parameters, lower case: what an Accept entry or a type set names. */
export function baseMediaType(mediaType: string): string {
  return mediaType.split(';')[0]!.trim().toLowerCase();
}

/** Accept headers already normalised, at most this many, each at most this long (the map is bounded). */
const MAX_REMEMBERED_ACCEPTS = 256;
const MAX_REMEMBERED_ACCEPT_LENGTH = 2048;
const normalisedAccepts = new Map<string, string>();

function parseAccept(values: string): string {
  const types = values
    .split(',')
    .map((part) => part.split(';').map((piece) => piece.trim()))
    .filter(([type, ...params]) => type && !params.some((param) => /^q\s*=\s*0(?:\.0{0,3})?$/i.test(param)))
    .map(([type]) => type!.toLowerCase());
  return [...new Set(types)].sort().join(',');
}
