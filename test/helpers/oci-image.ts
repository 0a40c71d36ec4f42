// Real OCI images built on disk without any network: an OCI image layout (oci-layout, index.json,
// blobs/sha256/...) whose layers are genuine uncompressed tars made by the system tar, so skopeo,
// podman or containerd could unpack them. Large layers (randomBytes) are streamed, never held in memory.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { makeTempDir, removeTempDir, requireTool, run } from './process.ts';

export const MEDIA_TYPES = {
  layout: '1.0.0',
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layer: 'application/vnd.oci.image.layer.v1.tar',
} as const;

const REF_NAME = 'org.opencontainers.image.ref.name';

export type Architecture = 'amd64' | 'arm64';

export interface LayerSpec {
  /** Files by path inside the layer ('etc/motd', 'usr/share/x/y.txt'). */
  files?: Record<string, string | Buffer>;
  /** Size of an extra file of random bytes ('random-<n>.bin'), e.g. 64 MiB for a large layer. */
  randomBytes?: number;
}

export interface ImageSpec {
  layers: LayerSpec[];
  architecture?: Architecture;
  /** Ref name in index.json (what skopeo's oci:<dir>:<tag> selects); default 'latest'. */
  tag?: string;
  /** Config labels: a cheap way to make a new image with otherwise identical content. */
  labels?: Record<string, string>;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os: string; architecture: string; variant?: string };
}

export interface BuiltImage {
  layoutDir: string;
  manifestDigest: string;
  /** Size of the manifest in bytes. */
  manifestSize: number;
  configDigest: string;
  layerDigests: string[];
  architecture: Architecture;
  /** Every blob this image put in the layout (layers, config, manifest): digest -> size. */
  blobs: Map<string, number>;
}

export interface MultiArchSpec {
  /** Layers for each platform; each platform's last layer also gets a file naming its architecture. */
  layers: LayerSpec[];
  architectures?: Architecture[];
  tag?: string;
  labels?: Record<string, string>;
}

export interface BuiltIndex {
  layoutDir: string;
  indexDigest: string;
  indexSize: number;
  images: BuiltImage[];
  /** Every blob written (index, manifests, configs, layers): digest -> size. */
  blobs: Map<string, number>;
}

/**
 * Builds a single-platform image into the OCI layout at layoutDir (created if needed; an existing
 * layout keeps its other tags, so several images can share one layout).
 */
export async function buildOciImage(layoutDir: string, spec: ImageSpec): Promise<BuiltImage> {
  await initLayout(layoutDir);
  const image = await writeImage(layoutDir, spec.layers, spec.architecture ?? 'amd64', spec.labels ?? {});
  await setRef(layoutDir, spec.tag ?? 'latest', {
    mediaType: MEDIA_TYPES.manifest,
    digest: image.manifestDigest,
    size: image.manifestSize,
  });
  return image;
}

/** Builds one image per architecture (default amd64 + arm64) and an image index tagged in the layout. */
export async function buildMultiArchIndex(layoutDir: string, spec: MultiArchSpec): Promise<BuiltIndex> {
  await initLayout(layoutDir);
  const images: BuiltImage[] = [];
  for (const architecture of spec.architectures ?? (['amd64', 'arm64'] as const)) {
    images.push(await writeImage(layoutDir, withArchMarker(spec.layers, architecture), architecture, spec.labels ?? {}));
  }
  const index = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.index,
    manifests: images.map((img) => ({
      mediaType: MEDIA_TYPES.manifest,
      digest: img.manifestDigest,
      size: img.manifestSize,
      platform: platformOf(img.architecture),
    })),
  };
  const indexBlob = await writeJsonBlob(layoutDir, index);
  await setRef(layoutDir, spec.tag ?? 'latest', { mediaType: MEDIA_TYPES.index, ...indexBlob });
  const blobs = new Map<string, number>([[indexBlob.digest, indexBlob.size]]);
  for (const img of images) for (const [digest, size] of img.blobs) blobs.set(digest, size);
  return { layoutDir, indexDigest: indexBlob.digest, indexSize: indexBlob.size, images, blobs };
}

/** sha256 digest ('sha256:<hex>') of a file, streamed. */
export async function digestFile(path: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(path), hash);
  return `sha256:${hash.digest('hex')}`;
}

export function digestBytes(bytes: Buffer | string): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/** Path of a blob inside an OCI layout. */
export function blobPath(layoutDir: string, digest: string): string {
  const [algorithm, hex] = digest.split(':');
  if (!algorithm || !hex) throw new Error(`not a digest: ${digest}`);
  return join(layoutDir, 'blobs', algorithm, hex);
}

async function writeImage(
  layoutDir: string,
  layers: LayerSpec[],
  architecture: Architecture,
  labels: Record<string, string>,
): Promise<BuiltImage> {
  const blobs = new Map<string, number>();
  const layerDescriptors: Descriptor[] = [];
  for (const [index, layer] of layers.entries()) {
    const { digest, size } = await writeLayer(layoutDir, layer, index);
    layerDescriptors.push({ mediaType: MEDIA_TYPES.layer, digest, size });
    blobs.set(digest, size);
  }
  const config = imageConfig(architecture, layerDescriptors.map((d) => d.digest), labels);
  const configBlob = await writeJsonBlob(layoutDir, config);
  blobs.set(configBlob.digest, configBlob.size);
  const manifest = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.manifest,
    config: { mediaType: MEDIA_TYPES.config, ...configBlob },
    layers: layerDescriptors,
  };
  const manifestBlob = await writeJsonBlob(layoutDir, manifest);
  blobs.set(manifestBlob.digest, manifestBlob.size);
  return {
    layoutDir,
    manifestDigest: manifestBlob.digest,
    manifestSize: manifestBlob.size,
    configDigest: configBlob.digest,
    layerDigests: layerDescriptors.map((d) => d.digest),
    architecture,
    blobs,
  };
}

