//! Kernel loading: an x86-64 ELF (the project's guest or a Linux `vmlinux`) through
//! linux-loader, from a file or from the guest embedded in this binary.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::config::KernelSource;
use crate::layout;
use crate::memory::GuestMemory;

/// The guest built from `guest-drivers/` by build.rs.
pub static EMBEDDED_GUEST: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/splitvisor-guest.elf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open --kernel {}: {source}; expected a path to an x86-64 ELF kernel", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kernel {} is not a loadable kernel: {source}; expected an x86-64 ELF executable (a vmlinux or the splitvisor guest) linked at or above 1 MiB that fits in guest memory", .path.display())]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("--kernel {} is a directory, not a kernel file", .0.display())]
    IsDirectory(PathBuf),
}

/// Loads the kernel's segments into guest memory and returns its 64-bit entry point.
pub fn load(memory: &GuestMemory, source: &KernelSource) -> Result<u64, KernelError> {
    let (result, path) = match source {
        KernelSource::Embedded => {
            let mut image = Cursor::new(EMBEDDED_GUEST);
            (load_elf(memory, &mut image), Path::new("<embedded guest>"))
        }
        KernelSource::File(path) => {
            if path.is_dir() {
                return Err(KernelError::IsDirectory(path.clone()));
            }
            let mut file = File::open(path).map_err(|source| KernelError::Open {
                path: path.clone(),
                source,
            })?;
            (load_elf(memory, &mut file), path.as_path())
        }
    };
    result.map_err(|source| KernelError::Load {
        path: path.to_path_buf(),
        source,
    })
}

fn load_elf<F>(memory: &GuestMemory, image: &mut F) -> Result<u64, linux_loader::loader::Error>
where
    F: std::io::Read + std::io::Seek + vm_memory::ReadVolatile,
{
    let loaded = Elf::load(
        memory,
        None,
        image,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )?;
    Ok(loaded.kernel_load.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn embedded_guest_loads_above_one_mib() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let entry = load(&mem, &KernelSource::Embedded).unwrap();
        assert!(entry >= layout::HIGH_RAM_START, "entry {entry:#x}");
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let err = load(&mem, &KernelSource::File("/nonexistent/vmlinux".into())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn non_elf_file_is_rejected() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let mut file = tempfile();
        file.1
            .write_all(b"this is not an ELF file at all, just text")
            .unwrap();
        let err = load(&mem, &KernelSource::File(file.0.clone())).unwrap_err();
        assert!(matches!(err, KernelError::Load { .. }), "{err}");
        assert!(
            err.to_string().contains("is not a loadable kernel"),
            "{err}"
        );
        std::fs::remove_file(file.0).unwrap();
    }

    #[test]
    fn kernel_larger_than_memory_is_rejected() {
        // The embedded guest does not fit in a VM with less memory than its load address.
        let mem = create_guest_memory(1 << 20, false).unwrap();
        assert!(matches!(
            load(&mem, &KernelSource::Embedded),
            Err(KernelError::Load { .. })
        ));
    }

    fn tempfile() -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("splitvisor-notelf-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        (path, file)
    }
}
