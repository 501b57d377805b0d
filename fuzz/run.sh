#!/usr/bin/env bash
# A fuzzing campaign: builds every cargo-fuzz target and runs each for
# FUZZ_SECONDS (default 600), JOBS targets at a time (default: the core
# count), then prints executions, corpus size and crashes per target.
#
#   fuzz/run.sh                 # every target, 10 minutes each
#   FUZZ_SECONDS=60 fuzz/run.sh flow publish
#
# Needs a nightly toolchain (libFuzzer's sanitizer flags) and cargo-fuzz
# (`cargo install cargo-fuzz`). RocksDB is linked, never exercised, by the
# targets: its static library is taken from the test build
# (./scripts/test.sh) instead of being compiled again with fuzzing flags.
# A crash is saved under fuzz/artifacts/<target>/; copy it into
# fuzz/regressions/<target>/ once fixed, and fuzz/corpus_replay.rs replays it.
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-600}
jobs=${JOBS:-$(nproc)}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

target_dir=${CARGO_TARGET_DIR:-$HOME/.cache/amoskys-target}
lib=$(find "$target_dir" -name librocksdb.a -path '*librocksdb-sys-*' -printf '%T@ %h\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
[ -n "$lib" ] || { echo "fuzz: no librocksdb.a under $target_dir; run ./scripts/test.sh --no-run first" >&2; exit 1; }
export ROCKSDB_LIB_DIR=$lib ROCKSDB_STATIC=1
export CARGO_TARGET_DIR="$target_dir/fuzz"


for t in "${targets[@]}"; do cargo +nightly fuzz build "$t" >/dev/null; done

log=$(mktemp -d)
run() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  # -max_total_time ends the run; -timeout flags an input that hangs.
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log/$t.log" 2>&1 || true
}
running=0
for t in "${targets[@]}"; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait

printf '%-16s %12s %10s %8s %8s\n' target executions exec/s corpus crashes
fail=0
for t in "${targets[@]}"; do
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log/$t.log" | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log/$t.log" | grep -o '[0-9]*$' || echo 0)
  corpus=$(find "corpus/$t" -type f | wc -l)
  crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
  printf '%-16s %12s %10s %8s %8s\n' "$t" "${execs:-0}" "${rate:-0}" "$corpus" "$crashes"
  [ "$crashes" -eq 0 ] || { fail=1; grep -m3 -E 'panicked|ERROR|SUMMARY' "$log/$t.log" | sed 's/^/    /'; }
done
echo "logs: $log"
exit $fail
