#!/bin/sh
# CI check of the unit: systemd-analyze verify needs ExecStart to exist, so it verifies a copy
# that points at the built binary, and fails on any message (unknown keys only warn, rc 0).
# Usage: systemd/verify.sh [path/to/atproto-ingest]   (default: target/debug/atproto-ingest)
set -eu
bin=$(realpath "${1:-target/debug/atproto-ingest}")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#^ExecStart=/usr/bin/atproto-ingest#ExecStart=$bin#" \
    "$(dirname "$0")/atproto-ingest.service" > "$dir/atproto-ingest.service"
out=$(systemd-analyze verify "$dir/atproto-ingest.service" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "$out"; exit 1; fi
echo "systemd/atproto-ingest.service: OK"
