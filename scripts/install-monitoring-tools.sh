#!/usr/bin/env bash
# Debian's `prometheus` package (prometheus and promtool), for the monitoring tests: `make monitoring-tools`, run
# by `make test` and `make test-slow`. Installs only where it is missing and apt can run (root, or passwordless
# sudo); otherwise it says why and exits 0, and the tests that need it skip with that reason.
set -uo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "monitoring-tools: prometheus is missing and apt needs root or passwordless sudo: the Prometheus tests will skip" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "monitoring-tools: prometheus is missing and this is not a Debian-like system (no apt-get): the Prometheus tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "monitoring-tools: installing Debian's prometheus package" >&2
if ! "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; then
  "${sudo[@]}" apt-get update -qq >/dev/null 2>&1
  "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
    || echo "monitoring-tools: apt-get install prometheus failed: the Prometheus tests will skip" >&2
fi
# Where an init system runs, the package starts a Prometheus service listening on all interfaces (:9090). The
# tests start their own on loopback and a free port, so that service is stopped and disabled: nothing of ours
# listens beyond loopback.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 \
    && echo "monitoring-tools: stopped and disabled the prometheus service the package started" >&2
fi
exit 0
