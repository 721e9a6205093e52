#!/usr/bin/env bash
# Prove the guest harness without Strata: boot the guest, reach a listener on
# the host's 127.0.0.1 (as 10.0.2.2), run Linux's nvmet-tcp target inside the
# guest and exercise it with nvme-cli (discover, connect, 2-path multipath,
# list, dd + sha256 compare, mkfs.ext4/mount, disconnect). Prints timings.
#
#   tests/guest/selftest.sh [TIMEOUT_S]      (default 180; builds the image if needed)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${GUEST_CACHE:-$REPO/.guest-cache}
TIMEOUT=${1:-180}

"$HERE/build.sh" "$CACHE"
BB=$CACHE/bin/busybox

TMP=$(mktemp -d "${TMPDIR:-/tmp}/strata-selftest.XXXXXX")
HPID=
cleanup() {
    [ -n "$HPID" ] && kill "$HPID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# Host-side listener on 127.0.0.1:<free port> (busybox httpd: no host deps).
mkdir -p "$TMP/www"
TOKEN=token-$$-$RANDOM$RANDOM
echo "$TOKEN" >"$TMP/www/token"
for _ in $(seq 1 20); do
    PORT=$((20000 + RANDOM % 40000))
    "$BB" httpd -f -p "127.0.0.1:$PORT" -h "$TMP/www" 2>/dev/null &
    HPID=$!
    sleep 0.3
    kill -0 "$HPID" 2>/dev/null && break
    HPID=
done
[ -n "$HPID" ] || { echo "selftest: could not start a host listener" >&2; exit 1; }

{
    echo "HOST_PORT=$PORT"
    echo "TOKEN=$TOKEN"
    cat "$HERE/selftest-guest.sh"
} >"$TMP/test.sh"

START=$(date +%s.%N)
set +e
GUEST_LOG=$TMP/console.log "$HERE/run.sh" "$TMP/test.sh" "$TIMEOUT"
rc=$?
set -e
WALL=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

if [ -f "$TMP/console.log" ]; then
    grep -E '^(SELFTEST|GUEST-)' "$TMP/console.log" | tr -d '\r' || true
    # Guest-clock timings (seconds since guest kernel start).
    tr -d '\r' <"$TMP/console.log" | awk -v wall="$WALL" '
        /^GUEST-BOOT uptime=/  { split($2, a, "="); boot = a[2] }
        /^GUEST-READY uptime=/ { split($2, a, "="); ready = a[2] }
        /^TIMING /             { t[$2] = $3 }
        /^GUEST-EXIT=/         { split($2, a, "="); ex = a[2] }
        END {
            printf "timings (guest clock, s): kernel->/init %.2f, /init->ready (modules, net) %.2f\n", boot, ready - boot
            if ("discover" in t) printf "  nvmet setup %.2f, discover %.2f, connect %.2f, 2nd path %.2f, dd 1MiB %.2f, mkfs+mount %.2f, disconnect %.2f\n",
                t["target"] - t["net"], t["discover"] - t["target"], t["connect"] - t["discover"],
                t["multipath"] - t["connect"], t["dd"] - t["multipath"], t["ext4"] - t["dd"], t["disconnect"] - t["ext4"]
            printf "  guest uptime at exit %.2f; whole run (host wall clock, incl. qemu start/stop) %s s\n", ex, wall
        }'
fi
if [ "$rc" = 0 ] && grep -q '^SELFTEST ALL OK' "$TMP/console.log"; then
    echo "selftest: PASS"
    exit 0
fi
echo "selftest: FAIL (run.sh exit $rc)" >&2
exit 1
