//! The disk path, end to end: the project's guest runs `blk-verify` under real KVM against a real
//! `splitvisor-blk` daemon (vhost-user) or the VMM's emulated ATA disk; the test checks the
//! guest's RESULT line against checksums and patterns recomputed on the host, and the image file's
//! bytes after the run. Also: read-only disks, the last sectors and reads past the end, sectors
//! beyond LBA28, two queues, a backend killed under a running guest, a VMM killed under a
//! serving daemon, qemu-storage-daemon as the backend, and bad `--disk` input.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use splitvisor_tests::daemon::{bin, Daemon};
use splitvisor_tests::image::{self, assert_image};
use splitvisor_tests::pattern::nonce;
use splitvisor_tests::pattern::{self, fnv1a64_hex, SECTOR};
use splitvisor_tests::vm::{require_kvm, run_splitvisor, RunningVm, VmRun};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

/// A VM doing a few MiB of disk I/O finishes in seconds; this is the hang detector.
const VM_TIMEOUT: Duration = Duration::from_secs(60);
/// 4 MiB and 5 sectors.
const IMAGE_SECTORS: u64 = 8197;
const IMAGE_LEN: usize = (IMAGE_SECTORS * SECTOR) as usize;

/// How the guest reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    /// virtio-blk served by `splitvisor-blk` over vhost-user.
    VhostUser,
    /// The VMM's emulated ATA disk.
    Ata,
}

impl Transport {
    fn dev(self) -> &'static str {
        match self {
            Transport::VhostUser => "virtio",
            Transport::Ata => "ata",
        }
    }
}

/// Starts `splitvisor-blk` on `image` with extra flags.
fn start_blk(workdir: &Workdir, image: &Path, flags: &[&str]) -> Daemon {
    Daemon::blk(
        workdir,
        "splitvisor-blk",
        &workdir.join("blk.sock"),
        image,
        flags,
    )
}

/// The `--disk` value for a vhost-user socket.
fn socket_disk(socket: &Path) -> String {
    format!("socket={}", socket.display())
}

/// Boots the guest with `--disk disk --cmdline task`.
fn run_vm(disk: &str, task: &str) -> VmRun {
    let started = Instant::now();
    let run = run_splitvisor(["run", "--disk", disk, "--cmdline", task], VM_TIMEOUT);
    eprintln!("{task} on {disk}: {:?}", started.elapsed());
    run
}

/// Runs `task` against `image` through `transport` (starting and stopping a daemon for
/// vhost-user) and returns the run once the image file is quiescent.
fn run_on(workdir: &Workdir, transport: Transport, image: &Path, task: &str) -> VmRun {
    let task = format!("{task},dev={}", transport.dev());
    match transport {
        Transport::VhostUser => {
            let mut daemon = start_blk(workdir, image, &[]);
            let run = run_vm(&socket_disk(&daemon.socket), &task);
            let status = daemon.stop().unwrap();
            assert!(status.success(), "splitvisor-blk exited with {status}");
            run
        }
        Transport::Ata => run_vm(&format!("path={},emulated=ata", image.display()), &task),
    }
}

/// `image` with the guest's pattern for `seed` over `size` bytes from `sector`.
fn with_pattern(image: &[u8], seed: u64, sector: u64, size: usize) -> Vec<u8> {
    let mut expected = image.to_vec();
    let start = (sector * SECTOR) as usize;
    expected[start..start + size].copy_from_slice(&pattern::sectors(seed, sector, size));
    expected
}

fn field<'a>(result: &'a Value, key: &str, run: &VmRun) -> &'a Value {
    result
        .get(key)
        .unwrap_or_else(|| panic!("RESULT has no {key:?}\n{run}"))
}

#[test]
fn guest_reads_host_written_bytes_through_vhost_user_and_ata() {
    if !require_kvm("guest_reads_host_written_bytes_through_vhost_user_and_ata") {
        return;
    }
    for transport in [Transport::VhostUser, Transport::Ata] {
        let workdir = Workdir::new("disk-read");
        let path = workdir.join("disk.img");
        let image = image::random(&path, nonce(), IMAGE_LEN);
        // An odd sector, 96 KiB; the guest's own write goes elsewhere (sectors 6000+).
        let (check_sector, check_len) = (1001u64, 96usize << 10);
        let check = &image[(check_sector * SECTOR) as usize..][..check_len];
        let task = format!(
            "blk-verify,offset=6000,size=32K,check_offset={check_sector},check_size={check_len}"
        );
        let run = run_on(&workdir, transport, &path, &task);
        let result = run.assert_passed();
        assert_eq!(result["dev"], transport.dev(), "{run}");
        assert_eq!(result["capacity_sectors"], IMAGE_SECTORS, "{run}");
        assert_eq!(result["read_only"], false, "{run}");
        assert_eq!(result["checksum_of"], "check", "{run}");
        assert_eq!(
            *field(&result, "checksum", &run),
            fnv1a64_hex(check),
            "{transport:?}: the guest's checksum of the host's bytes\n{run}"
        );
        let expected = with_pattern(&image, pattern::DEFAULT_SEED, 6000, 32 << 10);
        assert_image(&path, &expected);
    }
}

