//! The L1 guest's side of a nested run: the modules its initramfs loads and the script its
//! `/init` runs (the interop initramfs's `/test.sh`): check `/dev/kvm`, mount the files disk,
//! chroot into it and run the test's script with a time bound, its output prefixed on the
//! serial console, then report the status.
//!
//! Lines on L1's console that the host parses:
//! - `NESTED> <line>`: one line of the script's output (stdout and stderr);
//! - `NESTED:kvm=ok` / `NESTED:error=<what>`: setup in L1 (with the dmesg tail on error);
//! - `NESTED:uptime-start=<s>` / `NESTED:uptime-end=<s>`: L1's `/proc/uptime` around the script;
//! - `NESTED:exit=<status>`: the script's exit status (137: killed at the time bound).

use std::time::Duration;

/// Modules L1 loads: KVM with SVM, and virtio-blk over PCI for the disks (ext4 is built into
/// the Debian cloud kernel; `ModuleSet` leaves built-in modules out anyway).
pub const L1_MODULES: &[&str] = &["irqbypass", "kvm", "kvm_amd", "virtio_pci", "virtio_blk"];

/// Prefix of the script's output lines on L1's console.
pub const OUTPUT_PREFIX: &str = "NESTED> ";
/// Prefix of the harness's own markers on L1's console.
pub const MARKER_PREFIX: &str = "NESTED:";

/// Where the files disk is mounted in L1; the chroot's root.
const ROOT: &str = "/mnt";

/// The script L1's `/init` runs; `bound` limits the test's script (killed with SIGKILL then).
pub fn l1_script(bound: Duration) -> String {
    let secs = bound.as_secs().max(1);
    format!(
        r#"{wait_block}
fail() {{
    echo NESTED:error=$1
    dmesg | tail -n 40
    exit 1
}}
# From here on kernel messages would interleave with the script's output lines.
dmesg -n 1
if [ ! -c /dev/kvm ]; then
    echo "NESTED:svm-flags=$(grep -o -w -e svm -e npt /proc/cpuinfo | sort -u | tr '\n' ' ')"
    fail no-dev-kvm
fi
echo NESTED:kvm=ok
wait_block vda || fail no-files-disk
mkdir -p {ROOT}
mount -t ext4 -o ro /dev/vda {ROOT} || fail mount-files-disk
mount -o bind /dev {ROOT}/dev || fail bind-dev
mount -t proc proc {ROOT}/proc || fail mount-proc
mount -t sysfs sysfs {ROOT}/sys || fail mount-sys
mount -t tmpfs -o mode=1777 tmp {ROOT}/tmp || fail mount-tmp
mount -t tmpfs run {ROOT}/run || fail mount-run
run_script() {{
    timeout -s KILL {secs} chroot {ROOT} /bin/sh -c 'cd /tmp && exec /bin/sh /nested/test.sh' </dev/null 2>&1
    echo $? >/script.status
    # Background processes the script left behind (daemons) would keep the pipe below open.
    for p in /proc/[0-9]*; do
        if [ "$(readlink $p/root)" = {ROOT} ]; then kill -9 ${{p#/proc/}} 2>/dev/null; fi
    done
}}
echo NESTED:uptime-start=$(cut -d' ' -f1 /proc/uptime)
run_script | while IFS= read -r line || [ -n "$line" ]; do echo "{OUTPUT_PREFIX}$line"; done
rc=$(cat /script.status)
echo NESTED:uptime-end=$(cut -d' ' -f1 /proc/uptime)
# Writable disks may have dirty pages in L1's page cache; poweroff -f does not sync.
sync
echo NESTED:exit=$rc
exit $rc
"#,
        wait_block = crate::interop::initramfs::WAIT_BLOCK_FN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_the_bound_and_the_markers() {
        let s = l1_script(Duration::from_secs(77));
        assert!(s.contains("timeout -s KILL 77 chroot /mnt"), "{s}");
        assert!(s.contains("echo NESTED:exit=$rc"), "{s}");
        assert!(s.contains("echo \"NESTED> $line\""), "{s}");
    }
}
