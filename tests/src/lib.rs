//! Shared helpers for the end-to-end tests.

pub mod interop;
pub mod vm;
