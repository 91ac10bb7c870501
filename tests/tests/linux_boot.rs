//! Booting a stock Linux kernel with `splitvisor run --kernel ... --initramfs ...` on a real
//! (nested SVM) KVM, inside an L1 Linux under QEMU TCG (see `splitvisor_tests::nested`). Two L1
//! boots, each running several L2 guests one after the other:
//! - power and memory: 2 vCPUs and 512 MiB seen by Linux, `poweroff -f` -> exit 0,
//!   `reboot -f` -> 120, a panic (sysrq `c`) with `panic=1` -> 120, 4 GiB of RAM (memory
//!   above the 32-bit hole) seen by Linux, and the same kernel booted as a `vmlinux` ELF;
//! - devices and console: a `splitvisor-blk` disk found by Linux's virtio-mmio and virtio-blk
//!   drivers, with ACPI (the default) and with `--acpi off` (where the device is named on the
//!   command line: Debian's kernels lack CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so for them only
//!   the command line and the reboot are checked), and a line written to splitvisor's stdin
//!   reaching the L2 shell, whose output comes back.
//!
//! The L2 guest is the host's Debian kernel with an interop initramfs. Each case's splitvisor
//! output is printed in L1 with the prefix `<case>| `, followed by `SV:<case>-exit=<status>`.
//! Needs QEMU, the cloud kernel, busybox-static and e2fsprogs (`.ci/install-deps.sh`); skips
//! without them unless `CI` is set.

use std::path::Path;
use std::time::Duration;

use splitvisor_tests::nested::cases::{case_lines, case_marker, case_markers, Checks};
use splitvisor_tests::nested::{NestedFile, NestedHost, NestedOptions, NestedRun, L2_MODULES};
use splitvisor_tests::pattern::{crc32, random_bytes};
use splitvisor_tests::workdir::Workdir;

/// The L2 kernel command line; `sv.*` words (ignored by the kernel) select what the L2 script
/// does after its checks.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";
/// Exit statuses of `splitvisor run` for Linux guests.
const POWER_OFF: &str = "0";
const REBOOT: &str = "120";
/// The small disk image of the device cases.
const DISK_LEN: usize = 4 << 20;
const HEAD_SECTORS: usize = 8;

/// The L2 guest's `/test.sh`: report CPUs, memory and virtio devices, then do what the command
/// line asks (`sv.console`: read one line from the console and eval it; `sv.panic`: crash;
/// `sv.reboot`: reboot); otherwise `/init` powers off.
const L2_SCRIPT: &str = r#"cmd=" $(cat /proc/cmdline) "
has() { case "$cmd" in *" $1 "*) return 0;; esac; return 1; }
echo "SV:cmdline=$(cat /proc/cmdline)"
echo SV:nproc=$(nproc)
echo SV:memtotal-kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
echo "SV:virtio-ids=$(cat /sys/bus/virtio/devices/*/device 2>/dev/null | tr '\n' ' ')"
if [ -b /dev/vda ]; then
    echo SV:vda-sectors=$(cat /sys/block/vda/size)
    echo SV:vda-head-crc=$(dd if=/dev/vda bs=512 count=8 2>/dev/null | crc32)
fi
if has sv.console; then
    echo SV:ready=1
    read -r line
    eval "$line"
fi
if has sv.panic; then echo c >/proc/sysrq-trigger; fi
if has sv.reboot; then reboot -f; fi
"#;

