//! Interop: Linux's own virtio-blk driver, through QEMU's vhost-user-blk-pci frontend, served by
//! `splitvisor-blk`. The guest reads and writes /dev/vda and reports checksums on the serial
//! console; the host checks them against its own image and then checks the image file's bytes.
//!
//! Needs qemu-system-x86_64, a Debian kernel with virtio modules and busybox-static
//! (`.ci/install-deps.sh`); skips without them unless `CI` is set. The daemon is built on demand
//! in this test's target directory (see `daemon::workspace_bin`).

use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::image::{self, assert_image};
use splitvisor_tests::interop::initramfs::{Initramfs, WAIT_BLOCK_FN};
use splitvisor_tests::interop::qemu::{GuestRun, Qemu};
use splitvisor_tests::interop::HostTools;
use splitvisor_tests::pattern::{crc32, nonce, random_bytes, yes_pattern};
use splitvisor_tests::workdir::Workdir;

const MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
const SECTOR: usize = 512;
/// 12 MiB and 3 sectors, plus a partial sector the daemon must leave out of the capacity
/// (read-only: a writable image must be whole sectors).
const CAPACITY_SECTORS: usize = 24_579;
const IMAGE_LEN: usize = CAPACITY_SECTORS * SECTOR + 123;
const HEAD_SECTORS: usize = 8;
const TAIL_SECTORS: usize = 5;
/// The O_DIRECT write: 64 KiB at 4 KiB block 517.
const DIRECT_BLOCK: usize = 517;
const DIRECT_LEN: usize = 64 << 10;
/// The buffered write: 3 sectors at odd sector 12345 (a read-modify-write of a page).
const BUFFERED_SECTOR: usize = 12_345;
const BUFFERED_LEN: usize = 3 * SECTOR;

/// Write the image, start the daemon on it, boot the guest with `script`.
fn boot(
    tools: &HostTools,
    workdir: &Workdir,
    image: &[u8],
    daemon_flags: &[&str],
    script: &str,
) -> (Daemon, GuestRun) {
    let image_path = workdir.join("disk.img");
    image::write(&image_path, image.to_vec());
    let socket = workdir.join("blk.sock");
    let daemon = Daemon::blk(
        workdir,
        "splitvisor-blk",
        &socket,
        &image_path,
        daemon_flags,
    );

    let initrd = workdir.join("initrd.cpio");
    Initramfs::new(script)
        .modules(MODULES)
        .build(tools, &initrd)
        .unwrap();
    let run = Qemu::new(tools, &initrd)
        .vhost_user_blk(&socket, 1)
        .run(workdir, "guest")
        .unwrap();
    eprintln!("guest ran for {:?}", run.elapsed);
    (daemon, run)
}

/// Script lines printing the capacity, the read-only flag and checksums of the first and last
/// sectors, all read with O_DIRECT.
fn read_checks() -> String {
    let tail_skip = CAPACITY_SECTORS - TAIL_SECTORS;
    format!(
        "{WAIT_BLOCK_FN}wait_block vda || exit 1
echo SV:capacity=$(cat /sys/block/vda/size)
echo SV:ro=$(cat /sys/block/vda/ro)
echo SV:head-crc=$(dd if=/dev/vda bs=512 count={HEAD_SECTORS} iflag=direct 2>/dev/null | crc32)
echo SV:tail-crc=$(dd if=/dev/vda bs=512 skip={tail_skip} count={TAIL_SECTORS} iflag=direct 2>/dev/null | crc32)
"
    )
}

fn crc_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32(data))
}

/// Assert the capacity and the read checksums against the host's image.
fn assert_reads(run: &GuestRun, image: &[u8]) {
    assert_eq!(
        run.expect("capacity"),
        CAPACITY_SECTORS.to_string(),
        "capacity Linux sees in /sys/block/vda/size"
    );
    assert_eq!(
        run.expect("head-crc"),
        crc_hex(&image[..HEAD_SECTORS * SECTOR])
    );
    let tail = (CAPACITY_SECTORS - TAIL_SECTORS) * SECTOR..CAPACITY_SECTORS * SECTOR;
    assert_eq!(run.expect("tail-crc"), crc_hex(&image[tail]));
}

