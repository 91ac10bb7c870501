//! A virtio-blk frontend session with `splitvisor-blk` as a VMM sets it up: the full handshake
//! (features, memory table, rings) and single requests through a queue.

use std::path::Path;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmm_sys_util::eventfd::EventFd;

use super::{start_queue, wait_call, GuestRam, SplitVring};
use super::{F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1};

pub const RAM_GPA: u64 = 0;
pub const RAM_SIZE: u64 = 4 << 20;
pub const QUEUE_SIZE: u16 = 64;
/// The image a daemon test serves: 4 MiB.
pub const IMAGE_SIZE: u64 = 4 << 20;

pub const T_IN: u32 = VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = VIRTIO_BLK_T_OUT;

/// A connected, configured frontend with its queues.
pub struct Session {
    pub fe: Frontend,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
}

/// The handshake up to (not including) SET_FEATURES, every later message asking for a
/// REPLY_ACK; returns the frontend and the offered features.
pub fn connect(socket: &Path, queues: usize) -> (Frontend, u64) {
    connect_with(socket, queues, VhostUserProtocolFeatures::empty())
}

/// Like [`connect`], also negotiating the protocol features `extra` (e.g. INFLIGHT_SHMFD).
pub fn connect_with(
    socket: &Path,
    queues: usize,
    extra: VhostUserProtocolFeatures,
) -> (Frontend, u64) {
    let mut fe = Frontend::connect(socket, queues as u64).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let must = F_VERSION_1 | F_PROTOCOL_FEATURES | F_EVENT_IDX;
    assert_eq!(features & must, must, "offered features {features:#x}");
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | extra;
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(wanted), "protocol features {proto:?}");
    fe.set_protocol_features(wanted).unwrap();
    // Every following message asks for a REPLY_ACK.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(fe.get_queue_num().unwrap() >= queues as u64);
    (fe, features)
}

/// The full handshake a VMM does; returns the session and the config space bytes.
pub fn handshake(socket: &Path, ram: &GuestRam, rings: &[&SplitVring]) -> (Session, Vec<u8>) {
    let (mut fe, features) = connect(socket, rings.len());
    assert_eq!(fe.get_max_mem_slots().unwrap(), 509);
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[ram.region()]).unwrap();
    let (mut kicks, mut calls) = (Vec::new(), Vec::new());
    for (q, ring) in rings.iter().enumerate() {
        let (kick, call) = start_queue(&mut fe, q, ring, 0);
        kicks.push(kick);
        calls.push(call);
    }
    (Session { fe, kicks, calls }, config)
}

pub fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

pub fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// Guest addresses of one request's buffers (per queue, so queues do not overlap).
pub struct Bufs {
    pub hdr: u64,
    pub data: u64,
    pub status: u64,
}

pub fn bufs(q: usize) -> Bufs {
    let base = 0x10_0000 + q as u64 * 0x10_0000;
    Bufs {
        hdr: base,
        data: base + 0x1000,
        status: base + 0x800,
    }
}

/// A virtio-blk request header (struct virtio_blk_outhdr): type, reserved, sector.
pub fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    hdr
}

/// Submit one IN/OUT request on queue `q` and wait for its completion.
pub fn do_request(
    s: &Session,
    ram: &GuestRam,
    ring: &mut SplitVring,
    q: usize,
    kind: u32,
    sector: u64,
    len: u32,
) -> (u8, u32) {
    let b = bufs(q);
    ram.write(b.hdr, &request_header(kind, sector));
    ram.write(b.status, &[0xff]);
    let before = ring.used_idx();
    let head = ring.add_chain(&[
        (b.hdr, 16, false),
        (b.data, len, kind == T_IN),
        (b.status, 1, true),
    ]);
    s.kicks[q].write(1).unwrap();
    wait_call(&s.calls[q]);
    assert_eq!(ring.used_idx(), before.wrapping_add(1));
    let (id, used_len) = ring.used_elem(before);
    assert_eq!(id, u32::from(head));
    // EVENT_IDX: ask for the next interrupt after this completion.
    ring.set_used_event(ring.used_idx());
    (ram.read(b.status, 1)[0], used_len)
}

/// A well-behaved frontend still gets served: a fresh connection writes a sector and reads it
/// back through queue 0.
pub fn assert_serves(socket: &Path) {
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(socket, &ram, &[&ring]);
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    ram.write(bufs(0).data, &data);
    assert_eq!(do_request(&s, &ram, &mut ring, 0, T_OUT, 3, 512), (0, 1));
    ram.fill(bufs(0).data, 512, 0);
    assert_eq!(do_request(&s, &ram, &mut ring, 0, T_IN, 3, 512), (0, 513));
    assert_eq!(ram.read(bufs(0).data, 512), data);
}
