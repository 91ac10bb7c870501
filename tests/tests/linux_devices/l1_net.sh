# Network checks in L1: a guest on splitvisor-net --tap (L1 is 10.0.0.1), then two guests on one
# splitvisor-net --switch.
stamp tap
/bin/ip link set lo up
/bin/ip tuntap add dev tap0 mode tap || exit 1
/bin/ip addr add 10.0.0.1/24 dev tap0 || exit 1
/bin/ip link set tap0 up || exit 1
splitvisor-net --socket /tmp/net.sock --tap tap0 2>/tmp/net.log &
net=$!
wait_sock /tmp/net.sock || exit 1
head -c "$NET_BYTES" /dev/urandom >/tmp/tx
echo SV:l1-tx-crc=$(crc32 </tmp/tx)
# stdin stays open: at its end nc would half-close and the guest stop sending.
sleep 3600 | nc -l -p 5001 >/tmp/rx &
rx=$!
splitvisor run $L2 --net socket=/tmp/net.sock --api-socket /tmp/tap.api --cmdline "$CMD sv.tap" \
    </dev/null >/tmp/tap.out 2>&1 &
vm=$!
if wait_for /tmp/tap.out SV:listening= 240; then
    ping -c 3 -W 10 10.0.0.2 >/tmp/ping.out 2>&1
    echo SV:l1-ping-rc=$?
    # The guest waits for the data below: it still runs.
    metrics tap
    nc 10.0.0.2 5000 </tmp/tx &
    tx=$!
    wait_size /tmp/rx "$NET_BYTES" 240
    echo SV:l1-rx-bytes=$(wc -c </tmp/rx)
    echo SV:l1-rx-crc=$(crc32 </tmp/rx)
fi
kill $rx 2>/dev/null
bounded_wait $vm 240 tap
kill $tx 2>/dev/null
show tap /tmp/tap.out
show tap-daemon /tmp/net.log
kill $net
wait $net

stamp switch
splitvisor-net --switch --socket /tmp/swa.sock --socket /tmp/swb.sock 2>/tmp/switch.log &
switch=$!
wait_sock /tmp/swa.sock /tmp/swb.sock || exit 1
splitvisor run $L2 --net socket=/tmp/swa.sock --cmdline "$CMD sv.swa" </dev/null >/tmp/swa.out 2>&1 &
a=$!
splitvisor run $L2 --net socket=/tmp/swb.sock --cmdline "$CMD sv.swb" </dev/null >/tmp/swb.out 2>&1 &
b=$!
bounded_wait $a 300 swa
bounded_wait $b 60 swb
show swa /tmp/swa.out
show swb /tmp/swb.out
kill $switch
stamp end
