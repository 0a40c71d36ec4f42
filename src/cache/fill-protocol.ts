// The messages between the primary and a fill task in the worker pool.
import type { MessagePort } from 'node:worker_threads';
import type { UpstreamConfig } from '../upstream/agents.ts';

export interface FillTask {
  digest: string;
  upstream: UpstreamConfig;
  /** Registry path of the blob: /v2/<name>/blobs/<digest>. */
  path: string;
  /**
   * Sent upstream on the first hop (Authorization, User-Agent); Authorization is dropped when a redirect
   * leaves the host. Replaced by a fresh Authorization from the primary after the registry refused it.
   */
  headers: Record<string, string>;
  partPath: string;
  blobPath: string;
  /** Both ways: FillMessage from the task, FillReply to it. Closed by the primary after 'end'. */
  port: MessagePort;
  /** The W3C traceparent of the fill's span in the primary (tracing.ts carrierOf), when tracing. */
  trace?: Record<string, string>;
  /**
   * Cluster mode: replicas that may hold a verified public copy, asked in order before the registry. A
   * copy is hashed like any upstream answer; one cut short is resumed at the registry with Range.
   */
  peerSources?: PeerSource[];
}

export interface PeerSource {
  upstream: UpstreamConfig;
  path: string;
  headers: Record<string, string>;
}

export type FillMessage =
  /** Upstream answered 200: the blob's size (when announced) and type. */
  | { type: 'response'; size: number | undefined; mediaType: string | undefined; hops: number; from: string }
  /** The .part file holds this many bytes, written and hashed. */
  | { type: 'progress'; bytes: number }
  /** Every byte is in and the digest matches: readers may send their last byte. */
  | { type: 'verified'; size: number }
  /**
   * An upstream attempt failed; attempt number `attempt` (of `of`) follows after `delayMs`, from byte
   * `offset`. `reason` names what failed (a status, an error code), never a header value.
   * `freshAuthorization`: after a 401 from the registry, whether the primary gave a new Authorization.
   */
  | { type: 'retry'; attempt: number; of: number; offset: number; reason: string; delayMs: number; freshAuthorization?: boolean }
  /**
   * The registry refused the fill's Authorization (401) after the response began: the primary answers on
   * the same port with a FillReply of the same `id` (the token exchange lives on the primary).
   */
  | { type: 'need-authorization'; id: number; wwwAuthenticate?: string | string[] }
  /** The last message of a task; `resumes`: upstream requests after the first (for the fill's span). */
  | { type: 'end'; outcome: FillOutcome; resumes?: number };

/** From the primary to a fill task, on the task's port. */
export type FillReply =
  /** The answer to a 'need-authorization': the Authorization to send from now on; absent: none better. */
  { type: 'authorization'; id: number; authorization?: string };

export type FillOutcome =
  | { kind: 'committed'; size: number }
  /** Upstream answered something other than 200 (401, 404, 429, …): passed to the client as it came. */
  | { kind: 'upstream-status'; status: number; headers: Record<string, string>; body: string }
  | {
      kind: 'failed';
      reason: string;
      /** Bytes that were written before the failure. */
      offset: number;
      /** The bytes do not match the digest: every reader is cut. */
      mismatch?: boolean;
      /** The disk failed (full, read-only): readers continue from upstream without the cache. */
      writeError?: boolean;
      /** The digest had verified before the store failed. */
      verified?: boolean;
      /** Bytes came from a cluster peer's copy (a mismatch then says that copy is bad). */
      fromPeer?: boolean;
    };
