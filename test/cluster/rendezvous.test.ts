// Rendezvous ranking: every replica computes the same owner from the key and the member list alone,
// keys spread evenly, and a member joining or leaving moves only the keys it wins or held.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';
import { blobKey, manifestKey, rankFor } from '../../src/cluster/rendezvous.ts';

const members = (n: number) => Array.from({ length: n }, (_, i) => `10.0.0.${i + 1}:3129`);
const keys = Array.from({ length: 3000 }, (_, i) => blobKey(`sha256:${createHash('sha256').update(String(i)).digest('hex')}`));
const owners = (list: string[]) => keys.map((key) => rankFor(key, list)[0]);

describe('rendezvous ranking', () => {
  test('the same owner whatever order the members are listed in, and every member in the ranking once', () => {
    const list = members(3);
    for (const key of keys.slice(0, 200)) {
      const ranked = rankFor(key, list);
      assert.deepEqual(rankFor(key, [...list].reverse()), ranked);
      assert.deepEqual([...ranked].sort(), [...list].sort());
    }
  });

  test('keys spread evenly over the members', () => {
    const counts = new Map<string, number>();
    for (const owner of owners(members(3))) counts.set(owner!, (counts.get(owner!) ?? 0) + 1);
    for (const [member, count] of counts) assert.ok(count > 850 && count < 1150, `${member} owns ${count} of 3000`);
  });

  test('a member joining takes ~1/N of the keys from the others and moves no other key; leaving moves only its own', () => {
    const before = owners(members(3));
    const after = owners(members(4));
    let moved = 0;
    for (const [i, owner] of after.entries()) {
      if (owner === before[i]) continue;
      moved++;
      assert.equal(owner, '10.0.0.4:3129', 'a key moved between members that stayed');
    }
    assert.ok(moved > 600 && moved < 900, `${moved} of 3000 keys moved to the 4th member (expected ~750)`);
    // The 4th leaving again: its keys go back where they were, nothing else moves.
    assert.deepEqual(owners(members(3)), before);
    // A member leaving: its keys go to the next in each key's ranking, which is what failover asks.
    const without2 = owners(members(3).filter((m) => m !== '10.0.0.2:3129'));
    for (const [i, owner] of without2.entries()) {
      if (before[i] !== '10.0.0.2:3129') assert.equal(owner, before[i]);
      else assert.equal(owner, rankFor(keys[i]!, members(3))[1]);
    }
  });

  test('manifests are keyed by repository (tag and digest meet), blobs by digest alone', () => {
    assert.equal(manifestKey('registry-1.docker.io:443', 'library/alpine'), manifestKey('registry-1.docker.io:443', 'library/alpine'));
    assert.notEqual(manifestKey('registry-1.docker.io:443', 'library/alpine'), manifestKey('ghcr.io:443', 'library/alpine'));
    assert.notEqual(blobKey('sha256:aa'), manifestKey('x', 'sha256:aa'));
  });
});
