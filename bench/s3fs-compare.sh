#!/usr/bin/env bash
# Strata's objbacker against s3fs-fuse on the same S3 server (s3s-fs), both
# behind one latency-injecting proxy (`strata bench s3-proxy`), 127.0.0.1
# only. Issue #8; method and results: docs/objbacker.md "Against s3fs-fuse".
#
# Per round, alternating:
#   s3fs:   mount through the proxy, dd 256 MiB bs=1M conv=fsync from a random
#           file, unmount, sha256 of the object file in s3s-fs's directory;
#           remount, drop caches, dd the object to /dev/null bs=1M.
#   Strata: strata serve with an objbacker namespace on 6 buckets at the
#           proxy; `strata bench seqio` writes the file at QD16 + FLUSH
#           (timed), kill -9, sha256 of the concatenated objects in s3s-fs's
#           directory, restart, drop caches, read at QD16 comparing every
#           byte; then the same at QD1 (at offset 256 MiB, fresh objects).
# Prints MB/s per run and Strata/s3fs per round, with min-max over rounds.
#
# Needs root (mount, drop_caches, chrt), s3fs (apt-get install s3fs), s3s-fs
# (cargo install s3s-fs@0.14.1 --features binary --locked) and a release
# strata binary (cargo build --release).
#
# Environment: ROUNDS (3), SIZE_MB (256), DELAY_MS (20), BUCKETS (6),
# OBJECT_MB (objbacker object size in MiB, 1; a power of two up to 16),
# READAHEAD (the namespace's `readahead`, e.g. 4MiB; unset: its default),
# STRATA_BIN (build/release/strata), S3S_FS_BIN (s3s-fs on PATH or
# ~/.cargo/bin), OUT (results directory, default /tmp/s3fs-compare-DATE),
# MAX_SECONDS (whole-run bound, 1800), KEEP (1: keep the work directory).
set -euo pipefail
shopt -s inherit_errexit