/// Shell functions for the L1 scripts. `case NAME ARGS...` runs `splitvisor run --kernel ...
/// --initramfs ... ARGS` with a time bound and prints its output prefixed, then its status.
const L1_FUNCTIONS: &str = r#"
L2="--kernel /files/vmlinuz --initramfs /files/initrd.cpio"
case_run() {
    name=$1
    shift
    start=$(cut -d' ' -f1 /proc/uptime)
    timeout -s KILL 240 splitvisor run $L2 "$@" </dev/null >/tmp/$name.out 2>&1
    rc=$?
    echo SV:$name-seconds=$(awk "BEGIN { print $(cut -d' ' -f1 /proc/uptime) - $start }")
    sed "s/^/$name| /" /tmp/$name.out
    echo SV:$name-exit=$rc
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
"#;

/// The kernel and the L2 initramfs, as files for L1.
fn l2_files(host: &NestedHost, workdir: &Workdir) -> Vec<NestedFile> {
    let initrd = workdir.join("initrd.cpio");
    host.l2_initramfs(L2_SCRIPT, L2_MODULES, &initrd)
        .unwrap_or_else(|e| panic!("L2 initramfs: {e}"));
    vec![
        NestedFile::from_path("vmlinuz", host.kernel()),
        NestedFile::from_path("initrd.cpio", &initrd),
    ]
}

/// Exactly one virtio block device (id 0x0002) in case `name`, with the image's size and the
/// checksum of its first sectors.
fn check_disk(checks: &mut Checks, run: &NestedRun, name: &str, head_crc: &str) {
    let ids = case_marker(run, name, "virtio-ids").unwrap_or("");
    let blk = ids.split_whitespace().filter(|id| *id == "0x0002").count();
    checks.that(
        &format!("{name}: one virtio block device (0x0002) listed"),
        blk == 1,
        format!("ids {ids:?}"),
    );
    checks.eq(
        &format!("{name}: vda sectors"),
        case_marker(run, name, "vda-sectors"),
        &(DISK_LEN / 512).to_string(),
    );
    checks.eq(
        &format!("{name}: crc32 of vda's first sectors"),
        case_marker(run, name, "vda-head-crc"),
        head_crc,
    );
}

/// Whether the kernel's config (`/boot/config-<version>` beside `/boot/vmlinuz-<version>`)
/// lets virtio-mmio devices be named on the command line: the only way a kernel finds them
/// without ACPI. Debian's kernels leave it out.
fn kernel_reads_mmio_devices_from_cmdline(kernel: &Path) -> bool {
    let name = kernel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(version) = name.strip_prefix("vmlinuz-") else {
        return true;
    };
    let config = kernel.with_file_name(format!("config-{version}"));
    match std::fs::read_to_string(&config) {
        Ok(text) => text
            .lines()
            .any(|l| l == "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"),
        // Unknown kernel: expect the device.
        Err(_) => true,
    }
}

/// Print how long each case's splitvisor ran inside L1 (TCG time: for spotting hangs only).
fn print_case_times(run: &NestedRun, names: &[&str]) {
    for name in names {
        let secs = run.marker(&format!("{name}-seconds")).unwrap_or("?");
        eprintln!("  case {name}: {secs} s");
    }
}

fn memtotal_mib(run: &NestedRun, name: &str) -> Option<u64> {
    case_marker(run, name, "memtotal-kib")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib / 1024)
}

#[test]
fn linux_powers_off_reboots_panics_and_sees_its_cpus_and_memory() {
    let test = "linux_powers_off_reboots_panics_and_sees_its_cpus_and_memory";
    let Some(host) = NestedHost::require(test) else {
        return;
    };
    let workdir = Workdir::new("linux-power");
    let script = format!(
        r#"{L1_FUNCTIONS}
case_run poweroff --vcpus 2 --memory 512M --cmdline "{CMDLINE}"
case_run reboot --cmdline "{CMDLINE} sv.reboot"
case_run panic --cmdline "{CMDLINE} sv.panic"
case_run mem4g --memory 4G --cmdline "{CMDLINE}"
L2="--kernel /files/vmlinux --initramfs /files/initrd.cpio"
case_run vmlinux --vcpus 2 --cmdline "{CMDLINE}"
"#
    );
    // L1 holds the 4 GiB guest's memory plus its own.
    let options = NestedOptions::default()
        .memory_mib(6144)
        .timeout(Duration::from_secs(900));
    let mut files = l2_files(&host, &workdir);
    let vmlinux = workdir.join("vmlinux");
    splitvisor_tests::nested::vmlinux::extract(host.kernel(), &vmlinux)
        .unwrap_or_else(|e| panic!("vmlinux from {}: {e}", host.kernel().display()));
    files.push(NestedFile::from_path("vmlinux", &vmlinux));
    let run = host.run(&script, &files, &options);
    eprintln!(
        "linux power/memory: {:?} in all, L1 boot {:?}, script {:?}",
        run.elapsed, run.boot, run.script
    );
    print_case_times(&run, &["poweroff", "reboot", "panic", "mem4g", "vmlinux"]);
    run.assert_success();
    let mut checks = Checks::default();
    checks.eq("poweroff exit", run.marker("poweroff-exit"), POWER_OFF);
    checks.eq("nproc", case_marker(&run, "poweroff", "nproc"), "2");
    let mib = memtotal_mib(&run, "poweroff");
    checks.that(
        "MemTotal of a 512M guest (MiB)",
        mib.is_some_and(|m| (400..=512).contains(&m)),
        format!("{mib:?}"),
    );
    checks.eq("reboot exit", run.marker("reboot-exit"), REBOOT);
    checks.eq("reboot: L2 ran", case_marker(&run, "reboot", "nproc"), "1");
    checks.eq("panic exit", run.marker("panic-exit"), REBOOT);
    let panicked = case_lines(&run, "panic")
        .iter()
        .any(|l| l.contains("Kernel panic"));
    checks.that("panic: L2 printed Kernel panic", panicked, "no such line");
    checks.eq("4G exit", run.marker("mem4g-exit"), POWER_OFF);
    let mib = memtotal_mib(&run, "mem4g");
    checks.that(
        "MemTotal of a 4G guest above 3.5 GiB",
        mib.is_some_and(|m| m > 3584),
        format!("{mib:?} MiB"),
    );
    checks.eq("vmlinux exit", run.marker("vmlinux-exit"), POWER_OFF);
    checks.eq("vmlinux: nproc", case_marker(&run, "vmlinux", "nproc"), "2");
    checks.finish(&run);
}

