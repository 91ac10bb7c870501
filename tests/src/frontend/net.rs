//! A virtio-net frontend with `splitvisor-net` as a VMM sets it up: RX/TX queue pairs in guest
//! RAM, the handshake (also taking over rings earlier backends ran), frames posted and
//! received, and frames injected into a TAP from the host side.

use std::path::Path;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{start_queue, GuestRam, SplitVring};
use super::{F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1};

pub const MEM_SIZE: u64 = 1 << 20;
pub const QSIZE: u16 = 64;
pub const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
pub const MAC: u64 = 1 << VIRTIO_NET_F_MAC;
pub const STATUS: u64 = 1 << VIRTIO_NET_F_STATUS;
pub const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
/// Bytes of the virtio_net_hdr_v1 in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

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
    let wanted = F_VERSION_1 | F_EVENT_IDX | MRG_RXBUF | MAC | STATUS | F_PROTOCOL_FEATURES;
    assert_eq!(offered & wanted, wanted, "offered features {offered:#x}");
    let features = offered & (wanted | MQ);
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

/// A connected, fully set up frontend with `pairs` RX/TX pairs; ring `q` lives at
/// 0x4000 * (q + 1).
pub struct TestFrontend {
    pub fe: Frontend,
    pub guest: GuestRam,
    pub vqs: Vec<SplitVring>,
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
        let guest = Self::guest();
        fe.set_mem_table(&[guest.region()]).expect("set_mem_table");
        let (mut vqs, mut kicks, mut calls) = (Vec::new(), Vec::new(), Vec::new());
        for q in 0..queues {
            let mut vq = SplitVring::new(&guest, Self::ring_base(q), QSIZE);
            vq.continue_from(base);
            if when == RingPosition::BeforeSetup {
                vq.set_position(base);
            }
            let (kick, call) = start_queue(&mut fe, q, &vq, base);
            vqs.push(vq);
            kicks.push(kick);
            calls.push(call);
        }
        if when == RingPosition::AfterSetup {
            // Messages without a reply are not waited for: a round trip makes sure the daemon
            // has handled every vring message before guest memory changes.
            fe.get_features().expect("get_features");
            for vq in &vqs {
                vq.set_position(base);
            }
        }
        TestFrontend {
            fe,
            guest,
            vqs,
            kicks,
            calls,
            config,
            features,
        }
    }

    /// Guest RAM of the size this frontend uses, sealed as a VMM shares it.
    pub fn guest() -> GuestRam {
        GuestRam::new(0, MEM_SIZE)
    }

    fn ring_base(q: usize) -> u64 {
        0x4000 * (q as u64 + 1)
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.guest.mem
    }

    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).expect("kick");
    }

    /// Post `count` RX buffers of `len` bytes on queue `q` at `base`, without a kick.
    pub fn post_rx_silently(&mut self, q: usize, base: u64, count: u64, len: u32) {
        for i in 0..count {
            self.vqs[q].add_chain(&[(base + i * u64::from(len), len, true)]);
        }
    }

    /// Post `count` RX buffers of `len` bytes on queue `q` at `base` and kick.
    pub fn post_rx(&mut self, q: usize, base: u64, count: u64, len: u32) {
        self.post_rx_silently(q, base, count, len);
        self.kick(q);
    }

    /// Put `frame` (header included) at `addr` and post it on TX queue `q`, then kick.
    pub fn send(&mut self, q: usize, addr: u64, frame: &[u8]) {
        self.guest.write(addr, frame);
        self.vqs[q].add_chain(&[(addr, frame.len() as u32, false)]);
        self.kick(q);
    }

    /// Bytes of used element `i` of RX queue `q` whose buffers are `len` bytes each from
    /// `base` (virtio-net header included).
    pub fn rx_frame(&self, q: usize, base: u64, len: u32, i: u16) -> Vec<u8> {
        let (id, used_len) = self.vqs[q].used_elem(i);
        assert!(u16::try_from(id).is_ok_and(|id| id < QSIZE), "used id {id}");
        let mut buf = vec![0u8; used_len as usize];
        self.mem()
            .read_slice(
                &mut buf,
                GuestAddress(base + u64::from(id) * u64::from(len)),
            )
            .expect("the used buffer is in guest RAM");
        buf
    }
}

/// An Ethernet frame behind a zeroed virtio_net_hdr_v1.
pub fn net_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Transmit `frame` (no vnet header) out of interface `ifname` with an AF_PACKET socket.
pub fn inject(ifname: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(ifname).expect("an interface name without NUL");
    // SAFETY: plain libc calls on values we own; the socket is closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert!(ifindex > 0, "no interface {ifname}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sendto");
    }
}

/// True if TAP devices can be created here (/dev/net/tun). Without it the test is skipped -
/// except under CI, where it must run.
pub fn tap_available(test: &str) -> bool {
    if Path::new("/dev/net/tun").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: /dev/net/tun is missing and CI is set: the TAP test must run"
    );
    eprintln!("SKIP {test}: /dev/net/tun is missing");
    false
}
