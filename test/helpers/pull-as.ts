// One image pull by one kind of real client through a proxy, as the end-to-end tests compare them:
// skopeo (into a directory, every blob hashed against its name), podman, or containerd's ctr (the
// kubelet's path: HEAD the tag, then GET by digest; containerd verifies every blob before it commits it).
import { ctrUnavailable, startContainerd, type ContainerdHandle } from './ctr.ts';
import { podmanPullThroughProxy, podmanUnavailable } from './podman.ts';
import { makeTempDir, removeTempDir } from './process.ts';
import { skopeoCopyThroughProxy, verifyDirCopy } from './skopeo.ts';

export type ClientKind = 'skopeo' | 'podman' | 'ctr';

/** The kinds this machine can run (podman and ctr need their packages and privileges). */
export const CLIENT_KINDS: ClientKind[] = (['skopeo', 'podman', 'ctr'] as const).filter((kind) => (kind === 'podman' ? !podmanUnavailable() : kind === 'ctr' ? !ctrUnavailable() : true));

export interface Pulled {
  ok: boolean;
  /** The manifest digest the client stored. */
  digest?: string;
  detail: string;
}

export interface PullOptions {
  proxyUrl: string;
  /** The only CA the client trusts. */
  caFile: string;
  credentials?: { username: string; password: string };
  timeoutMs: number;
  /** ctr: this containerd (kept running); otherwise one of its own, stopped after the pull. */
  containerd?: ContainerdHandle;
}

export async function pullAs(kind: ClientKind, ref: string, options: PullOptions): Promise<Pulled> {
  const common = { image: ref, proxyUrl: options.proxyUrl, caFile: options.caFile, timeoutMs: options.timeoutMs, ...(options.credentials ? { credentials: options.credentials } : {}) };
  if (kind === 'skopeo') {
    const destDir = makeTempDir('pull-skopeo');
    try {
      const result = await skopeoCopyThroughProxy({ ...common, destDir });
      if (result.code !== 0) return { ok: false, detail: result.stderr };
      return { ok: true, digest: (await verifyDirCopy(destDir)).manifestDigest, detail: '' };
    } finally {
      removeTempDir(destDir);
    }
  }
  if (kind === 'podman') {
    const result = await podmanPullThroughProxy(common);
    return result.code === 0 && result.image ? { ok: true, digest: result.image.digest, detail: '' } : { ok: false, detail: result.stderr };
  }
  const daemon = options.containerd ?? (await startContainerd());
  try {
    const result = await daemon.pull(common);
    if (result.code !== 0) return { ok: false, detail: `${result.stderr}\n${result.stdout.slice(-2000)}` };
    const stored = (await daemon.images()).find((i) => i.ref === ref);
    return { ok: true, ...(stored ? { digest: stored.digest } : {}), detail: '' };
  } finally {
    if (!options.containerd) await daemon.stop();
  }
}
