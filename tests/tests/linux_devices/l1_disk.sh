# Disk checks in L1 (/dev/vdb is the host's ext4 image): a read-only daemon, then a 2-queue one.
stamp ro
splitvisor-blk --socket /tmp/ro.sock --image /dev/vdb --readonly --log-level warn 2>/tmp/ro.log &
ro=$!
wait_sock /tmp/ro.sock || exit 1
timeout -s KILL 240 splitvisor run $L2 --disk socket=/tmp/ro.sock --cmdline "$CMD sv.ro" \
    </dev/null >/tmp/ro.out 2>&1
echo SV:ro-exit=$?
show ro /tmp/ro.out
kill $ro
wait $ro
echo SV:image-crc-after-ro=$(crc32 </dev/vdb)

stamp disk
splitvisor-blk --socket /tmp/rw.sock --image /dev/vdb --queues 2 --log-level warn 2>/tmp/rw.log &
rw=$!
wait_sock /tmp/rw.sock || exit 1
mkfifo /tmp/disk.in
splitvisor run $L2 --vcpus 2 --memory 512M --disk socket=/tmp/rw.sock --api-socket /tmp/disk.api \
    --cmdline "$CMD sv.disk" </tmp/disk.in >/tmp/disk.out 2>&1 &
vm=$!
exec 3>/tmp/disk.in
if wait_for /tmp/disk.out SV:metrics-now= 300; then metrics disk; fi
echo go >&3
bounded_wait $vm 300 disk
exec 3>&-
show disk /tmp/disk.out
kill -TERM $rw
wait $rw
echo SV:rw-daemon-exit=$?
echo "SV:rw-stats=$(grep '^STATS ' /tmp/rw.log | tail -n 1 | cut -d' ' -f2-)"
stamp end
