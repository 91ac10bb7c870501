# Planned swaps (/dev/vdb, two daemons sharing one image: --share) and crash recovery under launch
# (/dev/vdc, the disk daemon killed KILLS times, then the net daemon once), both while the guest
# writes and verifies in a loop that a line on its console ends.
stamp swap
splitvisor-blk --socket /tmp/s0.sock --image /dev/vdb --share --log-level warn 2>/tmp/s0.log &
d0=$!
splitvisor-blk --socket /tmp/s1.sock --image /dev/vdb --share --log-level warn 2>/tmp/s1.log &
d1=$!
wait_sock /tmp/s0.sock /tmp/s1.sock || exit 1
mkfifo /tmp/swap.in
splitvisor run $L2 --disk socket=/tmp/s0.sock --api-socket /tmp/swap.api --cmdline "$CMD sv.loop" \
    </tmp/swap.in >/tmp/swap.out 2>&1 &
vm=$!
exec 3>/tmp/swap.in
n=0
while [ $n -lt "$SWAPS" ]; do
    # One swap per verified round, so that every swap falls into the guest's I/O.
    wait_for /tmp/swap.out "SV:round=$((n + 1)):" 120 || { echo SV:swap-stalled=$n; break; }
    splitvisor ctl --api-socket /tmp/swap.api swap disk0 /tmp/s$(((n + 1) % 2)).sock >/tmp/ctl.out 2>&1
    echo SV:swap-rc=$?
    sed 's/^/swap-ctl| /' /tmp/ctl.out
    n=$((n + 1))
done
wait_for /tmp/swap.out "SV:round=$((n + 1)):" 120
echo stop >&3
bounded_wait $vm 120 swap
exec 3>&-
show swap /tmp/swap.out
kill $d0 $d1
wait $d0 $d1

# pid_of PATTERN: the pid of a process whose command line (arguments joined by spaces) matches
# the shell PATTERN (busybox here has no pgrep).
pid_of() {
    for p in /proc/[0-9]*; do
        case "$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" in
        $1) echo "${p#/proc/}"; return ;;
        esac
    done
}
# wait_new_pid PATTERN OLD SECONDS: poll until a process other than OLD matches.
wait_new_pid() {
    i=0
    while p=$(pid_of "$1"); [ -z "$p" ] || [ "$p" = "$2" ]; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then return 1; fi
        sleep 0.1
    done
}
stamp launch
/bin/ip tuntap add dev tap1 mode tap || exit 1
/bin/ip addr add 10.0.2.1/24 dev tap1 || exit 1
/bin/ip link set tap1 up || exit 1
mkfifo /tmp/launch.in
splitvisor launch $L2 --disk image=/dev/vdc --net tap=tap1 --cmdline "$CMD sv.loop sv.netwatch" \
    </tmp/launch.in >/tmp/launch.out 2>/tmp/launch.err &
vm=$!
exec 4>/tmp/launch.in
BLK='*splitvisor-blk *--image /dev/vdc*'
n=0
while [ $n -lt "$KILLS" ]; do
    wait_for /tmp/launch.out "SV:round=$((n + 1)):" 120 || { echo SV:kill-stalled=$n; stalled=1; break; }
    pid=$(pid_of "$BLK")
    kill -9 "$pid"
    echo SV:blk-kill-rc=$?
    wait_new_pid "$BLK" "$pid" 30 || echo SV:blk-not-restarted=$n
    n=$((n + 1))
done
if [ -n "$stalled" ]; then
    # The guest's loop stopped making progress: say what the VMM and the daemons think while
    # they are still running, and skip the net daemon's kill (the time bound is shared).
    api=$(sed -n 's/.*API socket \([^ ]*\) .*/\1/p' /tmp/launch.out /tmp/launch.err | head -n 1)
    splitvisor ctl --api-socket "$api" --json status 2>&1 | tr -d '\n' | sed 's/^/SV:stalled-status=/'
    echo
    tail -n 40 /tmp/launch.err | show stalled-err -
    for log in /run/splitvisor/*/*.log; do tail -n 20 "$log" | show "stalled-log-${log##*/}" -; done
else
    wait_for /tmp/launch.out "SV:round=$((n + 1)):" 120
    ups=$(grep -c 'SV:carrier=1' /tmp/launch.out)
    pid=$(pid_of '*splitvisor-net *')
    kill -9 "$pid"
    echo SV:net-kill-rc=$?
    wait_new_pid '*splitvisor-net *' "$pid" 30 || echo SV:net-not-restarted=1
    i=0
    while [ "$(grep -c 'SV:carrier=1' /tmp/launch.out)" -le "$ups" ] && [ $i -lt 300 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    # Let the guest's pings run on for two more rounds before ending the loop.
    wait_for /tmp/launch.out "SV:round=$((n + 3)):" 120
fi
echo stop >&4
bounded_wait $vm 120 launch
exec 4>&-
show launch /tmp/launch.out
show launch-err /tmp/launch.err

# The root file system on splitvisor-blk, as in the README's launch example.
stamp root
cp /files/root.ext4 /tmp/root.img
timeout -s KILL 240 splitvisor launch $L2 --cmdline "$CMD sv.root root=/dev/vda" \
    --disk image=/tmp/root.img --net tap=tap1 </dev/null >/tmp/root.out 2>&1
echo SV:root-exit=$?
show root /tmp/root.out
stamp end
