//! The initramfs: read from its file into the top of low guest RAM, where Linux's boot
//! protocol wants it (below `initrd_addr_max`, clear of the kernel and the room it
//! decompresses into).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::RAM_HOLE_START;
use crate::memory::{self, GuestMemory};

/// Before boot protocol 2.03 the initrd had to end below this.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot open --initramfs {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    #[error("--initramfs {} is a directory; expected an initramfs file (a cpio archive, optionally compressed)", .0.display())]
    IsDirectory(PathBuf),
    #[error("--initramfs {} is empty", .0.display())]
    Empty(PathBuf),
    #[error("--initramfs {} ({} MiB) and the kernel (up to {} MiB) do not fit in {} MiB of guest memory; give the VM more --memory", .path.display(), .size.div_ceil(1 << 20), .kernel_end.div_ceil(1 << 20), .memory >> 20)]
    TooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        memory: u64,
    },
    #[error("cannot read --initramfs {} into guest memory", .0.display())]
    Read(PathBuf, #[source] vm_memory::GuestMemoryError),
}

/// Where the initramfs was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitramfs {
    pub addr: u64,
    pub size: u64,
}

/// Loads `path` as high as the kernel allows, above `kernel_end`.
pub fn load(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<LoadedInitramfs, InitramfsError> {
    if path.is_dir() {
        return Err(InitramfsError::IsDirectory(path.to_path_buf()));
    }
    let mut file = File::open(path).map_err(|e| InitramfsError::Open(path.to_path_buf(), e))?;
    let size = file
        .metadata()
        .map_err(|e| InitramfsError::Open(path.to_path_buf(), e))?
        .len();
    if size == 0 {
        return Err(InitramfsError::Empty(path.to_path_buf()));
    }
    let ram = memory::total_size(memory);
    let addr = placement(ram, size, kernel_end, header).ok_or(InitramfsError::TooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        memory: ram,
    })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| InitramfsError::Read(path.to_path_buf(), e))?;
    Ok(LoadedInitramfs { addr, size })
}

/// The page-aligned address for `size` bytes at the top of low RAM, below the kernel's
/// `initrd_addr_max`; `None` if that would reach down into the kernel.
pub fn placement(
    ram: u64,
    size: u64,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Option<u64> {
    let addr_max = match header {
        Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
        Some(_) => LEGACY_INITRD_ADDR_MAX,
        // A vmlinux has no header: any address below 4 GiB works.
        None => u64::from(u32::MAX),
    };
    let top = ram.min(RAM_HOLE_START).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE)).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    fn header(version: u16, addr_max: u32) -> setup_header {
        setup_header {
            version,
            initrd_addr_max: addr_max,
            ..Default::default()
        }
    }

    #[test]
    fn goes_to_the_top_of_low_ram_page_aligned() {
        let h = header(0x020f, 0x7fff_ffff);
        assert_eq!(
            placement(512 << 20, 5000, 64 << 20, Some(&h)),
            Some((512 << 20) - 8192)
        );
        // Below initrd_addr_max, however much RAM there is.
        assert_eq!(
            placement(8 << 30, 4096, 64 << 20, Some(&h)),
            Some((2 << 30) - 4096)
        );
        // RAM above the hole does not count: a vmlinux's initramfs stays below 3 GiB.
        assert_eq!(
            placement(8 << 30, 4096, 64 << 20, None),
            Some(RAM_HOLE_START - 4096)
        );
    }

    #[test]
    fn respects_initrd_addr_max() {
        let h = header(0x020f, 0x0fff_ffff);
        assert_eq!(
            placement(1 << 30, 4096, 64 << 20, Some(&h)),
            Some((256 << 20) - 4096)
        );
        let old = header(0x0202, 0);
        assert_eq!(
            placement(2 << 30, 4096, 64 << 20, Some(&old)),
            Some(LEGACY_INITRD_ADDR_MAX + 1 - 4096)
        );
    }

    #[test]
    fn refuses_to_overlap_the_kernel() {
        let h = header(0x020f, 0x7fff_ffff);
        assert_eq!(placement(64 << 20, 40 << 20, 32 << 20, Some(&h)), None);
        assert_eq!(placement(64 << 20, 100 << 20, 0, Some(&h)), None);
    }

    #[test]
    fn loads_the_file_bytes_and_names_bad_paths() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let path = std::env::temp_dir().join(format!("splitvisor-initrd-{}", std::process::id()));
        File::create(&path)
            .unwrap()
            .write_all(b"070701 cpio bytes")
            .unwrap();
        let loaded = load(&mem, &path, 16 << 20, None).unwrap();
        let mut back = [0u8; 17];
        mem.read_slice(&mut back, GuestAddress(loaded.addr))
            .unwrap();
        assert_eq!(&back, b"070701 cpio bytes");
        assert_eq!(loaded.size, 17);

        let too_big = load(&mem, &path, 64 << 20, None).unwrap_err();
        assert!(
            too_big.to_string().contains("do not fit in 64 MiB"),
            "{too_big}"
        );
        std::fs::remove_file(&path).unwrap();

        let dir = load(&mem, Path::new("/tmp"), 0, None).unwrap_err();
        assert!(
            dir.to_string().contains("--initramfs /tmp is a directory"),
            "{dir}"
        );
        let missing = load(&mem, Path::new("/nonexistent/initrd"), 0, None).unwrap_err();
        assert!(
            crate::error_chain(&missing).contains("/nonexistent/initrd: No such file"),
            "{}",
            crate::error_chain(&missing)
        );
    }
}
