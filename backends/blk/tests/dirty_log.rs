//! The vhost-user dirty page log (VHOST_USER_PROTOCOL_F_LOG_SHMFD, for a VMM's live
//! migration) against a real daemon: with VHOST_F_LOG_ALL negotiated, a read request sets
//! the log bits of the pages the daemon wrote (the data buffer, the status byte, the used
//! ring) and of nothing else; a write request logs no data page; without LOG_ALL nothing is
//! logged.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use common::{make_image, start};
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::frontend::blk::{bufs, connect_with, do_request, Session, T_IN, T_OUT};
use splitvisor_tests::frontend::{self, GuestRam, SplitVring};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vmm_sys_util::tempdir::TempDir;

const RAM_SIZE: u64 = 4 << 20;
const RING_GPA: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 64;
const PAGE: u64 = 4096;
/// One bit per page of the 4 MiB of guest RAM.
const LOG_LEN: u64 = RAM_SIZE / PAGE / 8;

/// A zeroed shared log.
fn log_file() -> File {
    // SAFETY: a constant NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"test-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(LOG_LEN).expect("size the log");
    file
}

/// The pages whose bits are set, and clears them.
fn logged_pages(log: &File) -> Vec<u64> {
    let mut bytes = vec![0u8; LOG_LEN as usize];
    log.read_exact_at(&mut bytes, 0).expect("read the log");
    log.write_all_at(&vec![0u8; LOG_LEN as usize], 0)
        .expect("clear the log");
    (0..LOG_LEN * 8)
        .filter(|page| bytes[(page / 8) as usize] & (1 << (page % 8)) != 0)
        .collect()
}

/// A session on a fresh daemon with queue 0 started, LOG_ALL acknowledged if `log_all`, and
/// the log given.
fn session(dir: &TempDir, log: &File, log_all: bool) -> (Daemon, Session, GuestRam, SplitVring) {
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let (mut fe, features) = connect_with(&daemon.socket, 1, VhostUserProtocolFeatures::LOG_SHMFD);
    let log_bit = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(
        features & log_bit,
        0,
        "splitvisor-blk offers VHOST_F_LOG_ALL"
    );
    let features = if log_all {
        features
    } else {
        features & !log_bit
    };
    fe.set_features(features).expect("SET_FEATURES");
    let ram = GuestRam::new(0, RAM_SIZE);
    fe.set_mem_table(&[ram.region()]).expect("SET_MEM_TABLE");
    let region = VhostUserDirtyLogRegion {
        mmap_size: LOG_LEN,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    fe.set_log_base(0, Some(region)).expect("SET_LOG_BASE");
    let ring = SplitVring::new(&ram, RING_GPA, QUEUE_SIZE);
    let (kick, call) = frontend::start_queue(&mut fe, 0, &ring, 0);
    let session = Session {
        fe,
        kicks: vec![kick],
        calls: vec![call],
    };
    (daemon, session, ram, ring)
}

#[test]
fn with_log_all_the_pages_the_daemon_writes_are_logged() {
    let dir = TempDir::new().expect("temp dir");
    let log = log_file();
    let (_daemon, s, ram, mut ring) = session(&dir, &log, true);
    let b = bufs(0);
    let (status, _) = do_request(&s, &ram, &mut ring, 0, T_IN, 0, PAGE as u32);
    assert_eq!(status, 0);
    // The data page, the page of the status byte (with the header), the used ring's page.
    let mut expected = vec![b.data / PAGE, b.status / PAGE, ring.used / PAGE];
    expected.sort();
    expected.dedup();
    assert_eq!(logged_pages(&log), expected);
    // A write: the daemon writes only the status byte and the used ring, not the data.
    let (status, _) = do_request(&s, &ram, &mut ring, 0, T_OUT, 8, PAGE as u32);
    assert_eq!(status, 0);
    let mut expected = vec![b.status / PAGE, ring.used / PAGE];
    expected.sort();
    assert_eq!(logged_pages(&log), expected);
}

#[test]
fn without_log_all_nothing_is_logged() {
    let dir = TempDir::new().expect("temp dir");
    let log = log_file();
    let (_daemon, s, ram, mut ring) = session(&dir, &log, false);
    let (status, _) = do_request(&s, &ram, &mut ring, 0, T_IN, 0, PAGE as u32);
    assert_eq!(status, 0);
    assert_eq!(logged_pages(&log), Vec::<u64>::new());
}
