// Figures for people (an aligned table) and for tools (one JSON line), and the statistics behind them.

/** The median; for an even count, the mean of the middle two. */
export function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** A number with a fixed count of decimals; '-' for a missing or non-finite one. */
export function fixed(value: number | undefined, decimals: number): string {
  return value === undefined || !Number.isFinite(value) ? '-' : value.toFixed(decimals);
}

/** Rounds for the JSON line: enough digits to quote, not float noise. */
export function round(value: number, decimals = 3): number {
  const factor = 10 ** decimals;
  return Math.round(value * factor) / factor;
}

/** A plain-text table: the first column left-aligned, the others (figures) right-aligned. */
export function formatTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? '').length)));
  const line = (cells: readonly string[]) =>
    cells.map((cell, column) => (column === 0 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!))).join('  ').trimEnd();
  return [line(header), widths.map((width) => '-'.repeat(width)).join('  '), ...rows.map(line)].join('\n');
}

/** A copy of a JSON-able value with every number rounded (to 3 decimals): the JSON line stays readable. */
export function roundNumbers<T>(value: T, decimals = 3): T {
  if (typeof value === 'number') return round(value, decimals) as T;
  if (Array.isArray(value)) return value.map((item: unknown) => roundNumbers(item, decimals)) as T;
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, roundNumbers(item, decimals)])) as T;
  }
  return value;
}
