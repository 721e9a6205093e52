#!/usr/bin/env bash
# Build the QEMU guest used by the NVMe/TCP integration tests.
#
#   tests/guest/build.sh [CACHE_DIR]      (default: <repo>/.guest-cache, git-ignored)
#
# Produces, in CACHE_DIR:
#   vmlinux          uncompressed kernel (PVH direct boot, no xz under TCG)
#   initramfs.cpio   uncompressed newc initramfs: busybox, nvme-cli, mke2fs, modules, /init
#   bin/busybox      static busybox for the host side (cpio -o for per-run script archives,
#                    httpd for the selftest); the host needs no cpio package
#   READY            stamp; when it matches this script + init, the build exits at once
#
# Nothing is installed on the host: every Debian package is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`.
# Host needs: apt-get, dpkg-deb, flock, sha256sum, GNU grep (-P), xz or zstd or gzip
# (for the kernel payload; busybox's unxz is used as a fallback).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${1:-${GUEST_CACHE:-$REPO/.guest-cache}}
FORCE=${GUEST_FORCE_BUILD:-0}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

log() { printf '[guest-build %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '[guest-build] ERROR: %s\n' "$*" >&2; exit 1; }

KEY=$(cat "$HERE/build.sh" "$HERE/init" | sha256sum | cut -c1-32)
is_ready() {
    [ -s "$CACHE/vmlinux" ] && [ -s "$CACHE/initramfs.cpio" ] && [ -x "$CACHE/bin/busybox" ] &&
        [ -f "$CACHE/READY" ] && [ "$(cat "$CACHE/READY")" = "$KEY" ]
}
if [ "$FORCE" != 1 ] && is_ready; then
    log "up to date: $CACHE"
    exit 0
fi

# Serialise concurrent builds of the same cache.
exec 9>"$CACHE/.lock"
flock 9
if [ "$FORCE" != 1 ] && is_ready; then
    log "up to date (built by a concurrent run): $CACHE"
    exit 0
fi
rm -f "$CACHE/READY"

T0=$(date +%s)
DEBS=$CACHE/debs
WORK=$CACHE/work
rm -rf "$WORK"
mkdir -p "$DEBS" "$WORK" "$CACHE/bin"
export LC_ALL=C

# ---------------------------------------------------------------- packages
# Newest bookworm 6.1 kernel flavour "amd64" (not cloud/rt, not -unsigned).
KPKG=${GUEST_KERNEL_PKG:-$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
    awk '{print $1}' | sort -V | tail -n1)}
[ -n "$KPKG" ] || die "no linux-image-6.1.0-*-amd64 in apt lists (run apt-get update)"
log "kernel package: $KPKG"

