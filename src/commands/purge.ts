// `pullthrough purge`: asks the running proxy to drop cached content (POST /admin/purge), with the
// admin token when one is configured. The token goes into the Authorization header only: it is never
// printed, and an error message never repeats it.
import { request } from 'undici';
import { readAdminTokenFile } from '../../config/load.ts';
import type { Policy } from '../../config/policy.ts';
import type { PurgeRequest } from '../admin/index.ts';

export interface PurgeResult {
  blobs: number;
  bytes: number;
  manifests: number;
  tags: number;
  busy: string[];
  /** Cluster mode: replicas that could not be asked (they keep what they hold). */
  unreachable?: string[];
}

/**
 * The token to send: $PULLTHROUGH_ADMIN_TOKEN, else the policy's admin.token, else its admin.tokenFile
 * (read now). `policy` is called only when the variable is not set, so that a policy file the CLI
 * cannot load does not stop a purge that brings its own token.
 */
export function adminTokenFor(env: NodeJS.ProcessEnv, policy: () => Policy): string | undefined {
  if (env.PULLTHROUGH_ADMIN_TOKEN) return env.PULLTHROUGH_ADMIN_TOKEN;
  const { token, tokenFile } = policy().admin;
  return token ?? (tokenFile ? readAdminTokenFile(tokenFile) : undefined);
}

/** Resolves with the proxy's answer, or throws with its message. */
export async function purgeThroughProxy(proxyUrl: string, what: PurgeRequest, token: string | undefined): Promise<PurgeResult> {
  const response = await request(`${proxyUrl}/admin/purge`, {
    method: 'POST',
    body: JSON.stringify(what),
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
  });
  const text = await response.body.text();
  if (response.statusCode !== 200) {
    const hint = response.statusCode === 401 && !token ? ' (set PULLTHROUGH_ADMIN_TOKEN, or admin.token in the proxy.yaml given with --config)' : '';
    throw new Error(`${text.trimEnd().replace(/^pullthrough: /, '')}${hint}`);
  }
  return JSON.parse(text) as PurgeResult;
}

export function formatPurge(result: PurgeResult): string {
  return `purged ${result.blobs} blobs (${result.bytes} bytes), ${result.manifests} manifests, ${result.tags} tags${result.busy.length ? `; left in use: ${result.busy.join(' ')}` : ''}${result.unreachable?.length ? `; replicas not reached (purge again later): ${result.unreachable.join(' ')}` : ''}\n`;
}
