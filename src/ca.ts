// The proxy's certificate authority and the leaf certificates it mints for the intercepted hosts.
//
// forge builds the certificates (it speaks X.509), but its pure-JS RSA signing costs 27–42 ms a leaf;
// signing the TBSCertificate with node:crypto costs ~0.6 ms. One leaf key pair of each type serves every
// host, so a new host costs two signatures and one SecureContext (~2.5 ms), and adding a registry needs
// no restart.
//
// Each host's context holds two leaves, ECDSA P-256 and RSA-2048, and the handshake picks: a client that
// offers ECDSA signatures (Go's crypto/tls — skopeo, podman, containerd, docker —, OpenSSL, Node) gets
// the ECDSA leaf, one that does not still gets RSA. The server signs once per full handshake, on the
// primary thread: RSA-2048 costs ~25 times what P-256 costs (perf/client-handshake.ts measures the time
// to first byte of 8 and 32 clients at once with either).
import { constants, createHash, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import forge from 'node-forge';
import { errorCode } from './log.ts';

const DAY = 86_400_000;
const CA_LIFETIME_DAYS = 3650;
const LEAF_LIFETIME_DAYS = 90;
/** A leaf this close to expiry is minted again. */
const LEAF_RENEW_BEFORE_MS = 7 * DAY;
/**
 * Contexts held in memory, least recently used out first. Sessions ask only for the names the policy
 * intercepts (src/session.ts), so this bounds a policy of more registries than that, never a client.
 */
const MEMORY_CACHE_SIZE = 256;

/**
 * The leaf key types, in the order their leaves are put in a context. RSA last: a session whose context
 * is swapped in by an SNICallback (the mirror front's) gets only the context's last certificate (Node's
 * UseSNIContext copies one), and every client can take RSA.
 */
export const LEAF_KEY_TYPES = ['ecdsa', 'rsa'] as const;
export type LeafKeyType = (typeof LEAF_KEY_TYPES)[number];

/** The file in the data directory that holds the key pair of every leaf of a type. */
const LEAF_KEY_FILES: Record<LeafKeyType, string> = { ecdsa: 'leaf-ec.key', rsa: 'leaf.key' };

/**
 * How the leaves' contexts negotiate: the server's preference, since Go's crypto/tls lists RSA-PSS before
 * ECDSA and with its own order would be handed the RSA leaf. The server's order of signature algorithms
 * is OpenSSL's, ECDSA first. Its TLS 1.3 suites are ordered as Go orders them on CPUs with AES
 * instructions, AES-128-GCM first (Node's default order would move Go clients to AES-256-GCM, more CPU
 * per byte for both sides); a client that lists ChaCha20 first (no AES instructions) still gets it. TLS
 * 1.2: the ECDSA suites before the RSA ones, the rest as Node has them.
 */
const LEAF_TLS_OPTIONS: tls.SecureContextOptions = {
  honorCipherOrder: true,
  secureOptions: constants.SSL_OP_PRIORITIZE_CHACHA,
  ciphers: [
    'TLS_AES_128_GCM_SHA256',
    'TLS_AES_256_GCM_SHA384',
    'TLS_CHACHA20_POLY1305_SHA256',
    'ECDHE-ECDSA-AES128-GCM-SHA256',
    'ECDHE-ECDSA-AES256-GCM-SHA384',
    'ECDHE-ECDSA-CHACHA20-POLY1305',
    ...tls.DEFAULT_CIPHERS.split(':').filter((cipher) => !cipher.startsWith('TLS_')),
  ].join(':'),
};

/** Where minted leaf certificates persist across restarts (the LMDB index); optional. */
export interface LeafStore {
  get(key: string): string | undefined;
  /** Stores in the background: a write that fails is the store's to log, never the caller's to handle. */
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
  private readonly leafKeys: Record<LeafKeyType, LeafKey>;
  private readonly contexts = new Map<string, { context: tls.SecureContext; notAfter: number }>();
  private readonly store: LeafStore | undefined;

  /**
   * Loads ca.crt/ca.key from `caDir` (bring your own by placing them there; a read-only mount such as a
   * Kubernetes Secret will do), or creates them there once.
   *
   * leaf-ec.key and leaf.key, the key pairs of every ECDSA and RSA leaf, live in `dataDir` (0600): beside
   * the LMDB index whose leaves certify them, generated once and kept with them, so that a restart serves
   * the stored leaves instead of minting them again, and a read-only CA directory needs nothing written to
   * it. (Held in memory only, they would be new at every start and every stored leaf minted again.)
   */
  static loadOrCreate(caDir: string, store?: LeafStore, dataDir = caDir): { ca: CertificateAuthority; created: boolean; copiedFrom?: string } {
    const certFile = path.join(caDir, 'ca.crt');
    const keyFile = path.join(caDir, 'ca.key');
    let created = false;
    let copiedFrom: string | undefined;
    if (!existsSync(certFile) && !existsSync(keyFile)) {
      // A CA already in the data directory (before caDir was set) stays the one clients trust.
      const previous = path.resolve(dataDir) !== path.resolve(caDir) && existsSync(path.join(dataDir, 'ca.crt')) && existsSync(path.join(dataDir, 'ca.key'));
      writeCa(caDir, previous ? { certPem: readPem(path.join(dataDir, 'ca.crt')), keyPem: readPem(path.join(dataDir, 'ca.key')) } : createCa());
      if (previous) copiedFrom = dataDir;
      else created = true;
    } else if (!existsSync(certFile) || !existsSync(keyFile)) {
      throw new CertificateError(`${caDir} has only one of ca.crt and ca.key; provide both (your own CA) or neither (a new one is created)`);
    }
    keepPrivate(keyFile);
    const leafKeyPems = { ecdsa: loadOrCreateLeafKey(dataDir, 'ecdsa'), rsa: loadOrCreateLeafKey(dataDir, 'rsa') };
    const ca = new CertificateAuthority(readPem(certFile), readPem(keyFile), leafKeyPems, store);
    return { ca, created, ...(copiedFrom ? { copiedFrom } : {}) };
  }

  /** Writes a new CA into `caDir` (where there is none: `ca rotate` has moved the old one aside). */
  static create(caDir: string): void {
    writeCa(caDir, createCa());
  }

  constructor(certPem: string, keyPem: string, leafKeyPems: Record<LeafKeyType, string>, store?: LeafStore) {
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
    this.leafKeys = { ecdsa: leafKey('ecdsa', leafKeyPems.ecdsa), rsa: leafKey('rsa', leafKeyPems.rsa) };
    this.store = store;
  }

  /**
   * The TLS context for a name (DNS name or IP literal): from memory, else from the store, else minted
   * and stored for good. Only for names the policy intercepts: every name asked for is a leaf in the
   * index and, while held here, a metric label.
   */
  secureContextFor(name: string): tls.SecureContext {
    const host = name.toLowerCase();
    const now = Date.now();
    const cached = this.contexts.get(host);
    if (cached && cached.notAfter - now > LEAF_RENEW_BEFORE_MS) {
      this.contexts.delete(host);
      this.contexts.set(host, cached); // most recently used last
      return cached.context;
    }
    const leaves = LEAF_KEY_TYPES.map((type) => this.leafFor(host, type, now));
    const context = tls.createSecureContext(this.credentialsOf(leaves));
    this.contexts.delete(host); // a renewed leaf is the most recently used too
    this.contexts.set(host, { context, notAfter: Math.min(...leaves.map((leaf) => leaf.notAfter)) });
    if (this.contexts.size > MEMORY_CACHE_SIZE) this.contexts.delete(this.contexts.keys().next().value!);
    return context;
  }

  /**
   * What a TLS server is created with to answer clients that send no SNI (an address) with this name's
   * leaves: createServer ignores a secureContext option, and its SNICallback is only asked for a name.
   */
  serverOptionsFor(name: string): tls.SecureContextOptions {
    const now = Date.now();
    return this.credentialsOf(LEAF_KEY_TYPES.map((type) => this.leafFor(name.toLowerCase(), type, now)));
  }

  private credentialsOf(leaves: Array<{ certPem: string }>): tls.SecureContextOptions {
    return { ...LEAF_TLS_OPTIONS, cert: leaves.map((leaf) => leaf.certPem + this.certPem), key: LEAF_KEY_TYPES.map((type) => this.leafKeys[type].pem) };
  }

  /**
   * The host's leaf of a key type: the stored one, else minted and stored for good. Each type has a key
   * of its own in the store (RSA leaves where they always were, "<CA fingerprint>/<host>"; ECDSA ones
   * under "<CA fingerprint>/ecdsa/<host>", a slash no host name has), so neither is taken for the other.
   */
  private leafFor(host: string, type: LeafKeyType, now: number): { certPem: string; notAfter: number } {
    const storeKey = type === 'rsa' ? `${this.fingerprint}/${host}` : `${this.fingerprint}/${type}/${host}`;
    const stored = this.storedLeaf(storeKey, type, now);
    if (stored) return stored;
    const certPem = this.mintLeaf(host, type);
    try {
      this.store?.put(storeKey, certPem);
    } catch {
      // The store only saves minting: a leaf it cannot keep is served all the same, minted again next start.
    }
    return { certPem, notAfter: new X509Certificate(certPem).validToDate.getTime() };
  }

  /** The stored leaf for `key` if it may be served again; a store that cannot be read, or garbage in it, means minting. */
  private storedLeaf(key: string, type: LeafKeyType, now: number): { certPem: string; notAfter: number } | undefined {
    try {
      const certPem = this.store?.get(key);
      if (!certPem) return undefined;
      const leaf = new X509Certificate(certPem);
      return this.reusable(leaf, type, now) ? { certPem, notAfter: leaf.validToDate.getTime() } : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * A stored leaf is served again while it is not about to expire and certifies the leaf key of its type
   * in use (one minted for a key file since deleted, or for the other type, would not match it).
   */
  private reusable(leaf: X509Certificate, type: LeafKeyType, now: number): boolean {
    return leaf.validToDate.getTime() - now > LEAF_RENEW_BEFORE_MS && leaf.publicKey.equals(this.leafKeys[type].publicKey);
  }

  /** When each leaf in use (the ones held in memory) expires, for the metrics. */
  leafExpiries(): Array<{ host: string; notAfter: Date }> {
    return [...this.contexts].map(([host, { notAfter }]) => ({ host, notAfter: new Date(notAfter) }));
  }

  /** A leaf for `host` certifying the key pair of `type`, signed by the CA. */
  mintLeaf(host: string, type: LeafKeyType = 'ecdsa'): string {
    const key = this.leafKeys[type];
    const cert = forge.pki.createCertificate();
    // forge encodes RSA keys only: an ECDSA leaf's SubjectPublicKeyInfo is put into its TBSCertificate
    // below, and this RSA key stands in for it until then (nothing of it reaches the certificate).
    cert.publicKey = (key.forgeKey ?? this.leafKeys.rsa.forgeKey)!;
    cert.serialNumber = serialNumber();
    cert.validity.notBefore = new Date(Date.now() - 3_600_000);
    cert.validity.notAfter = new Date(Math.min(Date.now() + LEAF_LIFETIME_DAYS * DAY, this.notAfter.getTime()));
    cert.setSubject([{ name: 'commonName', value: host.slice(0, 64) }]);
    cert.setIssuer(this.caCert.subject.attributes);
    const altName = isIP(host) ? { type: 7, ip: host } : { type: 2, value: host };
    cert.setExtensions([
      { name: 'basicConstraints', cA: false, critical: true },
      // An ECDSA key only signs (the handshake); an RSA one may also be encrypted to (TLS 1.2's RSA key exchange).
      { name: 'keyUsage', digitalSignature: true, ...(type === 'rsa' ? { keyEncipherment: true } : {}), critical: true },
      { name: 'extKeyUsage', serverAuth: true },
      { name: 'subjectAltName', altNames: [altName] },
      // Given as its value: forge would compute it from the stand-in RSA key of an ECDSA leaf.
      { name: 'subjectKeyIdentifier', value: forge.asn1.create(forge.asn1.Class.UNIVERSAL, forge.asn1.Type.OCTETSTRING, false, key.keyIdentifier) },
      { name: 'authorityKeyIdentifier', keyIdentifier: authorityKeyId(this.caCert) },
    ]);
    return signNatively(cert, this.caKey, key.spki);
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

function writeCa(caDir: string, { certPem, keyPem }: { certPem: string; keyPem: string }): void {
  try {
    mkdirSync(caDir, { recursive: true });
    writeFileSync(path.join(caDir, 'ca.key'), keyPem, { mode: 0o600, flag: 'wx' });
    writeFileSync(path.join(caDir, 'ca.crt'), certPem, { mode: 0o644, flag: 'wx' });
  } catch (err) {
    throw new CertificateError(`cannot create the CA in ${caDir} (${errorCode(err)}): make that directory writable by the proxy, or place your own ca.crt and ca.key in it`);
  }
}

function loadOrCreateLeafKey(dataDir: string, type: LeafKeyType): string {
  const file = path.join(dataDir, LEAF_KEY_FILES[type]);
  if (existsSync(file)) {
    keepPrivate(file);
    return readPem(file);
  }
  const { privateKey } = type === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  mkdirSync(dataDir, { recursive: true });
  writeFileSync(file, pem, { mode: 0o600 });
  return pem;
}

/**
 * A private key must stay private whoever created it. Mode 0600 or 0400 (nothing for group and others)
 * is left as it is: a chmod on a read-only mount fails with EROFS. A looser key is made 0600; when that
 * fails (a read-only mount, another user's file), one looser case is still accepted: readable by a group
 * the proxy is in and by nobody else. That is how Kubernetes mounts a Secret into a pod with fsGroup
 * (owned by root, group fsGroup, 0440 whatever defaultMode says: kubernetes/kubernetes#57923), and the
 * only way a non-root proxy can read a root-owned key. Anything else is refused.
 */
function keepPrivate(file: string): void {
  const { mode, gid } = statSync(file);
  if ((mode & 0o077) === 0) return;
  try {
    chmodSync(file, 0o600);
  } catch (err) {
    const ownGroups = [process.getgid?.(), ...(process.getgroups?.() ?? [])];
    if ((mode & 0o037) === 0 && ownGroups.includes(gid)) return;
    throw new CertificateError(
      `${file} is readable by other users (mode ${(mode & 0o777).toString(8).padStart(4, '0')}) and cannot be made 0600 (${errorCode(err)}): ` +
        'give it mode 0600 or 0400 where it comes from (a Kubernetes Secret: defaultMode: 0400)',
    );
  }
}

function readPem(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    throw new CertificateError(`cannot read ${file} (${errorCode(err)}): it must be readable by the proxy's user`);
  }
}


/**
 * Signs the TBSCertificate with node:crypto (fast) and lets forge encode the result; `spki`, when given,
 * is the SubjectPublicKeyInfo the certificate carries instead of the one forge encodes (an EC key).
 */
function signNatively(cert: forge.pki.Certificate, key: ReturnType<typeof createPrivateKey>, spki?: forge.asn1.Asn1): string {
  const oid = forge.pki.oids.sha256WithRSAEncryption!;
  cert.signatureOid = oid;
  (cert as unknown as { siginfo: { algorithmOid: string } }).siginfo.algorithmOid = oid;
  // getTBSCertificate exists in forge but is missing from its type definitions.
  const getTbs = (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate;
  const tbs = getTbs(cert);
  // version, serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, extensions
  if (spki) (tbs.value as forge.asn1.Asn1[])[6] = spki;
  // certificateToPem encodes this TBSCertificate rather than building one again from the fields.
  (cert as unknown as { tbsCertificate: forge.asn1.Asn1 }).tbsCertificate = tbs;
  cert.signature = sign('sha256', Buffer.from(forge.asn1.toDer(tbs).getBytes(), 'binary'), key).toString('binary');
  return forge.pki.certificateToPem(cert).replace(/\r\n/g, '\n');
}

/** A leaf key pair, with what minting needs of its public half. */
interface LeafKey {
  pem: string;
  publicKey: KeyObject;
  /** The public key as forge holds it: RSA only. */
  forgeKey: forge.pki.PublicKey | undefined;
  /** The SubjectPublicKeyInfo to put into the TBSCertificate when forge cannot encode the key (EC). */
  spki: forge.asn1.Asn1 | undefined;
  /** The SHA-1 of the subjectPublicKey bits (RFC 5280's method 1), a binary string: the leaf's subjectKeyIdentifier. */
  keyIdentifier: string;
}

function leafKey(type: LeafKeyType, pem: string): LeafKey {
  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey(pem);
  } catch (err) {
    throw new CertificateError(`${LEAF_KEY_FILES[type]} cannot be read: ${(err as Error).message} (delete it: a new one is made at start)`);
  }
  const expected = type === 'rsa' ? 'rsa' : 'ec';
  if (publicKey.asymmetricKeyType !== expected || (type === 'ecdsa' && publicKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1')) {
    throw new CertificateError(`${LEAF_KEY_FILES[type]} is not ${type === 'rsa' ? 'an RSA' : 'an ECDSA P-256'} key (delete it: a new one is made at start)`);
  }
  const der = publicKey.export({ type: 'spki', format: 'der' });
  // The subjectPublicKey's bits as they are (forge would otherwise decode an RSA key's into ASN.1); its
  // type definitions know only the older boolean argument.
  const fromDer = forge.asn1.fromDer as unknown as (bytes: forge.util.ByteStringBuffer, options: { decodeBitStrings: boolean }) => forge.asn1.Asn1;
  const spki = fromDer(forge.util.createBuffer(der.toString('binary')), { decodeBitStrings: false });
  // SubjectPublicKeyInfo ::= SEQUENCE { algorithm, subjectPublicKey BIT STRING }: the bits follow the unused-bits byte.
  const bits = Buffer.from((spki.value as forge.asn1.Asn1[])[1]!.value as string, 'binary').subarray(1);
  return {
    pem,
    publicKey,
    forgeKey: type === 'rsa' ? forge.pki.publicKeyFromPem(publicKey.export({ type: 'spki', format: 'pem' }).toString()) : undefined,
    spki: type === 'rsa' ? undefined : spki,
    keyIdentifier: createHash('sha1').update(bits).digest('binary'),
  };
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
