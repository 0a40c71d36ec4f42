// The proxy's certificate authority and the leaf certificates it mints per SNI name.
//
// forge builds the certificates (it speaks X.509), but its pure-JS RSA signing costs 27–42 ms a leaf;
// signing the TBSCertificate with node:crypto costs ~0.6 ms. One leaf key pair serves every host, so a
// new host costs one signature and one SecureContext (~2.3 ms), and adding a registry needs no restart.
import { createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, sign, X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import forge from 'node-forge';

const DAY = 86_400_000;
const CA_LIFETIME_DAYS = 3650;
const LEAF_LIFETIME_DAYS = 90;
/** A leaf this close to expiry is minted again. */
const LEAF_RENEW_BEFORE_MS = 7 * DAY;
const MEMORY_CACHE_SIZE = 1000;

/** Where minted leaf certificates persist across restarts (the LMDB index); optional. */
export interface LeafStore {
  get(key: string): string | undefined;
  put(key: string, certPem: string): void;
}

export class CertificateError extends Error {
  override name = 'CertificateError';
}

export class CertificateAuthority {
  readonly certPem: string;
  readonly fingerprint: string;
  readonly notAfter: Date;
  private readonly caCert: forge.pki.Certificate;
  private readonly caKey: ReturnType<typeof createPrivateKey>;
  private readonly leafKeyPem: string;
  private readonly leafPublicKey: forge.pki.PublicKey;
  private readonly contexts = new Map<string, { context: tls.SecureContext; notAfter: number }>();
  private readonly store: LeafStore | undefined;

  /** Loads ca.crt/ca.key from `dir` (bring your own by placing them there), or creates them once. */
  static loadOrCreate(dir: string, store?: LeafStore): { ca: CertificateAuthority; created: boolean } {
    mkdirSync(dir, { recursive: true });
    const certFile = path.join(dir, 'ca.crt');
    const keyFile = path.join(dir, 'ca.key');
    let created = false;
    if (!existsSync(certFile) && !existsSync(keyFile)) {
      const { certPem, keyPem } = createCa();
      writeFileSync(keyFile, keyPem, { mode: 0o600 });
      writeFileSync(certFile, certPem, { mode: 0o644 });
      created = true;
    } else if (!existsSync(certFile) || !existsSync(keyFile)) {
      throw new CertificateError(`${dir} has only one of ca.crt and ca.key; provide both (your own CA) or neither (a new one is created)`);
    }
    // The key must stay private whoever created it.
    chmodSync(keyFile, 0o600);
    const leafKeyPem = loadOrCreateLeafKey(path.join(dir, 'leaf.key'));
    return { ca: new CertificateAuthority(readFileSync(certFile, 'utf8'), readFileSync(keyFile, 'utf8'), leafKeyPem, store), created };
  }

  constructor(certPem: string, keyPem: string, leafKeyPem: string, store?: LeafStore) {
    let x509: X509Certificate;
    try {
      x509 = new X509Certificate(certPem);
      this.caKey = createPrivateKey(keyPem);
    } catch (err) {
      throw new CertificateError(`the CA certificate or key cannot be read: ${(err as Error).message}`);
    }
    if (!x509.ca) throw new CertificateError('ca.crt is not a CA certificate (basicConstraints CA:TRUE is missing)');
    if (!x509.checkPrivateKey(this.caKey)) throw new CertificateError('ca.key does not belong to ca.crt');
    if (this.caKey.asymmetricKeyType !== 'rsa') throw new CertificateError('the CA key must be RSA');
    // Keep only the first certificate: /ca.crt serves exactly the CA in use.
    this.certPem = x509.toString();
    this.caCert = forge.pki.certificateFromPem(this.certPem);
    this.fingerprint = x509.fingerprint256;
    this.notAfter = new Date(x509.validTo);
    this.leafKeyPem = leafKeyPem;
    this.leafPublicKey = forge.pki.publicKeyFromPem(
      createPublicKey(leafKeyPem).export({ type: 'spki', format: 'pem' }).toString(),
    );
    this.store = store;
  }

  /** The TLS context for a name (DNS name or IP literal): from memory, else from the store, else minted. */
  secureContextFor(name: string): tls.SecureContext {
    const host = name.toLowerCase();
    const now = Date.now();
    const cached = this.contexts.get(host);
    if (cached && cached.notAfter - now > LEAF_RENEW_BEFORE_MS) {
      this.contexts.delete(host);
      this.contexts.set(host, cached); // most recently used last
      return cached.context;
    }
    const storeKey = `${this.fingerprint}/${host}`;
    let certPem = this.store?.get(storeKey);
    if (!certPem || new X509Certificate(certPem).validToDate.getTime() - now <= LEAF_RENEW_BEFORE_MS) {
      certPem = this.mintLeaf(host);
      this.store?.put(storeKey, certPem);
    }
    const context = tls.createSecureContext({ cert: certPem + this.certPem, key: this.leafKeyPem });
    this.contexts.set(host, { context, notAfter: new X509Certificate(certPem).validToDate.getTime() });
    if (this.contexts.size > MEMORY_CACHE_SIZE) this.contexts.delete(this.contexts.keys().next().value!);
    return context;
  }

  /** When each leaf in use (the ones held in memory) expires, for the metrics. */
  leafExpiries(): Array<{ host: string; notAfter: Date }> {
    return [...this.contexts].map(([host, { notAfter }]) => ({ host, notAfter: new Date(notAfter) }));
  }

  mintLeaf(host: string): string {
    const cert = forge.pki.createCertificate();
    cert.publicKey = this.leafPublicKey;
    cert.serialNumber = serialNumber();
    cert.validity.notBefore = new Date(Date.now() - 3_600_000);
    cert.validity.notAfter = new Date(Math.min(Date.now() + LEAF_LIFETIME_DAYS * DAY, this.notAfter.getTime()));
    cert.setSubject([{ name: 'commonName', value: host.slice(0, 64) }]);
    cert.setIssuer(this.caCert.subject.attributes);
    const altName = isIP(host) ? { type: 7, ip: host } : { type: 2, value: host };
    cert.setExtensions([
      { name: 'basicConstraints', cA: false, critical: true },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
      { name: 'extKeyUsage', serverAuth: true },
      { name: 'subjectAltName', altNames: [altName] },
      { name: 'subjectKeyIdentifier' },
      { name: 'authorityKeyIdentifier', keyIdentifier: authorityKeyId(this.caCert) },
    ]);
    return signNatively(cert, this.caKey);
  }
}

function createCa(): { certPem: string; keyPem: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicKey.export({ type: 'spki', format: 'pem' }).toString());
  cert.serialNumber = serialNumber();
  cert.validity.notBefore = new Date(Date.now() - 3_600_000);
  cert.validity.notAfter = new Date(Date.now() + CA_LIFETIME_DAYS * DAY);
  const subject = [
    { name: 'commonName', value: `pullthrough CA ${randomBytes(4).toString('hex')}` },
    { name: 'organizationName', value: 'pullthrough' },
  ];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  return { certPem: signNatively(cert, privateKey), keyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() };
}