ROUNDS=${ROUNDS:-3}
SIZE_MB=${SIZE_MB:-256}
DELAY_MS=${DELAY_MS:-20}
BUCKETS=${BUCKETS:-6}
OBJECT_MB=${OBJECT_MB:-1}
READAHEAD=${READAHEAD:-}
MAX_SECONDS=${MAX_SECONDS:-1800}
HERE=$(cd "$(dirname "$0")/.." && pwd)
STRATA=${STRATA_BIN:-$HERE/build/release/strata}
S3S_FS=${S3S_FS_BIN:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
OUT=${OUT:-/tmp/s3fs-compare-$(date -u +%Y%m%dT%H%M%SZ)}
RT=(chrt -f 10)   # every measured process: builds on this machine must not distort it
STEP_TIMEOUT=600  # bound on any single step
AK=strata-compare
SK=strata-compare-secret-key
NQN=nqn.2026-12.dev.strata:s3fs-compare

[ $((SIZE_MB % OBJECT_MB)) = 0 ] || { echo "SIZE_MB must be a multiple of OBJECT_MB" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (mount, drop_caches, chrt)" >&2; exit 2; }
for b in "$STRATA" "$S3S_FS" "$(command -v s3fs || true)"; do
    [ -x "$b" ] || { echo "missing binary: ${b:-s3fs} (see the header of $0)" >&2; exit 2; }
done
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/s3fs-compare-work.XXXXXX)
S3ROOT=$WORK/s3
MNT=$WORK/mnt
mkdir -p "$S3ROOT/s3fs" "$MNT"
for k in $(seq 0 $((BUCKETS - 1))); do mkdir -p "$S3ROOT/strata-$k"; done

S3_PID= PROXY_PID= SERVE_PID= WATCHDOG_PID=
cleanup() {
    local rc=$?
    set +e
    mountpoint -q "$MNT" && { fusermount -u "$MNT" 2>/dev/null || umount -l "$MNT"; }
    for p in $SERVE_PID $PROXY_PID $S3_PID; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM
# Whole-run bound: TERM ourselves (the trap cleans up).
( sleep "$MAX_SECONDS"; echo "s3fs-compare: over $MAX_SECONDS s, stopping" >&2; kill -TERM $$ ) &
WATCHDOG_PID=$!

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listening on 127.0.0.1:$1 after $2 s" >&2; return 1
}
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

S3_PORT=$(free_port)
PROXY_PORT=$(free_port)
"${RT[@]}" "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$AK" --secret-key "$SK" \
    "$S3ROOT" > "$OUT/s3s-fs.log" 2>&1 &
S3_PID=$!
wait_port "$S3_PORT" 30
"${RT[@]}" "$STRATA" bench s3-proxy --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$S3_PORT" \
    --delay-ms "$DELAY_MS" --log "$OUT/proxy-requests.log" > "$OUT/proxy.log" 2>&1 &
PROXY_PID=$!
wait_port "$PROXY_PORT" 30

BYTES=$((SIZE_MB * 1048576))
SRC=$WORK/src.bin
head -c "$BYTES" /dev/urandom > "$SRC"
SRC_SHA=$(sha256sum "$SRC" | cut -d' ' -f1)

# --- s3fs ---------------------------------------------------------------
PASSWD=$WORK/passwd-s3fs
echo "$AK:$SK" > "$PASSWD"
chmod 600 "$PASSWD"
# Default tuning, as a user would mount it: only what pointing at a local
# path-style endpoint needs.
S3FS_OPTS="url=http://127.0.0.1:$PROXY_PORT,use_path_request_style,passwd_file=$PASSWD"
s3fs_mount() {
    timeout "$STEP_TIMEOUT" "${RT[@]}" s3fs s3fs "$MNT" -o "$S3FS_OPTS" \
        -o "logfile=$OUT/s3fs.log" -o dbglevel=warn
    local i
    for ((i = 0; i < 100; i++)); do mountpoint -q "$MNT" && return 0; sleep 0.1; done
    echo "s3fs did not mount" >&2; return 1
}
s3fs_umount() {
    local i
    for ((i = 0; i < 100; i++)); do fusermount -u "$MNT" 2>/dev/null && return 0; sleep 0.1; done
    echo "could not unmount $MNT" >&2; return 1
}
run_s3fs() { # round -> sets S3FS_W S3FS_R (MB/s)
    local r=$1 f=obj-r$1 t0 t1
    s3fs_mount
    t0=$(now)
    timeout "$STEP_TIMEOUT" "${RT[@]}" dd if="$SRC" of="$MNT/$f" bs=1M count="$SIZE_MB" conv=fsync status=none
    t1=$(now)
    S3FS_W=$(mbps "$BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
    s3fs_umount
    local sha
    sha=$(sha256sum "$S3ROOT/s3fs/$f" | cut -d' ' -f1)
    [ "$sha" = "$SRC_SHA" ] || { echo "s3fs round $r: the stored object differs from the source" >&2; exit 1; }
    s3fs_mount
    drop_caches
    t0=$(now)
    timeout "$STEP_TIMEOUT" "${RT[@]}" dd if="$MNT/$f" of=/dev/null bs=1M status=none
    t1=$(now)
    S3FS_R=$(mbps "$BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
    s3fs_umount
    echo "$(date -u +%T) round $r s3fs: write+fsync $S3FS_W MB/s, read $S3FS_R MB/s (stored object sha256 = source)" | tee -a "$OUT/summary.txt"
}

# --- Strata -------------------------------------------------------------
serve_start() { # config log
    : > "$2"
    "${RT[@]}" "$STRATA" serve --config "$1" --discovery "127.0.0.1:$DISC_PORT" >> "$2" 2>&1 &
    SERVE_PID=$!
    local i
    for ((i = 0; i < 600; i++)); do
        grep -q "strata serve started" "$2" && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || { echo "strata serve exited:" >&2; tail -20 "$2" >&2; return 1; }
        sleep 0.1
    done
    echo "strata serve not started after 60 s" >&2; tail -20 "$2" >&2; return 1
}
serve_kill9() { kill -9 "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=; }
store_check() { # prefix first_MiB MiB -> the objects in s3s-fs's dir concatenated = source
    local p=$1 first=$(($2 / OBJECT_MB)) n=$(($3 / OBJECT_MB)) i sha
    sha=$(for ((i = first; i < first + n; i++)); do
        cat "$S3ROOT/strata-$((i % BUCKETS))/$p/$(printf %08d "$i")"
    done | sha256sum | cut -d' ' -f1)
    [ "$sha" = "$SRC_SHA" ] || { echo "Strata $p: objects $first..$((first + n - 1)) in the store differ from the source" >&2; exit 1; }
}
seqio() { # args... -> prints MB/s
    rm -f "$WORK/seqio.json"
    timeout "$STEP_TIMEOUT" "${RT[@]}" "$STRATA" bench seqio --target "127.0.0.1:$SERVE_PORT" --nqn "$NQN" \
        --file "$SRC" --bs 1m "$@" --json "$WORK/seqio.json" >> "$OUT/seqio.log"
    python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["mb_per_s"])' "$WORK/seqio.json"
}
run_strata() { # round -> sets ST_W16 ST_R16 ST_W1 ST_R1
    local r=$1 p=r$1 cfg=$WORK/serve-r$1.toml log=$OUT/serve-r$1.log
    SERVE_PORT=$(free_port)
    DISC_PORT=$(free_port)
    local urls k
    urls=$(for k in $(seq 0 $((BUCKETS - 1))); do printf '"s3://strata-%d/%s", ' "$k" "$p"; done)
    cat > "$cfg" <<EOF
[[listener]]
name = "compare"
addr = "127.0.0.1:$SERVE_PORT"

[[subsystem]]
nqn = "$NQN"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
type = "objbacker"
size = "$((4 * SIZE_MB))MiB"
object_size = "${OBJECT_MB}MiB"
buckets = [${urls%, }]
auto_format = true
${READAHEAD:+readahead = \"$READAHEAD\"}
store_options = { aws_endpoint = "http://127.0.0.1:$PROXY_PORT", aws_allow_http = "true", aws_virtual_hosted_style_request = "false", aws_region = "us-east-1", aws_access_key_id = "$AK", aws_secret_access_key = "$SK" }
EOF
    serve_start "$cfg" "$log"
    ST_W16=$(seqio --rw write --qd 16 --flush)
    serve_kill9
    store_check "$p" 0 "$SIZE_MB"
    serve_start "$cfg" "$log.2"
    drop_caches
    ST_R16=$(seqio --rw read --qd 16)
    ST_W1=$(seqio --rw write --qd 1 --flush --offset "${SIZE_MB}m")
    serve_kill9
    store_check "$p" "$SIZE_MB" "$SIZE_MB"
    serve_start "$cfg" "$log.3"
    drop_caches
    ST_R1=$(seqio --rw read --qd 1 --offset "${SIZE_MB}m")
    kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=
    echo "$(date -u +%T) round $r Strata: QD16 write+FLUSH $ST_W16 MB/s, read $ST_R16 MB/s; QD1 write+FLUSH $ST_W1 MB/s, read $ST_R1 MB/s (after kill -9: store objects and every byte read = source)" | tee -a "$OUT/summary.txt"
}

{
    echo "# s3fs-compare $(date -u +%FT%TZ): $ROUNDS rounds, $SIZE_MB MiB at 1 MiB, proxy +$DELAY_MS ms/request, objbacker: $BUCKETS buckets, $OBJECT_MB MiB objects"
    echo "# s3fs $(s3fs --version 2>&1 | head -1 | sed 's/Amazon Simple Storage Service File System //'); options: $S3FS_OPTS (passwd path elided below)"
    echo "# strata $($STRATA --version 2>/dev/null || echo '?') at $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')"
} | sed "s#$PASSWD#PASSWD#" | tee "$OUT/summary.txt"
printf 'round\ts3fs_w\ts3fs_r\tst_w16\tst_r16\tst_w1\tst_r1\n' > "$OUT/results.tsv"
for r in $(seq 1 "$ROUNDS"); do
    echo "$(date -u +%T) round $r: s3fs phase start $(date +%s%3N)" >> "$OUT/phases.log"
    run_s3fs "$r"
    echo "$(date -u +%T) round $r: strata phase start $(date +%s%3N)" >> "$OUT/phases.log"
    run_strata "$r"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$S3FS_W" "$S3FS_R" "$ST_W16" "$ST_R16" "$ST_W1" "$ST_R1" >> "$OUT/results.tsv"
done
echo "$(date -u +%T) end $(date +%s%3N)" >> "$OUT/phases.log"

awk -F'\t' 'NR > 1 {
        n++
        v[n, 1] = $2; v[n, 2] = $3; v[n, 3] = $4; v[n, 4] = $5; v[n, 5] = $6; v[n, 6] = $7
        q[n, 1] = $4 / $2; q[n, 2] = $5 / $3; q[n, 3] = $6 / $2; q[n, 4] = $7 / $3
        printf "round %d ratio Strata/s3fs: QD16 write %.2fx read %.2fx; QD1 write %.2fx read %.2fx\n", $1, q[n, 1], q[n, 2], q[n, 3], q[n, 4]
    }
    function stat(a, j, name,   i, s, lo, hi) {
        lo = 1e18; hi = -1e18; s = 0
        for (i = 1; i <= n; i++) { x = (a == "v") ? v[i, j] : q[i, j]; s += x; if (x < lo) lo = x; if (x > hi) hi = x }
        printf "  %-28s mean %8.2f  min %8.2f  max %8.2f\n", name, s / n, lo, hi
    }
    END {
        print "MB/s over " n " rounds:"
        stat("v", 1, "s3fs write+fsync"); stat("v", 2, "s3fs read")
        stat("v", 3, "Strata QD16 write+FLUSH"); stat("v", 4, "Strata QD16 read")
        stat("v", 5, "Strata QD1 write+FLUSH"); stat("v", 6, "Strata QD1 read")
        print "Strata/s3fs (per round):"
        stat("q", 1, "QD16 write (goal >= 3)"); stat("q", 2, "QD16 read (goal >= 3)")
        stat("q", 3, "QD1 write (goal >= 1)"); stat("q", 4, "QD1 read (goal >= 1)")
    }' "$OUT/results.tsv" | tee -a "$OUT/summary.txt"
kill "$PROXY_PID" && wait "$PROXY_PID" 2>/dev/null; PROXY_PID=
tail -1 "$OUT/proxy.log" | tee -a "$OUT/summary.txt"
echo "results: $OUT"
