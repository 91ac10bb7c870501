//! splitvisor-wire: what both sides of a vhost-user socket agree on, in one place: the VMM
//! (frontend) and the splitvisor-blk / splitvisor-net daemons (backends) read and write the
//! same bytes through these types instead of each describing them in its own way.
//!
//! - [`config`]: typed views of the virtio-blk and virtio-net config spaces;
//! - [`ring`]: split-virtqueue sizes and offsets;
//! - [`protocol`]: the vhost-user protocol features each side wants or offers, `MAX_QUEUES`;
//! - [`stats`]: the schema of the daemons' `STATS` line and `GET /stats`;
//! - [`device_values`]: what is a usable MAC and MTU;
//! - [`host`]: the Unix plumbing every splitvisor process needs (sockets, signals, error
//!   chains, log limiting, the small HTTP server, image locks).

pub mod config;
pub mod device_values;
pub mod host;
pub mod protocol;
pub mod ring;
pub mod stats;

pub use protocol::MAX_QUEUES;