// Layers are uncompressed, so each diff_id equals the layer's digest.
function imageConfig(architecture: Architecture, diffIds: string[], labels: Record<string, string>): unknown {
  return {
    created: '2024-01-01T00:00:00Z',
    ...platformOf(architecture),
    config: {
      Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
      Cmd: ['/bin/sh'],
      ...(Object.keys(labels).length > 0 ? { Labels: labels } : {}),
    },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: diffIds.map((_, i) => ({ created: '2024-01-01T00:00:00Z', created_by: `pullthrough test layer ${i}` })),
  };
}

function platformOf(architecture: Architecture): { os: string; architecture: string; variant?: string } {
  return architecture === 'arm64' ? { os: 'linux', architecture, variant: 'v8' } : { os: 'linux', architecture };
}

function withArchMarker(layers: LayerSpec[], architecture: Architecture): LayerSpec[] {
  const copy = layers.map((l) => ({ ...l, files: { ...l.files } }));
  const last = copy[copy.length - 1] ?? { files: {} };
  if (copy.length === 0) copy.push(last);
  last.files = { ...last.files, 'etc/pullthrough-arch': `${architecture}\n` };
  return copy;
}

/** Writes the layer's files into a temp dir, tars it straight into the layout and names it by digest. */
async function writeLayer(layoutDir: string, layer: LayerSpec, index: number): Promise<{ digest: string; size: number }> {
  requireTool('/usr/bin/tar', 'tar not installed: apt-get install tar');
  const rootDir = makeTempDir('layer');
  try {
    for (const [path, content] of Object.entries(layer.files ?? {})) {
      const target = join(rootDir, path);
      await mkdir(dirname(target), { recursive: true });
      await writeFile(target, content);
    }
    if (layer.randomBytes !== undefined) await writeRandomFile(join(rootDir, `random-${index}.bin`), layer.randomBytes);
    const tmpTar = join(layoutDir, 'blobs', 'sha256', `.tmp-layer-${randomBytes(6).toString('hex')}.tar`);
    await createTar(rootDir, tmpTar);
    return await moveIntoBlobs(layoutDir, tmpTar);
  } finally {
    removeTempDir(rootDir);
  }
}

// Fixed owner, mode base and mtime, sorted names: layers with the same files get the same digest.
// ustar avoids the pax atime/ctime headers that would make every build differ.
async function createTar(rootDir: string, tarFile: string): Promise<void> {
  const entries = (await readdir(rootDir)).sort();
  const members = entries.length > 0 ? ['--', ...entries] : ['--files-from=/dev/null'];
  const r = await run(
    '/usr/bin/tar',
    [
      '--create',
      '--format=ustar',
      '--sort=name',
      '--owner=0',
      '--group=0',
      '--numeric-owner',
      '--mtime=@1704067200',
      '--mode=go-w',
      `--file=${tarFile}`,
      `--directory=${rootDir}`,
      ...members,
    ],
    { timeoutMs: 120_000 },
  );
  if (r.code !== 0) throw new Error(`tar failed (${r.code}): ${r.stderr}`);
}

/** Streams `size` random bytes to a file in 1 MiB chunks. */
async function writeRandomFile(path: string, size: number): Promise<void> {
  const chunk = 1 << 20;
  async function* chunks(): AsyncGenerator<Buffer> {
    for (let left = size; left > 0; left -= chunk) yield randomBytes(Math.min(chunk, left));
  }
  await pipeline(chunks(), createWriteStream(path));
}

async function moveIntoBlobs(layoutDir: string, file: string): Promise<{ digest: string; size: number }> {
  const [digest, { size }] = await Promise.all([digestFile(file), stat(file)]);
  await rename(file, blobPath(layoutDir, digest));
  return { digest, size };
}

async function writeJsonBlob(layoutDir: string, value: unknown): Promise<{ digest: string; size: number }> {
  const bytes = Buffer.from(JSON.stringify(value));
  const digest = digestBytes(bytes);
  await writeFile(blobPath(layoutDir, digest), bytes);
  return { digest, size: bytes.length };
}

async function initLayout(layoutDir: string): Promise<void> {
  await mkdir(join(layoutDir, 'blobs', 'sha256'), { recursive: true });
  await writeFile(join(layoutDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: MEDIA_TYPES.layout }));
  if (!existsSync(join(layoutDir, 'index.json'))) {
    await writeFile(join(layoutDir, 'index.json'), JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPES.index, manifests: [] }));
  }
}

/** Points `tag` in index.json at the descriptor, replacing an older entry with the same ref name. */
async function setRef(layoutDir: string, tag: string, descriptor: Descriptor): Promise<void> {
  const indexFile = join(layoutDir, 'index.json');
  const index = JSON.parse(await readFile(indexFile, 'utf8')) as { manifests: Descriptor[] };
  index.manifests = index.manifests.filter((d) => d.annotations?.[REF_NAME] !== tag);
  index.manifests.push({ ...descriptor, annotations: { [REF_NAME]: tag } });
  await writeFile(indexFile, JSON.stringify(index));
}

/** Removes a layout made by these helpers. */
export async function removeLayout(layoutDir: string): Promise<void> {
  await rm(layoutDir, { recursive: true, force: true });
}
