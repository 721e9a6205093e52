# Guest half of selftest.sh (runs as /test.sh inside the guest; selftest.sh
# prepends HOST_PORT=... and TOKEN=...). Uses Linux's own NVMe/TCP target
# (nvmet-tcp) on the guest's 127.0.0.1, backed by a memory-backed null_blk, so
# it proves the initramfs (nvme-cli, modules, mkfs.ext4) without Strata.
set -eu
T() { echo "TIMING $1 $(cut -d' ' -f1 /proc/uptime)"; }
fail() { echo "SELFTEST FAIL: $*"; exit 1; }
# NB: `set -e` ignores failures inside `a && b` and `! cmd`, so checks use fail.
T start
NQN=nqn.2014-08.io.strata:selftest

# 1. Networking: fetch a token from a listener on the host's 127.0.0.1.
wget -q -O /tmp/token "http://10.0.2.2:$HOST_PORT/token"
[ "$(cat /tmp/token)" = "$TOKEN" ] || fail "token mismatch"
echo "SELFTEST net ok"
T net

# 2. nvmet TCP target on 127.0.0.1:4420 (+ 4421 for a second path).
modprobe null_blk nr_devices=1 gb=1 memory_backed=1
modprobe nvmet
modprobe nvmet-tcp
[ -b /dev/nullb0 ] || fail "no /dev/nullb0"
S=/sys/kernel/config/nvmet/subsystems/$NQN
mkdir "$S"
echo 1 >"$S/attr_allow_any_host"
mkdir "$S/namespaces/1"
echo -n /dev/nullb0 >"$S/namespaces/1/device_path"
echo 1 >"$S/namespaces/1/enable"
for p in 1 2; do
    P=/sys/kernel/config/nvmet/ports/$p
    mkdir "$P"
    echo ipv4 >"$P/addr_adrfam"
    echo tcp >"$P/addr_trtype"
    echo 127.0.0.1 >"$P/addr_traddr"
    echo $((4419 + p)) >"$P/addr_trsvcid"
    ln -s "$S" "$P/subsystems/$NQN"
done
T target

# 3. Host side: discover, connect, list.
nvme discover -t tcp -a 127.0.0.1 -s 4420 | tee /tmp/disc
grep -q "subnqn: *$NQN" /tmp/disc
T discover
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN"
T connect
DEV=
for i in $(seq 1 100); do
    DEV=$(ls /dev/nvme*n1 2>/dev/null | head -n1 || true)
    [ -n "$DEV" ] && break
    sleep 0.1
done
[ -b "$DEV" ] || fail "no namespace block device after connect"
nvme list
cat /sys/module/nvme_core/parameters/multipath
echo "SELFTEST connect ok dev=$DEV"

# 4. Second path (native multipath): one namespace head, two controllers.
nvme connect -t tcp -a 127.0.0.1 -s 4421 -n "$NQN"
sleep 0.5
nvme list-subsys
ctrls=$(ls /sys/class/nvme-subsystem/nvme-subsys*/ | grep -cE '^nvme[0-9]+$')
heads=$(ls /dev/ | grep -cE '^nvme[0-9]+n1$')
[ "$ctrls" = 2 ] || fail "expected 2 controllers in the subsystem, got $ctrls"
[ "$heads" = 1 ] || fail "expected 1 multipath namespace head, got $heads"
echo "SELFTEST multipath ok ctrls=$ctrls heads=$heads"
T multipath

# 5. 1 MiB of random data: write, drop caches, read back, compare.
dd if=/dev/urandom of=/tmp/rand bs=1M count=1 2>/dev/null
dd if=/tmp/rand of="$DEV" bs=1M count=1 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
blockdev --flushbufs "$DEV"
dd if="$DEV" of=/tmp/back bs=1M count=1 2>/dev/null
a=$(sha256sum </tmp/rand | cut -d' ' -f1)
b=$(sha256sum </tmp/back | cut -d' ' -f1)
echo "sha256 written=$a read=$b"
[ "$a" = "$b" ] || fail "sha256 mismatch"
cmp /tmp/rand /tmp/back
echo "SELFTEST dd ok"
T dd

# 6. ext4: mkfs, mount, write, umount, mount again, verify.
mkfs.ext4 -F -q "$DEV"
mkdir -p /mnt/t
mount -t ext4 "$DEV" /mnt/t
cp /tmp/rand /mnt/t/rand
echo hello >/mnt/t/hello
sync
umount /mnt/t
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro "$DEV" /mnt/t
cmp /tmp/rand /mnt/t/rand
[ "$(cat /mnt/t/hello)" = hello ] || fail "ext4 file content"
umount /mnt/t
echo "SELFTEST ext4 ok"
T ext4

# 7. Disconnect (both paths) and check the device went away.
nvme disconnect -n "$NQN" | tee /tmp/disc.out
grep -q 'disconnected 2 controller' /tmp/disc.out
sleep 0.2
if ls /dev/nvme*n1 2>/dev/null; then fail "namespace still present after disconnect"; fi
echo "SELFTEST disconnect ok"
T disconnect
echo "SELFTEST ALL OK"
