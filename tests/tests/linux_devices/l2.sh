# The L2 Linux guest's /test.sh for linux_devices.rs. The test prepends NET_BYTES=...; a word
# sv.<part> on the kernel command line picks what the guest does. Results are `SV:key=value`
# lines on the console; the guest reads a line from the console where L1 must act first.
cmd=" $(cat /proc/cmdline) "
has() { case "$cmd" in *" $1 "*) return 0;; esac; return 1; }
mkdir -p /mnt /tmp
up() { cut -d' ' -f1 /proc/uptime; }
# wait_path PATH SECONDS: poll for PATH to exist.
wait_path() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        if [ $i -gt $(($2 * 10)) ]; then return 1; fi
        sleep 0.1
    done
}
# wait_size FILE BYTES SECONDS: poll until FILE holds BYTES (TCP through busybox nc ends only
# when the other side closes, so the receiver watches the size).
wait_size() {
    i=0
    while [ "$(wc -c <"$1" 2>/dev/null || echo 0)" -lt "$2" ]; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 5)) ]; then return 1; fi
        sleep 0.2
    done
}
# Kernel messages that mean an I/O error reached the guest.
report_io_errors() {
    dmesg | grep -i -E "I/O error|Buffer I/O|blk_update_request|EXT4-fs (error|warning)|virtio.*(error|fail)|hung_task|blocked for more" >/tmp/ioerr
    echo SV:io-errors=$(wc -l </tmp/ioerr)
    head -n 5 /tmp/ioerr | sed 's/^/SV:io-error-line=/'
}
net_up() {
    ip link set lo up
    ip addr add "$1/24" dev eth0 && ip link set eth0 up
}
# listen PORT FILE: receive one TCP connection into FILE in the background ($! is nc). Its stdin
# is a pipe that stays open: at the end of its input busybox nc half-closes the connection, and
# the sender, seeing that, would stop sending.
listen() { sleep 3600 | nc -l -p "$1" >"$2" & }
# send HOST PORT FILE: connect (retrying while refused, 60 s) and send FILE; nc ends when the
# receiver closes.
send() {
    i=0
    while ! nc "$1" "$2" <"$3" 2>/tmp/nc.err; do
        i=$((i + 1))
        if [ $i -gt 300 ] || ! grep -q refused /tmp/nc.err; then cat /tmp/nc.err; return 1; fi
        sleep 0.2
    done
}
# ping_until HOST SECONDS: one ping a second until one is answered.
ping_until() {
    i=0
    while ! ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt "$2" ]; then return 1; fi
    done
}