function loadOrCreateLeafKey(file: string): string {
  if (existsSync(file)) {
    chmodSync(file, 0o600);
    return readFileSync(file, 'utf8');
  }
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  writeFileSync(file, pem, { mode: 0o600 });
  return pem;
}

/** Signs the TBSCertificate with node:crypto (fast) and lets forge encode the result. */
function signNatively(cert: forge.pki.Certificate, key: ReturnType<typeof createPrivateKey>): string {
  const oid = forge.pki.oids.sha256WithRSAEncryption!;
  cert.signatureOid = oid;
  (cert as unknown as { siginfo: { algorithmOid: string } }).siginfo.algorithmOid = oid;
  // getTBSCertificate exists in forge but is missing from its type definitions.
  const getTbs = (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate;
  const tbs = forge.asn1.toDer(getTbs(cert)).getBytes();
  cert.signature = sign('sha256', Buffer.from(tbs, 'binary'), key).toString('binary');
  return forge.pki.certificateToPem(cert).replace(/\r\n/g, '\n');
}

/** 16 random bytes whose first byte is 0x01–0x7F: positive and without a leading zero, as OpenSSL wants. */
function serialNumber(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! % 0x7f) + 1;
  return bytes.toString('hex');
}

function authorityKeyId(ca: forge.pki.Certificate): string {
  const ski = ca.getExtension('subjectKeyIdentifier') as { subjectKeyIdentifier?: string } | null;
  if (ski?.subjectKeyIdentifier) return forge.util.hexToBytes(ski.subjectKeyIdentifier);
  // A CA without SKI (some bring-your-own ones): the SHA-1 of its public key, as RFC 5280 suggests.
  return forge.pki.getPublicKeyFingerprint(ca.publicKey, { type: 'RSAPublicKey' }).getBytes();
}
