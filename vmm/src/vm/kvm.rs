//! Opening KVM and creating the VM with its guest memory registered: the part of building a
//! VM that is the same for a boot, a restore and a live upgrade.

use std::fs::File;
use std::path::PathBuf;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use log::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{VmError, DEFAULT_KVM_DEVICE, MAX_XAPIC_VCPUS};
use crate::config::VmConfig;
use crate::layout;
use crate::memory::{self, GuestMemory};

/// KVM, the VM with its memory registered, and the in-kernel interrupt controllers.
/// With `memory_file`, guest RAM is that memfd (a live upgrade's, mapped as it is) instead of a
/// new one.
pub fn create_kvm_vm(
    config: &VmConfig,
    memory_file: Option<&File>,
) -> Result<(Kvm, VmFd, GuestMemory), VmError> {
    let kvm = open_kvm()?;
    let max = kvm.get_max_vcpus().min(MAX_XAPIC_VCPUS);
    if usize::from(config.vcpus) > max {
        return Err(VmError::TooManyVcpus {
            requested: config.vcpus,
            max,
        });
    }
    let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    let memory = match memory_file {
        Some(file) => memory::map_guest_memory(file, config.memory.0)?,
        None => memory::create_guest_memory(config.memory.0, config.prefault)?,
    };
    register_memory(&vm_fd, &memory)?;
    vm_fd
        .set_tss_address(layout::RAM_HOLE_END as usize - 0x3000)
        .map_err(VmError::TssAddress)?;
    vm_fd.create_irq_chip().map_err(VmError::Irqchip)?;
    Ok((kvm, vm_fd, memory))
}

fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var_os("SPLITVISOR_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE));
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::OpenKvm {
            path: path.clone(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
            hint: "the path contains a NUL byte",
        }
    })?;
    Kvm::new_with_path(&c_path).map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => "splitvisor needs KVM: load the kvm module for this CPU (kvm_intel, kvm_amd or kvm_pvm) or run on a host with hardware virtualization",
            libc::EACCES | libc::EPERM => "add your user to the group that owns it (usually 'kvm') or run as root",
            _ => "splitvisor needs a working KVM device",
        };
        VmError::OpenKvm { path, source, hint }
    })
}

/// Whether this host's KVM is PVM (pagetable-based virtualization): it runs guest user mode
/// natively but emulates guest kernel mode instruction by instruction.
fn host_kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Linux spends its boot in kernel mode; on PVM that is ~1000x slower than on VMX/SVM.
pub fn warn_if_pvm() {
    if host_kvm_is_pvm() {
        warn!(
            "this host's KVM is PVM (module kvm_pvm), which emulates guest kernel-mode code: a Linux guest will not boot in useful time here; use a host with VMX or SVM"
        );
    }
}

fn register_memory(vm: &VmFd, memory: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let start = region.start_addr().0;
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: start,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping belongs to `memory`, which the `Vm` keeps alive as long as the
        // VM fd (and so the memslot) exists; the slots do not overlap.
        unsafe { vm.set_user_memory_region(mapping) }.map_err(|e| VmError::MapMemory(start, e))?;
    }
    Ok(())
}
