// The manifest cache, in LMDB. Bodies are kept by digest, exactly as received (bytes, type), per
// registry and repository; tags point at a digest per normalised Accept set, with the time upstream
// last confirmed them. A digest never expires; a tag is fresh for its TTL tier and then revalidated.
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
  digest: string;
  mediaType: string;
  size: number;
  /** When upstream last confirmed that the tag points at this digest (GET or HEAD). */
  validatedAt: number;
  access: Access;
}

export class ManifestStore {
  private readonly bodies: Database<StoredManifest, string>;
  private readonly tags: Database<TagEntry, string>;

  constructor(index: RootDatabase) {
    this.bodies = index.openDB<StoredManifest, string>({ name: 'manifests', encoding: 'msgpack' });
    this.tags = index.openDB<TagEntry, string>({ name: 'tags', encoding: 'msgpack' });
  }

  body(registry: string, repository: string, digest: string): StoredManifest | undefined {
    return this.bodies.get(`${registry}/${repository}@${digest}`);
  }

  tag(registry: string, repository: string, tag: string, accept: string): TagEntry | undefined {
    return this.tags.get(tagKey(registry, repository, tag, accept));
  }

  async putBody(registry: string, repository: string, manifest: StoredManifest): Promise<void> {
    await this.bodies.put(`${registry}/${repository}@${manifest.digest}`, manifest);
  }

  async putTag(registry: string, repository: string, tag: string, accept: string, entry: TagEntry): Promise<void> {
    await this.tags.put(tagKey(registry, repository, tag, accept), entry);
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
    for (const { key, value } of this.tags.getRange()) {
      const at = key.lastIndexOf('|');
      const name = key.slice(0, at);
      const repositoryKey = name.slice(0, name.lastIndexOf(':'));
      if (!sizes.has(name)) sizes.set(name, this.bytesBehind(repositoryKey, value.digest, 0));
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

  /** Every Accept variant of a tag: after a push, the next pull must ask upstream. */
  async forgetTag(registry: string, repository: string, tag: string): Promise<void> {
    const prefix = `${registry}/${repository}:${tag}|`;
    // Keys first, then the removals: no read snapshot held open across the writes. '}' sorts after
    // '|', so the range holds exactly this tag's keys.
    const keys = [...this.tags.getKeys({ start: prefix, end: `${registry}/${repository}:${tag}}` })];
    await Promise.all(keys.map((key) => this.tags.remove(key)));
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

function tagKey(registry: string, repository: string, tag: string, accept: string): string {
  return `${registry}/${repository}:${tag}|${accept}`;
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
