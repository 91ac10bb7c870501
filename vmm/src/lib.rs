//! splitvisor: a KVM virtual machine monitor whose disk and network devices run outside it, as
//! vhost-user backend daemons. This crate is the VMM: CPU and memory through KVM, a few tiny
//! emulated devices, and the control plane of the vhost-user devices.

pub mod api;
pub mod attach;
pub mod backend_stats;
pub mod bench;
pub mod bench_net;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod ctl;
pub mod ctl_backends;
pub mod device_keys;
pub mod devices;
pub mod event_loop;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod launch;
pub mod layout;
pub mod list;
pub mod memory;
pub mod pause;
pub mod registry;
pub mod seccomp;
pub mod stats;
pub mod terminal;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod vm;
pub mod vm_end;

/// The MAC and MTU checks splitvisor-net makes too.
pub use splitvisor_wire::device_values;
/// "what failed: because: because", each cause once: how every splitvisor process shows errors.
pub use splitvisor_wire::host::error::error_chain;

/// `eprintln!`, but the line reaches stderr in one write(2): launch, the VMM it starts and its
/// daemons share a stderr, and `eprintln!` writes a line piece by piece, so another process's
/// line could land inside it.
#[macro_export]
macro_rules! eprintln_whole {
    ($($arg:tt)*) => {
        $crate::eprint_line(&format!($($arg)*))
    };
}

#[doc(hidden)]
pub use splitvisor_wire::host::error::eprint_line;
