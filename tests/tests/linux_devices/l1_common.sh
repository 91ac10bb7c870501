# Shell functions for the L1 scripts of linux_devices.rs (the test prepends the variables).
# A guest that ended before its console FIFO was written must not kill the script (SIGPIPE).
trap '' PIPE
L2="--kernel /files/vmlinuz --initramfs /files/initrd.cpio"
CMD="console=ttyS0 reboot=k panic=1 quiet"
# wait_sock PATH...: poll up to 30 s for each Unix socket.
wait_sock() {
    for s in "$@"; do
        i=0
        while [ ! -S "$s" ]; do
            i=$((i + 1))
            if [ $i -gt 300 ]; then echo "SV:error=no-socket-$s"; return 1; fi
            sleep 0.1
        done
    done
}
# wait_for FILE TEXT SECONDS: poll until FILE contains TEXT.
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then return 1; fi
        sleep 0.1
    done
}
# wait_size FILE BYTES SECONDS: poll until FILE holds BYTES.
wait_size() {
    i=0
    while [ "$(wc -c <"$1" 2>/dev/null || echo 0)" -lt "$2" ]; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 5)) ]; then return 1; fi
        sleep 0.2
    done
}
# bounded_wait PID SECONDS NAME: wait for a background process (SIGKILL at the bound) and
# print SV:NAME-exit=<status>.
bounded_wait() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($2 * 10)) ]; then kill -9 "$1"; echo "SV:$3-killed=1"; break; fi
        sleep 0.1
    done
    wait "$1"
    echo "SV:$3-exit=$?"
}
# show NAME FILE: FILE's lines with the case prefix the test parses.
show() { sed "s/^/$1| /" "$2"; }
# metrics NAME: GET /metrics of the VM on /tmp/NAME.api as one marker.
metrics() {
    splitvisor ctl --api-socket "/tmp/$1.api" --json metrics >/tmp/metrics.json 2>&1
    echo "SV:$1-metrics-rc=$?"
    echo "SV:$1-metrics=$(tr -d '\n' </tmp/metrics.json)"
}
# stamp NAME: L1's uptime as SV:t-NAME (the test prints the cases' durations).
stamp() { echo "SV:t-$1=$(cut -d' ' -f1 /proc/uptime)"; }
