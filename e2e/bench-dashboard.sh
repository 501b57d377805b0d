#!/usr/bin/env bash
# Dashboard server time at a bus holding many events from many agents, and
# the live tail at a fixed event rate with a fast and a slow viewer.
#
# Usage: e2e/bench-dashboard.sh [EVENTS] [AGENTS] [REQUESTS]   (default 1000000 100 200)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-1000000}
AGENTS=${2:-100}
N=${3:-200}
source e2e/bench-lib.sh
bench_bin

bench_workdir
"$BIN" pki init --out "$work/pki" >/dev/null
P="$work/pki"
TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN" >"$work/token"
"$BIN" bus --listen 127.0.0.1:17443 --http 127.0.0.1:19464 --data-dir "$work/bus" --tls-dir "$P/bus" \
  --admin-token-file "$work/token" 2>>"$work/bus.log" &
bus=$!; pids+=("$bus")
wait_port 19464
URL=http://127.0.0.1:19464
bench() { "$BIN" bench --bus https://127.0.0.1:17443 --tls-dir "$P/agent" "$@" | tail -1; }

echo "[fill] $(bench --events "$EVENTS" --agents "$AGENTS" --agent-prefix node)"
sleep 6 # two rate samples for the overview

# p50/p99 of N sequential requests (seconds from curl → ms).
measure() {
  local name=$1 path=$2
  for _ in $(seq 1 "$N"); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" "$URL$path"
  done | sort -n | awk -v name="$name" -v n="$N" '
    { t[NR] = $1 * 1000 }
    END { printf "%-28s n=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n", name, n, t[int(n*0.5)], t[int(n*0.99)], t[n] }'
}
mid=$(( EVENTS / 2 ))
measure "page /"                    "/"
measure "page /agents"              "/agents"
measure "page /events"              "/events"
measure "api overview"              "/api/overview"
measure "api agents (${AGENTS})"    "/api/agents"
measure "api agent"                 "/api/agent?id=node-0"
measure "api events newest 100"     "/api/events?limit=100"
measure "api events filtered"       "/api/events?agent=node-7&limit=100"
measure "api events no match"       "/api/events?text=no-such-text&limit=100"
measure "api events time range"     "/api/events?from=$(date -u -d '-10 min' +%FT%TZ)&to=$(date -u +%FT%TZ)&limit=100"
measure "api events page mid-store" "/api/events?before=$mid&limit=100"
measure "api event detail"          "/api/event?offset=$mid"
curl -s "$URL/metrics" | grep -E '^amoskys_bus_http_request_seconds_(sum|count)' | sed 's/^/[server] /' | head -40

# The live tail at 10k events/s: one viewer reading as fast as it can, one
# reading at 2 KB/s. The bus's RSS is sampled every second.
curl -sN -H "Authorization: Bearer $TOKEN" "$URL/api/tail" >"$work/fast.sse" &
pids+=("$!"); disown
curl -sN --limit-rate 2k -H "Authorization: Bearer $TOKEN" "$URL/api/tail" >"$work/slow.sse" &
pids+=("$!"); disown
sleep 1
rss() { awk '/VmRSS/ {printf "%.0f", $2/1024}' /proc/"$bus"/status; }
rss0=$(rss)
( while kill -0 "$bus" 2>/dev/null; do rss >>"$work/rss"; echo >>"$work/rss"; sleep 1; done ) &
pids+=("$!"); disown
echo "[tail @10k/s] $(bench --events 300000 --rate 10000 --agents 4 --agent-prefix tail)"
sleep 2
last_status() { grep -A1 '^event: status' "$1" | grep '^data:' | tail -1 | sed 's/^data: //'; }
echo "[tail] fast viewer: $(last_status "$work/fast.sse")"
echo "[tail] slow viewer: $(last_status "$work/slow.sse") (bytes received $(wc -c <"$work/slow.sse"))"
echo "[tail] bus_rss_mb start=$rss0 max=$(sort -n "$work/rss" | tail -1) end=$(rss)"
curl -s "$URL/metrics" | grep -E '^amoskys_bus_dashboard_tail' | sed 's/^/[tail] /'
