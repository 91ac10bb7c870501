#!/bin/busybox sh
# /init of the ext4 root image of linux_devices.rs (entered with root=/dev/vda).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
ip link set lo up
ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up
echo "SV:root-mount=$(grep ' / ' /proc/mounts)"
if ping -c 1 -W 20 10.0.2.1 >/dev/null; then echo SV:root-ping=ok; fi
if echo written >/written && sync; then echo SV:root-write=ok; fi
poweroff -f
