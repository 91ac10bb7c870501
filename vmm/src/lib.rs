//! splitvisor-vmm: the splitvisor VMM as a library, whose disk and network devices run outside
//! it as vhost-user backend daemons: CPU and memory through KVM, a few tiny emulated devices,
//! the virtio-mmio transport and its notifiers, the vhost-user frontend and the control API.
//! It parses no command line and starts no process; the `splitvisor` binary (vmm/cli) does.

pub mod api;
pub mod attach;
pub mod boot;
pub mod bus;
pub mod config;
pub mod console;
pub mod device_state;
pub mod devices;
pub mod event_loop;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod pause;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod upgrade;
pub mod vcpu;
pub mod vcpu_kick;
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
