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
# The package may start a service where an init system runs; the tests start their own Prometheus on a free port.
exit 0
