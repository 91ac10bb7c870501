//! Kernel loading: a Linux bzImage, a Linux vmlinux (ELF), or the project's own guest (ELF),
//! told apart by their content, from a file or from the guest embedded in this binary.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, KernelLoaderResult};
use vm_memory::GuestAddress;

use crate::config::KernelSource;
use crate::layout;
use crate::memory::GuestMemory;

/// The guest built from `guest-drivers/` by build.rs.
pub static EMBEDDED_GUEST: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/splitvisor-guest.elf"));

/// The ELF note by which the project's guest says it follows splitvisor's boot contract
/// (`docs/boot-protocol.md`): owner "splitvisor", this type, a 4-byte contract version.
pub const SPLITVISOR_NOTE_NAME: &[u8] = b"splitvisor";
pub const SPLITVISOR_NOTE_TYPE: u32 = 1;

/// "HdrS" at offset 0x202 of a bzImage: the Linux boot protocol's setup header magic.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// The 64-bit entry point (`startup_64`) sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 added `xloadflags` and with it the promise of a 64-bit entry point.
const MIN_64BIT_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PT_NOTE: u32 = 4;
/// Notes larger than this are not boot notes; reading them whole would only cost memory.
const MAX_NOTE_SEGMENT: u64 = 1 << 20;

/// What `--kernel` turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// The project's guest: direct 64-bit entry with `hvm_start_info` (docs/boot-protocol.md).
    SplitvisorGuest,
    /// A compressed Linux kernel: 64-bit boot protocol with the zero page.
    LinuxBzImage,
    /// An uncompressed Linux kernel: 64-bit entry at the ELF entry point with the zero page.
    LinuxElf,
}

impl KernelFormat {
    pub fn is_linux(self) -> bool {
        !matches!(self, KernelFormat::SplitvisorGuest)
    }

    /// How `GET /vm` and messages name the guest.
    pub fn guest_kind(self) -> &'static str {
        if self.is_linux() {
            "linux"
        } else {
            "splitvisor guest"
        }
    }
}

/// A kernel in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// The first guest-physical address above everything the kernel occupies while it boots
    /// (for a bzImage: also the room it decompresses into).
    pub footprint_end: u64,
    /// A bzImage's setup header, the start of the zero page.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open --kernel {}: {source}; expected a Linux bzImage or vmlinux, or the splitvisor guest", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kernel {} is not a loadable kernel: {source}; expected a Linux bzImage, or an x86-64 ELF executable (a vmlinux or the splitvisor guest) linked at or above 1 MiB that fits in guest memory", .path.display())]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("--kernel {} is neither an ELF executable nor a Linux bzImage (no ELF magic, no \"HdrS\" at offset 0x202)", .0.display())]
    UnknownFormat(PathBuf),
    #[error("--kernel {} is a bzImage with boot protocol {}.{:02}, which has no 64-bit entry point; splitvisor needs protocol 2.12 or later with XLF_KERNEL_64 (Linux 3.8 or newer, built for x86-64)", .path.display(), .version >> 8, .version & 0xff)]
    NoLongModeEntry { path: PathBuf, version: u16 },
    #[error("cannot read --kernel {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("--kernel {} is a directory, not a kernel file", .0.display())]
    IsDirectory(PathBuf),
}

/// Loads the kernel into guest memory and says what it is and where it starts.
pub fn load(memory: &GuestMemory, source: &KernelSource) -> Result<LoadedKernel, KernelError> {
    match source {
        KernelSource::Embedded => load_image(
            memory,
            &mut Cursor::new(EMBEDDED_GUEST),
            Path::new("<embedded guest>"),
        ),
        KernelSource::File(path) => {
            if path.is_dir() {
                return Err(KernelError::IsDirectory(path.clone()));
            }
            let mut file = File::open(path).map_err(|source| KernelError::Open {
                path: path.clone(),
                source,
            })?;
            load_image(memory, &mut file, path)
        }
    }
}

