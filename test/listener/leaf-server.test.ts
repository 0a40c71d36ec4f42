// The proxy's own HTTPS listeners (mirror front, cluster peer port) present the CA's leaves: ECDSA to a
// client that takes it and RSA to one that does not, with or without SNI, for their first name; another
// name of theirs gets its own leaf.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import type https from 'node:https';
import { CertificateAuthority } from '../../src/ca.ts';
import { createLeafServer } from '../../src/leaf-server.ts';

describe('a leaf server', () => {
  let dir: string;
  let ca: CertificateAuthority;
  let server: https.Server;
  let port: number;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-leaf-server-'));
    CertificateAuthority.create(dir);
    ca = CertificateAuthority.loadOrCreate(dir).ca;
    server = createLeafServer(ca, ['mirror.example.internal', 'other.example.internal'], (_req, res) => res.end('ok'));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });

  after(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const handshake = (options: tls.ConnectionOptions) =>
    new Promise<{ keyType: string | undefined; names: string }>((resolve, reject) => {
      const socket = tls.connect({ host: '127.0.0.1', port, ca: ca.certPem, maxVersion: 'TLSv1.2', checkServerIdentity: () => undefined, ...options }, () => {
        const cert = socket.getPeerX509Certificate();
        socket.destroy();
        resolve({ keyType: cert?.publicKey.asymmetricKeyType, names: cert?.subjectAltName ?? '' });
      });
      socket.once('error', reject);
    });

  test('ECDSA for its first name, with SNI and without; RSA for a client that cannot take ECDSA', async () => {
    const withSni = await handshake({ servername: 'mirror.example.internal' });
    assert.equal(withSni.keyType, 'ec');
    assert.match(withSni.names, /mirror\.example\.internal/);
    const withoutSni = await handshake({});
    assert.equal(withoutSni.keyType, 'ec');
    assert.match(withoutSni.names, /mirror\.example\.internal/);
    const rsaOnly = await handshake({ servername: 'mirror.example.internal', ciphers: 'ECDHE-RSA-AES128-GCM-SHA256' });
    assert.equal(rsaOnly.keyType, 'rsa');
  });

  test('another of its names gets a leaf for that name', async () => {
    const other = await handshake({ servername: 'other.example.internal' });
    assert.match(other.names, /other\.example\.internal/);
  });
});
