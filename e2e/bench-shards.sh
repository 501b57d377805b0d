#!/usr/bin/env bash
# Shards on loopback: how long AGENTS agents take to settle on 3 shards and
# after a map change 3 -> 5, the fraction that moved, the cost of a Query that
# fans out over every shard next to one shard's own (--local), and how soon a
# partial answer comes back while one shard is stopped (SIGSTOP).
#
# First, before any agent runs, the same fixed-rate `amoskys bench` load on
# one plain bus and through shard 0 of the three (most of its agents are
# redirected to their owners): CPU seconds per million events over all bus
# processes, connect-to-Welcome p50/p99 with and without the redirect, and
# write -> Tail latency through shard 0 (merged over all three) next to the
# plain bus's.
#
# Then, as fast as acks allow, a plain bus next to a bus that is shard 0 of a
# one-shard map: the cost of the sharding code in place.
#
# Usage: e2e/bench-shards.sh   (AGENTS=100 QUERIES=40 LOAD_EVENTS=300000
# LOAD_RATE=20000 FULL_EVENTS=1000000 by default; set AMOSKYS_BIN to an
# already built release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${AGENTS:-100}
QUERIES=${QUERIES:-40}
LOAD_EVENTS=${LOAD_EVENTS:-300000}
LOAD_RATE=${LOAD_RATE:-20000}
FULL_EVENTS=${FULL_EVENTS:-1000000}
source e2e/bench-lib.sh
bench_bin
bench_workdir
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
PEER_TIMEOUT_MS=1000
grpc=(27441 27442 27443 27444 27445)
http=(27461 27462 27463 27464 27465)
shard_pids=()