fn load_image<F>(
    memory: &GuestMemory,
    image: &mut F,
    path: &Path,
) -> Result<LoadedKernel, KernelError>
where
    F: Read + Seek + vm_memory::ReadVolatile,
{
    let format = detect(image).map_err(|e| KernelError::Read(path.to_path_buf(), e))?;
    let load_error = |source| KernelError::Load {
        path: path.to_path_buf(),
        source,
    };
    let high_ram = Some(GuestAddress(layout::HIGH_RAM_START));
    match format {
        None => Err(KernelError::UnknownFormat(path.to_path_buf())),
        Some(format @ (KernelFormat::SplitvisorGuest | KernelFormat::LinuxElf)) => {
            let loaded = Elf::load(memory, None, image, high_ram).map_err(load_error)?;
            Ok(LoadedKernel {
                format,
                entry: loaded.kernel_load.0,
                footprint_end: loaded.kernel_end,
                setup_header: None,
            })
        }
        Some(KernelFormat::LinuxBzImage) => {
            let loaded = BzImage::load(memory, None, image, high_ram).map_err(load_error)?;
            bzimage_loaded(loaded, path)
        }
    }
}

fn bzimage_loaded(loaded: KernelLoaderResult, path: &Path) -> Result<LoadedKernel, KernelError> {
    // BzImage::load only succeeds with a setup header.
    let header = loaded.setup_header.unwrap_or_default();
    let version = header.version;
    if version < MIN_64BIT_BOOT_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelError::NoLongModeEntry {
            path: path.to_path_buf(),
            version,
        });
    }
    // The kernel decompresses itself at its preferred address (or, relocatable, near it) into
    // `init_size` bytes; nothing else may be placed there.
    let pref_address = header.pref_address;
    let init_size = u64::from(header.init_size);
    Ok(LoadedKernel {
        format: KernelFormat::LinuxBzImage,
        entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        footprint_end: loaded.kernel_end.max(pref_address + init_size),
        setup_header: Some(header),
    })
}

/// Tells the formats apart by content; `None` when it is none of them.
pub fn detect<F: Read + Seek>(image: &mut F) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if read_fully(image, &mut magic)? && &magic == ELF_MAGIC {
        let format = if has_splitvisor_note(image)? {
            KernelFormat::SplitvisorGuest
        } else {
            KernelFormat::LinuxElf
        };
        image.seek(SeekFrom::Start(0))?;
        return Ok(Some(format));
    }
    image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    let found = read_fully(image, &mut magic)? && u32::from_le_bytes(magic) == BZIMAGE_MAGIC;
    image.seek(SeekFrom::Start(0))?;
    Ok(found.then_some(KernelFormat::LinuxBzImage))
}

/// Reads `buf` whole; false when the file ends first.
fn read_fully<F: Read>(image: &mut F, buf: &mut [u8]) -> std::io::Result<bool> {
    match image.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a PT_NOTE segment of the ELF64 image holds the splitvisor note.
fn has_splitvisor_note<F: Read + Seek>(image: &mut F) -> std::io::Result<bool> {
    let mut header = [0u8; 64];
    image.seek(SeekFrom::Start(0))?;
    if !read_fully(image, &mut header)? {
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([header[0x36], header[0x37]]);
    let phnum = u16::from_le_bytes([header[0x38], header[0x39]]);
    if phentsize < 0x38 {
        return Ok(false);
    }
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 0x38];
        image.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))?;
        if !read_fully(image, &mut phdr)? {
            return Ok(false);
        }
        let p_type = u32::from_le_bytes(phdr[0..4].try_into().unwrap_or_default());
        let offset = u64::from_le_bytes(phdr[0x08..0x10].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(phdr[0x20..0x28].try_into().unwrap_or_default());
        if p_type != PT_NOTE || size > MAX_NOTE_SEGMENT {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        image.seek(SeekFrom::Start(offset))?;
        if read_fully(image, &mut notes)?
            && notes_contain(&notes, SPLITVISOR_NOTE_NAME, SPLITVISOR_NOTE_TYPE)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Walks ELF notes (namesz, descsz, type, name and desc each padded to 4 bytes).
pub fn notes_contain(mut notes: &[u8], name: &[u8], note_type: u32) -> bool {
    let word = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            b.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (word(notes, 0), word(notes, 1), word(notes, 2))
        else {
            return false;
        };
        let name_len = (namesz as usize).div_ceil(4) * 4;
        let desc_len = (descsz as usize).div_ceil(4) * 4;
        let Some(this_name) = notes.get(12..12 + namesz as usize) else {
            return false;
        };
        if kind == note_type && this_name.strip_suffix(b"\0").unwrap_or(this_name) == name {
            return true;
        }
        let Some(rest) = notes.get(12 + name_len + desc_len..) else {
            return false;
        };
        notes = rest;
    }
    false
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
