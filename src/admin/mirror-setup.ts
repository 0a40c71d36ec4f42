/**
 * The setup scripts for the registry-mirror front, served at /setup/containerd-mirror,
 * /setup/podman-mirror and /setup/docker-mirror: bash that writes the client configurations of
 * mirror-config.ts (every registry of the policy, the registry itself kept as the last resort) and,
 * for an HTTPS mirror with a certificate from the proxy's CA, that CA where the runtime looks for a
 * registry's CA — never the system trust store, which a mirror does not need. ROOT=DIR writes under
 * DIR and runs nothing, as the other scripts do (common.sh).
 */
import { containerdHostsFiles, dockerDaemonMirrors, registriesConf, type ClientFile, type MirroredRegistry } from './mirror-config.ts';
import { COMMON_SH, heredoc, lines, pemCertificates, shellQuote, URL_HOSTNAME } from './setup-scripts.ts';

export type MirrorRuntime = 'containerd-mirror' | 'podman-mirror' | 'docker-mirror';

export function isMirrorRuntime(s: string): s is MirrorRuntime {
  return s === 'containerd-mirror' || s === 'podman-mirror' || s === 'docker-mirror';
}

export interface MirrorSetupOptions {
  /** Where nodes reach the mirror: http://host:port or https://name:port. */
  mirrorUrl: string;
  registries: readonly MirroredRegistry[];
  /** The proxy's CA, for an HTTPS mirror whose certificate it signed. */
  caPem?: string;
}

const CONTAINERD_CERTS = '/etc/containerd/certs.d';

export function mirrorSetupScript(runtime: MirrorRuntime, options: MirrorSetupOptions): string {
  const url = mirrorUrl(options.mirrorUrl);
  const ca = url.protocol === 'https:' && options.caPem ? pemCertificates(options.caPem) : undefined;
  switch (runtime) {
    case 'containerd-mirror': {
      const caFile = `${CONTAINERD_CERTS}/pullthrough-mirror-ca.crt`;
      const files = containerdHostsFiles(options.registries, { mirrorUrl: url, ...(ca ? { caFile } : {}) }, CONTAINERD_CERTS);
      return render(runtime, url, [...(ca ? [{ path: caFile, content: ca }] : []), ...files], [
        'containerd reads these files at each pull when its CRI registry config_path is',
        `${CONTAINERD_CERTS} (the default of most distributions since containerd 1.5): no restart.`,
        'The script warns when /etc/containerd/config.toml does not set it.',
      ], ['\tcheck_config_path']);
    }
    case 'podman-mirror': {
      const files: ClientFile[] = [{ path: '/etc/containers/registries.conf.d/pullthrough-mirror.conf', content: registriesConf(options.registries, { mirrorUrl: url }) }];
      if (ca) files.push({ path: `/etc/containers/certs.d/${url.host}/ca.crt`, content: ca });
      return render(runtime, url, files, ['podman, buildah, skopeo and CRI-O read registries.conf.d at each pull: no restart', '(CRI-O reloads it on SIGHUP or restart).']);
    }
    case 'docker-mirror': {
      const files: ClientFile[] = ca ? [{ path: `/etc/docker/certs.d/${url.host}/ca.crt`, content: ca }] : [];
      const mirror = dockerDaemonMirrors({ mirrorUrl: url })['registry-mirrors'][0]!;
      return render(runtime, url, files, ['dockerd uses registry mirrors for Docker Hub only (other registries keep going direct), and', 'falls back to Docker Hub itself when the mirror fails. dockerd is restarted when daemon.json changes.'], [
        `\tadd_docker_mirror ${shellQuote(mirror)}`,
        "\trestart_unit restart 'docker.service'",
      ]);
    }
  }
}

/** scheme://host:port, validated down to what needs no quoting anywhere it is written. */
function mirrorUrl(raw: string): URL {
  const url = new URL(raw);
  if ((url.protocol !== 'http:' && url.protocol !== 'https:') || !URL_HOSTNAME.test(url.hostname) || url.pathname !== '/' || url.search || url.username) {
    throw new Error(`setup script: mirror URL ${JSON.stringify(raw)} must be http(s)://host:port alone`);
  }
  return url;
}

