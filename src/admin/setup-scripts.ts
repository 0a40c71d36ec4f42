/**
 * The setup scripts served at /setup/docker, /setup/containerd and /setup/podman (R8.7): bash that makes
 * one container runtime on a systemd host pull through this proxy and trust its CA.
 *
 * The proxy URL comes from the Host header a client sent, so nothing from the options is trusted: each
 * value is validated down to a character set that needs no escaping in bash, systemd unit files or
 * TOML, and single-quoted where it reaches the shell all the same. The parts every runtime shares
 * (writing files idempotently, installing the CA, restarting a unit, the ROOT dry run) are one bash
 * file, setup/common.sh; this module adds the per-runtime plan.
 */
import { readFileSync } from 'node:fs';

export type Runtime = 'docker' | 'containerd' | 'podman';

export interface SetupOptions {
  /** Where clients reach the proxy, e.g. http://proxy.example:3128 (from the Host the client used). */
  proxyUrl: string;
  /** The proxy's CA certificate (PEM), embedded so the script needs no second download. */
  caPem: string;
  /** NO_PROXY entries on top of the defaults, e.g. a cluster's service CIDR. */
  noProxy: string[];
}

const RUNTIMES: ReadonlySet<string> = new Set<Runtime>(['docker', 'containerd', 'podman']);

export function isRuntime(s: string): s is Runtime {
  return RUNTIMES.has(s);
}

export function setupScript(runtime: Runtime, opts: SetupOptions): string {
  const proxy = parseProxyUrl(opts.proxyUrl);
  const vars = proxyVariables(proxy.url, noProxyList(proxy.host, opts.noProxy));
  return render(runtime, proxy.url, pemCertificates(opts.caPem), PLANS[runtime](vars));
}

// ---- The runtimes ----

/** Name and value of each proxy variable, upper case; values are validated and need no quoting. */
type ProxyVars = ReadonlyArray<readonly [name: string, value: string]>;

interface ConfigFile {
  readonly path: string;
  readonly content: string;
}

interface Plan {
  /** For the script's header: what this runtime needs and why. */
  readonly notes: readonly string[];
  /** The configuration files besides the CA. */
  readonly files: readonly ConfigFile[];
  /** Applies them: `try-restart` leaves a stopped unit stopped (it reads the new settings when started). */
  readonly restart: { readonly verb: 'restart' | 'try-restart'; readonly unit: string };
}

const PLANS: Record<Runtime, (vars: ProxyVars) => Plan> = {
  docker: (vars) => ({
    notes: [
      'dockerd pulls the images, so the proxy variables go into its environment by a systemd drop-in.',
      'Restarting dockerd stops running containers unless "live-restore": true is in /etc/docker/daemon.json.',
    ],
    files: [systemdDropIn('docker.service', vars)],
    restart: { verb: 'restart', unit: 'docker.service' },
  }),
  containerd: (vars) => ({
    notes: [
      "containerd pulls the images (kubelet's too, through its CRI plugin), so the proxy variables go into",
      'its environment by a systemd drop-in.',
      'Restarting containerd does not stop running containers: each one is held by its containerd-shim,',
      'which outlives the restart, so this is safe on a kubelet node.',
    ],
    files: [systemdDropIn('containerd.service', vars)],
    restart: { verb: 'restart', unit: 'containerd.service' },
  }),
  podman: (vars) => ({
    notes: [
      'podman has no daemon: every podman command pulls for itself, with the proxy variables of its own',
      'environment. Exporting them from /etc/profile.d would reach only login shells (not cron, not',
      'systemd units) and would send curl, apt and pip through the proxy as well. Instead they go into',
      "containers.conf's [engine] env, which podman, and only podman, sets on itself at start: the CLI,",
      'the podman.service API, podman-auto-update and quadlet units alike.',
      'podman.service is restarted only if it is running; socket activation starts it with the new',
      'settings otherwise.',
    ],
    files: [podmanEngineConf(vars)],
    restart: { verb: 'try-restart', unit: 'podman.service' },
  }),
};

