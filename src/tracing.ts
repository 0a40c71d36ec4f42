// OpenTelemetry tracing, configured only by the standard OTEL_* variables and off unless an exporter
// is set: then the SDK (loaded lazily, it is large) exports OTLP over HTTP, protobuf or JSON as
// OTEL_EXPORTER_OTLP_PROTOCOL says. Spans are made by hand at the points that matter (client request,
// fill, upstream fetch, redirect), with chosen attributes: no header, so no credential, ever reaches one.
import { context, propagation, trace, type Context, type Span, type Tracer } from '@opentelemetry/api';

export const tracer: Tracer = trace.getTracer('pullthrough');

export function tracingEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  const exporter = env.OTEL_TRACES_EXPORTER;
  if (exporter) return exporter !== 'none';
  return Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
}

/** Starts the SDK when tracing is enabled; returns its shutdown (which flushes pending spans). */
export async function startTracing(serviceName = 'pullthrough'): Promise<() => Promise<void>> {
  if (!tracingEnabled()) return async () => {};
  const { NodeSDK } = await import('@opentelemetry/sdk-node');
  const protocol = process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? process.env.OTEL_EXPORTER_OTLP_PROTOCOL ?? 'http/protobuf';
  const traceExporter =
    protocol === 'http/json'
      ? new (await import('@opentelemetry/exporter-trace-otlp-http')).OTLPTraceExporter()
      : new (await import('@opentelemetry/exporter-trace-otlp-proto')).OTLPTraceExporter();
  const sdk = new NodeSDK({ serviceName, traceExporter, instrumentations: [] });
  sdk.start();
  return () => sdk.shutdown();
}

/** The W3C traceparent of a span, to carry its context into a worker thread. */
export function carrierOf(span: Span): Record<string, string> {
  const carrier: Record<string, string> = {};
  propagation.inject(trace.setSpan(context.active(), span), carrier);
  return carrier;
}

export function contextFrom(carrier: Record<string, string> | undefined): Context {
  return carrier ? propagation.extract(context.active(), carrier) : context.active();
}
