#!/usr/bin/env bash
# DHCP benchmark: Kea's perfdhcp against dnsmasq, kea-dhcp4 (memfile), ISC dhcpd
# and bootorch's server, in one run, same namespace setup. See bench/dhcp_bench.py
# for what is measured and how.
#
#   sudo bench/dhcp.sh                  # full run: rates 125..4000, 5 s each, burst of 1000
#   sudo bench/dhcp.sh --quick          # smoke run (rates 500,2000, 2 s each)
#   sudo bench/dhcp.sh --servers kea,ours --overload   # rates 4000..48000: the plateau under overload
#   sudo bench/dhcp.sh --json > r.json  # JSON on stdout, table on stderr
#   sudo bench/dhcp.sh --servers dnsmasq,ours --rates 1000,2000 --period 3
#
# Needs root and Debian's kea-admin (perfdhcp), kea-dhcp4-server, dnsmasq,
# isc-dhcp-server (scripts/setup installs them). All DHCP traffic stays inside
# two network namespaces this run creates (bd-ds-TOKEN, bd-dc-TOKEN). The Python
# side removes them and kills what it started (by PID) on exit, error or Ctrl-C;
# this trap is the second line: if the Python process itself dies, it kills the
# processes still inside *our* namespaces (by PID, from `ip netns pids`) and
# deletes the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench/dhcp.sh: needs root (network namespaces)" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

TOKEN=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
RUN_DIR=${DHCP_BENCH_DIR:-$(mktemp -d /tmp/bootorch-dhcp-bench.XXXXXX)}
NAMESPACES=("bd-ds-$TOKEN" "bd-dc-$TOKEN")

CHILD=""

cleanup() {
  local ns pid i
  # The Python side first, by PID: `timeout` passes SIGTERM on, and the Python
  # side turns it into a normal exit that runs its own cleanup.
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$CHILD" 2>/dev/null || true
  fi
  for ns in "${NAMESPACES[@]}"; do
    ip netns list 2>/dev/null | grep -qw "^$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# timeout: a hard cap on the whole run, on top of the script's own --deadline-min.
timeout --signal=TERM --kill-after=30 45m "$PY" bench/dhcp_bench.py --token "$TOKEN" --run-dir "$RUN_DIR" "$@" &
CHILD=$!
rc=0
wait "$CHILD" || rc=$?
CHILD=""
exit "$rc"
