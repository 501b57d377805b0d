#!/usr/bin/env bash
# Agent benchmarks, printed as figures (never asserted):
#   1. idle footprint: agent with its default collectors (process, inventory)
#      on this host for IDLE_SECS: RSS, CPU share of one core, time to the
#      first event;
#   2. flow capture: UDP packets blasted on lo at rising rates; packets the
#      flow collector counted vs sent, and kernel drops;
#   3. agent -> bus: the synthetic collector producing as fast as the spool
#      takes, acked events per second at the bus;
#   4. draining: BACKLOG events (default 1M) spooled while the bus was away,
#      then sent with the collectors off; drain events per second, set beside
#      section 3's best live rate (the highest acked rate of a row whose
#      acks kept up with production) and its overloaded row (rate 0)
#      (DRAIN_ONLY=1 runs this section alone).
# BATCH (default 2048) is batch.maxEvents in sections 3 and 4.
#
# Usage: e2e/bench-agent.sh   (AMOSKYS_BIN=path skips the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE_SECS=${IDLE_SECS:-60}
source e2e/bench-lib.sh
bench_bin

bench_workdir
export AMOSKYS_LOG=${AMOSKYS_LOG:-info}
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

"$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$work/bus" --tls-dir "$P/bus" --sync batch 2>"$work/bus.log" &
pids+=($!)
bus_pid=$!
wait_port 19464
# The port answering is not enough: it must be this bus (not a leftover),
# still alive once a bind error would have ended it.
sleep 0.5
kill -0 "$bus_pid" 2>/dev/null || { echo "the bus did not start: $(grep -m1 Error "$work/bus.log")" >&2; exit 1; }

agent() { # $1 = name, $2 = config file, $3 = http port
  "$BIN" --log-format json agent --config "$2" --bus https://127.0.0.1:17443 --tls-dir "$P/agent" \
    --spool-dir "$work/spool-$1" --http "127.0.0.1:$3" --agent-id "$1" >/dev/null 2>"$work/agent-$1.log" &
  # Started here, not in $(...), so it stays this script's child: kill and
  # wait reach it, and the work dir is not removed under it.
  pid=$!
  pids+=("$pid")
}

