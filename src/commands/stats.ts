// `pullthrough stats`: what the dashboard shows, as text, from the running proxy's /ui/data.json.
import { request } from 'undici';
import type { DashboardData } from '../admin/dashboard.ts';

export async function fetchStats(proxyUrl: string): Promise<DashboardData> {
  const response = await request(`${proxyUrl}/ui/data.json`);
  if (response.statusCode !== 200) throw new Error(`${proxyUrl}/ui/data.json answered ${response.statusCode}`);
  return (await response.body.json()) as DashboardData;
}

export function formatStats(d: DashboardData): string {
  const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
  const lines = [
    `pullthrough ${d.version} (node ${d.node}), up ${Math.round(d.uptimeSeconds / 60)} min, ${d.health.status}`,
    `hit ratio:      ${pct(d.hitRatio.byBytes)} of bytes, ${pct(d.hitRatio.byRequests)} of ${d.totals.requests} requests`,
    `bytes saved:    ${size(d.totals.bytesFromCache)} of ${size(d.totals.bytes)} served`,
    `fills running:  ${d.fillsInFlight}`,
    `cache:          ${size(d.cache.bytes)} of ${size(d.cache.maxSize)} in ${d.cache.blobs} blobs`,
    'rate limits:    ' + (d.rateLimits.length ? d.rateLimits.map((r) => `${r.registry.replace(/:443$/, '')} ${r.remaining ?? '?'}/${r.limit ?? '?'}`).join(', ') : 'none reported'),
    '',
    'recent pulls:',
    ...(d.recentPulls.length ? d.recentPulls.slice(0, 10).map((p) => `  ${p.time}  ${p.cache ?? '-'}  ${size(p.bytes).padStart(10)}  ${p.client}  ${p.image}`) : ['  none yet']),
    '',
    'largest cached images:',
    ...(d.largestImages.length ? d.largestImages.map((i) => `  ${size(i.bytes).padStart(10)}  ${i.image}`) : ['  none yet']),
    '',
  ];
  return lines.join('\n');
}

function size(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