function render(runtime: MirrorRuntime, url: URL, files: readonly ClientFile[], notes: readonly string[], extra: readonly string[] = []): string {
  const origin = `${url.protocol}//${url.host}`;
  return lines(
    '#!/usr/bin/env bash',
    ...[
      `pullthrough: pull through the registry mirror at ${origin}, the registries themselves as the last resort`,
      '',
      `  curl -fsSL <proxy>/setup/${runtime} | sudo bash`,
      `  curl -fsSL <proxy>/setup/${runtime} | ROOT=/tmp/try bash   # dry run: files under /tmp/try, no root`,
      '',
      'It writes',
      ...files.map((f) => `  ${f.path}`),
      ...(runtime === 'docker-mirror' ? ['  /etc/docker/daemon.json (registry-mirrors added)'] : []),
      'Run again, it changes nothing.',
      '',
      ...notes,
    ].map((l) => (l === '' ? '#' : `# ${l}`)),
    'set -euo pipefail',
    '',
    `PROXY_URL=${shellQuote(origin)}`,
    `RUNTIME=${shellQuote(runtime)}`,
    '',
    COMMON_SH.trimEnd(),
    '',
    MIRROR_SH,
    '',
    'main() {',
    '\tpreflight_files',
    ...files.flatMap((f) => heredoc(`\twrite_file ${shellQuote(f.path)} 0644`, f.content)),
    ...extra,
    `\tlog "done: ${runtime.replace('-mirror', '')} pulls through the mirror at $PROXY_URL"`,
    '}',
    '',
    'main "$@"',
  );
}

/** What only the mirror scripts need, beside common.sh. */
const MIRROR_SH = String.raw`# preflight_files: root, unless ROOT makes this a dry run; no systemd needed to write files.
preflight_files() {
	if [ -n "$ROOT" ]; then
		log "ROOT=$ROOT: writing files under it and only printing the commands (dry run)"
		return
	fi
	[ "$EUID" -eq 0 ] || die "must run as root (or set ROOT=DIR to write the files under DIR without root)"
}

# check_config_path: containerd reads certs.d only when its CRI registry config_path names it.
check_config_path() {
	local config="$ROOT/etc/containerd/config.toml"
	if [ -f "$config" ] && grep -Eq '^[[:space:]]*config_path[[:space:]]*=[[:space:]]*"/etc/containerd/certs.d' "$config"; then
		log "containerd's config_path is /etc/containerd/certs.d"
		return
	fi
	warn "/etc/containerd/config.toml does not set config_path: add" \
		'[plugins."io.containerd.grpc.v1.cri".registry] config_path = "/etc/containerd/certs.d"' \
		"(containerd 1.x; [plugins.\"io.containerd.cri.v1.images\".registry] in 2.x), then systemctl restart containerd"
}

# add_docker_mirror URL: registry-mirrors in /etc/docker/daemon.json, the rest of the file kept.
add_docker_mirror() {
	local mirror="$1" file="$ROOT/etc/docker/daemon.json"
	if [ ! -s "$file" ]; then
		printf '{\n  "registry-mirrors": ["%s"]\n}\n' "$mirror" | write_file /etc/docker/daemon.json 0644
		return
	fi
	if grep -qF "\"$mirror\"" "$file"; then
		log "unchanged: /etc/docker/daemon.json (lists $mirror)"
		return
	fi
	command -v python3 >/dev/null || die "/etc/docker/daemon.json exists and python3 is not here to edit it: add \"registry-mirrors\": [\"$mirror\"] by hand"
	python3 - "$file" "$mirror" <<'PULLTHROUGH_PY' | write_file /etc/docker/daemon.json 0644
import json, sys
path, mirror = sys.argv[1], sys.argv[2]
with open(path) as f:
    config = json.load(f)
mirrors = config.get("registry-mirrors", [])
config["registry-mirrors"] = [mirror] + [m for m in mirrors if m != mirror]
print(json.dumps(config, indent=2))
PULLTHROUGH_PY
}`;

