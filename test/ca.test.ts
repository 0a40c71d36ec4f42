import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { CertificateAuthority, CertificateError } from '../src/ca.ts';
import { openIndex } from '../src/cache/index.ts';
import { createTestCa } from './helpers/pki.ts';
import { startTestProxy } from './helpers/proxy.ts';

const fresh = () => mkdtempSync(path.join(os.tmpdir(), 'pullthrough-ca-'));

describe('the proxy CA', () => {
  test('is created once with a private key (0600) and reused after', () => {
    const dir = fresh();
    const first = CertificateAuthority.loadOrCreate(dir);
    assert.equal(first.created, true);
    assert.equal(statSync(path.join(dir, 'ca.key')).mode & 0o777, 0o600);
    assert.equal(statSync(path.join(dir, 'leaf.key')).mode & 0o777, 0o600);
    const again = CertificateAuthority.loadOrCreate(dir);
    assert.equal(again.created, false);
    assert.equal(again.ca.fingerprint, first.ca.fingerprint);
    const x509 = new X509Certificate(first.ca.certPem);
    assert.equal(x509.ca, true);
    assert.ok(x509.validToDate.getTime() - Date.now() > 5 * 365 * 86_400_000, 'valid for years');
  });

  test('mints leaves that OpenSSL verifies, with DNS or IP SANs and valid serials', () => {
    const dir = fresh();
    const { ca } = CertificateAuthority.loadOrCreate(dir);
    writeFileSync(path.join(dir, 'name.pem'), ca.mintLeaf('registry.example.com'));
    writeFileSync(path.join(dir, 'ip.pem'), ca.mintLeaf('10.1.2.3'));
    writeFileSync(path.join(dir, 'ip6.pem'), ca.mintLeaf('::1'));
    const out = execFileSync('openssl', ['verify', '-purpose', 'sslserver', '-CAfile', path.join(dir, 'ca.crt'), 'name.pem', 'ip.pem', 'ip6.pem'], { cwd: dir }).toString();
    assert.equal(out.match(/: OK/g)?.length, 3, out);
    const name = new X509Certificate(ca.mintLeaf('registry.example.com'));
    assert.equal(name.subjectAltName, 'DNS:registry.example.com');
    assert.ok(name.checkHost('registry.example.com'));
    assert.equal(new X509Certificate(ca.mintLeaf('10.1.2.3')).subjectAltName, 'IP Address:10.1.2.3');
    for (let i = 0; i < 50; i++) {
      const first = Number.parseInt(new X509Certificate(ca.mintLeaf(`h${i}.test`)).serialNumber.slice(0, 2), 16);
      assert.ok(first >= 0x01 && first <= 0x7f, `serial starts with 0x${first.toString(16)}`);
    }
  });

  test('leaves are kept in LMDB across restarts, per CA', async () => {
    const dir = fresh();
    let index = openIndex(dir);
    const { ca } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
    ca.secureContextFor('Registry.Test');
    await index.root.committed; // writes are batched
    const stored = index.leafCertificates.get(`${ca.fingerprint}/registry.test`);
    assert.ok(stored, 'the leaf is stored under the CA fingerprint and the lower-cased name');
    await index.close();
    index = openIndex(dir);
    const { ca: restarted } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
    let minted = 0;
    const original = restarted.mintLeaf.bind(restarted);
    restarted.mintLeaf = (host: string) => {
      minted++;
      return original(host);
    };
    restarted.secureContextFor('registry.test');
    assert.equal(minted, 0, 'served from the store, not minted again');
    await index.close();
  });

  test('bring your own CA: placed in the data directory, it is used as is', () => {
    const dir = fresh();
    const own = createTestCa('Corp Root CA');
    writeFileSync(path.join(dir, 'ca.crt'), own.certPem);
    writeFileSync(path.join(dir, 'ca.key'), own.keyPem, { mode: 0o644 });
    const { ca, created } = CertificateAuthority.loadOrCreate(dir);
    assert.equal(created, false);
    assert.equal(ca.fingerprint, new X509Certificate(own.certPem).fingerprint256);
    assert.equal(statSync(path.join(dir, 'ca.key')).mode & 0o777, 0o600, 'the key is made private');
    assert.ok(new X509Certificate(ca.mintLeaf('x.test')).checkIssued(new X509Certificate(own.certPem)));
  });

  test('a CA directory of its own is only read when it holds the CA; leaf.key lives in the data directory', async () => {
    const caDir = fresh();
    const dataDir = fresh();
    const own = createTestCa('Secret CA');
    writeFileSync(path.join(caDir, 'ca.crt'), own.certPem, { mode: 0o444 });
    writeFileSync(path.join(caDir, 'ca.key'), own.keyPem, { mode: 0o400 });
    chmodSync(caDir, 0o555);
    const before = readdirSync(caDir).map((f) => `${f} ${statSync(path.join(caDir, f)).mode.toString(8)} ${statSync(path.join(caDir, f)).mtimeMs}`);
    let index = openIndex(dataDir);
    const first = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
    assert.equal(first.created, false);
    assert.equal(first.ca.fingerprint, new X509Certificate(own.certPem).fingerprint256);
    first.ca.secureContextFor('registry.test');
    const after = readdirSync(caDir).map((f) => `${f} ${statSync(path.join(caDir, f)).mode.toString(8)} ${statSync(path.join(caDir, f)).mtimeMs}`);
    assert.deepEqual(after, before, 'nothing written, nothing chmod-ed: a 0400 key is private enough');
    assert.equal(statSync(path.join(dataDir, 'leaf.key')).mode & 0o777, 0o600);
    await index.root.committed;
    await index.close();

    // A restart finds leaf.key and the stored leaf again: nothing is minted.
    index = openIndex(dataDir);
    const { ca: restarted } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
    let minted = 0;
    const mint = restarted.mintLeaf.bind(restarted);
    restarted.mintLeaf = (host: string) => (minted++, mint(host));
    restarted.secureContextFor('registry.test');
    assert.equal(minted, 0, 'served from the store');
    await index.close();

    // Without leaf.key (deleted, or a new data directory) a new one is made and the stored leaf, which
    // certifies the old key, is minted again instead of failing the handshake.
    unlinkSync(path.join(dataDir, 'leaf.key'));
    index = openIndex(dataDir);
    const { ca: rekeyed } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
    const remint = rekeyed.mintLeaf.bind(rekeyed);
    rekeyed.mintLeaf = (host: string) => (minted++, remint(host));
    assert.ok(rekeyed.secureContextFor('registry.test'));
    assert.equal(minted, 1);
    await index.close();
    chmodSync(caDir, 0o755);
  });

  test('an empty CA directory takes the CA already in the data directory, so clients keep trusting it', () => {
    const dataDir = fresh();
    const { ca: before } = CertificateAuthority.loadOrCreate(dataDir);
    const caDir = path.join(fresh(), 'ca');
    const moved = CertificateAuthority.loadOrCreate(caDir, undefined, dataDir);
    assert.equal(moved.created, false);
    assert.equal(moved.copiedFrom, dataDir);
    assert.equal(moved.ca.fingerprint, before.fingerprint);
    assert.equal(readFileSync(path.join(caDir, 'ca.key'), 'utf8'), readFileSync(path.join(dataDir, 'ca.key'), 'utf8'));
    assert.equal(statSync(path.join(caDir, 'ca.key')).mode & 0o777, 0o600);
    assert.ok(!existsSync(path.join(caDir, 'leaf.key')), 'leaf.key stays in the data directory');
  });

  test('a CA directory that cannot be written and holds no CA is refused with what to do', { skip: process.getuid?.() === 0 && 'root writes into a 0555 directory (test/ca-dir.test.ts uses a read-only mount)' }, () => {
    const caDir = fresh();
    chmodSync(caDir, 0o555);
    assert.throws(() => CertificateAuthority.loadOrCreate(caDir, undefined, fresh()), /cannot create the CA in .* \(EACCES\): make that directory writable by the proxy, or place your own ca\.crt and ca\.key in it/);
    chmodSync(caDir, 0o755);
  });

  test('an inconsistent CA is refused with a clear message', () => {
    const dir = fresh();
    const own = createTestCa('one');
    const other = createTestCa('two');
    writeFileSync(path.join(dir, 'ca.crt'), own.certPem);
    assert.throws(() => CertificateAuthority.loadOrCreate(dir), /only one of ca\.crt and ca\.key/);
    writeFileSync(path.join(dir, 'ca.key'), other.keyPem);
    assert.throws(() => CertificateAuthority.loadOrCreate(dir), (err: Error) => err instanceof CertificateError && /does not belong/.test(err.message));
    const leaf = own.issue(['not-a-ca.test']);
    writeFileSync(path.join(dir, 'ca.crt'), leaf.certPem);
    writeFileSync(path.join(dir, 'ca.key'), leaf.keyPem);
    assert.throws(() => CertificateAuthority.loadOrCreate(dir), /not a CA certificate/);
    writeFileSync(path.join(dir, 'ca.crt'), 'garbage');
    assert.throws(() => CertificateAuthority.loadOrCreate(dir), /cannot be read/);
    rmSync(dir, { recursive: true });
  });
});

describe('the data directory', () => {
  test('is 0700 and the index in it 0700 with 0600 files, whatever existed before (an older version, a volume)', async () => {
    const dataDir = path.join(fresh(), 'data');
    // What an older version left: the data directory and the index directory 0755, the LMDB files 0644.
    const old = openIndex(dataDir);
    await old.close();
    const indexDir = path.join(dataDir, 'index');
    chmodSync(dataDir, 0o755);
    chmodSync(indexDir, 0o755);
    for (const file of readdirSync(indexDir)) chmodSync(path.join(indexDir, file), 0o644);

    const proxy = await startTestProxy('', {}, dataDir);
    try {
      assert.equal(statSync(dataDir).mode & 0o777, 0o700);
      assert.equal(statSync(indexDir).mode & 0o777, 0o700);
      const files = readdirSync(indexDir);
      assert.deepEqual(files.sort(), ['data.mdb', 'lock.mdb']);
      for (const file of files) assert.equal(statSync(path.join(indexDir, file)).mode & 0o777, 0o600, file);
    } finally {
      await proxy.close();
    }
  });
});