# DRAIN_ONLY=1 runs section 4 alone.
if [ "${DRAIN_ONLY:-0}" != 1 ]; then
echo "== 1. idle agent, default collectors (process, inventory), ${IDLE_SECS}s, $(nproc) cores"
: >"$work/idle.yaml"
agent idle "$work/idle.yaml" 19465
wait_port 19465
sleep 5 # start-up snapshot done
t0=$(ticks "$pid"); s0=$(date +%s.%N)
sleep "$IDLE_SECS"
t1=$(ticks "$pid"); s1=$(date +%s.%N)
rss=$(awk '/VmRSS/ { printf "%.1f", $2/1024 }' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ { printf "%.1f", $2/1024 }' "/proc/$pid/status")
cpu=$(awk -v a="$t0" -v b="$t1" -v s="$s0" -v e="$s1" -v hz="$hz" 'BEGIN { printf "%.2f", 100 * (b - a) / hz / (e - s) }')
first=$(grep -o '"after_ms":[0-9]*' "$work/agent-idle.log" | head -1 | cut -d: -f2 || true)
mode=$(curl -s http://127.0.0.1:19465/metrics | grep '^amoskys_agent_collector_mode{' | grep ' 1$' | sed 's/amoskys_agent_collector_mode//' | tr '\n' ' ' || true)
echo "idle: rss_mb=$rss rss_peak_mb=$hwm cpu_pct_of_one_core=$cpu first_event_ms=$first modes=$mode"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true

echo "== 2. flow capture on lo (UDP, 64-byte payloads, 5 s per rate)"
port=$((20000 + RANDOM % 10000))
cat >"$work/flow.yaml" <<CONF
collectors:
  process: { enabled: false }
  inventory: { enabled: false }
  flow: { enabled: true, interface: lo, bpfFilter: "udp and dst port $port", idleTimeout: 2s }
CONF
agent flow "$work/flow.yaml" 19466
wait_port 19466
sleep 1
for rate in 10000 50000 100000 200000 0; do
  before=$(metric 19466 amoskys_agent_flow_packets_total); before=${before:-0}
  kd0=$(metric 19466 amoskys_agent_flow_kernel_dropped); kd0=${kd0:-0}
  sent=$(python3 - "$port" "$rate" <<'PY'
import socket, sys, time
port, rate = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
payload = b"x" * 64
n, t0, dur = 0, time.perf_counter(), 5.0
while True:
    el = time.perf_counter() - t0
    if el >= dur:
        break
    due = int(el * rate) + 1 if rate else n + 1000
    while n < due:
        try:
            s.sendto(payload, ("127.0.0.1", port)); n += 1
        except BlockingIOError:
            break
print(n, round(n / (time.perf_counter() - t0)))
PY
)
  sleep 2
  after=$(metric 19466 amoskys_agent_flow_packets_total); kd1=$(metric 19466 amoskys_agent_flow_kernel_dropped); kd1=${kd1:-0}
  n=${sent% *}; pps=${sent#* }
  echo "flow: target_pps=${rate:-max} sent=$n sent_pps=$pps counted=$((${after%.*} - ${before%.*})) kernel_dropped=$((${kd1%.*} - ${kd0%.*}))"
done
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true

echo "== 3. agent -> bus, synthetic 200-byte events at rising rates, 20 s each (0 = as fast as the spool takes)"
n=0
best_live=0
over_live=0
for rate in ${SYN_RATES:-10000 40000 120000 0}; do
  n=$((n + 1))
  cat >"$work/syn$n.yaml" <<CONF
batch: { maxEvents: ${BATCH:-2048}, window: 32 }
collectors:
  process: { enabled: false }
  inventory: { enabled: false }
  synthetic: { enabled: true, rate: $([ "$rate" = 0 ] && echo 10000000 || echo "$rate"), eventBytes: 200 }
CONF
  hp=$((19470 + n))
  agent "syn$n" "$work/syn$n.yaml" "$hp"
  wait_port "$hp"
  sleep 3
  a0=$(metric "$hp" amoskys_agent_events_acked_total); p0=$(metric "$hp" 'amoskys_agent_events_produced_total{collector="synthetic"}'); s0=$(date +%s.%N)
  sleep 20
  a1=$(metric "$hp" amoskys_agent_events_acked_total); p1=$(metric "$hp" 'amoskys_agent_events_produced_total{collector="synthetic"}'); s1=$(date +%s.%N)
  spool=$(metric "$hp" amoskys_agent_spool_bytes)
  arss=$(awk '/VmHWM/ { printf "%.0f", $2/1024 }' "/proc/$pid/status")
  awk -v rate="$rate" -v a0="$a0" -v a1="$a1" -v p0="$p0" -v p1="$p1" -v s="$s0" -v e="$s1" -v sp="$spool" -v r="$arss" \
    'BEGIN { printf "agent->bus: target_eps=%s produced_eps=%.0f acked_eps=%.0f spool_bytes_at_end=%d agent_rss_peak_mb=%s\n", rate, (p1-p0)/(e-s), (a1-a0)/(e-s), sp, r }' | tee "$work/row"
  acked_eps=$(sed 's/.*acked_eps=\([0-9]*\).*/\1/' "$work/row")
  produced_eps=$(sed 's/.*produced_eps=\([0-9]*\).*/\1/' "$work/row")
  if [ "$rate" = 0 ]; then
    over_live=$acked_eps
  elif [ $((acked_eps * 100)) -ge $((produced_eps * 98)) ] && [ "$acked_eps" -gt "$best_live" ]; then
    # Kept up: acks within 2 % of production over the 20 s.
    best_live=$acked_eps
  fi
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
done

fi

echo "== 4. draining a backlog after an outage, against live sending at full speed"
# Live: the last run above (rate 0) is the agent's full live rate. Drain:
# an agent spools BACKLOG events with no bus to send to, stops, and starts
# again with its collectors off once the bus is back; the time until its
# spool is empty gives the drain rate.
backlog=${BACKLOG:-1000000}
cat >"$work/fill.yaml" <<CONF
spool: { maxBytes: 2GiB }
shutdownGrace: 100ms
batch: { maxEvents: ${BATCH:-2048}, window: 32 }
collectors:
  process: { enabled: false }
  inventory: { enabled: false }
  synthetic: { enabled: true, rate: 10000000, eventBytes: 200 }
CONF
"$BIN" agent --config "$work/fill.yaml" --bus https://127.0.0.1:17999 --tls-dir "$P/agent" \
  --spool-dir "$work/spool-drain" --http 127.0.0.1:19480 --agent-id drain >/dev/null 2>"$work/agent-fill.log" &
pid=$!; pids+=("$pid")
wait_port 19480
until [ "$(metric 19480 amoskys_agent_spool_events | cut -d. -f1)" -ge "$backlog" ] 2>/dev/null; do sleep 0.2; done
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
sed -e 's/enabled: true, rate: 10000000/enabled: false, rate: 1/' "$work/fill.yaml" >"$work/drain.yaml"
"$BIN" agent --config "$work/drain.yaml" --bus https://127.0.0.1:17443 --tls-dir "$P/agent" \
  --spool-dir "$work/spool-drain" --http 127.0.0.1:19481 --agent-id drain >/dev/null 2>"$work/agent-drain.log" &
pid=$!; pids+=("$pid")
t_start=$(date +%s.%N)
wait_port 19481
s0=$(date +%s.%N); held=$(metric 19481 amoskys_agent_spool_events)
deadline=$(( $(date +%s) + 600 ))
until [ "$(metric 19481 amoskys_agent_spool_events | cut -d. -f1)" -le 1 ] 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "drain did not finish in 600 s" >&2; exit 1; }
  sleep 0.05
done
s1=$(date +%s.%N)
acked=$(metric 19481 amoskys_agent_events_acked_total)
awk -v n="$held" -v a="$acked" -v t="$t_start" -v s="$s0" -v e="$s1" -v best="${best_live:-0}" -v over="${over_live:-0}" 'BEGIN {
  d = n / (e - s)
  printf "drain: backlog_events=%d start_s=%.2f drain_s=%.2f drain_eps=%.0f\n", a, s - t, e - s, d
  if (best > 0) printf "drain vs live: best_live_acked_eps=%d (kept up) overloaded_live_acked_eps=%d drain/best_live=%.2fx\n", best, over, d / best
}'
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
