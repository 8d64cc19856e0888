#!/usr/bin/env bash
# Demo: the daemon with the simulated runtime, from nothing to ready and back.
#
# Sets up (.venv), then on a private session bus (dbus-run-session) starts
# `cxrd --runtime sim` with a throwaway install dir and free ports, waits for
# ready with `cxrctl wait`, prints `cxrctl status`, and stops it with
# `cxrctl stop`. Nothing outside the temp dir is touched (not ~/.cloudxr).
#   scripts/demo.sh            # CXRD_DEMO_KEEP=1 keeps the temp dir for a look
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [[ ${1:-} != --on-private-bus ]]; then
    bash scripts/setup.sh
    exec dbus-run-session -- bash "$repo/scripts/demo.sh" --on-private-bus
fi

export PATH="$repo/.venv/bin:$PATH"
work=$(mktemp -d -t cxrd-demo.XXXXXX)
daemon_pid=
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [[ ${CXRD_DEMO_KEEP:-0} == 1 ]]; then
        echo "demo: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

read -r proxy_port backend_port < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
cat >"$work/cxrd.toml" <<TOML
install_dir = "$work/cloudxr"
[runtime]
backend = "sim"
[proxy]
port = $proxy_port
backend_port = $backend_port
TOML

echo "demo: starting cxrd (sim runtime, proxy port $proxy_port) on a private bus"
cxrd --config "$work/cxrd.toml" --runtime sim >"$work/cxrd.log" 2>&1 &
daemon_pid=$!

if ! cxrctl wait --timeout 30; then
    echo "demo: cxrd did not become ready; its log:" >&2
    cat "$work/cxrd.log" >&2
    exit 1
fi
cxrctl status
cxrctl stop
# Stop() replies first, then the daemon stops both groups and exits 0.
wait "$daemon_pid"
daemon_pid=
echo "demo: cxrd stopped cleanly"
