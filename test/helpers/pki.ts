// Test PKI: a throw-away CA and leaf certificates for the fake registries and proxies the end-to-end
// tests start. Keys come from node:crypto (native, fast); certificates are built and signed with
// node-forge, which only signs with RSA, hence RSA keys.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import forge from 'node-forge';

export interface PemPair {
  certPem: string;
  keyPem: string;
}

export interface TestCa extends PemPair {
  /** Issues a server certificate for DNS names and/or IP literals (IP literals become IP SANs). */
  issue(names: string[]): PemPair;
}

const HOUR_MS = 60 * 60 * 1000;
const VALIDITY_MS = 30 * 24 * HOUR_MS;

/** Creates a self-signed CA able to issue server certificates. */
export function createTestCa(commonName: string): TestCa {
  const caKeys = newRsaKeyPair();
  const caCert = newCertificate(caKeys.publicKey);
  const caName = [{ name: 'commonName', value: commonName }, { name: 'organizationName', value: 'pullthrough tests' }];
  caCert.setSubject(caName);
  caCert.setIssuer(caName);
  caCert.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  caCert.sign(caKeys.privateKey, forge.md.sha256.create());

  return {
    certPem: forge.pki.certificateToPem(caCert),
    keyPem: caKeys.privateKeyPem,
    issue(names: string[]): PemPair {
      return issueLeaf(caCert, caKeys.privateKey, names);
    },
  };
}

/** Writes a PEM into dir (created if needed) and returns its path. */
export function writePem(dir: string, name: string, pem: string): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, name);
  writeFileSync(path, pem, { mode: 0o600 });
  return path;
}

function issueLeaf(caCert: forge.pki.Certificate, caKey: forge.pki.rsa.PrivateKey, names: string[]): PemPair {
  const first = names[0];
  if (first === undefined) throw new Error('issue(): at least one DNS name or IP literal is required');
  const keys = newRsaKeyPair();
  const cert = newCertificate(keys.publicKey);
  // CN is informational only: Go, OpenSSL and Node all match on SANs.
  cert.setSubject([{ name: 'commonName', value: first }]);
  cert.setIssuer(caCert.subject.attributes);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', serverAuth: true },
    { name: 'subjectAltName', altNames: names.map(subjectAltName) },
    { name: 'subjectKeyIdentifier' },
    { name: 'authorityKeyIdentifier', keyIdentifier: caCert.generateSubjectKeyIdentifier().getBytes() },
  ]);
  cert.sign(caKey, forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem: keys.privateKeyPem };
}

// forge's GeneralName types: 2 = dNSName, 7 = iPAddress.
function subjectAltName(name: string): { type: number; value?: string; ip?: string } {
  return isIP(name) !== 0 ? { type: 7, ip: name } : { type: 2, value: name };
}

function newCertificate(publicKey: forge.pki.rsa.PublicKey): forge.pki.Certificate {
  const cert = forge.pki.createCertificate();
  cert.publicKey = publicKey;
  cert.serialNumber = positiveSerial();
  const now = Date.now();
  cert.validity.notBefore = new Date(now - HOUR_MS); // tolerate clock skew between processes
  cert.validity.notAfter = new Date(now + VALIDITY_MS);
  return cert;
}

// DER integers are signed: a first byte of 0x80 or more would be a negative serial, which Go rejects,
// and 0x00 would be a non-minimal encoding. So the first byte is 0x01-0x7F.
function positiveSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = ((bytes[0] ?? 0) % 0x7f) + 1;
  return bytes.toString('hex');
}

interface RsaKeyPair {
  publicKey: forge.pki.rsa.PublicKey;
  privateKey: forge.pki.rsa.PrivateKey;
  privateKeyPem: string;
}

function newRsaKeyPair(): RsaKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  return {
    publicKey: forge.pki.publicKeyFromPem(publicKey),
    privateKey: forge.pki.privateKeyFromPem(privateKey),
    privateKeyPem: privateKey,
  };
}
