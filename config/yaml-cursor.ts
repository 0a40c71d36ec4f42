// A read-only walk over a parsed YAML document that knows, for every value, its key path and its
// file:line:column, so that each validation error points at the exact place to fix.
import { isMap, isScalar, isSeq, type LineCounter, type Node as YamlNode } from 'yaml';
import { parseDuration, parseSize } from './units.ts';

export class ConfigError extends Error {
  override name = 'ConfigError';
}

export interface Source {
  file: string;
  lines: LineCounter;
  env: NodeJS.ProcessEnv;
}

export class Cursor {
  readonly node: YamlNode | null;
  readonly path: string;
  readonly source: Source;

  constructor(node: YamlNode | null, path: string, source: Source) {
    this.node = node;
    this.path = path;
    this.source = source;
  }

  get present(): boolean {
    return this.node !== null && !(isScalar(this.node) && this.node.value === null);
  }

  where(): string {
    const offset = this.node?.range?.[0];
    if (offset === undefined) return this.source.file;
    const { line, col } = this.source.lines.linePos(offset);
    return `${this.source.file}:${line}:${col}`;
  }

  fail(message: string): never {
    throw new ConfigError(`${this.where()}: ${this.path || '(top level)'}: ${message}`);
  }

  /** The entries of a mapping; keys outside `allowed` are rejected so typos do not pass silently. */
  entries(allowed?: readonly string[]): Map<string, Cursor> {
    const out = new Map<string, Cursor>();
    if (!this.present) return out;
    if (!isMap(this.node)) this.fail('expected a mapping (key: value)');
    for (const pair of this.node.items) {
      const keyNode = pair.key as YamlNode | null;
      const key = isScalar(keyNode) ? String(keyNode.value) : '';
      const child = new Cursor((pair.value as YamlNode | null) ?? null, this.path ? `${this.path}.${key}` : key, this.source);
      if (allowed && !allowed.includes(key)) {
        new Cursor(keyNode, child.path, this.source).fail(`unknown key (expected one of: ${allowed.join(', ')})`);
      }
      out.set(key, child);
    }
    return out;
  }

  items(): Cursor[] {
    if (!this.present) return [];
    if (!isSeq(this.node)) this.fail('expected a list');
    return this.node.items.map((item, i) => new Cursor(item as YamlNode, `${this.path}[${i}]`, this.source));
  }

  private scalar(): unknown {
    if (!isScalar(this.node)) this.fail('expected a single value');
    return this.node.value;
  }

  /** A string with ${VAR} and ${VAR:-default} expanded from the environment. */
  string(): string {
    const value = this.scalar();
    if (typeof value !== 'string' && typeof value !== 'number') this.fail('expected a string');
    return expandEnv(String(value), this.source.env, (message) => this.fail(message));
  }

  boolean(): boolean {
    const value = this.scalar();
    if (typeof value === 'boolean') return value;
    const text = typeof value === 'string' ? expandEnv(value, this.source.env, (m) => this.fail(m)) : '';
    if (/^(true|yes|on|1)$/i.test(text)) return true;
    if (/^(false|no|off|0)$/i.test(text)) return false;
    this.fail('expected true or false');
  }

  oneOf<T extends string>(choices: readonly T[]): T {
    const text = this.string();
    if (!(choices as readonly string[]).includes(text)) this.fail(`expected one of: ${choices.join(', ')}`);
    return text as T;
  }

  durationMs(): number {
    return this.convert(parseDuration);
  }

  size(): number {
    return this.convert(parseSize);
  }

  regex(): RegExp {
    return this.convert((text) => new RegExp(`^(?:${text})$`));
  }

  stringList(): string[] {
    return this.items().map((item) => item.string());
  }

  private convert<T>(parse: (text: string) => T): T {
    const text = this.string();
    try {
      return parse(text);
    } catch (err) {
      this.fail((err as Error).message);
    }
  }
}

/** Expands ${VAR} and ${VAR:-default}; "$${" stands for a literal "${". */
export function expandEnv(text: string, env: NodeJS.ProcessEnv, fail: (message: string) => never): string {
  return text.replace(/\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g, (whole, name?: string, fallback?: string) => {
    if (whole === '$${') return '${';
    const value = env[name!];
    if (value !== undefined && value !== '') return value;
    if (fallback !== undefined) return fallback;
    return fail(`environment variable ${name} is not set (write \${${name}:-} to allow it to be empty)`);
  });
}
