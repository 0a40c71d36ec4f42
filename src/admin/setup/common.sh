# --- The part every pullthrough setup script shares (src/admin/setup-scripts.ts adds the rest). ---
# Only functions live here: the script's last line calls main, so a download cut short by
# `curl | bash` runs nothing at all.

ROOT="${ROOT:-}" # a prefix for every file written; set, it also turns every command into a dry run
changed=0        # files this run created or modified

log() { printf 'pullthrough-setup: %s\n' "$*"; }
warn() { printf 'pullthrough-setup: warning: %s\n' "$*" >&2; }
die() {
	printf 'pullthrough-setup: error: %s\n' "$*" >&2
	exit 1
}

preflight() {
	if [ -n "$ROOT" ]; then
		log "ROOT=$ROOT: writing files under it and only printing the commands (dry run)"
		return
	fi
	[ "$EUID" -eq 0 ] || die "must run as root: curl -fsSL $PROXY_URL/setup/$RUNTIME | sudo bash" \
		"(or set ROOT=DIR to write the files under DIR without root, running nothing)"
	command -v systemctl >/dev/null || die "systemctl not found: this script configures systemd hosts"
}

# run CMD ARG...: runs a command, or under ROOT only says what it would run.
# stdin is /dev/null because under `curl | bash` stdin is the rest of this script.
run() {
	if [ -n "$ROOT" ]; then
		log "would run: $*"
		return
	fi
	log "running: $*"
	"$@" </dev/null
}

# write_file PATH MODE <CONTENT: puts CONTENT at $ROOT$PATH by an atomic rename, and leaves the file
# alone when it already holds exactly that, so a second run changes (and restarts) nothing.
write_file() {
	local path="$1" mode="$2" dest tmp
	dest="$ROOT$path"
	mkdir -p "$(dirname "$dest")"
	# Same directory, so the rename is atomic; the suffix keeps it out of *.conf / *.crt globs meanwhile.
	tmp="$(mktemp "$dest.XXXXXX")"
	cat >"$tmp"
	chmod "$mode" "$tmp"
	if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
		rm -f "$tmp"
		log "unchanged: $path"
		return
	fi
	mv -f "$tmp" "$dest"
	changed=$((changed + 1))
	log "wrote: $path"
}

# Which trust-store layout the host has: its release file first, then the anchor directory.
ca_layout() {
	if [ -e "$ROOT/etc/debian_version" ]; then
		echo debian
	elif [ -e "$ROOT/etc/redhat-release" ]; then
		echo redhat
	elif [ -d "$ROOT/usr/local/share/ca-certificates" ]; then
		echo debian
	elif [ -d "$ROOT/etc/pki/ca-trust/source/anchors" ]; then
		echo redhat
	else
		echo unknown
	fi
}

# install_ca <PEM: adds the proxy's CA to the system trust store. dockerd, containerd and podman all
# verify registries against that store (and read it once, at start-up: hence the restart later).
install_ca() {
	case "$(ca_layout)" in
	redhat)
		write_file /etc/pki/ca-trust/source/anchors/pullthrough-ca.crt 0644
		refresh_trust update-ca-trust extract
		;;
	debian)
		write_file /usr/local/share/ca-certificates/pullthrough-ca.crt 0644
		refresh_trust update-ca-certificates
		;;
	*)
		warn "neither Debian/Ubuntu nor RHEL/Fedora recognised; using the Debian layout for the CA"
		write_file /usr/local/share/ca-certificates/pullthrough-ca.crt 0644
		refresh_trust update-ca-certificates
		;;
	esac
}

# The refresh runs even when the CA file was already there: it is cheap and idempotent, and it repairs
# a previous run that stopped between writing the file and refreshing.
refresh_trust() {
	if [ -z "$ROOT" ] && ! command -v "$1" >/dev/null; then
		warn "$1 not found: the CA file is in place but not trusted yet;" \
			"install your distribution's ca-certificates package, then run: $*"
		return
	fi
	run "$@"
}

reload_systemd() {
	if [ "$changed" -gt 0 ]; then
		run systemctl daemon-reload
	fi
}

# restart_unit VERB UNIT: applies the new settings, only when this run changed a file, so re-running
# the script on a host that is already set up does not bounce the runtime.
restart_unit() {
	local verb="$1" unit="$2"
	if [ "$changed" -eq 0 ]; then
		log "nothing changed; $unit not restarted"
		return
	fi
	if [ -z "$ROOT" ] && ! systemctl cat "$unit" >/dev/null 2>&1; then
		warn "$unit is not installed here; the settings apply once it is"
		return
	fi
	run systemctl "$verb" "$unit"
}
