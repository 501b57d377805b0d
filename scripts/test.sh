#!/usr/bin/env bash
# The test suite, as CI runs it: set-up, then every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Build outputs live outside the clone so a fresh clone reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/amoskys-target}"
cargo test --workspace --locked "$@"
