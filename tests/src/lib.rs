//! Shared helpers for the end-to-end tests.

pub mod api;
pub mod hostile;
pub mod interop;
pub mod launch;
pub mod named;
pub mod nested;
pub mod openapi;
pub mod pattern;
pub mod vm;
