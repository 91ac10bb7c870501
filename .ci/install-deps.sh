#!/bin/sh
# Install the host packages the interop tests (tests/tests/interop_*.rs) need: QEMU (TCG) as an
# independent vhost-user frontend and qemu-storage-daemon, a Debian kernel with virtio modules,
# a static busybox for the guest's initramfs, e2fsprogs for the nested-SVM harness's disk image
# (tests/src/nested), lz4 to unpack a vmlinux from the kernel, acpica-tools (iasl) for the ACPI
# table test, and the networking tools of the net tests.
# Idempotent: installs only what is missing. Needs root (or sudo) and the Debian registry.
set -eu

PACKAGES="qemu-system-x86 qemu-system-common linux-image-cloud-amd64 busybox-static cpio xz-utils lz4 e2fsprogs acpica-tools iproute2 iputils-ping python3-minimal"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install-deps: all present:$(printf ' %s' $PACKAGES)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install-deps: installing$missing"
$SUDO apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
