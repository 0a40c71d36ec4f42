// Names in /etc/hosts for clients that must reach test hosts without the proxy (a mirror's fallback to
// the registry itself): Go resolves them there. Each line carries this process's mark, and only those
// lines are removed again. Needs root; tests that need it skip otherwise.
import { readFileSync, writeFileSync } from 'node:fs';

const HOSTS = '/etc/hosts';

export function etcHostsUnavailable(): string | undefined {
  return process.getuid?.() === 0 ? undefined : 'writing /etc/hosts needs root';
}

/** Adds `address name` lines; returns what removes exactly them. */
export function addEtcHosts(names: readonly string[], address = '127.0.0.1'): () => void {
  const mark = `# pullthrough-test ${process.pid}`;
  const lines = names.map((name) => `${address} ${name} ${mark}`);
  writeFileSync(HOSTS, `${readFileSync(HOSTS, 'utf8').replace(/\n?$/, '\n')}${lines.join('\n')}\n`);
  return () => {
    const kept = readFileSync(HOSTS, 'utf8').split('\n').filter((line) => !line.endsWith(mark));
    writeFileSync(HOSTS, kept.join('\n'));
  };
}
