// The registry-mirror front (mirror: in proxy.yaml): where it listens, whether it speaks TLS, and
// which registry a request that names none goes to (dockerd's registry-mirrors only ever mean Docker
// Hub). Off when absent.
import { registryKey, type Listen, type Policy } from './policy.ts';
import type { Cursor } from './yaml-cursor.ts';

export interface MirrorPolicy {
  listen: Listen;
  /**
   * HTTPS, absent: plain HTTP (common inside a cluster). `names`: what clients call the mirror (its
   * certificate's names, from the proxy's CA); `certFile`/`keyFile`: the operator's own certificate
   * instead, read when the mirror starts.
   */
  tls?: { names: string[]; certFile?: string; keyFile?: string };
  /** Registry key for requests that name no registry (dockerd's registry-mirrors): Docker Hub by default. */
  defaultRegistry?: string;
}

export const DOCKER_HUB_KEY = 'registry-1.docker.io:443';

export function parseMirror(cursor: Cursor, policy: Policy, resolvePath: (p: string) => string, parseListen: (text: string, fail: (message: string) => never) => Listen): MirrorPolicy {
  const fields = cursor.entries(['listen', 'tls', 'default']);
  const tls = fields.get('tls');
  // Unknown keys anywhere are reported before what is missing.
  const t = tls?.present ? tls.entries(['names', 'cert', 'key']) : undefined;
  const listenCursor = fields.get('listen');
  if (!listenCursor?.present) return cursor.fail('needs listen (for example 0.0.0.0:5000)');
  const mirror: MirrorPolicy = { listen: parseListen(listenCursor.string(), (m) => listenCursor.fail(m)) };
  if (tls?.present && t) {
    const names = t.get('names')?.present ? t.get('names')!.stringList().map((n) => n.toLowerCase()) : [];
    const cert = t.get('cert');
    const key = t.get('key');
    if (Boolean(cert?.present) !== Boolean(key?.present)) tls.fail('give cert and key together (your own certificate), or neither (one from the proxy\'s CA for names)');
    if (!cert?.present && names.length === 0) tls.fail('needs names (a certificate from the proxy\'s CA for them), or cert and key');
    mirror.tls = { names, ...(cert?.present && key?.present ? { certFile: resolvePath(cert.string()), keyFile: resolvePath(key.string()) } : {}) };
  }
  const defaultCursor = fields.get('default');
  if (defaultCursor?.present) {
    const text = defaultCursor.string().toLowerCase();
    const key = mirrorRegistryKey(text);
    if (!policy.registries.has(key)) defaultCursor.fail(`${text} is not a registry of this policy (add it under registries:)`);
    mirror.defaultRegistry = key;
  } else if (policy.registries.has(DOCKER_HUB_KEY)) {
    mirror.defaultRegistry = DOCKER_HUB_KEY;
  }
  return mirror;
}

/** "ghcr.io", "registry.example.com:5443", "docker.io" (Docker Hub's other names) → the policy's key. */
export function mirrorRegistryKey(name: string): string {
  const lower = name.toLowerCase();
  if (lower === 'docker.io' || lower === 'index.docker.io' || lower === 'registry-1.docker.io') return DOCKER_HUB_KEY;
  const match = /^(\[[0-9a-f:.]+\]|[^:[\]]+)(?::(\d{1,5}))?$/.exec(lower);
  if (!match) return lower;
  return registryKey(match[1]!, Number(match[2] ?? 443));
}
