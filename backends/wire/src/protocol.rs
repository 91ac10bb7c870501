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
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    // For live migration's pre-copy, from a backend whose server can log its writes.
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

/// What the vhost-user server both daemons are built on (splitvisor-vhost-server) offers,
/// plus CONFIG for a device with a config space (both have one) and LOG_SHMFD for one whose
/// queues it serves itself (splitvisor-blk).
pub const SERVER_OFFERS: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offer_is_something_the_vmm_wants() {
        let with_config = SERVER_OFFERS
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD;
        assert_eq!(
            FRONTEND_WANTS, with_config,
            "the VMM uses all the daemons offer"
        );
        assert_eq!(MAX_QUEUES % 2, 0, "net serves MAX_QUEUES / 2 whole pairs");
    }
}
