//! The Unix plumbing every splitvisor process needs, written once: the VMM, splitvisor-blk
//! and splitvisor-net bind their sockets, take their signals, print their errors, limit
//! guest-caused log lines, speak their small HTTP and lock disk images the same way.

pub mod error;
pub mod http;
pub mod imagelock;
pub mod loglimit;
pub mod signals;
pub mod slots;
pub mod socket;
pub mod stats_server;
