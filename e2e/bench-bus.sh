#!/usr/bin/env bash
# The bus alone: ack latency and write -> live tail latency at a fixed rate
# (three runs, after the disk's own fsync latency), peak RSS at full load, and
# the time from start to ready with many events stored.
#
# Usage: e2e/bench-bus.sh [STORED_EVENTS]   (default 10000000)
set -euo pipefail
cd "$(dirname "$0")/.."
STORED=${1:-10000000}
source e2e/bench-lib.sh
bench_bin

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
start_bus() {
  "$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$work/bus" --tls-dir "$P/bus" 2>>"$work/bus.log" &
  pid=$!
}
bench() { "$BIN" bench --bus https://127.0.0.1:17443 --tls-dir "$P/agent" "$@" | tail -1; }

start_bus; ready_ms 19464 >/dev/null
# The disk's own fsync tail is the floor under the ack p99, and it varies
# from minute to minute on shared machines: print it next to the runs.
echo "[disk]           $(python3 e2e/disk-fsync.py "$work")"
for run in 1 2 3; do
  echo "[latency @10k/s] $(bench --events 300000 --rate 10000 --agents 4 --batch 10 --window 64 --agent-prefix "lat$run" --tail-tls-dir "$P/reader")"
done
echo "[full load]      $(bench --events "$STORED" --agents 4 --agent-prefix load) bus_rss_peak_mb=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$pid/status)"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
start_bus
echo "[restart]        stored=$((STORED + 300000)) ready_ms=$(ready_ms 19464)"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