function systemdDropIn(unit: string, vars: ProxyVars): ConfigFile {
  // systemd would expand % and \ inside these quotes; the validated values contain neither.
  const environment = (vs: ProxyVars) => 'Environment=' + vs.map(([k, v]) => `"${k}=${v}"`).join(' ');
  return {
    path: `/etc/systemd/system/${unit}.d/http-proxy.conf`,
    content: lines(
      `# Written by pullthrough's setup script: ${unit} pulls images through the caching proxy.`,
      `# To undo: delete this file, then systemctl daemon-reload && systemctl restart ${unit}`,
      '[Service]',
      environment(vars),
      environment(lowerCase(vars)),
    ),
  };
}

function podmanEngineConf(vars: ProxyVars): ConfigFile {
  return {
    path: '/etc/containers/containers.conf.d/pullthrough-proxy.conf',
    content: lines(
      "# Written by pullthrough's setup script: podman pulls images through the caching proxy.",
      '# podman sets [engine] env on itself when it starts, except variables its environment already has.',
      '# To undo: delete this file.',
      '[engine]',
      'env = [',
      ...[...vars, ...lowerCase(vars)].map(([k, v]) => `  "${k}=${v}",`),
      ']',
      '',
      '[containers]',
      '# podman copies the proxy variables of its own environment into every container it creates; these',
      '# are for pulls only (the proxy answers plain HTTP for registries alone, so apt in a container',
      '# would fail through it). Set this back to true in a later file to pass a proxy of your own.',
      'http_proxy = false',
    ),
  };
}

/** Go reads either case (upper first), but the non-Go helpers a runtime calls often know only lower case. */
function lowerCase(vars: ProxyVars): ProxyVars {
  return vars.map(([k, v]) => [k.toLowerCase(), v] as const);
}

function proxyVariables(proxyUrl: string, noProxy: readonly string[]): ProxyVars {
  return [
    ['HTTP_PROXY', proxyUrl],
    ['HTTPS_PROXY', proxyUrl],
    ['NO_PROXY', noProxy.join(',')],
  ];
}

// ---- Validating the options ----

/** Never through the proxy: loopback, in-cluster names, the cloud metadata service. */
const DEFAULT_NO_PROXY = ['localhost', '127.0.0.0/8', '::1', '.svc', '.cluster.local', '169.254.169.254'];

/** What a NO_PROXY entry may hold: names, IPs, CIDRs, ports, `*`. Nothing a shell or systemd would expand. */
const NO_PROXY_ENTRY = /^[A-Za-z0-9.:/*_-]+$/;

/** A hostname as WHATWG URL leaves it (lower case, IDN in punycode), or a bracketed IPv6 literal. */
export const URL_HOSTNAME = /^(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])$/;

/** The proxy's origin, and its host as NO_PROXY spells it (IPv6 without brackets). */
function parseProxyUrl(raw: string): { url: string; host: string } {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(`setup script: proxyUrl ${JSON.stringify(raw)} is not a URL`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new Error(`setup script: proxyUrl ${JSON.stringify(raw)} must be http:// or https://`);
  }
  // WHATWG URL lets `$`, quotes and parentheses through in a hostname, so it is not validation enough.
  if (!URL_HOSTNAME.test(url.hostname)) {
    throw new Error(`setup script: proxyUrl ${JSON.stringify(raw)} has an invalid host name`);
  }
  if (url.pathname !== '/' || url.search !== '' || url.hash !== '') {
    throw new Error(`setup script: proxyUrl ${JSON.stringify(raw)} must be scheme://host[:port] alone`);
  }
  // Any user:password@ is dropped: the script goes to whoever asks for it and must carry no secret.
  return { url: `${url.protocol}//${url.host}`, host: url.hostname.replace(/^\[(.*)\]$/, '$1') };
}

