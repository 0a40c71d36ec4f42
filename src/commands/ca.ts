// `pullthrough ca` prints the CA in use; `pullthrough ca rotate` replaces it (the old pair is kept as
// *.old-<time> beside it) and drops the leaves minted by the old one.
import { X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import { CertificateAuthority, CertificateError } from '../ca.ts';
import { openIndex } from '../cache/index.ts';

export function describeCa(caDir: string): string {
  const file = path.join(caDir, 'ca.crt');
  if (!existsSync(file)) return `no CA yet in ${caDir}: it is created at the first start\n`;
  const pem = readFileSync(file, 'utf8');
  const cert = new X509Certificate(pem);
  const daysLeft = Math.floor((cert.validToDate.getTime() - Date.now()) / 86_400_000);
  return [
    `subject:     ${cert.subject.replace(/\n/g, ', ')}`,
    `fingerprint: SHA256 ${cert.fingerprint256}`,
    `valid:       ${cert.validFromDate.toISOString()} to ${cert.validToDate.toISOString()} (${daysLeft} days left)`,
    `file:        ${file}`,
    '',
    pem.trimEnd(),
    '',
  ].join('\n');
}

/** Rotates the CA in `caDir`; the leaves (and leaf.key) are in `dataDir`'s index. */
export async function rotateCa(caDir: string, dataDir = caDir): Promise<string> {
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const old = path.join(caDir, 'ca.crt');
  let previous = '';
  if (existsSync(old)) {
    previous = new X509Certificate(readFileSync(old, 'utf8')).fingerprint256;
    try {
      renameSync(old, `${old}.old-${stamp}`);
    } catch (err) {
      // A CA mounted read-only (a Secret, say) is replaced where it comes from, not here.
      throw new CertificateError(
        `cannot rotate the CA in ${caDir} (${(err as NodeJS.ErrnoException).code}): replace ca.crt and ca.key where that directory comes from, then restart the proxy`,
      );
    }
    renameSync(path.join(caDir, 'ca.key'), path.join(caDir, `ca.key.old-${stamp}`));
    chmodSync(path.join(caDir, `ca.key.old-${stamp}`), 0o600);
  }
  CertificateAuthority.create(caDir);
  const index = openIndex(dataDir);
  try {
    const { ca } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
    const dropped = await index.dropLeavesExcept(ca.fingerprint);
    return [
      `new CA: SHA256 ${ca.fingerprint} (valid to ${ca.notAfter.toISOString()})`,
      previous ? `old CA: SHA256 ${previous}, kept as ca.crt.old-${stamp}; ${dropped} leaf certificates dropped` : 'there was no CA before',
      'restart the proxy, then give clients the new /ca.crt (the setup scripts install it)',
      '',
    ].join('\n');
  } finally {
    await index.close();
  }
}