# --- disk: ext4 on a 2-queue splitvisor-blk, files with checksums, then driver resets.
checksums() { (cd /mnt && crc32 big small/*); }
verify_sums() {
    mount -t ext4 /dev/vda /mnt || { echo SV:$1=mount-failed; return 1; }
    echo 3 >/proc/sys/vm/drop_caches
    if checksums | cmp -s - /tmp/sums; then echo SV:$1=ok; else echo SV:$1=mismatch; fi
}
disk_part() {
    echo SV:hwq=$(ls /sys/block/vda/mq | wc -l)
    mount -t ext4 /dev/vda /mnt || return 1
    echo SV:seed=$(cat /mnt/seed.txt)
    dd if=/dev/urandom of=/mnt/big bs=1M count=20 2>/dev/null || return 1
    mkdir -p /mnt/small
    i=0
    while [ $i -lt 200 ]; do
        head -c $((i * 97 % 3000 + 1)) /dev/urandom >/mnt/small/f$i || return 1
        i=$((i + 1))
    done
    checksums >/tmp/sums
    sed 's/^/SV:crc=/' /tmp/sums
    sync
    # L1 reads GET /metrics while this guest still runs, then sends a line.
    echo SV:metrics-now=1
    read -t 120 line
    umount /mnt && echo SV:umount=ok
    reset_part
}
reset_part() {
    dev=$(basename "$(readlink /sys/block/vda/device)")
    echo "$dev" >/sys/bus/virtio/drivers/virtio_blk/unbind || return 1
    if [ -e /sys/block/vda ]; then echo SV:unbind=vda-still-there; else echo SV:unbind=ok; fi
    echo "$dev" >/sys/bus/virtio/drivers/virtio_blk/bind || return 1
    wait_path /dev/vda 20 || { echo SV:bind=no-vda; return 1; }
    echo SV:bind=ok
    echo SV:hwq-after-bind=$(ls /sys/block/vda/mq | wc -l)
    verify_sums bind-verify
    umount /mnt
    rmmod virtio_blk || return 1
    if [ -e /sys/block/vda ]; then echo SV:rmmod=vda-still-there; else echo SV:rmmod=ok; fi
    insmod /modules/*-virtio_blk.ko || return 1
    wait_path /dev/vda 20 || { echo SV:insmod=no-vda; return 1; }
    echo SV:insmod=ok
    verify_sums insmod-verify
    head -c 65536 /dev/urandom >/mnt/after-reset
    sync
    echo SV:after-reset-crc=$(crc32 </mnt/after-reset)
    umount /mnt && echo SV:final-umount=ok
}

# --- a read-only daemon: Linux sees ro=1, writes fail, nothing changes.
ro_part() {
    echo SV:ro=$(cat /sys/block/vda/ro)
    dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/tmp/err
    echo SV:ro-raw-write-rc=$?
    echo "SV:ro-raw-write-err=$(tr '\n' ' ' </tmp/err)"
    mount -t ext4 /dev/vda /mnt 2>/tmp/err
    echo SV:ro-mount-rc=$?
    echo "SV:ro-mount-opts=$(grep ' /mnt ' /proc/mounts | cut -d' ' -f4)"
    echo SV:ro-seed=$(cat /mnt/seed.txt)
    echo data 2>/tmp/err >/mnt/new
    echo SV:ro-fs-write-rc=$?
    echo "SV:ro-fs-write-err=$(tr '\n' ' ' </tmp/err)"
    umount /mnt
}

# --- network through a TAP in L1 (10.0.0.1): ping, NET_BYTES each way over TCP.
tap_part() {
    net_up 10.0.0.2 || return 1
    echo SV:carrier=$(cat /sys/class/net/eth0/carrier)
    ping_until 10.0.0.1 30
    echo SV:l2-ping-rc=$?
    listen 5000 /tmp/rx
    rx=$!
    echo SV:listening=5000
    wait_size /tmp/rx "$NET_BYTES" 180
    echo SV:rx-bytes=$(wc -c </tmp/rx)
    echo SV:rx-crc=$(crc32 </tmp/rx)
    kill $rx 2>/dev/null || true
    head -c "$NET_BYTES" /dev/urandom >/tmp/tx
    echo SV:tx-crc=$(crc32 </tmp/tx)
    send 10.0.0.1 5001 /tmp/tx
    echo SV:send-rc=$?
}

# --- two guests on one splitvisor-net --switch: A (10.0.1.1) receives, B (10.0.1.2) sends.
switch_a() {
    listen 5002 /tmp/rx
    rx=$!
    net_up 10.0.1.1 || return 1
    ping_until 10.0.1.2 60
    echo SV:sw-ping-rc=$?
    wait_size /tmp/rx "$NET_BYTES" 180
    echo SV:sw-rx-bytes=$(wc -c </tmp/rx)
    echo SV:sw-rx-crc=$(crc32 </tmp/rx)
    # nc has usually ended with the sender's close already.
    kill $rx 2>/dev/null || true
}
switch_b() {
    net_up 10.0.1.2 || return 1
    head -c "$NET_BYTES" /dev/urandom >/tmp/tx
    echo SV:sw-tx-crc=$(crc32 </tmp/tx)
    ping_until 10.0.1.1 60
    echo SV:sw-ping-rc=$?
    send 10.0.1.1 5002 /tmp/tx
    echo SV:sw-send-rc=$?
}

# --- write, fsync, drop caches, compare, while L1 swaps or kills the backend; L1 ends the loop
# with a line on the console.
loop_part() {
    mount -t ext4 /dev/vda /mnt || return 1
    k=0
    while [ $k -lt 60 ]; do
        k=$((k + 1))
        head -c 1048576 /dev/urandom >/tmp/src
        dd if=/tmp/src of=/mnt/f bs=64k conv=fsync 2>/tmp/err || echo "SV:dd-failed=$k $(cat /tmp/err)"
        echo 3 >/proc/sys/vm/drop_caches
        if cmp -s /tmp/src /mnt/f; then r=ok; else r=mismatch; fi
        echo SV:round=$k:$r:$(crc32 </tmp/src)
        if read -t 0.2 line; then break; fi
    done
    echo SV:rounds=$k
    umount /mnt && echo SV:umount=ok
}

# --- watch eth0's carrier and ping L1's TAP (10.0.2.1) in the background; after the loop,
# how long after the carrier came back the first ping was answered.
netwatch_start() {
    net_up 10.0.2.2 || return 1
    (
        last=
        while [ ! -e /tmp/stop ]; do
            c=$(cat /sys/class/net/eth0/carrier 2>/dev/null)
            if [ "$c" != "$last" ]; then echo "$c $(up)" >>/tmp/carrier; echo "SV:carrier=$c"; last=$c; fi
            sleep 0.05
        done
    ) &
    (
        while [ ! -e /tmp/stop ]; do
            if ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1; then echo "ok $(up)"; else echo "lost $(up)"; fi
        done >/tmp/pings
    ) &
}
netwatch_report() {
    touch /tmp/stop
    echo "SV:carrier-seq=$(cut -d' ' -f1 /tmp/carrier | tr -d '\n')"
    back=$(grep '^1 ' /tmp/carrier | tail -n 1 | cut -d' ' -f2)
    first=$(awk -v t="$back" '$1 == "ok" && $2 >= t { print $2; exit }' /tmp/pings)
    echo SV:pings-lost=$(grep -c '^lost' /tmp/pings)
    if [ -n "$first" ]; then
        echo SV:ping-resume-ms=$(awk "BEGIN { print int(($first - $back) * 1000) }")
    fi
}

# --- root=/dev/vda: the ext4 root file system on splitvisor-blk, entered with chroot (the
# script is not PID 1, so switch_root would refuse); its /init reports and powers off.
root_part() {
    mkdir -p /root
    wait_path /dev/vda 20 || return 1
    mount -t ext4 /dev/vda /root || return 1
    exec chroot /root /init
}

echo SV:part-start=$(up)
if has sv.root; then root_part || exit 1; fi
rc=0
if has sv.disk; then disk_part || rc=1; fi
if has sv.ro; then ro_part || rc=1; fi
if has sv.tap; then tap_part || rc=1; fi
if has sv.swa; then switch_a || rc=1; fi
if has sv.swb; then switch_b || rc=1; fi
if has sv.netwatch; then netwatch_start || rc=1; fi
if has sv.loop; then loop_part || rc=1; fi
if has sv.netwatch; then netwatch_report; fi
report_io_errors
exit $rc
