#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine with
# the Rust toolchain: the QEMU Linux-host image and the object-store servers.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
for part in .ci/install-guest.sh .ci/install-objstores.sh; do
  if [ -f "$part" ]; then
    echo "== $part"
    bash "$part"
  fi
done
