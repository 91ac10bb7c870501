//! The vhost-user protocol features each side of the socket wants or offers, and the queue
//! limit they share. Kept here so the VMM's wish list and the daemons' offers are read side
//! by side: a feature the VMM wants and no daemon offers is a feature nobody uses.

use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// The most virtqueues a device may have, in the VMM's transport and in splitvisor-blk
/// (`--queues`); splitvisor-net serves half as many RX/TX pairs. A u16 like the config
/// spaces' `num_queues` / `max_virtqueue_pairs`, so every wider use converts losslessly.
pub const MAX_QUEUES: u16 = 64;

/// What the VMM asks of backends; each is used only if the backend offers it. INFLIGHT_SHMFD
/// lets a restarted backend resubmit the requests its predecessor had in flight.
pub const FRONTEND_WANTS: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

/// What splitvisor-blk offers: everything the VMM wants (CONFIG only when the device has a
/// config space to answer with, which a block device always has).
pub const BLK_OFFERS: VhostUserProtocolFeatures = FRONTEND_WANTS;

/// What splitvisor-net offers today: no inflight tracking (see issue 9) and no memory slots.
pub const NET_OFFERS: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offer_is_something_the_vmm_wants() {
        assert!(FRONTEND_WANTS.contains(BLK_OFFERS));
        assert!(FRONTEND_WANTS.contains(NET_OFFERS));
        assert!(!NET_OFFERS.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert_eq!(MAX_QUEUES % 2, 0, "net serves MAX_QUEUES / 2 whole pairs");
    }
}