/// The devices and console cases in L1 (after [`L1_FUNCTIONS`]): one splitvisor-blk daemon on a
/// tmpfs copy of `/files/disk.img` serves the ACPI and the no-ACPI guest in turn; then a guest
/// whose stdin is a FIFO, written once the guest says it is ready for the line.
const DEVICES_SCRIPT: &str = r#"
cp /files/disk.img /tmp/disk.img
splitvisor-blk --socket /tmp/blk.sock --image /tmp/disk.img --log-level warn &
i=0
while [ ! -S /tmp/blk.sock ]; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then echo SV:error=no-blk-socket; exit 1; fi
    sleep 0.1
done
case_run acpi --disk socket=/tmp/blk.sock --cmdline "$CMDLINE"
case_run noacpi --acpi off --disk socket=/tmp/blk.sock --cmdline "$CMDLINE sv.reboot"

mkfifo /tmp/console.in
splitvisor run $L2 --cmdline "$CMDLINE sv.console" </tmp/console.in >/tmp/console.out 2>&1 &
vm=$!
exec 3>/tmp/console.in
if wait_for /tmp/console.out SV:ready= 180; then
    echo 'echo SV:answer=$((6 * 7))' >&3
else
    echo SV:console-ready=timeout
fi
i=0
while kill -0 $vm 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 900 ]; then kill -9 $vm; echo SV:console-vm=killed; break; fi
    sleep 0.1
done
wait $vm
rc=$?
exec 3>&-
sed "s/^/console| /" /tmp/console.out
echo SV:console-exit=$rc
"#;

#[test]
fn linux_finds_a_splitvisor_blk_disk_with_and_without_acpi_and_reads_the_console() {
    let test = "linux_finds_a_splitvisor_blk_disk_with_and_without_acpi_and_reads_the_console";
    let Some(host) = NestedHost::require(test) else {
        return;
    };
    let workdir = Workdir::new("linux-dev");
    let disk = random_bytes(0x5eed, DISK_LEN);
    let head_crc = format!("{:08x}", crc32(&disk[..HEAD_SECTORS * 512]));
    let mut files = l2_files(&host, &workdir);
    files.push(NestedFile::from_bytes("disk.img", disk));
    let script = format!("CMDLINE=\"{CMDLINE}\"\n{L1_FUNCTIONS}{DEVICES_SCRIPT}");
    let options = NestedOptions::default().timeout(Duration::from_secs(900));
    let run = host.run(&script, &files, &options);
    eprintln!(
        "linux devices/console: {:?} in all, L1 boot {:?}, script {:?}",
        run.elapsed, run.boot, run.script
    );
    print_case_times(&run, &["acpi", "noacpi"]);
    run.assert_success();
    let mut checks = Checks::default();
    check_acpi_cases(&mut checks, &run, &head_crc, host.kernel());
    checks.eq(
        "console: L2 got ready",
        case_marker(&run, "console", "ready"),
        "1",
    );
    checks.that(
        "console: the line written to stdin ran in L2",
        case_markers(&run, "console", "answer").contains(&"42"),
        format!("answers {:?}", case_markers(&run, "console", "answer")),
    );
    checks.eq("console exit", run.marker("console-exit"), POWER_OFF);
    checks.finish(&run);
}

/// The disk with ACPI (found through the DSDT, powered off) and without (named on the command
/// line, ended by a reboot).
fn check_acpi_cases(checks: &mut Checks, run: &NestedRun, head_crc: &str, kernel: &Path) {
    checks.eq("acpi exit", run.marker("acpi-exit"), POWER_OFF);
    check_disk(checks, run, "acpi", head_crc);
    // The DSDT describes the device; naming it on the command line too would add it twice.
    let cmdline = case_marker(run, "acpi", "cmdline").unwrap_or("");
    checks.that(
        "acpi: no virtio_mmio.device= on the command line",
        !cmdline.contains("virtio_mmio.device="),
        format!("cmdline {cmdline:?}"),
    );
    // Without ACPI (and so without power off) the guest ends by rebooting.
    checks.eq("noacpi exit", run.marker("noacpi-exit"), REBOOT);
    checks.eq("noacpi: L2 ran", case_marker(run, "noacpi", "nproc"), "1");
    let cmdline = case_marker(run, "noacpi", "cmdline").unwrap_or("");
    checks.that(
        "noacpi: the device is on the command line",
        cmdline.contains("virtio_mmio.device=4K@0x"),
        format!("cmdline {cmdline:?}"),
    );
    if kernel_reads_mmio_devices_from_cmdline(kernel) {
        check_disk(checks, run, "noacpi", head_crc);
    } else {
        eprintln!(
            "NOTE: {} lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so with --acpi off it cannot \
             find virtio-mmio devices; only the command line is checked",
            kernel.display()
        );
    }
}
