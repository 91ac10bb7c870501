//! The one test harness of the workspace: helpers the end-to-end tests in `tests/tests` and the
//! daemons' own tests (`backends/*/tests`) share, each in the module named after what it is.

pub mod api;
pub mod daemon;
pub mod frontend;
pub mod hostile;
pub mod image;
pub mod interop;
pub mod launch;
pub mod named;
pub mod nested;
pub mod netns;
pub mod openapi;
pub mod pattern;
pub mod vm;
pub mod wait;
pub mod workdir;