function noProxyList(proxyHost: string, extra: readonly string[]): string[] {
  for (const entry of extra) {
    if (!NO_PROXY_ENTRY.test(entry)) {
      throw new Error(
        `setup script: NO_PROXY entry ${JSON.stringify(entry)} may only contain letters, digits and . : / * _ -`,
      );
    }
  }
  // The proxy's own host, so that reaching the proxy never goes through the proxy.
  return [...new Set([...DEFAULT_NO_PROXY, proxyHost, ...extra].map((e) => e.toLowerCase()))];
}

/** One certificate or more. Nothing else may pass: the PEM goes into a heredoc, and only base64 lines
 * are sure never to end it early. Line ends are normalised to \n, with one at the end. */
const PEM_CERTIFICATES = /^(?:-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n+)+$/;

export function pemCertificates(pem: string): string {
  const text = pem.replace(/\r\n/g, '\n').trim() + '\n';
  if (!PEM_CERTIFICATES.test(text)) {
    throw new Error('setup script: caPem must be PEM certificates (-----BEGIN CERTIFICATE----- blocks) only');
  }
  return text;
}

// ---- Rendering the script ----

export const COMMON_SH = readFileSync(new URL('./setup/common.sh', import.meta.url), 'utf8');
const HEREDOC_END = 'PULLTHROUGH_EOF';

function render(runtime: Runtime, proxyUrl: string, caPem: string, plan: Plan): string {
  const touchesSystemd = plan.files.some((f) => f.path.startsWith('/etc/systemd/'));
  return lines(
    '#!/usr/bin/env bash',
    ...header(runtime, proxyUrl, plan).map((l) => (l === '' ? '#' : `# ${l}`)),
    'set -euo pipefail',
    '',
    `PROXY_URL=${shellQuote(proxyUrl)}`,
    `RUNTIME=${shellQuote(runtime)}`,
    '',
    COMMON_SH.trimEnd(),
    '',
    'main() {',
    '\tpreflight',
    ...heredoc('\tinstall_ca', caPem),
    ...plan.files.flatMap((f) => heredoc(`\twrite_file ${shellQuote(f.path)} 0644`, f.content)),
    ...(touchesSystemd ? ['\treload_systemd'] : []),
    `\trestart_unit ${plan.restart.verb} ${shellQuote(plan.restart.unit)}`,
    `\tlog "done: ${runtime} pulls through $PROXY_URL"`,
    '}',
    '',
    // Last, so that a download cut short runs nothing.
    'main "$@"',
  );
}

function header(runtime: Runtime, proxyUrl: string, plan: Plan): string[] {
  return [
    `pullthrough: make ${runtime} on this systemd host pull through the caching proxy at ${proxyUrl}`,
    '',
    `  curl -fsSL ${proxyUrl}/setup/${runtime} | sudo bash`,
    `  curl -fsSL ${proxyUrl}/setup/${runtime} | ROOT=/tmp/try bash   # dry run: files under /tmp/try, no root`,
    '',
    "It installs the proxy's CA in the system trust store (Debian/Ubuntu or RHEL/Fedora layout), writes",
    ...plan.files.map((f) => `  ${f.path}`),
    `and restarts ${plan.restart.unit}${plan.restart.verb === 'try-restart' ? ' if it is running' : ''}.`,
    'Run again, it changes nothing and restarts nothing.',
    '',
    ...plan.notes,
  ];
}

/** A command fed `content` on stdin by a quoted heredoc, inside which bash expands nothing. */
export function heredoc(command: string, content: string): string[] {
  const body = content.endsWith('\n') ? content.slice(0, -1).split('\n') : content.split('\n');
  if (body.includes(HEREDOC_END)) throw new Error(`setup script: content contains ${HEREDOC_END}`);
  return [`${command} <<'${HEREDOC_END}'`, ...body, HEREDOC_END];
}

export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

export function lines(...ls: string[]): string {
  return ls.join('\n') + '\n';
}
