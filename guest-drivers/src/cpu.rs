//! CPU structures and privileged paths: the per-vCPU TSSs (rsp0 and the I/O permission bitmap),
//! the exception stubs and fatal exception report, and the park path APs finish in.
//!
//! The GDT and IDT themselves are generated into the linker script by build.rs; this file owns
//! the code they point at. Exceptions from CPL 3 arrive on the vCPU's own CPL-0 stack (TSS
//! rsp0), so the CPL-3 red zone is never touched; nothing here returns to the interrupted code.

use crate::layout::{
    GUEST_PORTS, IO_BITMAP_PORTS, MAX_CPUS, TSS_IOMAP_BASE, TSS_IOMAP_BYTES, TSS_LIMIT, TSS_STRIDE,
};
use crate::serial;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

/// One vCPU's 64-bit TSS and its I/O bitmap, padded to the stride the generated GDT assumes.
#[repr(C, align(256))]
struct Tss([u8; TSS_STRIDE]);

const _: () = assert!(core::mem::size_of::<Tss>() == TSS_STRIDE);
const _: () = assert!(TSS_LIMIT < TSS_STRIDE);

/// The TSS of every possible vCPU, fully formed at link time except `rsp0`, which the boot
/// stub stores (at CPL 0) before `ltr`. Rust code never touches it: the CPU reads it.
#[no_mangle]
static mut SPLITVISOR_TSS: [Tss; MAX_CPUS] = [const { tss_image() }; MAX_CPUS];

/// A TSS whose I/O bitmap allows exactly `GUEST_PORTS`: a clear bit opens a port, and the CPU
/// needs a trailing all-ones byte as it reads two bitmap bytes per access.
const fn tss_image() -> Tss {
    let mut bytes = [0u8; TSS_STRIDE];
    bytes[0x66] = TSS_IOMAP_BASE as u8;
    bytes[0x67] = (TSS_IOMAP_BASE >> 8) as u8;
    let mut i = 0;
    while i < TSS_IOMAP_BYTES {
        bytes[TSS_IOMAP_BASE + i] = 0xff;
        i += 1;
    }
    let mut range = 0;
    while range < GUEST_PORTS.len() {
        let (first, count) = GUEST_PORTS[range];
        let mut port = first as usize;
        while port < first as usize + count as usize {
            assert!(port < IO_BITMAP_PORTS, "guest port beyond the I/O bitmap");
            bytes[TSS_IOMAP_BASE + port / 8] &= !(1 << (port % 8));
            port += 1;
        }
        range += 1;
    }
    Tss(bytes)
}

core::arch::global_asm!(
    ".text",
    // One stub per exception vector: make the frame uniform (error code, then vector on top of
    // the CPU's rip/cs/rflags/rsp/ss) and go to the common path.
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".globl splitvisor_exception_\\vector",
    "splitvisor_exception_\\vector:",
    // A breakpoint whose return address is the one in `splitvisor_park` is a park request.
    ".if \\vector == 3",
    "    cmpq $splitvisor_park_return, (%rsp)",
    "    je splitvisor_park_gate",
    ".endif",
    ".if (\\vector == 8) || ((\\vector >= 10) && (\\vector <= 14)) || (\\vector == 17) || (\\vector == 21) || (\\vector == 29) || (\\vector == 30)",
    ".else",
    "    pushq $0",
    ".endif",
    "    pushq $\\vector",
    "    jmp splitvisor_exception_common",
    ".endr",
    "splitvisor_exception_common:",
    "    movq %rsp, %rdi",
    "    andq $-16, %rsp",
    "    call splitvisor_exception",
    "    ud2",
    // Where parked vCPUs stop: CPL 0, interrupts off, halted for good.
    "splitvisor_park_gate:",
    "    cli",
    "1:  hlt",
    "    jmp 1b",
    // Parking from CPL 3: `int3` through its DPL-3 gate, recognised by the return address.
    // (`int 0x81` through a DPL-3 gate raises #UD on the PVM hosts; int3 works everywhere.)
    ".globl splitvisor_park",
    "splitvisor_park:",
    "    int3",
    "splitvisor_park_return:",
    "    jmp splitvisor_park",
    options(att_syntax),
);

/// What the exception stubs leave on the CPL-0 stack.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Reports an unexpected exception and ends the VM with status 3. Runs at CPL 0 (emulated,
/// slow, but this is the fatal path) on the vCPU's own rsp0 stack.
#[no_mangle]
extern "C" fn splitvisor_exception(frame: &ExceptionFrame) -> ! {
    static REPORTING: AtomicBool = AtomicBool::new(false);
    // A fault while reporting (or a second vCPU faulting) must not recurse or interleave.
    if REPORTING.swap(true, Ordering::AcqRel) {
        serial::exit(3);
    }
    let mut console = serial::Console::new_unlocked();
    let _ = write!(
        console,
        "\nEXCEPTION vector={} error={:#x} rip={:#x} cpl={} rsp={:#x} rflags={:#x}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.cs & 3,
        frame.rsp,
        frame.rflags
    );
    if frame.vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects; this handler runs at CPL 0.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        let _ = write!(console, " cr2={cr2:#x}");
    }
    let _ = writeln!(console, " ss={:#x}", frame.ss);
    serial::exit(3)
}

extern "C" {
    /// `int3` from a known address, which the #BP stub turns into a halt at CPL 0.
    fn splitvisor_park() -> !;
}

/// Stops the calling vCPU for good: it halts at CPL 0 with interrupts off.
pub fn park() -> ! {
    // SAFETY: splitvisor_park (assembly above) never returns and touches no memory of ours;
    // it works from CPL 3 and from CPL 0 (the fatal exception path).
    unsafe { splitvisor_park() }
}

/// The time-stamp counter (readable at CPL 3 unless CR4.TSD is set, which nobody sets here).
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the TSC into EDX:EAX.
    unsafe { core::arch::x86_64::_rdtsc() }
}
