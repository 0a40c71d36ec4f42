import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { CertificateAuthority } from '../../src/ca.ts';
import { openIndex } from '../../src/cache/index.ts';
import { describeCa, rotateCa } from '../../src/commands/ca.ts';

test('ca prints the CA; ca rotate makes a new one, keeps the old pair and drops its leaves', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-ca-cmd-'));
  assert.match(describeCa(dir), /no CA yet/);
  let index = openIndex(dir);
  const { ca: old } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
  old.secureContextFor('registry.test');
  await index.root.committed;
  await index.close();
  assert.match(describeCa(dir), new RegExp(`fingerprint: SHA256 ${old.fingerprint}[\\s\\S]*BEGIN CERTIFICATE`));

  const report = await rotateCa(dir);
  // One host, two leaves: ECDSA and RSA.
  assert.match(report, /2 leaf certificates dropped/);
  const kept = readdirSync(dir).filter((f) => f.startsWith('ca.key.old-'));
  assert.equal(kept.length, 1);
  assert.equal(statSync(path.join(dir, kept[0]!)).mode & 0o777, 0o600, 'the old key stays private');
  assert.equal(statSync(path.join(dir, 'ca.key')).mode & 0o777, 0o600);
  index = openIndex(dir);
  const { ca: fresh, created } = CertificateAuthority.loadOrCreate(dir, index.leafCertificates);
  assert.equal(created, false, 'rotate already created it');
  assert.notEqual(fresh.fingerprint, old.fingerprint);
  assert.equal(index.leafCertificates.get(`${old.fingerprint}/registry.test`), undefined);
  await index.close();
  assert.ok(existsSync(path.join(dir, 'ca.crt')));
});

test('with a CA directory of its own, ca rotate replaces the CA there and drops the leaves in the data directory', async () => {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-ca-cmd-data-'));
  const caDir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-ca-cmd-ca-'));
  // A CA left in the data directory from before caDir was set: rotate must not bring it back.
  const { ca: leftOver } = CertificateAuthority.loadOrCreate(dataDir);
  let index = openIndex(dataDir);
  const { ca: old, copiedFrom } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
  assert.equal(copiedFrom, dataDir);
  old.secureContextFor('registry.test');
  await index.root.committed;
  await index.close();
  assert.match(describeCa(caDir), new RegExp(`file:\\s+${path.join(caDir, 'ca.crt')}`));

  const report = await rotateCa(caDir, dataDir);
  // One host, two leaves: ECDSA and RSA.
  assert.match(report, /2 leaf certificates dropped/);
  index = openIndex(dataDir);
  const { ca: fresh } = CertificateAuthority.loadOrCreate(caDir, index.leafCertificates, dataDir);
  assert.notEqual(fresh.fingerprint, leftOver.fingerprint, 'a new CA, not the one left in the data directory');
  assert.equal(index.leafCertificates.get(`${old.fingerprint}/registry.test`), undefined);
  await index.close();
  assert.equal(readdirSync(caDir).filter((f) => f.startsWith('ca.key.old-')).length, 1);
  assert.deepEqual(readdirSync(caDir).filter((f) => f === 'leaf.key'), [], 'leaf.key stays in the data directory');
});
