#!/bin/sh
# CI check of the Debian package: builds the .deb from the binary already built (see below),
# installs it with dpkg -i on this machine, checks what landed where, verifies the installed unit
# with systemd-analyze (any message fails), then purges the package again.
#
# Usage: deploy/check-deb.sh [cargo-deb options]   (default: --profile dev --no-build --fast)
# CI packages the debug binary that `cargo build` made for the tests, which checks the packaging
# (files, modes, conffile, unit, install and removal) without a second, release, build of the
# whole tree (~6 min on 2 cores). Releases are built with plain `cargo deb` (release profile).
set -eu
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then set -- --profile dev --no-build --fast; fi

log=$(mktemp)
if ! cargo deb "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; exit 1; fi
deb=$(tail -n 1 "$log")
rm -f "$log"
[ -f "$deb" ] || { echo "cargo deb produced no package ($deb)" >&2; exit 1; }
echo "built $deb"
dpkg-deb --info "$deb" | grep -q 'Package: atproto-ingest'

if dpkg-query -W -f='${Status}' atproto-ingest 2>/dev/null | grep -q installed; then
  # Left by an interrupted earlier run of this check (CI machines are reused).
  echo "atproto-ingest is already installed; purging it first" >&2
  dpkg --purge atproto-ingest
fi
trap 'dpkg --purge atproto-ingest >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb"

fail() { echo "package check failed: $*" >&2; exit 1; }
unit=$(dpkg -L atproto-ingest | grep '/systemd/system/atproto-ingest.service$') || fail "no unit installed"
[ -x /usr/bin/atproto-ingest ] || fail "no /usr/bin/atproto-ingest"
grep -q '^ExecStart=/usr/bin/atproto-ingest run$' "$unit" || fail "unit does not start /usr/bin/atproto-ingest"
dpkg-query -W -f='${Conffiles}\n' atproto-ingest | grep -q '^ /etc/atproto-ingest/env ' \
  || fail "/etc/atproto-ingest/env is not a conffile"
[ "$(stat -c '%a %U' /etc/atproto-ingest/env)" = "600 root" ] || fail "env is not 0600 root"
cmp -s /etc/atproto-ingest/env systemd/env.example || fail "env differs from systemd/env.example"
[ -f /usr/share/doc/atproto-ingest/README.md ] || fail "no README"
[ -f /usr/share/doc/atproto-ingest/prometheus/alerts.yml ] || fail "no alert rules"
[ -f /usr/share/doc/atproto-ingest/grafana/atproto-ingest.json ] || fail "no dashboard"
/usr/bin/atproto-ingest --version

out=$(systemd-analyze verify "$unit" 2>&1) || { echo "$out"; fail "systemd-analyze verify $unit"; }
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify $unit printed messages"; }
echo "systemd-analyze verify $unit: OK"

dpkg --purge atproto-ingest
[ ! -e /usr/bin/atproto-ingest ] && [ ! -e /etc/atproto-ingest/env ] || fail "purge left files behind"
trap - EXIT
echo "package $deb: installs, verifies and purges cleanly"