# Downloaded .deb of PKG (empty if not downloaded yet).
deb_of() { ls "$DEBS/${1}_"*.deb 2>/dev/null | sort -V | tail -n1 || true; }
# fetch PKG... -> download (in one apt-get call) those not in $DEBS yet; the
# candidate version from the apt lists at the time of the first download.
fetch() {
    local need=() p
    for p in "$@"; do [ -n "$(deb_of "$p")" ] || need+=("$p"); done
    [ ${#need[@]} -eq 0 ] && return 0
    (cd "$DEBS" && apt-get download -q "${need[@]}" >&2 2>"$WORK/apt.err") ||
        { cat "$WORK/apt.err" >&2; die "apt-get download ${need[*]} failed"; }
    for p in "${need[@]}"; do [ -n "$(deb_of "$p")" ] || die "apt-get download $p produced no .deb"; done
}

# Runtime Pre-Depends/Depends of a downloaded package, read from its own
# control file (first alternative of each, version constraints dropped).
deb_deps() {
    { dpkg-deb -f "$1" Pre-Depends; dpkg-deb -f "$1" Depends; } | tr ',' '\n' |
        sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/[[:space:]]//g' | grep -v '^$' | sort -u
}

# A package is a shared-library package if its control area carries `shlibs`
# or `symbols` (Debian policy 8.6). Starting from the tools, walk Depends and
# unpack every library package (recursively) into the sysroot. Which .so files
# the guest really needs is then decided by the dynamic loader itself (below).
SYSROOT=$WORK/sysroot
mkdir -p "$SYSROOT"
declare -A SEEN=()
LEVEL=(busybox-static nvme-cli e2fsprogs libc6)
TOOLS=" busybox-static nvme-cli e2fsprogs "
while [ ${#LEVEL[@]} -gt 0 ]; do
    todo=()
    for pkg in "${LEVEL[@]}"; do
        [ -n "${SEEN[$pkg]:-}" ] && continue
        SEEN[$pkg]=1
        todo+=("$pkg")
    done
    [ ${#todo[@]} -eq 0 ] && break
    fetch "${todo[@]}"
    LEVEL=()
    for pkg in "${todo[@]}"; do
        deb=$(deb_of "$pkg")
        info=$(dpkg-deb -I "$deb")
        if [[ "$TOOLS" == *" $pkg "* ]] || grep -Eq '^ +[0-9]+ bytes, +[0-9]+ lines +(shlibs|symbols) ' <<<"$info"; then
            dpkg-deb -x "$deb" "$SYSROOT"
            echo "$pkg" >>"$WORK/unpacked.txt"
            for d in $(deb_deps "$deb"); do LEVEL+=("$d"); done
        fi
    done
done
log "unpacked: $(tr '\n' ' ' <"$WORK/unpacked.txt")"

cp "$SYSROOT/bin/busybox" "$CACHE/bin/busybox.new"
mv "$CACHE/bin/busybox.new" "$CACHE/bin/busybox"
BB=$CACHE/bin/busybox

# ---------------------------------------------------------------- kernel
KROOT=$WORK/kernel
mkdir -p "$KROOT"
fetch "$KPKG"
dpkg-deb -x "$(deb_of "$KPKG")" "$KROOT"
KVER=$(ls "$KROOT/lib/modules" | head -n1)
log "kernel version: $KVER"

# extract-vmlinux: find a compressed payload by its magic, decompress from
# there, keep the first result that is an ELF image.
extract_vmlinux() {
    local img=$1 out=$2 magic cmd off
    for spec in 'xz|\xfd7zXZ\x00' 'zstd|\x28\xb5\x2f\xfd' 'gzip|\x1f\x8b\x08' 'lzma|\x5d\x00\x00\x00'; do
        cmd=${spec%%|*}; magic=${spec#*|}
        for off in $(grep -obUaP "$magic" "$img" | cut -d: -f1); do
            case $cmd in
            xz) if command -v xz >/dev/null; then d="xz -dc"; else d="$BB unxz -c"; fi ;;
            zstd) command -v zstd >/dev/null || continue; d="zstd -dcq" ;;
            gzip) if command -v gzip >/dev/null; then d="gzip -dc"; else d="$BB gunzip -c"; fi ;;
            lzma) d="$BB unlzma -c" ;;
            esac
            tail -c "+$((off + 1))" "$img" | $d >"$out" 2>/dev/null || true
            if [ "$(head -c4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                log "vmlinux: $cmd payload at offset $off"
                return 0
            fi
        done
    done
    return 1
}
extract_vmlinux "$KROOT/boot/vmlinuz-$KVER" "$WORK/vmlinux" || die "could not extract vmlinux from bzImage"

# ---------------------------------------------------------------- modules
# Modules available in the guest. BOOT_MODULES are loaded by /init; the rest
# (Linux's own target, null_blk, loop) are for the selftest and load on demand.
MODULES="virtio_pci virtio_net nvme-core nvme-fabrics nvme-tcp ext4 configfs
 crc32c_generic libcrc32c crct10dif_generic crc64_rocksoft_generic
 nvmet nvmet-tcp null_blk loop"
BOOT_MODULES="virtio_pci virtio_net crc32c_generic crct10dif_generic crc64_rocksoft_generic configfs nvme-core nvme-fabrics nvme-tcp ext4"

"$BB" depmod -b "$KROOT" "$KVER"
MDIR=$KROOT/lib/modules/$KVER
# modules.dep lines: "kernel/path/name.ko: dep1.ko dep2.ko"; closure of MODULES.
declare -A WANT=()
for m in $MODULES; do
    n=${m//_/-}
    path=$(awk -F: -v n="$n" '{f=$1; sub(/.*\//,"",f); sub(/\.ko$/,"",f); gsub(/_/,"-",f); if (f==n) {print $1; exit}}' "$MDIR/modules.dep")
    [ -n "$path" ] || die "module $m not found in $KVER"
    WANT[$path]=1
    for d in $(awk -F: -v p="$path" '$1==p {print $2}' "$MDIR/modules.dep"); do WANT[$d]=1; done
done

# ---------------------------------------------------------------- initramfs tree
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc/nvme,proc,sys,dev,tmp,run,mnt,root}
cp "$BB" "$ROOT/bin/busybox"
for applet in $("$BB" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -sf /bin/busybox "$ROOT/$applet"
done
# Real tools replace the busybox applets of the same name.
install -m755 "$SYSROOT/usr/sbin/nvme" "$ROOT/usr/sbin/nvme"
MKE2FS=$(ls "$SYSROOT"/sbin/mke2fs "$SYSROOT"/usr/sbin/mke2fs 2>/dev/null | head -n1 || true)
[ -n "$MKE2FS" ] || die "mke2fs not found in e2fsprogs"
rm -f "$ROOT/sbin/mke2fs" "$ROOT/usr/sbin/mke2fs"
install -m755 "$MKE2FS" "$ROOT/sbin/mke2fs"
for t in mkfs.ext4 mkfs.ext3 mkfs.ext2; do ln -sf mke2fs "$ROOT/sbin/$t"; done
for t in e2fsck tune2fs dumpe2fs; do
    f=$(ls "$SYSROOT/sbin/$t" "$SYSROOT/usr/sbin/$t" 2>/dev/null | head -n1 || true)
    [ -n "$f" ] && install -m755 "$f" "$ROOT/sbin/$t"
done
ln -sf e2fsck "$ROOT/sbin/fsck.ext4"
[ -f "$SYSROOT/etc/mke2fs.conf" ] && cp "$SYSROOT/etc/mke2fs.conf" "$ROOT/etc/"

# Shared libraries: ask the staged dynamic loader what each binary needs.
LDSO=$SYSROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -x "$LDSO" ] || LDSO=$SYSROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
LIBPATH=$SYSROOT/lib/x86_64-linux-gnu:$SYSROOT/usr/lib/x86_64-linux-gnu
: >"$WORK/libs.txt"
for bin in "$ROOT/usr/sbin/nvme" "$ROOT"/sbin/mke2fs "$ROOT"/sbin/e2fsck "$ROOT"/sbin/tune2fs "$ROOT"/sbin/dumpe2fs; do
    [ -f "$bin" ] || continue
    out=$("$LDSO" --library-path "$LIBPATH" --list "$bin") || die "ld.so --list failed on $bin: $out"
    if grep -q 'not found' <<<"$out"; then
        die "unresolved libraries for $bin:
$out"
    fi
    awk '$1 !~ /^\// && $2 == "=>" && $3 ~ /^\// {print $1, $3}' <<<"$out" >>"$WORK/libs.txt"
done
sort -u "$WORK/libs.txt" | while read -r soname path; do
    cp -L "$path" "$ROOT/lib/x86_64-linux-gnu/$soname"
done
cp -L "$LDSO" "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT/lib64/ld-linux-x86-64.so.2"
log "libraries: $(awk '{print $1}' "$WORK/libs.txt" | sort -u | tr '\n' ' ')"

# Modules + a modules.dep (and alias/symbols) for busybox modprobe.
for p in "${!WANT[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$p")"
    cp "$MDIR/$p" "$ROOT/lib/modules/$KVER/$p"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -f "$MDIR/$f" ] && cp "$MDIR/$f" "$ROOT/lib/modules/$KVER/"
done
"$BB" depmod -b "$ROOT" "$KVER"
echo "$BOOT_MODULES" >"$ROOT/etc/guest-modules"
log "modules: ${#WANT[@]} files"

install -m755 "$HERE/init" "$ROOT/init"
cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
echo 'root:x:0:' >"$ROOT/etc/group"
echo 'guest' >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n10.0.2.2 host\n' >"$ROOT/etc/hosts"
echo "$KPKG $KVER" >"$ROOT/etc/guest-release"

# ---------------------------------------------------------------- archive
(cd "$ROOT" && find . -mindepth 1 | sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) >"$WORK/initramfs.cpio"
mv "$WORK/vmlinux" "$CACHE/vmlinux"
mv "$WORK/initramfs.cpio" "$CACHE/initramfs.cpio"
echo "$KPKG $KVER" >"$CACHE/kernel-release"
rm -rf "$WORK"
echo "$KEY" >"$CACHE/READY"
log "done in $(($(date +%s) - T0)) s: vmlinux $(du -h "$CACHE/vmlinux" | cut -f1), initramfs $(du -h "$CACHE/initramfs.cpio" | cut -f1)"
