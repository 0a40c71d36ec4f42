// Just enough Markdown for the documentation tests: sections by heading, fenced code blocks, GitHub
// tables, code spans, links and GitHub's heading anchors. Everything inside a fenced block is code,
// never a heading, table or link.
import { readFileSync } from 'node:fs';
import path from 'node:path';

export const REPO = path.resolve(import.meta.dirname, '../..');

export function readDoc(relative: string): string {
  return readFileSync(path.join(REPO, relative), 'utf8');
}

export interface Line {
  text: string;
  /** 1-based. */
  number: number;
  /** Inside a fenced code block (the fences included). */
  code: boolean;
}

export function lines(markdown: string): Line[] {
  let fence: string | undefined;
  return markdown.split('\n').map((text, i) => {
    const marker = /^ {0,3}(`{3,}|~{3,})/.exec(text)?.[1];
    if (fence === undefined && marker) {
      fence = marker;
      return { text, number: i + 1, code: true };
    }
    if (fence !== undefined) {
      if (marker && marker[0] === fence[0] && marker.length >= fence.length && text.trim() === marker) fence = undefined;
      return { text, number: i + 1, code: true };
    }
    return { text, number: i + 1, code: false };
  });
}

export interface Heading {
  level: number;
  text: string;
  line: number;
}

export function headings(markdown: string): Heading[] {
  return lines(markdown).flatMap((l) => {
    const match = l.code ? null : /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(l.text);
    return match ? [{ level: match[1]!.length, text: match[2]!, line: l.number }] : [];
  });
}

/** The text under a heading (exact text), up to the next heading of the same or a higher level. */
export function section(markdown: string, title: string): string {
  const all = headings(markdown);
  const start = all.find((h) => h.text === title);
  if (!start) throw new Error(`no heading "${title}"`);
  const end = all.find((h) => h.line > start.line && h.level <= start.level);
  return markdown.split('\n').slice(start.line, end ? end.line - 1 : undefined).join('\n');
}

export interface CodeBlock {
  lang: string;
  body: string;
  /** Line of the opening fence, relative to the text given. */
  line: number;
}

export function codeBlocks(markdown: string): CodeBlock[] {
  const blocks: CodeBlock[] = [];
  let current: { lang: string; body: string[]; line: number } | undefined;
  for (const l of lines(markdown)) {
    if (!l.code) continue;
    const open = /^ {0,3}(?:`{3,}|~{3,})\s*([\w-]*)/.exec(l.text);
    if (!current) {
      current = { lang: open?.[1] ?? '', body: [], line: l.number };
    } else if (open && l.text.trim().replace(/[`~]/g, '') === '') {
      blocks.push({ lang: current.lang, body: current.body.join('\n'), line: current.line });
      current = undefined;
    } else {
      current.body.push(l.text);
    }
  }
  return blocks;
}

/** A GitHub table: its header cells and rows of cells (trimmed; `\|` unescaped). */
export interface Table {
  header: string[];
  rows: string[][];
  line: number;
}

export function tables(markdown: string): Table[] {
  const out: Table[] = [];
  const all = lines(markdown);
  for (let i = 0; i + 1 < all.length; i++) {
    const head = all[i]!;
    const rule = all[i + 1]!;
    if (head.code || rule.code || !head.text.trim().startsWith('|') || !/^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/.test(rule.text)) continue;
    const table: Table = { header: cells(head.text), rows: [], line: head.number };
    let j = i + 2;
    for (; j < all.length && !all[j]!.code && all[j]!.text.trim().startsWith('|'); j++) table.rows.push(cells(all[j]!.text));
    out.push(table);
    i = j - 1;
  }
  return out;
}

function cells(row: string): string[] {
  const inner = row.trim().replace(/^\|/, '').replace(/(?<!\\)\|$/, '');
  return inner.split(/(?<!\\)\|/).map((cell) => cell.trim().replaceAll('\\|', '|'));
}

/** The contents of every `code span` in a piece of text, in order. */
export function codeSpans(text: string): string[] {
  return [...text.matchAll(/(`+)(.+?)\1/g)].map((m) => m[2]!.trim());
}

export interface Link {
  target: string;
  line: number;
}

/** Inline links and images, outside code blocks and code spans. */
export function links(markdown: string): Link[] {
  return lines(markdown).flatMap((l) => {
    if (l.code) return [];
    const text = l.text.replace(/(`+).+?\1/g, '');
    return [...text.matchAll(/!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)].map((m) => ({ target: m[1]!, line: l.number }));
  });
}

/** The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as '-', repeats numbered. */
export function anchors(markdown: string): Set<string> {
  const seen = new Map<string, number>();
  const out = new Set<string>();
  for (const h of headings(markdown)) {
    const text = h.text
      .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1') // a link's text only
      .replace(/<[^>]+>/g, '');
    const base = text
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\p{M}\s_-]/gu, '')
      .replace(/ /g, '-');
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    out.add(n === 0 ? base : `${base}-${n}`);
  }
  return out;
}