#[test]
fn guest_writes_land_in_the_image_exactly_through_vhost_user_and_ata() {
    if !require_kvm("guest_writes_land_in_the_image_exactly_through_vhost_user_and_ata") {
        return;
    }
    for (transport, sector, size) in [
        (Transport::VhostUser, 777u64, 768usize << 10),
        (Transport::Ata, 4321, 40 << 10),
    ] {
        let workdir = Workdir::new("disk-write");
        let path = workdir.join("disk.img");
        let image = image::random(&path, nonce(), IMAGE_LEN);
        let seed = nonce() >> 1;
        let task = format!("blk-verify,offset={sector},size={size},seed={seed}");
        let run = run_on(&workdir, transport, &path, &task);
        let result = run.assert_passed();
        assert_eq!(result["write_status"], "ok", "{run}");
        assert_eq!(result["pattern_seed"], format!("{seed:016x}"), "{run}");
        assert_eq!(result["verified_bytes"], size, "{run}");
        assert_eq!(result["mismatched_sectors"], 0, "{run}");
        let expected = with_pattern(&image, seed, sector, size);
        let written = &expected[(sector * SECTOR) as usize..][..size];
        assert_eq!(result["checksum_of"], "verify", "{run}");
        assert_eq!(
            result["checksum"],
            fnv1a64_hex(written),
            "{transport:?}: checksum of the region read back\n{run}"
        );
        // Exactly the guest's bytes in the region, the host's everywhere else.
        assert_image(&path, &expected);
    }
}

#[test]
fn readonly_ata_disk_refuses_guest_writes_and_leaves_the_image_alone() {
    if !require_kvm("readonly_ata_disk_refuses_guest_writes_and_leaves_the_image_alone") {
        return;
    }
    let workdir = Workdir::new("disk-ro-ata");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let disk = format!("path={},emulated=ata,readonly", path.display());
    let run = run_vm(
        &disk,
        "blk-verify,dev=ata,size=4K,check_offset=100,check_size=8K",
    );
    let result = run.result();
    assert_eq!(result["status"], "fail", "{run}");
    assert_eq!(run.code(), Some(1), "the guest's fail status\n{run}");
    assert_eq!(result["write_status"], "ioerr", "{run}");
    assert_eq!(
        result["checksum"],
        fnv1a64_hex(&image[100 * SECTOR as usize..][..8 << 10]),
        "{run}"
    );
    assert_image(&path, &image);
}

#[test]
fn readonly_daemon_refuses_guest_writes_and_leaves_the_image_alone() {
    if !require_kvm("readonly_daemon_refuses_guest_writes_and_leaves_the_image_alone") {
        return;
    }
    let workdir = Workdir::new("disk-ro");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let mut daemon = start_blk(&workdir, &path, &["--readonly"]);
    // Reads still work: the check region is read after the refused write.
    let task = "blk-verify,size=64K,check_offset=100,check_size=16K";
    let run = run_vm(&socket_disk(&daemon.socket), task);
    let result = run.result();
    assert_eq!(result["status"], "fail", "{run}");
    assert_eq!(run.code(), Some(1), "the guest's fail status\n{run}");
    assert_eq!(result["read_only"], true, "VIRTIO_BLK_F_RO\n{run}");
    assert_eq!(result["write_status"], "ioerr", "{run}");
    assert_eq!(result["checksum_of"], "check", "{run}");
    assert_eq!(
        result["checksum"],
        fnv1a64_hex(&image[100 * SECTOR as usize..][..16 << 10]),
        "{run}"
    );
    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    assert_image(&path, &image);
}

