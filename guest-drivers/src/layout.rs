//! Fixed layout constants shared by the guest and its build script, which generates the GDT
//! and IDT into the linker script from them (so no CPL-0 code has to build descriptor tables).

/// vCPUs the guest has stacks and TSSs for; a vCPU with a higher index parks at once.
pub const MAX_CPUS: usize = 64;

/// GDT selectors. User data sits just below user code, the order `syscall`/`sysret` expect,
/// although this guest never uses them (`sysretq` faults on the PVM hosts).
pub const KERNEL_CODE_SEL: u16 = 0x08;
pub const KERNEL_DATA_SEL: u16 = 0x10;
pub const USER_DATA_SEL: u16 = 0x20 | 3;
pub const USER_CODE_SEL: u16 = 0x28 | 3;
/// The TSS descriptor of vCPU `i` is the 16-byte system descriptor at `TSS_SEL_BASE + 16 * i`.
pub const TSS_SEL_BASE: u16 = 0x30;
/// GDT size in bytes: six 8-byte descriptors, then one 16-byte TSS descriptor per vCPU.
pub const GDT_BYTES: usize = TSS_SEL_BASE as usize + 16 * MAX_CPUS;

/// The TSS I/O permission bitmap covers ports `[0, IO_BITMAP_PORTS)`; the CPU refuses CPL-3
/// access to any port beyond the TSS limit, so higher ports need no bitmap bytes.
pub const IO_BITMAP_PORTS: usize = 0x400;
/// Offset of the I/O bitmap in the TSS (right after the 104-byte 64-bit TSS).
pub const TSS_IOMAP_BASE: usize = 0x68;
/// Bitmap bytes, plus the all-ones byte the CPU may read past the last port's byte.
pub const TSS_IOMAP_BYTES: usize = IO_BITMAP_PORTS / 8 + 1;
/// TSS descriptor limit (last valid byte offset).
pub const TSS_LIMIT: usize = TSS_IOMAP_BASE + TSS_IOMAP_BYTES - 1;
/// Distance between the per-vCPU TSSs in the TSS array.
pub const TSS_STRIDE: usize = 256;

/// Port ranges `(first, count)` CPL-3 code may use: COM1, the debug-exit port, splitvisor's
/// paravirtual console port, the primary ATA command block and the ATA control register.
/// Everything else raises #GP.
pub const GUEST_PORTS: [(u16, u16); 5] = [(0x3f8, 8), (0xf4, 1), (0xf8, 4), (0x1f0, 8), (0x3f6, 1)];

/// CPU exception vectors; all of them are fatal for this guest.
pub const EXCEPTION_VECTORS: usize = 32;
/// Exceptions that push an error code (the stubs push a zero for the others).
pub const VECTORS_WITH_ERROR_CODE: [usize; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
/// IDT entries (16 bytes each): the exceptions only. Parking uses the #BP gate (cpu.rs), as
/// `int N` through other DPL-3 gates raises #UD on the PVM hosts; a stray external interrupt
/// (vector >= 32) is beyond the IDT limit and raises #GP, which is reported.
pub const IDT_ENTRIES: usize = EXCEPTION_VECTORS;

/// Per-vCPU stacks: CPL 0 (the TSS `rsp0`, used only by exception and gate handlers) and CPL 3.
pub const KERNEL_STACK_SIZE: usize = 8 << 10;
pub const USER_STACK_SIZE: usize = 64 << 10;

/// The guest image's load address (the linker script's origin).
pub const IMAGE_BASE: u64 = 0x10_0000;
