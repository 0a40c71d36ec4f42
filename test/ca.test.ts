import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { createHash, createPrivateKey, createPublicKey, X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import tls from 'node:tls';
import { CertificateAuthority, CertificateError, LEAF_KEY_TYPES, type LeafKeyType } from '../src/ca.ts';
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
    assert.equal(statSync(path.join(dir, 'leaf-ec.key')).mode & 0o777, 0o600);
    assert.equal(createPrivateKey(readFileSync(path.join(dir, 'leaf-ec.key'))).asymmetricKeyDetails?.namedCurve, 'prime256v1');
    assert.equal(createPrivateKey(readFileSync(path.join(dir, 'leaf.key'))).asymmetricKeyType, 'rsa');
    const again = CertificateAuthority.loadOrCreate(dir);
    assert.equal(again.created, false);
    assert.equal(again.ca.fingerprint, first.ca.fingerprint);
    const x509 = new X509Certificate(first.ca.certPem);
    assert.equal(x509.ca, true);
    assert.ok(x509.validToDate.getTime() - Date.now() > 5 * 365 * 86_400_000, 'valid for years');
  });

  for (const type of LEAF_KEY_TYPES) {
    test(`mints ${type} leaves that OpenSSL verifies, with DNS or IP SANs and valid serials`, () => {
      const dir = fresh();
      const { ca } = CertificateAuthority.loadOrCreate(dir);
      writeFileSync(path.join(dir, 'name.pem'), ca.mintLeaf('registry.example.com', type));
      writeFileSync(path.join(dir, 'ip.pem'), ca.mintLeaf('10.1.2.3', type));
      writeFileSync(path.join(dir, 'ip6.pem'), ca.mintLeaf('::1', type));
      const out = execFileSync('openssl', ['verify', '-purpose', 'sslserver', '-CAfile', path.join(dir, 'ca.crt'), 'name.pem', 'ip.pem', 'ip6.pem'], { cwd: dir }).toString();
      assert.equal(out.match(/: OK/g)?.length, 3, out);
      const name = new X509Certificate(ca.mintLeaf('registry.example.com', type));
      assert.equal(name.subjectAltName, 'DNS:registry.example.com');
      assert.ok(name.checkHost('registry.example.com'));
      assert.ok(name.publicKey.equals(createPublicKey(readFileSync(path.join(dir, type === 'rsa' ? 'leaf.key' : 'leaf-ec.key')))), 'it certifies the leaf key of its type');
      assert.ok(name.checkIssued(new X509Certificate(ca.certPem)) && name.verify(new X509Certificate(ca.certPem).publicKey), 'signed by the CA');
      // An ECDSA key only signs; the subject key identifier is the SHA-1 of the key's bits (RFC 5280 4.2.1.2).
      const text = execFileSync('openssl', ['x509', '-in', 'name.pem', '-noout', '-ext', 'keyUsage,subjectKeyIdentifier'], { cwd: dir }).toString();
      assert.match(text, type === 'rsa' ? /Digital Signature, Key Encipherment/ : /Digital Signature\n/);
      const spki = new X509Certificate(readFileSync(path.join(dir, 'name.pem'))).publicKey.export({ type: 'spki', format: 'der' });
      const bits = type === 'ecdsa' ? spki.subarray(spki.length - 65) : spki.subarray(spki.indexOf(Buffer.from([0x03, 0x82])) + 5);
      assert.ok(text.replaceAll(':', '').toLowerCase().includes(createHash('sha1').update(bits).digest('hex')), text);
      assert.equal(new X509Certificate(ca.mintLeaf('10.1.2.3', type)).subjectAltName, 'IP Address:10.1.2.3');
      for (let i = 0; i < 50; i++) {
        const first = Number.parseInt(new X509Certificate(ca.mintLeaf(`h${i}.test`, type)).serialNumber.slice(0, 2), 16);
        assert.ok(first >= 0x01 && first <= 0x7f, `serial starts with 0x${first.toString(16)}`);
      }
    });
  }

  test('a context holds both leaves and the handshake picks: ECDSA for every client that offers it, RSA for the others', async () => {
    const { ca } = CertificateAuthority.loadOrCreate(fresh());
    const context = ca.secureContextFor('registry.test');
    // As an intercepted session is served (src/session.ts): the socket is made with the context.
    const server = net.createServer((raw) => {
      const socket = new tls.TLSSocket(raw, { isServer: true, secureContext: context, SNICallback: (_name, done) => done(null) });
      socket.once('secure', () => socket.end());
      socket.on('error', () => {});
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    const handshake = (options: tls.ConnectionOptions = {}) =>
      new Promise<{ key: string | undefined; cipher: string; protocol: string | null }>((resolve, reject) => {
        const socket = tls.connect({ host: '127.0.0.1', port, servername: 'registry.test', ca: ca.certPem, ...options }, () => {
          resolve({ key: socket.getPeerX509Certificate()?.publicKey.asymmetricKeyType, cipher: socket.getCipher().name, protocol: socket.getProtocol() });
          socket.destroy();
        });
        socket.once('error', reject);
      });
    try {
      assert.equal((await handshake()).key, 'ec', "Node's defaults");
      assert.equal((await handshake({ sigalgs: 'ecdsa_secp256r1_sha256' })).key, 'ec');
      assert.equal((await handshake({ sigalgs: 'rsa_pss_rsae_sha256:rsa_pkcs1_sha256' })).key, 'rsa', 'a client without ECDSA still connects');
      // Go's crypto/tls: RSA-PSS listed before ECDSA, AES-128-GCM first among the TLS 1.3 suites.
      const go = await handshake({ sigalgs: 'rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256:ed25519:rsa_pss_rsae_sha384:rsa_pkcs1_sha256', ciphers: 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384' });
      assert.deepEqual(go, { key: 'ec', cipher: 'TLS_AES_128_GCM_SHA256', protocol: 'TLSv1.3' });
      assert.equal((await handshake({ ciphers: 'TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256' })).cipher, 'TLS_CHACHA20_POLY1305_SHA256', 'a client without AES instructions keeps ChaCha20');
      assert.deepEqual(await handshake({ maxVersion: 'TLSv1.2' }), { key: 'ec', cipher: 'ECDHE-ECDSA-AES128-GCM-SHA256', protocol: 'TLSv1.2' });
      assert.equal((await handshake({ maxVersion: 'TLSv1.2', ciphers: 'ECDHE-RSA-AES128-GCM-SHA256' })).key, 'rsa');
      // OpenSSL's own client, as `openssl s_client` checks a server.
      const caFile = path.join(fresh(), 'ca.crt');
      writeFileSync(caFile, ca.certPem);
      for (const [sigalgs, expected] of [['ECDSA+SHA256', /Peer signature type: ECDSA/], ['RSA-PSS+SHA256', /Peer signature type: RSA-PSS/]] as const) {
        const out = await new Promise<string>((resolve, reject) => {
          const client = execFile('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-servername', 'registry.test', '-sigalgs', sigalgs, '-verify_return_error', '-CAfile', caFile], { timeout: 10_000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout + stderr)));
          client.stdin?.end();
        });
        assert.match(out, expected, sigalgs);
        assert.match(out, /Verify return code: 0 \(ok\)/, sigalgs);
      }
    } finally {
      server.close();
    }
  });

  test('leaves are kept in LMDB across restarts, per CA and key type', async () => {
    const dir = fresh();
    let index = openIndex(dir);
    const { ca } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
    ca.secureContextFor('Registry.Test');
    await index.root.committed; // writes are batched
    const rsa = index.leafCertificates.get(`${ca.fingerprint}/registry.test`);
    const ecdsa = index.leafCertificates.get(`${ca.fingerprint}/ecdsa/registry.test`);
    assert.ok(rsa && ecdsa, 'each leaf is stored under the CA fingerprint, its type (RSA where it always was) and the lower-cased name');
    assert.equal(new X509Certificate(rsa).publicKey.asymmetricKeyType, 'rsa');
    assert.equal(new X509Certificate(ecdsa).publicKey.asymmetricKeyType, 'ec');
    await index.close();
    index = openIndex(dir);
    const { ca: restarted } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
    const minted: string[] = [];
    const original = restarted.mintLeaf.bind(restarted);
    restarted.mintLeaf = (host: string, type?: LeafKeyType) => {
      minted.push(`${type}`);
      return original(host, type);
    };
    restarted.secureContextFor('registry.test');
    assert.deepEqual(minted, [], 'served from the store, not minted again');
    await index.close();

    // Never one type's leaf for the other's: a leaf stored under the wrong type is minted again.
    index = openIndex(dir);
    index.leafCertificates.put(`${ca.fingerprint}/ecdsa/other.test`, ca.mintLeaf('other.test', 'rsa'));
    index.leafCertificates.put(`${ca.fingerprint}/other.test`, ca.mintLeaf('other.test', 'ecdsa'));
    await index.root.committed;
    const { ca: confused } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
    const again: string[] = [];
    const mint = confused.mintLeaf.bind(confused);
    confused.mintLeaf = (host: string, type?: LeafKeyType) => (again.push(`${type}`), mint(host, type));
    assert.ok(confused.secureContextFor('other.test'));
    assert.deepEqual(again.sort(), ['ecdsa', 'rsa']);
    await index.root.committed;
    assert.equal(new X509Certificate(index.leafCertificates.get(`${ca.fingerprint}/ecdsa/other.test`)!).publicKey.asymmetricKeyType, 'ec');
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
    assert.equal(statSync(path.join(dataDir, 'leaf-ec.key')).mode & 0o777, 0o600);
    await index.root.committed;
    await index.close();

    // A restart finds leaf.key and the stored leaf again: nothing is minted.
    index = openIndex(dataDir);
    const { ca: restarted } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
    let minted = 0;
    const mint = restarted.mintLeaf.bind(restarted);
    restarted.mintLeaf = (host: string, type?: LeafKeyType) => (minted++, mint(host, type));
    restarted.secureContextFor('registry.test');
    assert.equal(minted, 0, 'served from the store');
    await index.close();

    // Without leaf.key (deleted, or a new data directory) a new one is made and the stored leaf, which
    // certifies the old key, is minted again instead of failing the handshake; so is the ECDSA one
    // without leaf-ec.key, each on its own.
    for (const [file, type] of [['leaf.key', 'rsa'], ['leaf-ec.key', 'ecdsa']] as const) {
      unlinkSync(path.join(dataDir, file));
      index = openIndex(dataDir);
      const { ca: rekeyed } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
      const types: string[] = [];
      const remint = rekeyed.mintLeaf.bind(rekeyed);
      rekeyed.mintLeaf = (host: string, leafType?: LeafKeyType) => (types.push(`${leafType}`), remint(host, leafType));
      assert.ok(rekeyed.secureContextFor('registry.test'));
      assert.deepEqual(types, [type], file);
      assert.equal(statSync(path.join(dataDir, file)).mode & 0o777, 0o600);
      await index.root.committed;
      await index.close();
    }
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

  test('a leaf key of the wrong type is refused with what to do', () => {
    const dir = fresh();
    CertificateAuthority.loadOrCreate(dir);
    writeFileSync(path.join(dir, 'leaf-ec.key'), readFileSync(path.join(dir, 'leaf.key')), { mode: 0o600 });
    assert.throws(() => CertificateAuthority.loadOrCreate(dir), (err: Error) => err instanceof CertificateError && /leaf-ec\.key is not an ECDSA P-256 key \(delete it/.test(err.message));
    unlinkSync(path.join(dir, 'leaf-ec.key'));
    assert.ok(CertificateAuthority.loadOrCreate(dir).ca.secureContextFor('x.test'), 'made again');
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
