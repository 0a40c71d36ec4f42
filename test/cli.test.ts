// The pullthrough command as users run it: a child process on Node 24, configured by file and env.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, statSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { httpOverSocket, tlsThroughProxy } from './helpers/connect.ts';
import { createTestCa } from './helpers/pki.ts';

const CLI = path.join(import.meta.dirname, '../src/cli.ts');

function runCli(args: string[], env: NodeJS.ProcessEnv = {}, cwd = os.tmpdir()): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c));
    child.stderr.on('data', (c: Buffer) => (stderr += c));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Starts `pullthrough start` and resolves once it logs that it listens; returns its port and a stop. */
async function startCli(env: NodeJS.ProcessEnv, cwd: string): Promise<{ port: number; stop(): Promise<number | null>; output(): string }> {
  const child = spawn(process.execPath, [CLI, 'start'], { cwd, env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (c: Buffer) => (output += c));
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr.on('data', (c: Buffer) => {
      output += c;
      const match = /"listen":"[^"]*:(\d+)"/.exec(output);
      if (match) resolve(Number(match[1]));
    });
    child.once('exit', (code) => reject(new Error(`exited with ${code}: ${output}`)));
  });
  return {
    port,
    output: () => output,
    stop: () =>
      new Promise((resolve) => {
        child.once('exit', (code) => resolve(code));
        child.kill('SIGTERM');
      }),
  };
}

describe('the pullthrough command', () => {
  test('an invalid proxy.yaml stops it with file:line:key and a non-zero exit', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-'));
    writeFileSync(path.join(dir, 'proxy.yaml'), 'listen: 127.0.0.1:0\nregistries:\n  quay.io:\n    push: sometimes\n');
    const result = await runCli(['start'], {}, dir);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /proxy\.yaml:4:11: registries\.quay\.io\.push: expected one of: deny, bypass/);
  });

  test('an unreadable --config is named, and nothing starts', async () => {
    const result = await runCli(['start', '--config', '/nonexistent/proxy.yaml']);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /\/nonexistent\/proxy\.yaml: cannot read the policy file: ENOENT/);
  });

  test('check-config prints the effective policy with secrets masked', async () => {
    const result = await runCli(['check-config'], { PULLTHROUGH_CONFIG: path.join(import.meta.dirname, '../proxy.yaml'), AUTH_REGISTRIES: 'auth.docker.io:hubuser:very-secret-token' });
    assert.equal(result.code, 0, result.stderr);
    assert.ok(!result.stdout.includes('very-secret-token'));
    assert.match(result.stdout, /registry-1\.docker\.io:443:[\s\S]*username: hubuser/);
  });

  test('start: creates the CA (key 0600) once, serves it, trusts NODE_EXTRA_CA_CERTS upstream, stops on SIGTERM', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pullthrough-cli-'));
    const upstreamCa = createTestCa('cli upstream CA');
    const leaf = upstreamCa.issue(['up.test']);
    const upstream = https.createServer({ cert: leaf.certPem, key: leaf.keyPem }, (_req, res) => res.end('{}'));
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const upstreamPort = (upstream.address() as AddressInfo).port;
    writeFileSync(path.join(dir, 'proxy.yaml'), `registries:\n  up.test:${upstreamPort}: {}\nhosts:\n  up.test: 127.0.0.1\n`);
    writeFileSync(path.join(dir, 'upstream-ca.pem'), upstreamCa.certPem);
    const env = { PULLTHROUGH_LISTEN: '127.0.0.1:0', PULLTHROUGH_DATA_DIR: path.join(dir, 'state') };
    try {
      // Without the upstream CA the proxy refuses to talk to the upstream, and says why.
      let proxy = await startCli(env, dir);
      let caPem = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      let response = await httpOverSocket(await tlsThroughProxy(proxy.port, 'up.test', upstreamPort, caPem), 'GET', '/v2/', 'up.test');
      assert.equal(response.status, 502);
      assert.match(response.body.toString(), /UNAVAILABLE.*unable to verify the first certificate.*NODE_EXTRA_CA_CERTS/);
      assert.equal(await proxy.stop(), 0);
      assert.equal(statSync(path.join(dir, 'state/ca.key')).mode & 0o777, 0o600);

      // With NODE_EXTRA_CA_CERTS it does, and the CA created on first start is reused.
      proxy = await startCli({ ...env, NODE_EXTRA_CA_CERTS: path.join(dir, 'upstream-ca.pem') }, dir);
      const again = await (await fetch(`http://127.0.0.1:${proxy.port}/ca.crt`)).text();
      assert.equal(again, caPem, 'the same CA after a restart');
      caPem = again;
      response = await httpOverSocket(await tlsThroughProxy(proxy.port, 'up.test', upstreamPort, caPem), 'GET', '/v2/', 'up.test');
      assert.equal(response.status, 200);
      assert.equal(await proxy.stop(), 0);
    } finally {
      upstream.closeAllConnections();
      upstream.close();
    }
  });
});
