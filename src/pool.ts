// The Piscina pool of worker threads that run blob fills (upstream → .part file + hash → verify →
// rename). TLS sessions stay on the thread that accepted them (relaying a socket's bytes to a worker
// measured 20–70% more CPU per GiB); the pool does the work that is not tied to a socket.
import path from 'node:path';
import { Piscina } from 'piscina';
import type { TransferListItem } from 'node:worker_threads';
import type { FillTask } from './cache/fill-protocol.ts';
import type { Logger } from './log.ts';

/** Tasks are .ts beside the sources and .js in dist/: the same extension as this module. */
const EXT = path.extname(new URL(import.meta.url).pathname);
const HEALTH_TASK = new URL(`../workers/health${EXT}`, import.meta.url).href;
const FILL_TASK = new URL(`../workers/fill${EXT}`, import.meta.url).href;

export interface WorkerPool {
  piscina: Piscina;
  /** Runs a no-op task: resolves with the worker's thread id when the pool answers. */
  health(timeoutMs?: number): Promise<{ threadId: number }>;
  /** Runs one blob fill; its progress and outcome arrive on the task's port. */
  fill(task: FillTask, transferList: TransferListItem[]): Promise<void>;
  close(): Promise<void>;
}

export function createWorkerPool(log: Logger, threads: number): WorkerPool {
  const piscina = new Piscina({
    filename: HEALTH_TASK,
    minThreads: threads,
    maxThreads: threads,
    idleTimeout: Infinity,
    // A fill waits on the network most of the time; one task per worker would serialise them.
    concurrentTasksPerWorker: 16,
  });
  // Piscina replaces a worker that dies; the tasks it was running fail and their clients are cut.
  piscina.on('error', (err: Error) => log.error('a worker thread failed; it is replaced', { error: err.message }));
  // The first fill of a fresh worker paid ~150 ms loading undici and the CA stores: pay it at start.
  for (let i = 0; i < threads; i++) {
    piscina.run('warm-up', { filename: FILL_TASK }).catch((err: Error) => log.warn('a fill worker could not warm up', { error: err.message }));
  }
  return {
    piscina,
    health: (timeoutMs = 5000) => piscina.run(undefined, { signal: AbortSignal.timeout(timeoutMs) }),
    fill: (task, transferList) => piscina.run(task, { filename: FILL_TASK, transferList }),
    close: () => piscina.close({ force: true }),
  };
}
