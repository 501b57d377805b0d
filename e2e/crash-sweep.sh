#!/usr/bin/env bash
# The long crash sweep: the same test CI runs with 8 kills
# (e2e/identity_e2e.rs, crash_sweep_*), here with KILLS (default 50) SIGKILLs
# of the bus and of three agents at random moments, one spool wiped and one
# clone started midway. The history checker then prints what every agent
# produced and saw acked against what the bus stores, and fails on any
# event acked but missing, stored twice, or lost without a gap event.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/amoskys-target}"
AMOSKYS_SWEEP_KILLS=${KILLS:-50} cargo test --workspace --tests --locked -- \
  --exact crash_sweep_kill_9_of_bus_and_agents_at_random_loses_nothing_unaccounted --nocapture 2>&1 |
  grep -E '^(crash sweep|incarnations=|  [a-z]|test crash|test result: FAILED)'
