//! Builds the project's own guest (`guest-drivers/`) and embeds it, so that `splitvisor run`
//! without `--kernel` boots a working guest on a fresh checkout after one build.
//!
//! The guest is a separate cargo workspace (it needs `panic = "abort"` and its own link flags),
//! so it is built by a nested `cargo build` into a target directory of its own; nothing of the
//! outer build's environment that would change its flags is passed down.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../guest-drivers");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let embedded = out_dir.join("splitvisor-guest.elf");

    for watched in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed=SPLITVISOR_GUEST_ELF");

    // An already-built guest can be supplied instead (packagers, cross builds).
    if let Some(prebuilt) = env::var_os("SPLITVISOR_GUEST_ELF").filter(|p| !p.is_empty()) {
        copy(Path::new(&prebuilt), &embedded);
        return;
    }
    if !guest_dir.join("Cargo.toml").exists() {
        panic!(
            "guest-drivers/Cargo.toml not found next to vmm/: the embedded guest cannot be built"
        );
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = guest_target_dir(&out_dir);
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags (coverage, sanitizers, a different target) must not leak into
    // the freestanding guest; its flags come from guest-drivers/.cargo/config.toml.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build the guest: {e}"));
    if !status.success() {
        panic!("building the guest in guest-drivers/ failed ({status}); see the errors above");
    }
    copy(&target_dir.join("release/splitvisor-guest"), &embedded);
}

/// Shares one guest build between the debug and release builds of the VMM: the guest is
/// always built in release mode, so `target/guest` is enough.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/splitvisor-vmm-<hash>/out.
    out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("guest"))
        .unwrap_or_else(|| out_dir.join("guest-target"))
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying the guest ELF {} failed: {e}", from.display()));
}
