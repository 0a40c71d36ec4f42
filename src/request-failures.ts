// The last error path of every request, whichever way it came in (an intercepted session, a plain-HTTP
// absolute-form request, the admin surface): whatever a handler throws — an upstream that cuts a body,
// an index that cannot write — is logged for the operator and answered as a registry error, or, once an
// answer is under way, cut. Never an unhandled rejection: that would end the process (R12.1).
import type { IncomingMessage, ServerResponse } from 'node:http';
import { errors as undiciErrors } from 'undici';
import { pathForLog, type Logger } from './log.ts';
import { sendRegistryError } from './registry/errors.ts';
import type { RegistryHandler } from './registry/handler.ts';
import { describeUpstreamError } from './upstream/forward.ts';

export interface Failure {
  /** What the client was answered (the status already sent, when the answer was under way). */
  status: number;
  error: string;
}

/**
 * Logs `err` (host and path, never a header) and answers 502 (upstream broke) or 500 (anything else)
 * as registry-style JSON when nothing was sent yet; else cuts the response, so the client sees a
 * broken answer, not a clean end.
 */
export function answerFailure(req: IncomingMessage, res: ServerResponse, err: unknown, log: Logger, host: string): Failure {
  const error = err instanceof Error ? err : new Error(String(err));
  const upstream = fromUpstream(error);
  const path = pathForLog(req.url);
  const message = withoutCredentials(upstream ? `upstream ${host} failed: ${describeUpstreamError(error)}` : `pullthrough failed: ${error.message}`).slice(0, 500);
  const underWay = res.headersSent;
  const status = underWay ? res.statusCode : upstream ? 502 : 500;
  const outcome = !underWay ? String(status) : res.writableEnded ? 'its whole answer' : 'a cut answer';
  try {
    log.error(
      upstream
        ? `upstream failed while ${host}${path} was answered; the client got ${outcome} and may retry`
        : `a request failed inside the proxy; the client got ${outcome} (if it recurs, report it with this line)`,
      { host, method: req.method, path, status, error: withoutCredentials(error.stack ?? error.message) },
    );
  } catch {
    // A logger that fails must not turn an answered failure into an unanswered one.
  }
  if (underWay) {
    // An answer already complete stays as it is; one under way is cut.
    if (!res.writableEnded) res.destroy();
  } else {
    try {
      // The client may be mid-upload: read nothing more of it.
      res.setHeader('Connection', 'close');
      sendRegistryError(res, status, 'UNKNOWN', message);
    } catch {
      res.destroy();
    }
  }
  return { status, error: message };
}

/** The registry handler with an error path: it never rejects; a failure is logged, answered, and in the access log. */
export function withErrorAnswers(handler: RegistryHandler, log: Logger): RegistryHandler {
  return async (req, res, context) => {
    const started = performance.now();
    try {
      await handler(req, res, context);
    } catch (err) {
      const { status, error } = answerFailure(req, res, err, log, context.registry.key);
      try {
        log.access({
          method: req.method ?? 'GET',
          host: context.registry.key,
          path: pathForLog(req.url),
          status,
          bytes: 0,
          client: context.client,
          ...(context.user ? { user: context.user.name } : {}),
          ms: Math.round(performance.now() - started),
          error,
        });
      } catch {
        // as above
      }
    }
  };
}

/** Errors of the connection to upstream (cut bodies, resets, timeouts); not undici refusing our own arguments. */
function fromUpstream(err: Error): boolean {
  return err instanceof undiciErrors.UndiciError && !(err instanceof undiciErrors.InvalidArgumentError) && !(err instanceof undiciErrors.NotSupportedError);
}

/** A credential in an error's text (a URL's user info, an Authorization value) never reaches a log or a client. */
function withoutCredentials(text: string): string {
  return text.replace(/\b(Basic|Bearer)\s+[A-Za-z0-9._~+/=-]+/gi, '$1 [redacted]').replace(/\/\/[^/\s:@]+:[^/\s@]+@/g, '//[redacted]@');
}
