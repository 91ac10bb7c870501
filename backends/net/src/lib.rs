//! The frame path of splitvisor-net as a library, only for the fuzz targets in `fuzz/`
//! (feature `fuzzing`); without the feature this crate is empty and the daemon is `main.rs`.
#![cfg(feature = "fuzzing")]
// The modules are the daemon's; the library only calls the fuzzing entry points into them.
#![allow(dead_code)]

#[doc(hidden)]
pub mod fuzzing;
// As in main.rs: per-queue rate limiting of guest-caused logs, splitvisor-blk's too.
use splitvisor_wire::host::loglimit;
mod ring;
mod rxtx;
mod stats;
mod switch;
