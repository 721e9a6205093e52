#!/usr/bin/env bash
# Boot the test guest once with SCRIPT as /test.sh.
#
#   tests/guest/run.sh [-f HOSTFILE:GUESTPATH]... SCRIPT [TIMEOUT_S]
#
# SCRIPT is a POSIX sh script run by the guest's /init with `sh -x` (output on
# the console). The guest is a Debian 6.1 kernel + busybox + nvme-cli + mke2fs;
# the host's 127.0.0.1:PORT is 10.0.2.2:PORT inside the guest (user-mode net).
#   -f HOSTFILE:GUESTPATH   also place HOSTFILE at GUESTPATH in the guest (repeatable)
#
# Exit status: the guest script's exit code (from the GUEST-EXIT= line),
#              124 if TIMEOUT_S (default 120) passed,
#              125 if the guest ended without a GUEST-EXIT line (panic, qemu error).
# The console log is printed on failure (and always with GUEST_VERBOSE=1).
#
# Environment:
#   GUEST_CACHE       image directory (default <repo>/.guest-cache, from build.sh)
#   GUEST_LOG         also keep the console log at this path
#   GUEST_APPEND      extra kernel command line (e.g. "guest.hostnqn=nqn.... guest.hostid=UUID")
#   GUEST_QEMU_ARGS   extra qemu arguments (word-split)
#   GUEST_MEM         guest memory (default 1024M)
#   GUEST_VERBOSE=1   stream the console to stderr while the guest runs
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${GUEST_CACHE:-$REPO/.guest-cache}

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
EXTRA=()
while getopts 'f:h' opt; do
    case $opt in
    f) EXTRA+=("$OPTARG") ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] && [ $# -le 2 ] || usage
SCRIPT=$1
TIMEOUT=${2:-120}
[ -f "$SCRIPT" ] || { echo "run.sh: no such script: $SCRIPT" >&2; exit 2; }

for f in vmlinux initramfs.cpio bin/busybox READY; do
    [ -e "$CACHE/$f" ] || {
        echo "run.sh: guest image missing ($CACHE/$f): run tests/guest/build.sh first" >&2
        exit 2
    }
done
QEMU=$(command -v qemu-system-x86_64 || true)
[ -n "$QEMU" ] || { echo "run.sh: qemu-system-x86_64 not found: run .ci/install-guest.sh" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/strata-guest.XXXXXX")
QPID=
TAILPID=
cleanup() {
    [ -n "$TAILPID" ] && kill "$TAILPID" 2>/dev/null || true
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Per-run archive: /test.sh (+ extra files). The kernel unpacks concatenated
# newc archives in order, so this one goes after the base and may override it.
mkdir -p "$TMP/root"
install -m755 "$SCRIPT" "$TMP/root/test.sh"
for spec in ${EXTRA[@]+"${EXTRA[@]}"}; do
    src=${spec%%:*}
    dst=${spec#*:}
    [ "$src" != "$spec" ] && [ -n "$dst" ] || { echo "run.sh: -f wants HOSTFILE:GUESTPATH" >&2; exit 2; }
    mkdir -p "$TMP/root/$(dirname "$dst")"
    cp -p "$src" "$TMP/root/$dst"
done
(cd "$TMP/root" && find . -mindepth 1 | "$CACHE/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) >"$TMP/extra.cpio"
cat "$CACHE/initramfs.cpio" "$TMP/extra.cpio" >"$TMP/initrd.cpio"

# lpj preset skips the delay-loop calibration (its value only scales udelay
# loops before the TSC takes over; any sane value works under TCG).
CMDLINE="console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off tsc=reliable no_timer_check cryptomgr.notests=1 lpj=4000000 ${GUEST_APPEND:-}"
LOG=$TMP/console.log
: >"$LOG"

START=$(date +%s.%N)
set +e
# shellcheck disable=SC2086
timeout -k 5 "$TIMEOUT" "$QEMU" \
    -accel tcg,thread=single -cpu max -smp 2 -m "${GUEST_MEM:-1024M}" -machine q35 \
    -nographic -no-reboot -nodefaults -monitor none \
    -bios /usr/share/qemu/qboot.rom \
    -kernel "$CACHE/vmlinux" -initrd "$TMP/initrd.cpio" -append "$CMDLINE" \
    -chardev file,id=con0,path="$LOG" -serial chardev:con0 \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
    ${GUEST_QEMU_ARGS:-} </dev/null >"$TMP/qemu.out" 2>&1 &
QPID=$!
if [ "${GUEST_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -f --pid="$QPID" "$LOG" >&2 &
    TAILPID=$!
fi
wait "$QPID"
qrc=$?
QPID=
set -e
if [ -n "$TAILPID" ]; then wait "$TAILPID" 2>/dev/null || true; TAILPID=; fi
ELAPSED=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

[ -n "${GUEST_LOG:-}" ] && cp "$LOG" "$GUEST_LOG"
code=$(tr -d '\r' <"$LOG" | sed -n 's/^GUEST-EXIT=\([0-9][0-9]*\).*/\1/p' | tail -n1)
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    rc=124
    why="timed out after ${TIMEOUT}s"
elif [ -n "$code" ]; then
    rc=$code
    why="guest script exited $code"
else
    rc=125
    why="guest ended without GUEST-EXIT (qemu exit $qrc)"
fi

if [ "$rc" != 0 ] || [ "${GUEST_VERBOSE:-0}" = 1 ]; then
    if [ "${GUEST_VERBOSE:-0}" != 1 ]; then
        echo "----- guest console ($LOG) -----" >&2
        cat "$LOG" >&2
        echo "----- end of guest console -----" >&2
    fi
    if [ -s "$TMP/qemu.out" ]; then
        echo "----- qemu output -----" >&2
        cat "$TMP/qemu.out" >&2
    fi
fi
# Under host load the guest may miscalibrate its TSC, and its clock then runs
# fast (seen: 31 s of guest uptime in 9 s). Timing-sensitive tests (keep-alive,
# ctrl_loss_tmo) can pass GUEST_APPEND=clocksource=hpet (accurate, ~15% slower).
up=$(tr -d '\r' <"$LOG" | sed -n 's/^GUEST-EXIT=[0-9]* uptime=\([0-9.]*\).*/\1/p' | tail -n1)
if [ -n "$up" ] && awk -v u="$up" -v w="$ELAPSED" 'BEGIN{exit !(u > w * 1.3 + 1)}'; then
    echo "run.sh: WARNING: guest clock ran fast (guest uptime ${up}s vs ${ELAPSED}s wall): TSC miscalibrated under host load; use GUEST_APPEND=clocksource=hpet for timing-sensitive tests" >&2
fi
echo "run.sh: $why (${ELAPSED}s)" >&2
exit "$rc"
