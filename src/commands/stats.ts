// `pullthrough stats`: what the dashboard shows, as text, from the running proxy's /ui/data.json.
import { request } from 'undici';
import { humanBytes } from '../../config/units.ts';
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
    `bytes saved:    ${humanBytes(d.totals.bytesFromCache)} of ${humanBytes(d.totals.bytes)} served`,
    `fills running:  ${d.fillsInFlight}`,
    `cache:          ${humanBytes(d.cache.bytes)} of ${humanBytes(d.cache.maxSize)} in ${d.cache.blobs} blobs`,
    'rate limits:    ' + (d.rateLimits.length ? d.rateLimits.map((r) => `${r.registry.replace(/:443$/, '')} ${r.remaining ?? '?'}/${r.limit ?? '?'}`).join(', ') : 'none reported'),
    '',
    'recent pulls:',
    ...(d.recentPulls.length ? d.recentPulls.slice(0, 10).map((p) => `  ${p.time}  ${p.cache ?? '-'}  ${humanBytes(p.bytes).padStart(10)}  ${p.client}  ${p.image}`) : ['  none yet']),
    '',
    'largest cached images:',
    ...(d.largestImages.length ? d.largestImages.map((i) => `  ${humanBytes(i.bytes).padStart(10)}  ${i.image}`) : ['  none yet']),
    '',
  ];
  return lines.join('\n');
}
