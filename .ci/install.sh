#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine with
# the Rust toolchain: the QEMU Linux-host image, the object-store servers and
# the Prometheus server the metrics test scrapes with, and protoc for the
# raft crate's build script.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
for part in .ci/install-protoc.sh .ci/install-guest.sh .ci/install-objstores.sh .ci/install-prometheus.sh; do
  if [ -f "$part" ]; then
    echo "== $part"
    bash "$part"
  fi
done
