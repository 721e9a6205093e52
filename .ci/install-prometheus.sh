#!/usr/bin/env bash
# Install the Prometheus server that tests/metrics_prometheus.rs scrapes the
# metrics endpoint with (Debian's `prometheus` package). The test starts its
# own instance on 127.0.0.1; the package's service is not used.
set -euo pipefail
SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v prometheus >/dev/null; then
    echo "[install-prometheus] installing prometheus"
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
prometheus --version | head -1
