#!/usr/bin/env bash
# Detection on the bus, measured with events the starter rules read: the
# same `amoskys bench --mix node` load (flows, process starts, listeners
# shaped like a busy node's) against a bus without rules and one running
# config/rules, side by side:
#   1. as fast as acks allow: ingest throughput and ack latency, off vs on
#      (alerts stored, not delivered);
#   2. at RATE events/s (default 10,000): ack p50/p99 off vs on, then, with
#      the rules on, each new alert's latency from its source event stored
#      to the alert stored (`amoskys bench --alert-latency`, both stored
#      times from the bus's clock), and to its arrival at an Alertmanager
#      API endpoint (e2e/alert-receiver.py, timed against the alert's
#      startsAt, which is the source event's stored time), plus the
#      detector's lag and the share of events that ran no CEL.
#
# Usage: e2e/bench-detect.sh [EVENTS] [RATE]   (defaults 1000000 10000; the
# paced runs send RATE x 30 events; set AMOSKYS_BIN to an already built
# release binary, RULES_SET=on to run only with the rules)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-1000000}
RATE=${2:-10000}
PACED=$((RATE * 30))
source e2e/bench-lib.sh
bench_bin
bench_workdir
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
HTTP=19467

python3 e2e/alert-receiver.py 19468 "$work/received" &
pids+=($!)
wait_port 19468
cat >"$work/bus.yaml" <<CONF
alerting:
  externalUrl: http://127.0.0.1:$HTTP
  alertmanager:
    url: http://127.0.0.1:19468
CONF

bus_pid=""
start_bus() { # label, rules on|off, config file
  local dir="$work/bus-$1" rules=()
  [ "$2" = on ] && rules=(--rules-dir config/rules)
  fresh_dir "$dir"
  "$BIN" bus --listen 127.0.0.1:17445 --http 127.0.0.1:$HTTP --data-dir "$dir" --tls-dir "$P/bus" \
    --config "$3" "${rules[@]}" 2>>"$work/bus.log" &
  bus_pid=$!
  pids+=("$bus_pid")
  ready_ms $HTTP "$bus_pid" >/dev/null || { tail -5 "$work/bus.log" >&2; exit 1; }
}
stop_bus() { kill -TERM "$bus_pid"; wait "$bus_pid" 2>/dev/null || true; }
load() { # label, events, extra bench flags...
  local label=$1 n=$2
  shift 2
  "$BIN" bench --bus https://127.0.0.1:17445 --tls-dir "$P/agent" --mix node --events "$n" \
    --agents 4 --agent-prefix "$label" "$@" | tail -1
}
# Waits until the detector has evaluated everything stored and the sink has
# passed everything the detector wrote.
drain() {
  until [ "$(metric $HTTP amoskys_bus_detect_lag_events)" = 0 ] \
    && [ "$(metric_sum $HTTP amoskys_bus_alert_sink_backlog_events)" = 0 ]; do
    sleep 0.1
  done
}

# Full speed without a receiver: one on these two cores would take CPU
# from the bus that a real Alertmanager elsewhere does not.
: >"$work/no-alerting.yaml"
echo "== full speed, $EVENTS events (batches of 512, 16 in flight per agent; alerts stored, not delivered)"
for rules in ${RULES_SET:-off on}; do
  start_bus "full-$rules" "$rules" "$work/no-alerting.yaml"
  echo "[rules $rules] $(load "full-$rules" "$EVENTS" --batch 512 --window 16)"
  stop_bus
done

echo "== $RATE events/s, $PACED events (batches of 10, Poisson arrivals)"
for rules in ${RULES_SET:-off on}; do
  start_bus "paced-$rules" "$rules" "$work/bus.yaml"
  : >"$work/received"
  echo "[rules $rules] $(load "paced-$rules" "$PACED" --rate "$RATE" --batch 10 --window 64)"
  if [ "$rules" = on ]; then
    drain
    echo "[rules on] $("$BIN" bench --bus https://127.0.0.1:17445 --tls-dir "$P/reader" --alert-latency)"
    seen=$(metric $HTTP amoskys_bus_detect_events_total)
    nocel=$(metric $HTTP amoskys_bus_detect_events_without_cel_total)
    echo "[rules on] detector: evaluated=$seen no_cel_share=$(awk -v a="$nocel" -v b="$seen" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }') matches=$(metric_sum $HTTP amoskys_bus_detect_matches_total) suppressed=$(metric_sum $HTTP amoskys_bus_detect_suppressed_total) checkpoints=$(metric $HTTP amoskys_bus_detect_checkpoint_seconds_count) checkpoint_mean_ms=$(awk -v s="$(metric $HTTP amoskys_bus_detect_checkpoint_seconds_sum)" -v n="$(metric $HTTP amoskys_bus_detect_checkpoint_seconds_count)" 'BEGIN { printf "%.1f", (n > 0 ? s * 1000 / n : 0) }') checkpoint_bytes=$(metric $HTTP amoskys_bus_detect_checkpoint_bytes)"
    # First arrival of each new alert (a dedup key and its startsAt; a
    # window's update repeats both later).
    python3 - "$work/received" <<'PY'
import sys
first = {}
for line in open(sys.argv[1]):
    arrived, starts, key = line.split(" ", 2)
    k = (key, starts)
    first[k] = min(first.get(k, int(arrived)), int(arrived))
ms = sorted((a - int(k[1])) / 1e6 for k, a in first.items() if int(k[1]) > 0)
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))] if ms else 0
print(f"[rules on] alertmanager: alerts={len(ms)} stored_to_received_p50_ms={q(0.5):.3f} p99_ms={q(0.99):.3f} max_ms={(ms[-1] if ms else 0):.3f}")
PY
  fi
  stop_bus
done