#[test]
fn linux_virtio_blk_reads_and_writes_through_splitvisor_blk() {
    let Some(tools) = HostTools::require("interop_blk read/write", MODULES) else {
        return;
    };
    let workdir = Workdir::new("interop-blk-rw");
    let seed = nonce();
    // Writable: whole sectors only (splitvisor-blk refuses a partial sector without --readonly).
    let image = random_bytes(seed, CAPACITY_SECTORS * SECTOR);
    let direct_line = format!("splitvisor-direct-{seed:016x}");
    let buffered_line = format!("splitvisor-buffered-{seed:016x}");
    let direct_count = DIRECT_LEN / 4096;
    let script = format!(
        "{}yes {direct_line} | head -c {DIRECT_LEN} > /tmp/direct
dd if=/tmp/direct of=/dev/vda bs=4096 seek={DIRECT_BLOCK} oflag=direct conv=notrunc,fsync 2>/dev/null
echo SV:direct-write-rc=$?
yes {buffered_line} | head -c {BUFFERED_LEN} > /tmp/buffered
dd if=/tmp/buffered of=/dev/vda bs=512 seek={BUFFERED_SECTOR} conv=notrunc 2>/dev/null
echo SV:buffered-write-rc=$?
sync
echo SV:synced=1
echo SV:direct-readback-crc=$(dd if=/dev/vda bs=4096 skip={DIRECT_BLOCK} count={direct_count} iflag=direct 2>/dev/null | crc32)
echo SV:disk-crc=$(dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | crc32)
",
        read_checks()
    );
    let (mut daemon, run) = boot(&tools, &workdir, &image, &[], &script);
    run.assert_passed();
    assert_reads(&run, &image);
    assert_eq!(
        run.marker("ro"),
        Some("0"),
        "/sys/block/vda/ro of a writable disk"
    );
    assert_eq!(run.expect("direct-write-rc"), "0");
    assert_eq!(run.expect("buffered-write-rc"), "0");

    let mut expected = image.clone();
    let direct = DIRECT_BLOCK * 4096..DIRECT_BLOCK * 4096 + DIRECT_LEN;
    expected[direct.clone()].copy_from_slice(&yes_pattern(&direct_line, DIRECT_LEN));
    let buffered = BUFFERED_SECTOR * SECTOR..BUFFERED_SECTOR * SECTOR + BUFFERED_LEN;
    expected[buffered].copy_from_slice(&yes_pattern(&buffered_line, BUFFERED_LEN));
    assert_eq!(
        run.expect("direct-readback-crc"),
        crc_hex(&expected[direct])
    );
    assert_eq!(
        run.expect("disk-crc"),
        crc_hex(&expected[..CAPACITY_SECTORS * SECTOR]),
        "checksum of the whole disk read back by the guest after its writes"
    );

    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    assert_image(&workdir.join("disk.img"), &expected);
}

#[test]
fn linux_sees_a_readonly_splitvisor_blk_disk_and_cannot_write_it() {
    let Some(tools) = HostTools::require("interop_blk read-only", MODULES) else {
        return;
    };
    let workdir = Workdir::new("interop-blk-ro");
    let image = random_bytes(nonce(), IMAGE_LEN);
    let script = format!(
        "{}yes readonly | head -c 4096 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null
echo SV:write-rc=$?
",
        read_checks()
    );
    let (mut daemon, run) = boot(&tools, &workdir, &image, &["--readonly"], &script);
    run.assert_passed();
    assert_reads(&run, &image);
    assert_eq!(run.expect("ro"), "1", "/sys/block/vda/ro");
    assert_ne!(
        run.expect("write-rc"),
        "0",
        "a write to the read-only disk succeeded"
    );

    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    assert_image(&workdir.join("disk.img"), &image);
}

#[test]
fn qemu_default_queue_per_vcpu_is_served_by_a_daemon_started_without_queues() {
    let Some(tools) = HostTools::require("interop_blk default queues", MODULES) else {
        return;
    };
    let workdir = Workdir::new("interop-blk-mq");
    let image = random_bytes(nonce(), CAPACITY_SECTORS * SECTOR);
    let image_path = workdir.join("disk.img");
    image::write(&image_path, image.clone());
    let socket = workdir.join("blk.sock");
    let mut daemon = Daemon::blk(&workdir, "splitvisor-blk", &socket, &image_path, &[]);
    // As many vCPUs as the host has CPUs (at most 4): the daemon offers one queue per host
    // CPU by default, QEMU asks for one per vCPU.
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u32;
    let script = format!(
        "echo SV:hw-queues=$(ls /sys/block/vda/mq | wc -l)\n{}",
        read_checks()
    );
    let initrd = workdir.join("initrd.cpio");
    Initramfs::new(&script)
        .modules(MODULES)
        .build(&tools, &initrd)
        .unwrap();
    let run = Qemu::new(&tools, &initrd)
        .smp(vcpus)
        .vhost_user_blk_default_queues(&socket)
        .run(&workdir, "guest")
        .unwrap();
    run.assert_passed();
    assert_eq!(
        run.expect("hw-queues"),
        vcpus.to_string(),
        "one queue per vCPU"
    );
    assert_reads(&run, &image);
    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
}
