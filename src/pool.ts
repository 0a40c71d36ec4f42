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
  /** The Piscina pool; its threads start at warmUp() or at the first task, whichever comes first. */
  readonly piscina: Piscina;
  /**
   * Starts the threads and loads the fill task in each, so that the first fill does not pay for it
   * (~150 ms: undici and the CA stores). The proxy calls it once it listens: on 2 cores the threads'
   * start-up competed with the primary's and delayed listening.
   */
  warmUp(): void;
  /** Runs a no-op task: resolves with the worker's thread id when the pool answers. */
  health(timeoutMs?: number): Promise<{ threadId: number }>;
  /** Runs one blob fill; its progress and outcome arrive on the task's port. */
  fill(task: FillTask, transferList: TransferListItem[]): Promise<void>;
  close(): Promise<void>;
}

export function createWorkerPool(log: Logger, threads: number): WorkerPool {
  let piscina: Piscina | undefined;
  let warmed = false;
  const pool = (): Piscina => (piscina ??= startPool(log, threads));
  return {
    get piscina() {
      return pool();
    },
    warmUp() {
      if (warmed) return;
      warmed = true;
      const started = pool();
      for (let i = 0; i < threads; i++) {
        started.run('warm-up', { filename: FILL_TASK }).catch((err: Error) => log.warn('a fill worker could not warm up', { error: err.message }));
      }
    },
    health: (timeoutMs = 5000) => pool().run(undefined, { signal: AbortSignal.timeout(timeoutMs) }),
    fill: (task, transferList) => pool().run(task, { filename: FILL_TASK, transferList }),
    close: async () => {
      await piscina?.close({ force: true });
    },
  };
}

function startPool(log: Logger, threads: number): Piscina {
  const piscina = new Piscina({
    filename: HEALTH_TASK,
    minThreads: threads,
    maxThreads: threads,
    idleTimeout: Infinity,
    // A fill waits on the network most of the time; one task per worker would serialise them.
    concurrentTasksPerWorker: 16,
    // Between tasks a worker's event loop keeps running ('sync' blocks it in Atomics.wait): it sees
    // upstream close an idle keep-alive connection, so the next fill does not go out on a dead one and
    // pay a failed attempt and a backoff (83-89 ms after nginx's 60 s, against 21-24 ms).
    atomics: 'async',
  });
  // Piscina replaces a worker that dies; the tasks it was running fail and their clients are cut.
  piscina.on('error', (err: Error) => log.error('a worker thread failed; it is replaced', { error: err.message }));
  return piscina;
}
