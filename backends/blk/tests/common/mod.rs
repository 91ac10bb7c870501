//! This crate's daemon binary bound to the shared test harness (`splitvisor_tests`: the daemon
//! process, the test vhost-user frontend, images).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::frontend::blk::IMAGE_SIZE;

/// The `splitvisor-blk` cargo built for these tests.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_splitvisor-blk"))
}

/// The daemon on `dir/blk.sock` serving `image`, logging to `dir/daemon.log`, waited for.
pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    start_with(dir, "daemon", image, extra, &[])
}

/// Like [`start`], logging to `dir/NAME.log`, with extra environment variables.
pub fn start_with(
    dir: &Path,
    name: &str,
    image: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    Daemon::spawn_blk(bin(), dir, name, image, extra, env).wait_serving()
}

/// The daemon on `dir/blk.sock`, logging to `dir/NAME.log`, not waited for (it may fail).
pub fn spawn(dir: &Path, name: &str, image: &Path, extra: &[&str]) -> Daemon {
    Daemon::spawn_blk(bin(), dir, name, image, extra, &[])
}

/// An empty image of [`IMAGE_SIZE`] bytes in `dir`.
pub fn make_image(dir: &Path) -> PathBuf {
    splitvisor_tests::image::zeroed(dir.join("disk.img"), IMAGE_SIZE)
}