#[test]
fn out_of_range_read_fails_and_the_daemon_serves_the_next_vm() {
    if !require_kvm("out_of_range_read_fails_and_the_daemon_serves_the_next_vm") {
        return;
    }
    let workdir = Workdir::new("disk-oob");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let mut daemon = start_blk(&workdir, &path, &[]);
    let disk = socket_disk(&daemon.socket);

    let run = run_vm(&disk, "blk-verify,size=64K,oob=1");
    let result = run.assert_passed();
    assert_eq!(
        result["oob_status"], "ioerr",
        "a read at the capacity\n{run}"
    );

    // The same daemon, a new frontend: it must have gone back to accepting connections.
    let seed = nonce() >> 1;
    let task = format!("blk-verify,offset=2048,size=128K,seed={seed}");
    let run = run_vm(&disk, &task);
    run.assert_passed();
    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert_eq!(
        log.matches("frontend connected").count(),
        2,
        "two frontends, one after the other\n{log}"
    );
    let expected = with_pattern(&image, pattern::DEFAULT_SEED, 0, 64 << 10);
    assert_image(&path, &with_pattern(&expected, seed, 2048, 128 << 10));
}

#[test]
fn last_sectors_are_writable_a_partial_sector_is_invisible_and_oob_fails() {
    if !require_kvm("last_sectors_are_writable_a_partial_sector_is_invisible_and_oob_fails") {
        return;
    }
    for transport in [Transport::VhostUser, Transport::Ata] {
        let workdir = Workdir::new("disk-tail");
        let path = workdir.join("disk.img");
        let image = image::random(&path, nonce(), IMAGE_LEN);
        let seed = nonce() >> 1;
        let last = IMAGE_SECTORS - 8;
        let task = format!("blk-verify,offset={last},size=4K,seed={seed},oob=1");
        let run = run_on(&workdir, transport, &path, &task);
        let result = run.assert_passed();
        assert_eq!(result["capacity_sectors"], IMAGE_SECTORS, "{run}");
        assert_eq!(
            result["oob_status"], "ioerr",
            "a read at the capacity\n{run}"
        );
        assert_image(&path, &with_pattern(&image, seed, last, 4096));

        // Whole sectors plus 123 bytes: not a disk image to write to (like /etc/passwd); read
        // only, the partial sector is invisible.
        let odd_path = workdir.join("odd.img");
        let odd = image::random(&odd_path, nonce(), IMAGE_LEN + 123);
        let refusal = match transport {
            Transport::VhostUser => {
                let out = std::process::Command::new(bin("splitvisor-blk"))
                    .arg("--socket")
                    .arg(workdir.join("odd.sock"))
                    .arg("--image")
                    .arg(&odd_path)
                    .output()
                    .unwrap();
                assert!(!out.status.success(), "splitvisor-blk on a partial sector");
                String::from_utf8_lossy(&out.stderr).into_owned()
            }
            Transport::Ata => {
                let disk = format!("path={},emulated=ata", odd_path.display());
                let run = run_vm(&disk, "blk-verify,dev=ata");
                assert_ne!(run.code(), Some(0), "{run}");
                run.stderr
            }
        };
        assert!(refusal.contains("odd.img"), "{refusal}");
        assert!(
            refusal.contains("not a whole number of 512-byte sectors"),
            "{refusal}"
        );
        let disk = match transport {
            Transport::VhostUser => None,
            Transport::Ata => Some(format!("path={},emulated=ata,readonly", odd_path.display())),
        };
        let task = format!("blk-verify,dev={},size=4K,oob=1", transport.dev());
        let run = match disk {
            Some(disk) => run_vm(&disk, &task),
            None => {
                let mut daemon = start_blk(&workdir, &odd_path, &["--readonly"]);
                let run = run_vm(&socket_disk(&daemon.socket), &task);
                assert!(daemon.stop().unwrap().success());
                run
            }
        };
        assert_eq!(run.result()["capacity_sectors"], IMAGE_SECTORS, "{run}");
        assert_image(&odd_path, &odd);
    }
}

/// `len` bytes of `path` from `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn sectors_beyond_lba28_reach_the_right_place_in_a_sparse_image() {
    if !require_kvm("sectors_beyond_lba28_reach_the_right_place_in_a_sparse_image") {
        return;
    }
    // 129 GiB, sparse: ATA needs the 48-bit commands from sector 2^28 (128 GiB) on.
    let len: u64 = 129 << 30;
    let sector = (1u64 << 28) + 5;
    for transport in [Transport::VhostUser, Transport::Ata] {
        let workdir = Workdir::new("disk-lba48");
        let path = workdir.join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        let seed = nonce() >> 1;
        let task = format!("blk-verify,offset={sector},size=4K,seed={seed},oob=1");
        let run = run_on(&workdir, transport, &path, &task);
        let result = run.assert_passed();
        assert_eq!(result["capacity_sectors"], len / SECTOR, "{run}");
        assert_eq!(result["oob_status"], "ioerr", "{run}");
        // One zero sector either side, the pattern in between.
        let around = read_at(&path, (sector - 1) * SECTOR, 4096 + 1024);
        let mut expected = vec![0; 512];
        expected.extend(pattern::sectors(seed, sector, 4096));
        expected.extend([0; 512]);
        assert!(
            around == expected,
            "{transport:?}: sectors {}..{} of the image are not [zero, pattern, zero]",
            sector - 1,
            sector + 9
        );
    }
}

