// An in-process fake registry (or CDN) over real TLS, for the edge cases a real registry will not
// produce on demand: it serves blobs by digest (GET, HEAD, single Range), records every request it
// receives with its headers, and lets a test take over any request to misbehave (cut the connection,
// lie, stall, redirect, ignore Range).
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestCa } from './pki.ts';

export interface FakeBlob {
  digest: string;
  bytes: Buffer;
  /** Content-Type upstream sends; application/octet-stream when absent. */
  mediaType?: string;
}

export interface SeenRequest {
  method: string;
  /** Path and query as received. */
  url: string;
  /** Path without the query. */
  path: string;
  headers: IncomingHttpHeaders;
  /** The blob a /blobs/<digest> path names, if the fake has it. */
  blob?: FakeBlob;
  /** 1 for the first GET of this path, 2 for the second…; HEADs are numbered apart. */
  nth: number;
}

/** Takes over a request; return true when it answered (or cut) it, false to let the fake serve it. */
export type Behaviour = (req: IncomingMessage, res: ServerResponse, seen: SeenRequest) => boolean | Promise<boolean>;

export interface FakeRegistry {
  /** The name clients use (in the certificate; mapped to 127.0.0.1 by the proxy's `hosts:`). */
  host: string;
  port: number;
  /** "host:port" */
  hostPort: string;
  /** Requests received since start or the last reset(), oldest first. */
  seen: SeenRequest[];
  /** Set to misbehave; reset() clears it. */
  behave: Behaviour | undefined;
  /** Adds a blob of `size` random bytes (or the given bytes) and returns it. */
  addBlob(content: number | Buffer, mediaType?: string): FakeBlob;
  count(filter?: { method?: string; digest?: string; path?: string }): number;
  /** Forgets the requests seen so far (the behaviour stays). */
  clearSeen(): void;
  /** Forgets the requests and the behaviour. */
  reset(): void;
  close(): Promise<void>;
}

export async function startFakeRegistry(host: string, ca: TestCa): Promise<FakeRegistry> {
  const leaf = ca.issue([host]);
  const blobs = new Map<string, FakeBlob>();
  const counters = new Map<string, number>();
  const fake: FakeRegistry = {
    host,
    port: 0,
    hostPort: '',
    seen: [],
    behave: undefined,
    addBlob(content, mediaType) {
      const bytes = typeof content === 'number' ? randomBytes(content) : content;
      const blob: FakeBlob = { digest: sha256(bytes), bytes, ...(mediaType ? { mediaType } : {}) };
      blobs.set(blob.digest, blob);
      return blob;
    },
    count(filter = {}) {
      return fake.seen.filter(
        (s) => (!filter.method || s.method === filter.method) && (!filter.digest || s.blob?.digest === filter.digest) && (!filter.path || s.path === filter.path),
      ).length;
    },
    clearSeen() {
      fake.seen = [];
    },
    reset() {
      fake.seen = [];
      fake.behave = undefined;
      counters.clear();
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };

  const server = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (req, res) => {
    const url = req.url ?? '/';
    const pathOnly = url.split('?')[0]!;
    const digest = /\/blobs\/(sha256:[0-9a-f]{64})$/.exec(pathOnly)?.[1];
    const counter = `${req.method === 'HEAD' ? 'HEAD' : 'GET'} ${pathOnly}`;
    const nth = (counters.get(counter) ?? 0) + 1;
    counters.set(counter, nth);
    const blob = digest ? blobs.get(digest) : undefined;
    const seen: SeenRequest = { method: req.method ?? 'GET', url, path: pathOnly, headers: req.headers, ...(blob ? { blob } : {}), nth };
    fake.seen.push(seen);
    void (async () => {
      if (fake.behave && (await fake.behave(req, res, seen))) return;
      if (!blob) {
        const body = JSON.stringify({ errors: [{ code: 'BLOB_UNKNOWN', message: 'blob unknown to registry' }] });
        res.writeHead(404, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
        res.end(body);
        return;
      }
      serveBlob(req, res, blob);
    })().catch((err: Error) => res.destroy(err));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  fake.port = (server.address() as AddressInfo).port;
  fake.hostPort = `${host}:${fake.port}`;
  return fake;
}

/** Answers as a registry does: 200, or 206/416 for a single `Range: bytes=a-b`; HEAD without the body. */
export function serveBlob(req: IncomingMessage, res: ServerResponse, blob: FakeBlob, options: { ignoreRange?: boolean } = {}): void {
  const size = blob.bytes.length;
  const headers = {
    'Content-Type': blob.mediaType ?? 'application/octet-stream',
    'Docker-Content-Digest': blob.digest,
    'Accept-Ranges': 'bytes',
  };
  const range = options.ignoreRange ? undefined : /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
  if (range) {
    const start = Number(range[1]);
    const end = range[2] ? Math.min(Number(range[2]) + 1, size) : size;
    if (start >= size) {
      res.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}`, 'Content-Length': 0 });
      res.end();
      return;
    }
    res.writeHead(206, { ...headers, 'Content-Range': `bytes ${start}-${end - 1}/${size}`, 'Content-Length': end - start });
    res.end(req.method === 'HEAD' ? undefined : blob.bytes.subarray(start, end));
    return;
  }
  res.writeHead(200, { ...headers, 'Content-Length': size });
  res.end(req.method === 'HEAD' ? undefined : blob.bytes);
}

/** Writes `bytes` and resolves once they are handed to the kernel (false if the client went away). */
export function writeFlushed(res: ServerResponse, bytes: Buffer): Promise<boolean> {
  return new Promise((resolve) => {
    if (res.destroyed) return resolve(false);
    res.write(bytes, (err) => resolve(!err));
  });
}

/** Writes `bytes` in pieces of `chunk` bytes with a pause after each; stops if the connection goes. */
export async function sendSlowly(res: ServerResponse, bytes: Buffer, chunk: number, pauseMs: number): Promise<boolean> {
  for (let at = 0; at < bytes.length; at += chunk) {
    if (!(await writeFlushed(res, bytes.subarray(at, at + chunk)))) return false;
    await sleep(pauseMs);
  }
  return true;
}

/**
 * A 200 with the whole blob's Content-Length whose connection is cut after exactly `cutAt` bytes (every
 * byte written has arrived before the cut): a mid-blob break the proxy has to resume with Range.
 */
export async function sendAndCut(req: IncomingMessage, res: ServerResponse, blob: FakeBlob, cutAt: number): Promise<void> {
  res.writeHead(200, { 'Content-Type': blob.mediaType ?? 'application/octet-stream', 'Content-Length': blob.bytes.length });
  await writeFlushed(res, blob.bytes.subarray(0, cutAt));
  await sleep(100);
  req.socket.destroy();
}

/** A registry-style error answer (JSON `errors` body) with extra headers (WWW-Authenticate, Retry-After…). */
export function sendError(res: ServerResponse, status: number, code: string, headers: Record<string, string> = {}): void {
  const body = JSON.stringify({ errors: [{ code, message: code.toLowerCase().replaceAll('_', ' ') }] });
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

/** A test CA's certificate in a file, for `tls: { ca: <file> }` in a proxy.yaml. */
export function writeCaFile(dir: string, ca: TestCa): string {
  const file = path.join(dir, 'upstream-ca.pem');
  writeFileSync(file, ca.certPem);
  return file;
}

export function sha256(bytes: Buffer): string {
  return 'sha256:' + createHash('sha256').update(bytes).digest('hex');
}
