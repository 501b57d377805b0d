#!/usr/bin/env bash
# The local all-in-one: installs what is missing, builds, and runs `amoskys up`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/amoskys-target}"
# The debug build the tests use: one RocksDB compile serves both, and the
# local demo does not need release speed (benchmarks build --release).
exec cargo run --locked -- up "$@"
