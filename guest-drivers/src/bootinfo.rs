//! Boot information: the PVH `hvm_start_info` (command line, e820 memory map), copied into the
//! image before anything may overwrite it, plus the vCPU count from the MP table.

use crate::mptable;
use core::cell::UnsafeCell;
use core::ptr;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const MAX_CMDLINE: usize = 4096;
const MAX_MEMMAP: usize = 128;
pub const MIB: u64 = 1 << 20;

/// One e820 memory map entry, as in `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    reserved: u32,
}

impl E820Entry {
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the guest learned about its machine at boot.
pub struct BootInfo {
    pub cmdline: &'static str,
    pub memmap: &'static [E820Entry],
    /// vCPUs listed in the MP table, or 1 without one.
    pub vcpus: u32,
    pub has_mp_table: bool,
    /// End of the identity map: all RAM on the direct entry, 4 GiB on the PVH path.
    pub mapped_end: u64,
}

impl BootInfo {
    /// Total e820 RAM, rounded up to whole MiB.
    pub fn memory_mib(&self) -> u64 {
        let bytes: u64 = self
            .memmap
            .iter()
            .filter(|e| e.is_ram())
            .map(|e| e.size)
            .sum();
        bytes.div_ceil(MIB)
    }
}

/// `hvm_start_info` version 1 (xen/include/public/arch-x86/hvm/start_info.h).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// Image-owned copies: the loader's copies may live in RAM the memory self-test overwrites.
struct Saved {
    cmdline: UnsafeCell<[u8; MAX_CMDLINE]>,
    memmap: UnsafeCell<[E820Entry; MAX_MEMMAP]>,
}

// SAFETY: written once by the BSP in `parse` before any reference is handed out; read-only after.
unsafe impl Sync for Saved {}

static SAVED: Saved = Saved {
    cmdline: UnsafeCell::new([0; MAX_CMDLINE]),
    memmap: UnsafeCell::new(
        [E820Entry {
            addr: 0,
            size: 0,
            kind: 0,
            reserved: 0,
        }; MAX_MEMMAP],
    ),
};

/// Reads the start info at `paddr`. Call once, on the BSP, before the memory is reused.
pub fn parse(paddr: u64) -> Result<BootInfo, &'static str> {
    if paddr == 0 || !paddr.is_multiple_of(8) {
        return Err("no hvm_start_info (RBX/EBX is 0 or misaligned)");
    }
    // SAFETY: the loader put a start info at `paddr`; all RAM is identity mapped and readable
    // at CPL 3. The read is volatile as the compiler knows nothing about this memory.
    let info = unsafe { ptr::read_volatile(paddr as *const StartInfo) };
    if info.magic != START_INFO_MAGIC {
        return Err("hvm_start_info has a bad magic number");
    }
    if info.version < 1 || info.memmap_entries == 0 {
        return Err("hvm_start_info has no e820 memory map (version 0 or no entries)");
    }
    // SAFETY: called once by the BSP before any other code reads SAVED (see `Saved`).
    let cmdline_buf = unsafe { &mut *SAVED.cmdline.get() };
    let len = copy_cstr(info.cmdline_paddr, cmdline_buf);
    let cmdline =
        core::str::from_utf8(&cmdline_buf[..len]).map_err(|_| "the command line is not UTF-8")?;

    let count = (info.memmap_entries as usize).min(MAX_MEMMAP);
    // SAFETY: as above, the only access to the memmap copy until the shared borrow below.
    let memmap_buf = unsafe { &mut *SAVED.memmap.get() };
    for (i, slot) in memmap_buf.iter_mut().take(count).enumerate() {
        let entry = info.memmap_paddr + (i * core::mem::size_of::<E820Entry>()) as u64;
        // SAFETY: the loader's memory map table has `memmap_entries` entries at memmap_paddr.
        *slot = unsafe { ptr::read_unaligned(entry as *const E820Entry) };
    }
    let vcpus = mptable::count_cpus();
    Ok(BootInfo {
        cmdline,
        memmap: &memmap_buf[..count],
        vcpus: vcpus.unwrap_or(1),
        has_mp_table: vcpus.is_some(),
        mapped_end: if crate::boot::booted_via_pvh() {
            4 << 30
        } else {
            u64::MAX
        },
    })
}

/// Copies the NUL-terminated string at `paddr` (possibly absent) into `buf`; returns its length.
fn copy_cstr(paddr: u64, buf: &mut [u8]) -> usize {
    if paddr == 0 {
        return 0;
    }
    for (i, slot) in buf.iter_mut().enumerate() {
        // SAFETY: the loader placed a NUL-terminated command line at paddr, identity mapped.
        let byte = unsafe { ptr::read_volatile((paddr + i as u64) as *const u8) };
        if byte == 0 {
            return i;
        }
        *slot = byte;
    }
    buf.len()
}
