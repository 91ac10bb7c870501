//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod daemon;
pub mod inflight;
pub mod raw;
pub mod session;
pub mod vring;
