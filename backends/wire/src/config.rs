//! Typed views of the virtio-blk and virtio-net config spaces, over the layouts of
//! virtio-bindings' `virtio_blk_config` and `virtio_net_config`: the daemons build theirs with
//! these, the VMM reads (a prefix of) what a backend sent with the same types, so both sides
//! name the same fields instead of one side counting bytes.
//!
//! Fields are little-endian on the wire (virtio 1.0); the accessors convert.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config;
use virtio_bindings::virtio_net::{virtio_net_config, VIRTIO_NET_S_LINK_UP};
use vm_memory::ByteValued;

/// Copies what `bytes` has of a `T` over a zeroed one: a backend's config space may be
/// shorter than today's struct (the VMM reads a prefix, older backends send less).
fn from_prefix<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let slice = value.as_mut_slice();
    let n = slice.len().min(bytes.len());
    slice[..n].copy_from_slice(&bytes[..n]);
    value
}

/// Writes `value` back over the prefix of `bytes` it shares with it.
fn to_prefix<T: ByteValued>(value: &T, bytes: &mut [u8]) {
    let slice = value.as_slice();
    let n = slice.len().min(bytes.len());
    bytes[..n].copy_from_slice(&slice[..n]);
}

/// `struct virtio_blk_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlkConfig(pub virtio_blk_config);

// SAFETY: virtio_blk_config is a packed C struct of integers and byte arrays: no padding, no
// pointers, and every bit pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

impl BlkConfig {
    /// The bytes the VMM reads from a backend: up to the write-zeroes fields, which every
    /// backend it talks to knows (older ones reject larger reads).
    pub const READ_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

    /// The view of the first bytes of a config space (the rest reads as zero).
    pub fn from_prefix(bytes: &[u8]) -> Self {
        from_prefix(bytes)
    }

    /// Writes this view back over the bytes of `config` it covers.
    pub fn write_prefix(&self, config: &mut [u8]) {
        to_prefix(self, config)
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        u64::from_le(self.0.capacity)
    }
    pub fn set_capacity(&mut self, sectors: u64) {
        self.0.capacity = sectors.to_le();
    }
    /// Logical block size (with VIRTIO_BLK_F_BLK_SIZE).
    pub fn blk_size(&self) -> u32 {
        u32::from_le(self.0.blk_size)
    }
    pub fn set_blk_size(&mut self, bytes: u32) {
        self.0.blk_size = bytes.to_le();
    }
    /// Segments per request (with VIRTIO_BLK_F_SEG_MAX).
    pub fn set_seg_max(&mut self, segments: u32) {
        self.0.seg_max = segments.to_le();
    }
    /// Queue count (with VIRTIO_BLK_F_MQ).
    pub fn num_queues(&self) -> u16 {
        u16::from_le(self.0.num_queues)
    }
    pub fn set_num_queues(&mut self, queues: u16) {
        self.0.num_queues = queues.to_le();
    }
    /// Discard limits (with VIRTIO_BLK_F_DISCARD): sectors per range, ranges per request,
    /// and the granularity hint in sectors.
    pub fn set_discard(&mut self, max_sectors: u32, max_seg: u32, sector_alignment: u32) {
        self.0.max_discard_sectors = max_sectors.to_le();
        self.0.max_discard_seg = max_seg.to_le();
        self.0.discard_sector_alignment = sector_alignment.to_le();
    }
    /// Write-zeroes limits (with VIRTIO_BLK_F_WRITE_ZEROES) and whether it may unmap.
    pub fn set_write_zeroes(&mut self, max_sectors: u32, max_seg: u32, may_unmap: bool) {
        self.0.max_write_zeroes_sectors = max_sectors.to_le();
        self.0.max_write_zeroes_seg = max_seg.to_le();
        self.0.write_zeroes_may_unmap = u8::from(may_unmap);
    }
}

/// `struct virtio_net_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetConfig(pub virtio_net_config);

