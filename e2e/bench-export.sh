#!/usr/bin/env bash
# The NATS JetStream export next to ingest: the same `amoskys bench` load
# against a bus without an export and against one exporting to a real
# nats-server, side by side, and how fast the export drains what was stored.
#
# Usage: e2e/bench-export.sh [EVENTS]   (default 500000; set AMOSKYS_BIN to
# an already built release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-500000}
source e2e/bench-lib.sh
export PATH="${AMOSKYS_TOOLS_VENV:-$HOME/.cache/amoskys-tools}/bin:$PATH" # setup.sh installs nats-server there
bench_bin
bench_workdir
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
HTTP=19465

cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:14223
max_payload: 8MB
jetstream { store_dir: "$work/js" }
CONF
nats-server -c "$work/nats.conf" 2>"$work/nats.log" &
pids+=($!)
wait_port 14223
python3 e2e/nats-create-stream.py 127.0.0.1:14223 AMOSKYS 'amoskys.>'

run() { # label, then extra bus config
  local dir="$work/bus-$1"
  printf '%s' "$2" >"$work/bus-$1.yaml"
  fresh_dir "$dir"
  "$BIN" bus --listen 127.0.0.1:17444 --http 127.0.0.1:$HTTP --data-dir "$dir" --tls-dir "$P/bus" \
    --config "$work/bus-$1.yaml" 2>>"$work/bus.log" &
  local pid=$!; pids+=("$pid")
  ready_ms $HTTP >/dev/null
  local t0 line
  t0=$(now_ms)
  line=$("$BIN" bench --bus https://127.0.0.1:17444 --tls-dir "$P/agent" --events "$EVENTS" \
    --agents 4 --batch 100 --window 64 --agent-prefix "$1" | tail -1)
  echo "[$1] $line"
  if [ -n "$2" ]; then
    until [ "$(metric $HTTP amoskys_bus_export_lag_events)" = 0 ] \
      && [ "$(metric $HTTP amoskys_bus_export_acked_total)" -ge "$EVENTS" ] 2>/dev/null; do
      sleep 0.05
    done
    local ms=$(( $(now_ms) - t0 ))
    echo "[$1] export: $(metric $HTTP amoskys_bus_export_acked_total) events acked by JetStream in $ms ms from the load's start ($(( $(metric $HTTP amoskys_bus_export_acked_total | cut -d. -f1) * 1000 / (ms > 0 ? ms : 1) )) events/s), errors=$(metric_sum $HTTP amoskys_bus_export_errors_total)"
  fi
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

echo "nats-server $(nats-server --version 2>&1 | head -1)"
run export-off ""
run export-on "$(printf 'export:\n  nats:\n    url: nats://127.0.0.1:14223\n    stream: AMOSKYS\n    maxInFlight: 256\n')"
