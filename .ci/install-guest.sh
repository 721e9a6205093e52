#!/usr/bin/env bash
# Install what the QEMU NVMe/TCP guest harness needs on a fresh Debian 12
# machine, then build the guest image (tests/guest/build.sh).
#
#   .ci/install-guest.sh [CACHE_DIR]        (as root, or with sudo available)
#
# Host packages: qemu-system-x86 (pulls qemu-system-data: qboot.rom, pvh.bin),
# xz-utils (decompress the bzImage payload; busybox is the fallback), plus the
# base tools build.sh/run.sh use (dpkg-deb, flock, GNU grep, coreutils, mawk),
# all present on Debian but listed to be explicit. No cpio package: the
# staged static busybox makes the archives.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive

PKGS="qemu-system-x86 xz-utils dpkg util-linux grep coreutils mawk"
missing=
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
# apt lists are needed by build.sh (apt-cache search / apt-get download) even
# when every host package is already installed.
$SUDO apt-get update -q
if [ -n "$missing" ]; then
    echo "[install-guest] installing:$missing"
    $SUDO apt-get install -y -q --no-install-recommends $missing
fi
command -v qemu-system-x86_64 >/dev/null
[ -f /usr/share/qemu/qboot.rom ] || { echo "[install-guest] /usr/share/qemu/qboot.rom missing" >&2; exit 1; }

"$REPO/tests/guest/build.sh" "$@"
