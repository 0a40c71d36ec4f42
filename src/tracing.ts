// OpenTelemetry tracing, configured only by the standard OTEL_* variables and off unless an exporter
// is set: then the SDK (loaded lazily, it is large) exports OTLP over HTTP, protobuf or JSON as
// OTEL_EXPORTER_OTLP_PROTOCOL says. Spans are made by hand at the points that matter (client request,
// fill, upstream fetch, redirect), with chosen attributes: no header, so no credential, ever reaches one.
//
// Off, `tracer` is the API's no-op: a span costs one small object and nothing is exported.
import { context, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, TraceFlags, type Attributes, type Context, type Span, type Tracer } from '@opentelemetry/api';

export const tracer: Tracer = trace.getTracer('pullthrough');

export function tracingEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  if (/^true$/i.test(env.OTEL_SDK_DISABLED?.trim() ?? '')) return false;
  const exporter = env.OTEL_TRACES_EXPORTER?.trim();
  if (exporter) return exporter !== 'none';
  return Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
}

let started: Promise<() => Promise<void>> | undefined;

/**
 * Starts the SDK when tracing is enabled (once per thread: the proxy's and each pool worker's);
 * returns its shutdown, which flushes pending spans. Traces only: metrics and logs have their own
 * channels (/metrics, the access log), so the SDK's env-configured readers for them stay off.
 */
export function startTracing(serviceName = 'pullthrough'): Promise<() => Promise<void>> {
  if (!tracingEnabled()) return Promise.resolve(async () => {});
  started ??= (async () => {
    // OTEL_TRACES_EXPORTER (default otlp) and OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (http/protobuf,
    // http/json, grpc), the endpoint, headers, timeout and OTEL_BSP_* are read by the SDK itself.
    const { NodeSDK } = await import('@opentelemetry/sdk-node');
    // OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) names the service when set.
    const named = Boolean(process.env.OTEL_SERVICE_NAME) || /(^|,)\s*service\.name\s*=/.test(process.env.OTEL_RESOURCE_ATTRIBUTES ?? '');
    const sdk = new NodeSDK({ ...(named ? {} : { serviceName }), instrumentations: [], metricReaders: [], logRecordProcessors: [] });
    sdk.start();
    return () => sdk.shutdown();
  })();
  return started;
}

/** Exports the spans that ended so far; gives up waiting after `timeoutMs` (a collector that hangs). */
export async function flushTracing(timeoutMs = 2000): Promise<void> {
  const provider = trace.getTracerProvider() as { getDelegate?(): unknown };
  const delegate = (provider.getDelegate?.() ?? provider) as { forceFlush?(): Promise<void> };
  if (!delegate.forceFlush) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([delegate.forceFlush().catch(() => {}), new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
  clearTimeout(timer);
}

/**
 * The W3C traceparent of a span, to carry its context into a worker thread; undefined when the span
 * records nothing (tracing off). Written by hand, not by the global propagator: OTEL_PROPAGATORS is
 * about what crosses to other services, and must not decide whether a fill finds its parent.
 */
export function carrierOf(span: Span): Record<string, string> | undefined {
  if (!span.isRecording()) return undefined;
  const { traceId, spanId, traceFlags } = span.spanContext();
  return { traceparent: `00-${traceId}-${spanId}-${(traceFlags & 0xff).toString(16).padStart(2, '0')}` };
}

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/** The context a carrier describes (its span as the remote parent); the root context without one. */
export function contextFrom(carrier: Record<string, string> | undefined): Context {
  const match = carrier?.traceparent ? TRACEPARENT.exec(carrier.traceparent) : null;
  if (!match) return ROOT_CONTEXT;
  return trace.setSpanContext(ROOT_CONTEXT, { traceId: match[1]!, spanId: match[2]!, traceFlags: parseInt(match[3]!, 16) & TraceFlags.SAMPLED, isRemote: true });
}

/** Runs `fn` with `span` as the active span (its async continuations included). */
export function withSpan<T>(span: Span, fn: () => T): T {
  return context.with(trace.setSpan(context.active(), span), fn);
}

/** The context that makes `span` the parent, for code that takes one; undefined when it records nothing. */
export function contextWith(span: Span, parent: Context = context.active()): Context | undefined {
  return span.isRecording() ? trace.setSpan(parent, span) : undefined;
}

/**
 * A client span for one request upstream, child of `parent` (default: the active span). `url` is
 * for logs: urlForLog()'s, never with a query string (signed CDN URLs carry tokens there); a function
 * is called only when the span records.
 */
export function startUpstreamSpan(method: string, url: string | (() => string), attributes: Attributes = {}, parent?: Context): Span {
  const span = tracer.startSpan(`upstream ${method}`, { kind: SpanKind.CLIENT, attributes: { 'http.request.method': method, ...attributes } }, parent);
  if (span.isRecording()) span.setAttribute('url.full', typeof url === 'function' ? url() : url);
  return span;
}

/** Ends a span with its last attributes; an error marks it failed. */
export function endSpan(span: Span, attributes: Attributes = {}, error?: string): void {
  if (span.isRecording()) {
    span.setAttributes(attributes);
    if (error) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
  }
  span.end();
}
