// The pool's liveness probe: /healthz runs it to prove that worker threads take and finish tasks.
import { threadId } from 'node:worker_threads';

export default function health(): { threadId: number } {
  return { threadId };
}