// SAFETY: virtio_net_config is a packed C struct of integers and byte arrays: no padding, no
// pointers, and every bit pattern is a valid value.
unsafe impl ByteValued for NetConfig {}

impl NetConfig {
    /// The bytes the VMM reads from a backend and splitvisor-net defines: mac, status,
    /// max_virtqueue_pairs and mtu (the rest is for features neither side offers).
    pub const READ_LEN: usize = offset_of!(virtio_net_config, speed);

    /// The view of the first bytes of a config space (the rest reads as zero).
    pub fn from_prefix(bytes: &[u8]) -> Self {
        from_prefix(bytes)
    }

    /// Writes this view back over the bytes of `config` it covers.
    pub fn write_prefix(&self, config: &mut [u8]) {
        to_prefix(self, config)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.0.mac
    }
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.0.mac = mac;
    }
    /// VIRTIO_NET_S_LINK_UP in `status` (with VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> bool {
        u16::from_le(self.0.status) & VIRTIO_NET_S_LINK_UP as u16 != 0
    }
    pub fn set_link_up(&mut self, up: bool) {
        let mut status = u16::from_le(self.0.status);
        if up {
            status |= VIRTIO_NET_S_LINK_UP as u16;
        } else {
            status &= !(VIRTIO_NET_S_LINK_UP as u16);
        }
        self.0.status = status.to_le();
    }
    /// RX/TX queue pairs (with VIRTIO_NET_F_MQ).
    pub fn max_virtqueue_pairs(&self) -> u16 {
        u16::from_le(self.0.max_virtqueue_pairs)
    }
    pub fn set_max_virtqueue_pairs(&mut self, pairs: u16) {
        self.0.max_virtqueue_pairs = pairs.to_le();
    }
    /// Advertised MTU (with VIRTIO_NET_F_MTU).
    pub fn mtu(&self) -> u16 {
        u16::from_le(self.0.mtu)
    }
    pub fn set_mtu(&mut self, mtu: u16) {
        self.0.mtu = mtu.to_le();
    }
}

// The views are the bindings' layouts, byte for byte.
const _: () = assert!(size_of::<BlkConfig>() == size_of::<virtio_blk_config>());
const _: () = assert!(size_of::<NetConfig>() == size_of::<virtio_net_config>());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_fields_land_where_the_spec_puts_them() {
        let mut c = BlkConfig::default();
        c.set_capacity(0x0102_0304_0506_0708);
        c.set_blk_size(512);
        c.set_num_queues(3);
        c.set_write_zeroes(1, 2, true);
        let bytes = c.as_slice();
        assert_eq!(&bytes[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[20..24], &512u32.to_le_bytes());
        assert_eq!(&bytes[34..36], &[3, 0]);
        assert_eq!(bytes[56], 1);
        assert_eq!(BlkConfig::READ_LEN, 60);
        // A short config space reads as zero past its end, and writes back only its prefix.
        let view = BlkConfig::from_prefix(&bytes[..24]);
        assert_eq!(
            (view.capacity(), view.blk_size(), view.num_queues()),
            (c.capacity(), 512, 0)
        );
        let mut short = [0u8; 10];
        view.write_prefix(&mut short);
        assert_eq!(&short[..8], &bytes[..8]);
    }

    #[test]
    fn net_fields_land_where_the_spec_puts_them() {
        let mut c = NetConfig::default();
        c.set_mac([0x52, 0x54, 0, 1, 2, 3]);
        c.set_link_up(true);
        c.set_max_virtqueue_pairs(2);
        c.set_mtu(1500);
        let bytes = c.as_slice();
        assert_eq!(
            &bytes[..12],
            &[0x52, 0x54, 0, 1, 2, 3, 1, 0, 2, 0, 0xdc, 0x05]
        );
        assert_eq!(NetConfig::READ_LEN, 12);
        let mut view = NetConfig::from_prefix(&bytes[..8]);
        assert!(view.link_up());
        assert_eq!(view.max_virtqueue_pairs(), 0);
        view.set_link_up(false);
        assert_eq!(view.as_slice()[6], 0);
    }
}