map() { # epoch active shards
  local peers=()
  for i in $(seq 0 $(($3 - 1))); do peers+=("\"https://127.0.0.1:${grpc[$i]}\""); done
  printf 'epoch: %s\nactive: %s\npeers: [%s]\n' "$1" "$2" "$(IFS=,; echo "${peers[*]}")"
}
start_shard() { # index map
  local d="$work/shard-$1"
  mkdir -p "$d"
  echo "$2" >"$d/map.yaml"
  printf 'sharding:\n  peerTlsDir: %s\n  mapReloadInterval: 100ms\n  peerTimeout: %sms\n' "$P/peer" "$PEER_TIMEOUT_MS" >"$d/bus.yaml"
  AMOSKYS_LOG=warn "$BIN" bus --listen "127.0.0.1:${grpc[$1]}" --http "127.0.0.1:${http[$1]}" \
    --data-dir "$d/data" --tls-dir "$P/bus" --config "$d/bus.yaml" \
    --shard-index "$1" --shard-map "$d/map.yaml" 2>>"$work/bus.log" &
  pids+=($!)
  shard_pids[$1]=$!
  ready_ms "${http[$1]}" >/dev/null
}
set_map() { # map shards
  for i in $(seq 0 $(($2 - 1))); do
    echo "$1" >"$work/shard-$i/map.tmp"
    mv "$work/shard-$i/map.tmp" "$work/shard-$i/map.yaml"
  done
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# Waits until every shard runs map `epoch` and holds exactly the agents the
# hash gives it under `active`; prints the milliseconds it took.
settle() { # epoch active shards
  local t0 want got ok
  t0=$(now_ms)
  want=$(seq -f "agent-%03g" 0 $((AGENTS - 1)) | "$BIN" shards owner --active "$2" | awk '{c[$2]++} END {for (s in c) print s, c[s]}' | sort)
  while :; do
    ok=1
    got=""
    for i in $(seq 0 $(($3 - 1))); do
      [ "$(metric "${http[$i]}" amoskys_bus_shard_map_epoch)" = "$1" ] || ok=0
      n=$(metric "${http[$i]}" amoskys_bus_connected_agents)
      [ "${n:-0}" != 0 ] && got+="$i $n"$'\n'
    done
    if [ "$ok" = 1 ] && [ "$(echo -n "$got" | sort)" = "$want" ]; then
      echo $(( $(now_ms) - t0 ))
      return
    fi
    if [ $(( $(now_ms) - t0 )) -gt 120000 ]; then
      echo "agents did not settle under $2 shards; want:" >&2; echo "$want" >&2; echo "got:" >&2; echo "$got" >&2
      exit 1
    fi
    sleep 0.1
  done
}
# p50 and p99 of QUERIES runs of `events query` through shard 1.
query_ms() {
  local ts=()
  for _ in $(seq 1 "$QUERIES"); do
    local t0; t0=$(date +%s%N)
    "$BIN" events query --bus "https://127.0.0.1:${grpc[1]}" --tls-dir "$P/reader" --limit 500 --output json "$@" >/dev/null 2>&1
    ts+=($(( ($(date +%s%N) - t0) / 1000000 )))
  done
  printf '%s\n' "${ts[@]}" | sort -n | awk '{v[NR]=$1} END {printf "p50_ms=%d p99_ms=%d", v[int(NR*0.5+0.5)], v[int(NR*0.99+0.5)]}'
}

# CPU ticks (user + system) of the given pids.
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
HZ=$(getconf CLK_TCK)
# Ingest alone at the fixed rate: CPU seconds per million events over the
# bus processes (what a shard costs), then the same load again with a Tail
# following it through the bus reached (on 3 shards, merged from all three):
# the write -> tail latency, whose fan-out CPU is not ingest's.
load() { # label url pids...
  local label=$1 url=$2; shift 2
  local c0 line c1
  c0=$(ticks "$@")
  line=$("$BIN" bench --bus "$url" --tls-dir "$P/agent" --events "$LOAD_EVENTS" --rate "${RATE:-$LOAD_RATE}" \
    --agents 30 --batch 50 --window 16 --agent-prefix "$label" | tail -1)
  c1=$(ticks "$@")
  echo "[$label ingest] $line cpu_s_per_m_events=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v n="$LOAD_EVENTS" 'BEGIN {printf "%.2f", t / hz / n * 1e6}')"
  c0=$(ticks "$@")
  line=$("$BIN" bench --bus "$url" --tls-dir "$P/agent" --events "$LOAD_EVENTS" --rate "${RATE:-$LOAD_RATE}" \
    --agents 30 --batch 50 --window 16 --agent-prefix "$label-t" --tail-tls-dir "$P/reader" | tail -1)
  c1=$(ticks "$@")
  echo "[$label + tail] $line cpu_s_per_m_events=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v n="$LOAD_EVENTS" 'BEGIN {printf "%.2f", t / hz / n * 1e6}')"
}

# As fast as acks allow, in bench-bus.sh's shape (4 agents, batches of 512):
# a plain bus next to one started as shard 0 of a one-shard map, so the
# cost of the sharding code itself shows.
full_speed() { # label url
  echo "[$1 full speed] $("$BIN" bench --bus "$2" --tls-dir "$P/agent" --events "$FULL_EVENTS" --agents 4 --agent-prefix "$1-f" | tail -1)"
}

m3=$(map 1 3 3)
for i in 0 1 2; do start_shard "$i" "$m3"; done
AMOSKYS_LOG=warn "$BIN" bus --listen 127.0.0.1:27446 --http 127.0.0.1:27466 --data-dir "$work/single" \
  --tls-dir "$P/bus" 2>>"$work/bus.log" &
single=$!
pids+=("$single")
ready_ms 27466 >/dev/null
load one-bus https://127.0.0.1:27446 "$single"
load 3-shards "https://127.0.0.1:${grpc[0]}" "${shard_pids[0]}" "${shard_pids[1]}" "${shard_pids[2]}"
# Each shard above took a third of the rate: one bus at that rate shows what
# smaller group commits cost apart from the sharding code.
RATE=$((LOAD_RATE / 3)) load one-bus-at-a-third https://127.0.0.1:27446 "$single"
full_speed one-bus https://127.0.0.1:27446
kill -TERM "$single"
# One shard of a one-shard map: every Hello goes through the owner check and
# the map is watched, as in a sharded deployment.
mkdir -p "$work/one-shard"
map 1 1 1 | sed "s#${grpc[0]}#27447#" >"$work/one-shard/map.yaml"
printf 'sharding:\n  peerTlsDir: %s\n  mapReloadInterval: 100ms\n' "$P/peer" >"$work/one-shard/bus.yaml"
AMOSKYS_LOG=warn "$BIN" bus --listen 127.0.0.1:27447 --http 127.0.0.1:27467 --data-dir "$work/one-shard/data" \
  --tls-dir "$P/bus" --config "$work/one-shard/bus.yaml" --shard-index 0 --shard-map "$work/one-shard/map.yaml" 2>>"$work/bus.log" &
one_shard=$!
pids+=("$one_shard")
ready_ms 27467 >/dev/null
full_speed one-shard https://127.0.0.1:27447
kill -TERM "$one_shard"
for i in $(seq 0 $((AGENTS - 1))); do
  id=$(printf 'agent-%03d' "$i")
  d="$work/$id"
  mkdir -p "$d"
  printf 'heartbeatInterval: 2s\nbatch:\n  maxDelay: 50ms\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: false\n  synthetic:\n    enabled: true\n    rate: 5\n' >"$d/agent.yaml"
  AMOSKYS_LOG=error "$BIN" agent --config "$d/agent.yaml" --bus "https://127.0.0.1:${grpc[0]}" \
    --tls-dir "$P/agent" --spool-dir "$d/spool" --agent-id "$id" --http 127.0.0.1:0 2>>"$work/agents.log" &
  pids+=($!)
done
echo "[bootstrap] $AGENTS agents through shard 0 settled on 3 shards in $(settle 1 3 3) ms"

m5=$(map 2 5 5)
start_shard 3 "$m5"
start_shard 4 "$m5"
moved0=0
for i in 0 1 2; do moved0=$((moved0 + $(metric "${http[$i]}" amoskys_bus_shard_moved_out_total | cut -d. -f1))); done
set_map "$m5" 3
took=$(settle 2 5 5)
ids=$(seq -f "agent-%03g" 0 $((AGENTS - 1)))
moved=$(paste -d' ' <(echo "$ids" | "$BIN" shards owner --active 3) <(echo "$ids" | "$BIN" shards owner --active 5) |
  awk '$2 != $4 { n++ } END { print n + 0 }')
handed=0
for i in 0 1 2; do handed=$((handed + $(metric "${http[$i]}" amoskys_bus_shard_moved_out_total | cut -d. -f1))); done
echo "[map 3->5]  settled in $took ms; $moved of $AGENTS agents moved ($(awk -v m="$moved" -v n="$AGENTS" 'BEGIN{printf "%.2f", m/n}')), $((handed - moved0)) streams handed over"

sleep 2
echo "[query]     fan-out over 5 shards: $(query_ms)   one shard (--local): $(query_ms --local)"
kill -STOP "${shard_pids[4]}"
echo "[partial]   shard 4 stopped (peerTimeout ${PEER_TIMEOUT_MS} ms): $(QUERIES=5 query_ms)"
kill -CONT "${shard_pids[4]}"
