#!/usr/bin/env bash
# Backups under load: how long a first (full) and a later (incremental)
# backup take with STORED events in the bus, what a backup does to the ack
# latency of a 10,000 events/s stream running beside it, and how long a
# restore and the restored bus's start take.
#
# Usage: [BACKUP_DIR=DIR] e2e/bench-backup.sh [STORED_EVENTS]   (default 3000000)
# BACKUP_DIR puts the backups elsewhere than the bus's filesystem (e.g. on
# another disk, or /dev/shm to see what a separate device would spare).
set -euo pipefail
cd "$(dirname "$0")/.."
STORED=${1:-3000000}
source e2e/bench-lib.sh
bench_bin
bench_workdir
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
URL=https://127.0.0.1:17443
start_bus() { # DATA_DIR
  "$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$1" --tls-dir "$P/bus" \
    --config "$work/bus.yaml" 2>>"$work/bus.log" &
  pid=$!
  pids+=("$pid")
}
bench() { "$BIN" bench --bus "$URL" --tls-dir "$P/agent" "$@" | tail -1; }
latency() { bench --events 200000 --rate 10000 --agents 4 --batch 10 --window 64 --agent-prefix "$1"; }
# Prints the backup line and how long the request took.
backup_now() {
  local t0 out; t0=$(date +%s%N)
  out=$("$BIN" backup now --bus "$URL" --tls-dir "$P/admin")
  echo "$out took_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
}
backup_dir=${BACKUP_DIR:-$work/backup}/amoskys-bench-$$
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work" "$backup_dir"' EXIT
printf 'backup:\n  dir: %s\n  interval: 0s\n  keep: 3\n' "$backup_dir" >"$work/bus.yaml"

start_bus "$work/bus"; ready_ms 19464 >/dev/null
echo "[fill]                 $(bench --events "$STORED" --agents 4 --agent-prefix fill)"
echo "[store]                data_mb=$(du -sm "$work/bus" | cut -f1)"
# Let the compactions the fill started finish, so they do not land in the
# latency runs below.
sleep 30
echo "[latency, no backup]   $(latency quiet)"
latency during >"$work/during.txt" &
lat=$!
sleep 3
echo "[first backup]         $(backup_now)"
wait "$lat"
echo "[latency, beside it]   $(cat "$work/during.txt")"
echo "[more]                 $(bench --events 200000 --agents 4 --agent-prefix more)"
echo "[incremental backup]   $(backup_now)"
echo "[backup dir]           backup_mb=$(du -sm "$backup_dir" | cut -f1)"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
t0=$(date +%s%N)
"$BIN" backup restore --dir "$backup_dir" --data-dir "$work/restored" >/dev/null
echo "[restore]              restore_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
start_bus "$work/restored"
echo "[restored bus]         ready_ms=$(ready_ms 19464) $(curl -s http://127.0.0.1:19464/metrics | grep '^amoskys_bus_stored_event_count' | tr -d '\n')"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
