// Reads the Prometheus text exposition format (what /metrics serves) into samples, so tests assert on
// values by metric name and labels rather than on lines.
import { request } from 'undici';

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export class Scrape {
  readonly samples: Sample[];
  /** Metric name -> TYPE line's type. */
  readonly types: Map<string, string>;

  constructor(text: string) {
    this.samples = [];
    this.types = new Map();
    for (const line of text.split('\n')) {
      if (line.startsWith('# TYPE ')) {
        const [name, type] = line.slice('# TYPE '.length).split(' ');
        this.types.set(name!, type!);
        continue;
      }
      if (line === '' || line.startsWith('#')) continue;
      this.samples.push(parseSample(line));
    }
  }

  /** The samples of `name` whose labels include `labels`. */
  select(name: string, labels: Record<string, string> = {}): Sample[] {
    return this.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  }

  /** The sum over select(name, labels): 0 when there is none (a counter never incremented is absent). */
  sum(name: string, labels: Record<string, string> = {}): number {
    return this.select(name, labels).reduce((total, s) => total + s.value, 0);
  }

  /** The one sample of `name` with exactly these labels; throws when absent. */
  value(name: string, labels: Record<string, string> = {}): number {
    const found = this.samples.filter((s) => s.name === name && sameLabels(s.labels, labels));
    if (found.length !== 1) throw new Error(`${name}${JSON.stringify(labels)}: ${found.length} samples; have ${JSON.stringify(this.select(name))}`);
    return found[0]!.value;
  }
}

export async function scrape(baseUrl: string): Promise<Scrape> {
  const response = await request(`${baseUrl}/metrics`);
  const text = await response.body.text();
  if (response.statusCode !== 200) throw new Error(`/metrics answered ${response.statusCode}: ${text}`);
  if (!/^text\/plain; version=0\.0\.4/.test(String(response.headers['content-type']))) throw new Error(`/metrics content-type ${response.headers['content-type']}`);
  return new Scrape(text);
}

function sameLabels(a: Record<string, string>, b: Record<string, string>): boolean {
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length && keys.every((k) => a[k] === b[k]);
}

/** `name{a="x",b="y\"z"} 12.5` (label values escaped as \\, \" and \n). */
function parseSample(line: string): Sample {
  const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
  if (!match) throw new Error(`not a sample line: ${line}`);
  const labels: Record<string, string> = {};
  const body = match[2]?.slice(1, -1) ?? '';
  const pair = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?/g;
  let at = 0;
  for (let m = pair.exec(body); m; m = pair.exec(body)) {
    if (m.index !== at) throw new Error(`bad labels in: ${line}`);
    labels[m[1]!] = m[2]!.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
    at = pair.lastIndex;
  }
  if (at !== body.length) throw new Error(`bad labels in: ${line}`);
  // Prometheus parses values with Go's ParseFloat: NaN and Inf in any case (prom-client writes "Nan").
  const raw = match[3]!.toLowerCase();
  const value = raw === '+inf' || raw === 'inf' ? Infinity : raw === '-inf' ? -Infinity : raw === 'nan' ? NaN : Number(raw);
  if (Number.isNaN(value) && raw !== 'nan') throw new Error(`bad value in: ${line}`);
  return { name: match[1]!, labels, value };
}
