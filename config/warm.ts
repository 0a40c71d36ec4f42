// The warm-up list (warm: in proxy.yaml): images the running proxy pulls through itself after it starts
// and every interval, so that they are in the cache before a client asks. Each image is read as
// `pullthrough warm` reads it; the platforms of a multi-platform image are the entry's own, else the
// list's, else all of them (Docker Hub counts a pull per platform fetched).
import { isMap } from 'yaml';
import { parseImageReference, type ImageReference } from '../src/commands/image-reference.ts';
import { mirrorRegistryKey } from './mirror.ts';
import { ConfigError, type Cursor } from './yaml-cursor.ts';
import type { Policy } from './policy.ts';

export interface WarmImage {
  /** As written (check-config prints it so). */
  image: string;
  ref: ImageReference;
  /** The policy's registry key the image is pulled from ("ghcr.io:443"). */
  registry: string;
  /** This entry's own platforms; absent: the list's. */
  platforms?: string[];
  /** file:line:column: warm.images[i], for the registry check made once the environment is applied. */
  where: string;
}

export interface WarmPolicy {
  /** Between the starts of two runs; 0: once, at start only. */
  intervalMs: number;
  /** From listening to the first run. */
  delayMs: number;
  /** "os/arch[/variant]" for entries that name none; empty: every platform. */
  platforms: string[];
  images: WarmImage[];
}

export const DEFAULT_WARM_INTERVAL_MS = 6 * 3_600_000;
export const DEFAULT_WARM_DELAY_MS = 10_000;

export function defaultWarm(): WarmPolicy {
  return { intervalMs: DEFAULT_WARM_INTERVAL_MS, delayMs: DEFAULT_WARM_DELAY_MS, platforms: [], images: [] };
}

const PLATFORM = /^[a-z0-9]+\/[a-z0-9_]+(?:\/[a-z0-9]+)?$/;

/** "linux/amd64", "linux/arm64/v8"; throws a message that says what is expected. */
export function parsePlatform(text: string): string {
  const platform = text.trim().toLowerCase();
  if (!PLATFORM.test(platform)) throw new Error(`"${text}" is not a platform: expected os/arch or os/arch/variant (examples: linux/amd64, linux/arm64, linux/arm/v7)`);
  return platform;
}

export function parseWarm(cursor: Cursor): WarmPolicy {
  const fields = cursor.entries(['interval', 'delay', 'platforms', 'images']);
  const warm = defaultWarm();
  const interval = fields.get('interval');
  if (interval?.present) warm.intervalMs = interval.durationMs();
  const delay = fields.get('delay');
  if (delay?.present) warm.delayMs = delay.durationMs();
  warm.platforms = platformList(fields.get('platforms'));
  for (const item of fields.get('images')?.items() ?? []) {
    // An entry is an image reference, or a mapping with the image and its own platforms.
    const entry = isMap(item.node) ? item.entries(['image', 'platforms']) : undefined;
    const imageCursor = entry ? entry.get('image') : item;
    if (!imageCursor?.present) return item.fail('needs image (for example alpine:3.20)');
    const image = imageCursor.string().trim();
    let ref: ImageReference;
    try {
      ref = parseImageReference(image);
    } catch (err) {
      return imageCursor.fail((err as Error).message);
    }
    const own = entry?.get('platforms');
    warm.images.push({
      image,
      ref,
      registry: mirrorRegistryKey(ref.registry),
      ...(own?.present ? { platforms: platformList(own) } : {}),
      where: `${imageCursor.where()}: ${imageCursor.path}`,
    });
  }
  return warm;
}

function platformList(cursor: Cursor | undefined): string[] {
  if (!cursor?.present) return [];
  return cursor.items().map((item) => {
    try {
      return parsePlatform(item.string());
    } catch (err) {
      return item.fail((err as Error).message);
    }
  });
}

/**
 * Every image's registry must be one the proxy intercepts (else its warm-up would pull past the
 * cache), over TLS. Checked once the seed's variables have added their registries.
 */
export function checkWarmRegistries(policy: Policy): void {
  for (const entry of policy.warm.images) {
    const registry = policy.registries.get(entry.registry);
    const name = entry.ref.registry === 'registry-1.docker.io' ? 'Docker Hub (registry-1.docker.io)' : entry.ref.registry;
    if (!registry) throw new ConfigError(`${entry.where}: ${name} is not a registry of this policy: add it under registries: to warm ${entry.image}`);
    if (registry.http) throw new ConfigError(`${entry.where}: ${entry.registry} is a plain-HTTP registry (http: true): the warm-up pulls over intercepted TLS only; leave ${entry.image} out`);
  }
}