/// The per-queue request counts of the daemon's last `STATS {json}` line.
fn queue_requests(log: &str) -> Vec<u64> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("STATS "))
        .unwrap_or_else(|| panic!("no STATS line in the daemon log\n{log}"));
    let stats: Value = serde_json::from_str(line).unwrap();
    stats["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("STATS without queues: {line}"))
        .iter()
        .map(|q| q["requests"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn two_queues_carry_the_guest_io() {
    if !require_kvm("two_queues_carry_the_guest_io") {
        return;
    }
    let workdir = Workdir::new("disk-mq");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let mut daemon = start_blk(&workdir, &path, &["--queues", "2"]);
    let seed = nonce() >> 1;
    let size = 2usize << 20;
    let task = format!("blk-verify,queues=2,offset=1000,size={size},seed={seed}");
    let run = run_vm(&socket_disk(&daemon.socket), &task);
    let result = run.assert_passed();
    assert_eq!(result["queues"], 2, "{run}");
    assert_eq!(result["verified_bytes"], size, "{run}");
    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    let requests = queue_requests(&std::fs::read_to_string(&daemon.log).unwrap());
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests.iter().all(|&n| n > 0),
        "both queues served requests: {requests:?}"
    );
    assert_image(&path, &with_pattern(&image, seed, 1000, size));
}

#[test]
fn killing_the_backend_fails_the_guest_cleanly_instead_of_crashing_the_vmm() {
    if !require_kvm("killing_the_backend_fails_the_guest_cleanly_instead_of_crashing_the_vmm") {
        return;
    }
    let workdir = Workdir::new("disk-kill");
    let path = workdir.join("disk.img");
    image::random(&path, nonce(), IMAGE_LEN);
    let mut daemon = start_blk(&workdir, &path, &[]);
    let disk = socket_disk(&daemon.socket);
    // Rounds of write+verify for far longer than the test waits.
    let args = [
        "run",
        "--disk",
        &disk,
        "--cmdline",
        "blk-verify,seconds=600",
    ];
    let mut vm = RunningVm::spawn(args, workdir.path(), "vm");
    workdir.log("VMM stderr", &workdir.join("vm.stderr"));
    workdir.log("guest console", &workdir.join("vm.stdout"));
    // The driver is up once it prints the device line; the daemon is serving by then.
    poll_until("the guest to open virtio-blk", VM_TIMEOUT, || {
        assert!(!vm.has_exited(), "the VM ended before the disk was killed");
        vm.stdout_so_far().contains("virtio-blk: ").then_some(())
    })
    .unwrap();
    let status = daemon.kill().unwrap();
    assert_eq!(
        status.code(),
        None,
        "the daemon died of the signal: {status}"
    );
    let killed = Instant::now();

    let run = vm.wait(Duration::from_secs(30));
    let ended_after = killed.elapsed();
    eprintln!("the VM ended {ended_after:?} after the backend was killed");
    assert!(
        ended_after < Duration::from_secs(15),
        "the guest took {ended_after:?} to notice"
    );
    assert_eq!(
        run.code(),
        Some(1),
        "the guest's fail status, not a VMM crash (121-123) or a signal\n{run}"
    );
    let result = run.result();
    assert_eq!(result["status"], "fail", "{run}");
    let error = field(&result, "error", &run).as_str().unwrap_or_default();
    assert!(
        error.contains("needs reset") || error.contains("backend gone"),
        "error {error:?}\n{run}"
    );
    assert!(
        run.stderr.contains("lost the backend"),
        "the VMM logs the lost backend\n{run}"
    );
    assert!(!run.stderr.contains("panicked"), "{run}");
}

#[test]
fn daemon_survives_a_vmm_killed_mid_io_and_serves_the_next_vm() {
    if !require_kvm("daemon_survives_a_vmm_killed_mid_io_and_serves_the_next_vm") {
        return;
    }
    let workdir = Workdir::new("disk-vmm-kill");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let mut daemon = start_blk(&workdir, &path, &[]);
    let disk = socket_disk(&daemon.socket);
    // Write+verify rounds over the first MiB until killed.
    let args = [
        "run",
        "--disk",
        &disk,
        "--cmdline",
        "blk-verify,seconds=600",
    ];
    let vm = RunningVm::spawn(args, workdir.path(), "vm1");
    poll_until("the guest to open virtio-blk", VM_TIMEOUT, || {
        vm.stdout_so_far().contains("virtio-blk: ").then_some(())
    })
    .unwrap();
    let status = vm.kill();
    assert_eq!(status.code(), None, "the VMM died of the signal: {status}");
    poll_until("the daemon to see the frontend go", VM_TIMEOUT, || {
        let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        log.contains("frontend disconnected").then_some(())
    })
    .unwrap();

    let seed = nonce() >> 1;
    let task = format!("blk-verify,offset=4096,size=256K,seed={seed}");
    run_vm(&disk, &task).assert_passed();
    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-blk exited with {status}");
    // Beyond the killed guest's first MiB: the host's bytes, then the second guest's pattern.
    let expected = with_pattern(&image, seed, 4096, 256 << 10);
    let actual = std::fs::read(&path).unwrap();
    let beyond = (1 << 20)..IMAGE_LEN;
    assert!(
        actual[beyond.clone()] == expected[beyond],
        "the image beyond the first MiB differs from the expected bytes"
    );
}

/// qemu-storage-daemon from PATH (or /usr/bin, /usr/sbin); `None` after a SKIP line, or a panic
/// with `CI` set.
fn require_qsd(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("qemu-storage-daemon"))
        .find(|p| p.is_file());
    if found.is_none() {
        let why = "qemu-storage-daemon not found (package qemu-system-common; .ci/install-deps.sh)";
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {why} and CI is set");
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    }
    found
}

#[test]
fn splitvisor_drives_qemu_storage_daemon() {
    let test = "splitvisor_drives_qemu_storage_daemon";
    if !require_kvm(test) {
        return;
    }
    let Some(qsd) = require_qsd(test) else {
        return;
    };
    let workdir = Workdir::new("disk-qsd");
    let path = workdir.join("disk.img");
    let image = image::random(&path, nonce(), IMAGE_LEN);
    let socket = workdir.join("qsd.sock");
    let blockdev = format!("driver=file,node-name=f,filename={}", path.display());
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
        socket.display()
    );
    let args: Vec<&OsStr> = ["--blockdev", &blockdev, "--export", &export]
        .into_iter()
        .map(OsStr::new)
        .collect();
    let mut daemon = Daemon::start(&workdir, "qemu-storage-daemon", &qsd, &args, &socket).unwrap();

    let seed = nonce() >> 1;
    let (sector, size) = (3001u64, 512usize << 10);
    let (check_sector, check_len) = (17u64, 64usize << 10);
    let task = format!(
        "blk-verify,offset={sector},size={size},seed={seed},check_offset={check_sector},check_size={check_len},oob=1"
    );
    let run = run_vm(&socket_disk(&socket), &task);
    let result = run.assert_passed();
    assert_eq!(result["capacity_sectors"], IMAGE_SECTORS, "{run}");
    assert_eq!(result["write_status"], "ok", "{run}");
    assert_eq!(result["oob_status"], "ioerr", "{run}");
    assert_eq!(
        result["checksum"],
        fnv1a64_hex(&image[(check_sector * SECTOR) as usize..][..check_len]),
        "{run}"
    );
    let status = daemon.stop().unwrap();
    assert!(status.success(), "qemu-storage-daemon exited with {status}");
    assert_image(&path, &with_pattern(&image, seed, sector, size));
}

#[test]
fn missing_disk_socket_or_image_is_named_in_the_error() {
    if !require_kvm("missing_disk_socket_or_image_is_named_in_the_error") {
        return;
    }
    let socket = "/nonexistent/splitvisor-disk.sock";
    let started = Instant::now();
    let run = run_splitvisor(
        [
            "run",
            "--disk",
            &format!("socket={socket}"),
            "--connect-timeout",
            "1",
            "--cmdline",
            "blk-verify",
        ],
        Duration::from_secs(20),
    );
    let took = started.elapsed();
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains(socket), "names the socket\n{run}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with --connect-timeout 1"
    );
    assert!(!run.stderr.contains("panicked"), "{run}");

    let image = "/nonexistent/splitvisor-disk.img";
    let run = run_splitvisor(
        [
            "run",
            "--disk",
            &format!("path={image},emulated=ata"),
            "--cmdline",
            "blk-verify",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains(image), "names the image\n{run}");
    assert!(!run.stderr.contains("panicked"), "{run}");
}
