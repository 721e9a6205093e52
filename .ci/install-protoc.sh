#!/usr/bin/env bash
# Install protoc (Debian's `protobuf-compiler`, 3.21) for the build script of
# `raft-proto`, which strata-cluster pulls in through the `raft` crate: its
# prost codec runs prost-build 0.11, which bundles no protoc and cannot be
# pointed at proto/'s vendored one. Skipped when a protoc is already on PATH.
set -euo pipefail
SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v protoc >/dev/null; then
    echo "[install-protoc] installing protobuf-compiler"
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends protobuf-compiler
fi
protoc --version
