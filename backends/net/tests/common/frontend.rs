//! Test frontend: guest memory in a memfd, split vrings laid out by hand, the vhost-user
//! handshake through `vhost::vhost_user::Frontend`, and a daemon process helper.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 1 << 20;
pub const QSIZE: u16 = 64;
pub const VERSION_1: u64 = 1 << 32;
pub const EVENT_IDX: u64 = 1 << 29;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const MAC: u64 = 1 << 5;
pub const STATUS: u64 = 1 << 16;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Poll `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svnet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A running `splitvisor-net`, killed on drop; stderr goes to `stderr_path`.
pub struct Daemon {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn spawn(dir: &Path, args: &[String], sockets: &[PathBuf]) -> Daemon {
        let stderr_path = dir.join("daemon.stderr");
        let stderr = File::create(&stderr_path).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_splitvisor-net"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn daemon");
        let mut daemon = Daemon { child, stderr_path };
        let ready = wait_for(Duration::from_secs(10), || {
            sockets.iter().all(|s| s.exists()) || daemon.exited()
        });
        assert!(
            ready && !daemon.exited(),
            "daemon not ready: {}",
            daemon.stderr()
        );
        daemon
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Guest memory backed by a memfd, as a VMM would share it.
pub struct GuestMem {
    pub file: File,
    pub mem: GuestMemoryMmap,
}

impl GuestMem {
    /// Guest memory in a memfd sealed against resizing, as a VMM shares it.
    pub fn new() -> GuestMem {
        let guest = Self::unsealed();
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fcntl(guest.file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
        guest
    }

    /// Guest memory in a memfd the frontend could still shrink (the daemon must refuse it).
    pub fn unsealed() -> GuestMem {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked before use.
        let fd = unsafe {
            libc::memfd_create(
                c"svnet-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).expect("ftruncate");
        let clone = file.try_clone().expect("dup memfd");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(clone, 0)),
        )])
        .expect("map memfd");
        GuestMem { file, mem }
    }

    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .expect("host address") as u64
    }
}

/// A driver-side split ring at a fixed guest address.
pub struct Vq {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Vq {
    pub fn new(base: u64) -> Vq {
        Vq {
            base,
            next_desc: 0,
            avail_idx: 0,
        }
    }
    pub fn desc(&self) -> u64 {
        self.base
    }
    pub fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    pub fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(QSIZE) + 3) & !3
    }

    /// Post one chain of `(addr, len, device-writable)` descriptors; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= 1;
            }
            let at = GuestAddress(self.desc() + 16 * u64::from(idx));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj((idx + 1) % QSIZE, GuestAddress(at.0 + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        fence(Ordering::SeqCst);
        mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }

    /// `(id, len)` of used element `i`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + 8 * u64::from(i % QSIZE);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// When a taken-over ring's position appears in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingPosition {
    /// Before the ring is configured: the old backend was stopped first (the VMM's order).
    BeforeSetup,
    /// After SET_VRING_ADDR/BASE: the old backend finished its last completions while the new
    /// one was being configured.
    AfterSetup,
}

/// Connect and negotiate features (VERSION_1, EVENT_IDX, MRG_RXBUF, ...) and protocol
/// features (CONFIG, MQ, REPLY_ACK); returns the frontend and the acked features. No message
/// asks for a REPLY_ACK yet.
pub fn negotiate(path: &Path, pairs: usize) -> (Frontend, u64) {
    let mut fe = Frontend::connect(path, (pairs * 2) as u64).expect("connect");
    fe.set_owner().expect("set_owner");
    let offered = fe.get_features().expect("get_features");
    let wanted = VERSION_1 | EVENT_IDX | MRG_RXBUF | MAC | STATUS | PROTOCOL_FEATURES;
    assert_eq!(offered & wanted, wanted, "offered features {offered:#x}");
    let features = offered & (wanted | (1 << 22));
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("get_protocol_features");
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(proto.contains(want), "protocol features {proto:?}");
    fe.set_protocol_features(want)
        .expect("set_protocol_features");
    (fe, features)
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// A connected, fully set up frontend with `pairs` RX/TX pairs; ring `q` lives at 0x1000*(q+1).
pub struct TestFrontend {
    pub fe: Frontend,
    pub guest: GuestMem,
    pub vqs: Vec<Vq>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub config: Vec<u8>,
    pub features: u64,
}

impl TestFrontend {
    pub fn connect(path: &Path, pairs: usize) -> TestFrontend {
        Self::connect_at(path, pairs, 0, RingPosition::BeforeSetup)
    }

    /// Like `connect`, but take over rings that earlier backends already ran up to `base`, as
    /// a VMM does when it reconnects or swaps backends: guest memory holds `avail.idx ==
    /// used.idx == base` (written `when` says) and SET_VRING_BASE hands over `base`. Nothing
    /// is kicked.
    pub fn connect_at(path: &Path, pairs: usize, base: u16, when: RingPosition) -> TestFrontend {
        let queues = pairs * 2;
        let (mut fe, features) = negotiate(path, pairs);
        let (_, config) = fe
            .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])
            .expect("get_config");
        let guest = GuestMem::new();
        fe.set_mem_table(&[Self::region(&guest)])
            .expect("set_mem_table");
        let mut frontend = TestFrontend {
            fe,
            guest,
            vqs: Vec::new(),
            kicks: Vec::new(),
            calls: Vec::new(),
            config,
            features,
        };
        for q in 0..queues {
            if when == RingPosition::BeforeSetup {
                frontend.write_ring_position(q, base);
            }
            frontend.setup_vring(q, base);
        }
        if when == RingPosition::AfterSetup {
            // Messages without a reply are not waited for: a round trip makes sure the daemon
            // has handled every vring message before guest memory changes.
            frontend.fe.get_features().expect("get_features");
            for q in 0..queues {
                frontend.write_ring_position(q, base);
            }
        }
        frontend
    }

    fn ring_base(q: usize) -> u64 {
        0x1000 * (q as u64 + 1) * 4
    }

    /// Guest memory says ring `q` ran up to `base`: `avail.idx == used.idx == base`.
    fn write_ring_position(&mut self, q: usize, base: u16) {
        let vq = Vq::new(Self::ring_base(q));
        let mem = &self.guest.mem;
        mem.write_obj(base, GuestAddress(vq.avail() + 2)).unwrap();
        mem.write_obj(base, GuestAddress(vq.used() + 2)).unwrap();
        fence(Ordering::SeqCst);
    }

    fn setup_vring(&mut self, q: usize, base: u16) {
        let mut vq = Vq::new(Self::ring_base(q));
        vq.avail_idx = base;
        let host = self.guest.host_base();
        let data = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + vq.desc(),
            used_ring_addr: host + vq.used(),
            avail_ring_addr: host + vq.avail(),
            log_addr: None,
        };
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
        self.fe.set_vring_num(q, QSIZE).expect("set_vring_num");
        self.fe.set_vring_addr(q, &data).expect("set_vring_addr");
        self.fe.set_vring_base(q, base).expect("set_vring_base");
        self.fe.set_vring_call(q, &call).expect("set_vring_call");
        self.fe.set_vring_kick(q, &kick).expect("set_vring_kick");
        self.fe.set_vring_enable(q, true).expect("set_vring_enable");
        self.vqs.push(vq);
        self.kicks.push(kick);
        self.calls.push(call);
    }

    /// The region SET_MEM_TABLE describes for this guest memory.
    pub fn region(guest: &GuestMem) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: guest.host_base(),
            mmap_offset: 0,
            mmap_handle: guest.file.as_raw_fd(),
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.guest.mem
    }

    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).expect("kick");
    }

    /// Post `count` RX buffers of `len` bytes on queue `q` at `base` and kick.
    pub fn post_rx(&mut self, q: usize, base: u64, count: u64, len: u32) {
        for i in 0..count {
            let addr = base + i * u64::from(len);
            let mem = self.guest.mem.clone();
            self.vqs[q].add_chain(&mem, &[(addr, len, true)]);
        }
        self.kick(q);
    }

    /// Put `frame` (header included) at `addr` and post it on TX queue `q`, then kick.
    pub fn send(&mut self, q: usize, addr: u64, frame: &[u8]) {
        self.guest
            .mem
            .write_slice(frame, GuestAddress(addr))
            .expect("write frame");
        let mem = self.guest.mem.clone();
        self.vqs[q].add_chain(&mem, &[(addr, frame.len() as u32, false)]);
        self.kick(q);
    }
}

/// An Ethernet frame behind a zeroed virtio_net_hdr_v1.
pub fn net_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
