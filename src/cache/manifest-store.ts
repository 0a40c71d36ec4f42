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

  constructor(index: RootDatabase) {
    this.bodies = index.openDB<StoredManifest, string>({ name: 'manifests', encoding: 'msgpack' });
    // 'tags' held one entry per Accept set; these keys hold every variant of a tag.
    this.tags = index.openDB<TagEntry[], string>({ name: 'tag-variants', encoding: 'msgpack' });
  }

  body(registry: string, repository: string, digest: string): StoredManifest | undefined {
    return this.bodies.get(`${registry}/${repository}@${digest}`);
  }

  /** The variant of a tag to serve to a client with this (normalised) Accept, if one is cached. */
  tag(registry: string, repository: string, tag: string, accept: string): TagEntry | undefined {
    return chooseVariant(this.tags.get(tagKey(registry, repository, tag)) ?? [], accept);
  }

  async putBody(registry: string, repository: string, manifest: StoredManifest): Promise<void> {
    await this.bodies.put(`${registry}/${repository}@${manifest.digest}`, manifest);
  }

  /** Records what upstream said the tag is for this variant's media type (replacing the one it had). */
  async putTag(registry: string, repository: string, tag: string, entry: TagEntry): Promise<void> {
    const key = tagKey(registry, repository, tag);
    await this.tags.transaction(() => {
      const others = (this.tags.get(key) ?? []).filter((v) => v.mediaType !== entry.mediaType && v.accept !== entry.accept);
      return this.tags.put(key, [entry, ...others].slice(0, MAX_VARIANTS));
    });
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
   * for an index the sum over the platform manifests that are cached too.
   */
  largestImages(limit: number): ImageSize[] {
    const sizes = new Map<string, number>();
    for (const { key: name, value } of this.tags.getRange()) {
      const repositoryKey = name.slice(0, name.lastIndexOf(':'));
      const variant = value[0];
      if (variant) sizes.set(name, this.bytesBehind(repositoryKey, variant.digest, 0));
    }
    return [...sizes]
      .map(([image, bytes]) => ({ image: image.replace(/:443\//, '/'), bytes }))
      .sort((a, b) => b.bytes - a.bytes)
      .slice(0, limit);
  }

  private bytesBehind(repositoryKey: string, digest: string, depth: number): number {
    const stored = this.bodies.get(`${repositoryKey}@${digest}`);
    if (!stored || depth > 1) return 0;
    let manifest: { manifests?: Array<{ digest: string }>; config?: { size?: number }; layers?: Array<{ size?: number }> };
    try {
      manifest = JSON.parse(stored.body.toString('utf8'));
    } catch {
      return 0;
    }
    if (manifest.manifests) return manifest.manifests.reduce((sum, m) => sum + this.bytesBehind(repositoryKey, m.digest, depth + 1), 0);
    return (manifest.config?.size ?? 0) + (manifest.layers ?? []).reduce((sum, l) => sum + (l.size ?? 0), 0);
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
    return { manifests: bodies.length, tags: tags.length };
  }

  /** Every variant of a tag: after a push, the next pull must ask upstream. */
  async forgetTag(registry: string, repository: string, tag: string): Promise<void> {
    await this.tags.remove(tagKey(registry, repository, tag));
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
  const admitted = variants.filter((v) => accepted.has(v.mediaType.split(';')[0]!.trim().toLowerCase()));
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
  const types = values
    .split(',')
    .map((part) => part.split(';').map((piece) => piece.trim()))
    .filter(([type, ...params]) => type && !params.some((param) => /^q\s*=\s*0(?:\.0{0,3})?$/i.test(param)))
    .map(([type]) => type!.toLowerCase());
  return [...new Set(types)].sort().join(',');
}
