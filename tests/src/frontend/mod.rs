//! The test vhost-user frontend both daemons' tests use (`backends/blk/tests`,
//! `backends/net/tests`): guest RAM in a memfd, split rings the test drives as a guest driver,
//! the handshake through the `vhost` crate's `Frontend` as a VMM sends it, raw messages for
//! what that `Frontend` cannot send, and the frontend's view of an inflight region. `blk` and
//! `net` add what each device speaks on top.

pub mod blk;
pub mod inflight;
pub mod net;
pub mod ram;
pub mod raw;
pub mod vring;

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use ram::GuestRam;
pub use vring::SplitVring;

use crate::wait::TIMEOUT;

/// Device features every frontend here negotiates.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
pub const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// SET_VRING_NUM, ADDR, BASE (`base`), CALL, KICK and ENABLE for queue `q` on `ring`, as a VMM
/// sends them; returns the queue's (kick, call) eventfds.
pub fn start_queue(
    fe: &mut Frontend,
    q: usize,
    ring: &SplitVring,
    base: u16,
) -> (EventFd, EventFd) {
    let kick = EventFd::new(EFD_NONBLOCK).expect("kick eventfd");
    let call = EventFd::new(EFD_NONBLOCK).expect("call eventfd");
    fe.set_vring_num(q, ring.size).expect("SET_VRING_NUM");
    fe.set_vring_addr(q, &ring.config())
        .expect("SET_VRING_ADDR");
    fe.set_vring_base(q, base).expect("SET_VRING_BASE");
    fe.set_vring_call(q, &call).expect("SET_VRING_CALL");
    fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
    fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    (kick, call)
}

/// Wait (at most [`TIMEOUT`]) until `call` is signalled, and consume the signal.
pub fn wait_call(call: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
    assert_eq!(n, 1, "no interrupt from the backend within {TIMEOUT:?}");
    call.read().expect("read the call eventfd");
}

/// Open descriptors of process `pid` (a daemon must not leak them across reconnects).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}
