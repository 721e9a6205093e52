#!/usr/bin/env bash
# Installs the local object-store protocol servers that strata-objbacker's
# tests drive on 127.0.0.1. S3 needs nothing here: s3s-fs is embedded in the
# test binary as a dev-dependency. GCS has no XML-API emulator in any
# registry we reach (see docs/objbacker.md), so nothing is installed for it.
set -euo pipefail

# Azurite (Microsoft's Azure Storage emulator) from npm. Pinned to a major
# version so a CI run does not pick up an incompatible API change.
if command -v azurite-blob >/dev/null 2>&1; then
    echo "azurite-blob already installed: $(command -v azurite-blob)"
else
    if ! command -v npm >/dev/null 2>&1; then
        echo "npm is missing: apt-get install -y nodejs npm" >&2
        exit 1
    fi
    npm install --global --no-audit --no-fund azurite@3
    command -v azurite-blob
fi
