// Request buffering, as the seed's PROXY_REQUEST_BUFFERING=true asked of nginx: the whole upload is
// written to a temporary file first and sent upstream with its Content-Length only once complete, so a
// slow client never holds an upstream connection. Off by default: uploads stream through unbuffered.
import { randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { rm, stat } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

export interface SpooledBody {
  body: Readable;
  size: number;
  discard(): Promise<void>;
}

export async function spool(req: IncomingMessage, dir: string): Promise<SpooledBody> {
  const file = path.join(dir, `upload-${randomBytes(8).toString('hex')}.spool`);
  try {
    await pipeline(req, createWriteStream(file, { mode: 0o600 }));
    const { size } = await stat(file);
    return { body: createReadStream(file, { highWaterMark: 1024 * 1024 }), size, discard: () => rm(file, { force: true }) };
  } catch (err) {
    await rm(file, { force: true });
    throw err;
  }
}
