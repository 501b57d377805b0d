# Shared by the bench scripts; sourced, not run.

# Sets BIN: $AMOSKYS_BIN when given (an already built release binary; a
# release build of RocksDB takes most of an hour on 2 cores), otherwise a
# release build with the given extra cargo arguments.
bench_bin() {
  if [ -n "${AMOSKYS_BIN:-}" ]; then
    BIN=$AMOSKYS_BIN
    return
  fi
  ./scripts/setup.sh
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/amoskys-target}"
  # Hardware CRC32C for RocksDB, as the image is built (see Dockerfile).
  if [ "$(uname -m)" = x86_64 ]; then
    export CXXFLAGS_x86_64_unknown_linux_gnu="${CXXFLAGS_x86_64_unknown_linux_gnu:--msse4.2 -mpclmul}"
  fi
  cargo build --release --locked "$@"
  BIN="$CARGO_TARGET_DIR/release/amoskys"
}

# The value of one series on the /metrics of 127.0.0.1:$1 (empty if absent).
metric() { # http-port series
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s { print $2 }'
}

# The sum of every series whose name starts with $2 (all its label sets).
metric_sum() { # http-port prefix
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v s="$2" 'index($1, s) == 1 { t += $2 } END { print t + 0 }'
}

# Waits up to 20 s for a TCP port on 127.0.0.1 to accept connections.
wait_port() {
  for _ in $(seq 1 400); do
    (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  return 1
}

# Milliseconds from now until the bus's /readyz on 127.0.0.1:$1 answers 200.
# Fails, saying why, if the bus process $2 (when given) exits first, or
# after 10 minutes: a bus that refused its config must not hang the run.
ready_ms() {
  local t0; t0=$(date +%s%N)
  until curl -sf -o /dev/null "http://127.0.0.1:$1/readyz"; do
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
      echo "the bus (pid $2) exited before it was ready; see its log" >&2
      return 1
    fi
    if [ $(( ($(date +%s%N) - t0) / 1000000000 )) -ge 600 ]; then
      echo "the bus on port $1 was not ready after 600 s" >&2
      return 1
    fi
    sleep 0.005
  done
  echo $(( ($(date +%s%N) - t0) / 1000000 ))
}

# A scratch directory in $work and a list of background pids ($pids, append
# to it) that are killed, and the directory removed, when the script exits.
bench_workdir() {
  work=$(mktemp -d)
  pids=()
  # Waiting for the killed processes frees their ports before the script
  # exits, so a run started right after this one can bind them.
  trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
}

# Removes a previous run's data and lets the disk settle. Deleting files on a
# filesystem mounted with `discard` stalls the next fdatasyncs (17 ms after
# 64 MB, 57 ms after 512 MB on the build machine), which the next run would
# otherwise pay for.
fresh_dir() {
  rm -rf "$1"
  sync
  sleep 2
}
