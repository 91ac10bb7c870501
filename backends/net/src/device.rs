//! The virtio-net device model: offered feature bits, config space, and the mapping from the
//! guest's negotiated offloads to TAP offload flags.

use splitvisor_wire::config::NetConfig;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::ByteValued;

use crate::switch::MacAddr;

const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// Offloads the device side (TAP) takes from the guest: TX checksum and TSO.
const HOST_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);

/// Offloads the guest may receive (partial checksums, GSO frames), mirrored by TUNSETOFFLOAD.
const GUEST_OFFLOADS: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN);

/// What the device offers and reports in its config space.
#[derive(Clone, Debug)]
pub struct DeviceModel {
    pub mac: MacAddr,
    pub pairs: u16,
    pub mtu: Option<u16>,
    /// Whether checksum/TSO offloads are offered (TAP mode with a TAP that accepts them).
    pub offloads: bool,
}

impl DeviceModel {
    /// virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES is added by the glue).
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS);
        if self.pairs > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        if self.offloads {
            f |= HOST_OFFLOADS | GUEST_OFFLOADS;
        }
        f
    }

    /// `struct virtio_net_config`: mac, status (link up), max_virtqueue_pairs, mtu; the rest
    /// (speed, duplex, RSS) is zero, for features not offered.
    fn config(&self) -> NetConfig {
        let mut c = NetConfig::default();
        c.set_mac(self.mac);
        c.set_link_up(true);
        c.set_max_virtqueue_pairs(self.pairs);
        c.set_mtu(self.mtu.unwrap_or(0));
        c
    }

    /// GET_CONFIG: exactly `size` bytes from `offset`, zero past the fields we define.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config();
        let bytes = config.as_slice();
        let size = size.min(crate::device::MAX_CONFIG_READ) as usize;
        (0..size)
            .map(|i| {
                let at = offset as usize + i;
                bytes.get(at).copied().unwrap_or(0)
            })
            .collect()
    }
}

/// Cap on one GET_CONFIG read (the vhost-user config payload is at most 256 bytes).
pub const MAX_CONFIG_READ: u32 = 256;

/// TUNSETOFFLOAD flags matching the guest's negotiated receive offloads.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// All the TAP offloads we may ask for (used to probe the TAP at startup).
pub const ALL_TAP_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

/// Whether the guest negotiated merged RX buffers.
pub fn has_mrg_rxbuf(acked: u64) -> bool {
    acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

    fn model() -> DeviceModel {
        DeviceModel {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            pairs: 2,
            mtu: None,
            offloads: true,
        }
    }

    #[test]
    fn config_has_mac_link_up_and_pairs() {
        let c = model().read_config(0, 12);
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(model().read_config(6, 2), vec![1, 0]);
        assert_eq!(model().read_config(100, 4), vec![0; 4]);
    }

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let acked = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(
            tap_offload_flags(acked),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        assert!(model().features() & bit(VIRTIO_NET_F_MQ) != 0);
    }
}
