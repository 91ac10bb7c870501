//! The serial console (8250/16550 UART at COM1, polled) with `print!`/`println!` and polled
//! input (`read_byte`), and the debug-exit port that ends the VM with a status byte.
//!
//! On the PVM hosts every port access from CPL 3 is a VM exit costing ~100 us, so the writer
//! checks the line status once per 16 bytes (the 16550 FIFO depth) rather than once per byte;
//! and under splitvisor, which answers a magic value on its paravirtual console port, a locked
//! console collects its output and hands each line over with one 32-bit `out` of the buffer's
//! address (`u16 len; bytes`, identity mapped: the address is guest-physical) - one exit per
//! line instead of one per character. Under another VMM the port reads as all ones and the
//! UART is used as before.

use crate::cpu;
use crate::port::{inb, outb};
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (DLAB = 0)
const RBR: u16 = COM1; // receive buffer register (DLAB = 0, read)
const DLL: u16 = COM1; // divisor latch low (DLAB = 1)
const IER: u16 = COM1 + 1;
const DLM: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
const FIFO_DEPTH: u32 = 16;

/// Writing a byte here ends the VM with that status (splitvisor, QEMU's isa-debug-exit).
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// splitvisor's paravirtual console: a 32-bit read answers `PV_MAGIC`, a 32-bit write of a
/// buffer's address prints it (vmm/src/devices/pv_console.rs).
const PV_CONSOLE_PORT: u16 = 0xf8;
const PV_MAGIC: u32 = 0x5356_434e;
/// Bytes one console handle collects before it hands them over.
const PV_LINE: usize = 254;
/// Whether the paravirtual console answered at `init`.
static PV: AtomicBool = AtomicBool::new(false);

/// Serialises whole lines between vCPUs.
static LOCK: AtomicBool = AtomicBool::new(false);
/// Bytes that may still be written before the FIFO must be checked again.
static TX_BUDGET: AtomicU32 = AtomicU32::new(0);

/// Programs COM1 for 115200 8N1 with FIFOs on. Harmless on emulated UARTs that ignore it.
pub fn init() {
    outb(IER, 0); // polled: no interrupts
    outb(LCR, 0x80); // DLAB on to set the divisor
    outb(DLL, 1); // 115200 baud
    outb(DLM, 0);
    outb(LCR, 0x03); // 8 data bits, no parity, one stop bit, DLAB off
    outb(FCR, 0xc7); // enable and clear FIFOs
    outb(MCR, 0x03); // DTR, RTS
    PV.store(inl(PV_CONSOLE_PORT) == PV_MAGIC, Ordering::Relaxed);
}

/// 32-bit port read (the paravirtual console's probe).
fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O touches no memory; the port is in this guest's I/O bitmap.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Whether this code runs at CPL 3. The exception handlers print at CPL 0, where the PVM hosts
/// emulate every instruction and cannot emulate a 32-bit `out`: they use the UART.
fn at_user_level() -> bool {
    let cs: u16;
    // SAFETY: reads the CS selector; no memory, no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    cs & 3 == 3
}

/// One line for the paravirtual console, in the layout the VMM reads.
#[repr(C)]
struct PvLine {
    len: u16,
    bytes: [u8; PV_LINE],
}

/// The one line being collected: only the holder of `LOCK` touches it. A static rather than a
/// field keeps `Console` one byte, which the CPL-0 exception path builds and moves without SSE
/// (the PVM hosts cannot emulate SSE instructions at CPL 0).
struct SharedLine(UnsafeCell<PvLine>);
// SAFETY: accessed only by the vCPU holding `LOCK` (see `Console::line`).
unsafe impl Sync for SharedLine {}
static LINE: SharedLine = SharedLine(UnsafeCell::new(PvLine {
    len: 0,
    bytes: [0; PV_LINE],
}));

/// A handle on the UART. `lock()` is the normal way in; `new_unlocked` is for the fatal paths
/// (exception report), which must not wait for a lock another vCPU may hold forever.
pub struct Console {
    locked: bool,
}

impl Console {
    pub fn lock() -> Console {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Console { locked: true }
    }

    /// The fatal paths write straight to the UART: nothing is held back if they never return.
    pub fn new_unlocked() -> Console {
        Console { locked: false }
    }

    fn put(&mut self, byte: u8) {
        if self.locked && PV.load(Ordering::Relaxed) && at_user_level() {
            let line = self.line();
            let at = usize::from(line.len);
            line.bytes[at] = byte;
            line.len += 1;
            if byte == b'\n' || at + 1 == PV_LINE {
                self.hand_over();
            }
            return;
        }
        self.put_uart(byte);
    }

    /// Gives the collected bytes to the paravirtual console, or to the UART when the buffer
    /// is not addressable with 32 bits.
    fn hand_over(&mut self) {
        if !self.locked {
            return;
        }
        let line = self.line();
        let len = usize::from(line.len);
        if len == 0 {
            return;
        }
        let addr = line as *const PvLine as u64;
        match u32::try_from(addr) {
            Ok(addr) => {
                // The buffer must be in memory before the VMM reads it at the exit.
                core::sync::atomic::compiler_fence(Ordering::SeqCst);
                // SAFETY: port I/O; the VMM only reads the buffer at `addr` during the exit.
                // No `nomem`: the writes to the buffer must not move past the `out`.
                unsafe {
                    core::arch::asm!("out dx, eax", in("dx") PV_CONSOLE_PORT, in("eax") addr, options(nostack, preserves_flags))
                };
            }
            Err(_) => {
                for i in 0..len {
                    let byte = self.line().bytes[i];
                    self.put_uart(byte);
                }
            }
        }
        self.line().len = 0;
    }

    /// The shared line; only a locked handle may call this.
    #[allow(clippy::mut_from_ref)]
    fn line(&self) -> &mut PvLine {
        debug_assert!(self.locked);
        // SAFETY: this handle holds `LOCK`, so no other handle touches `LINE` until it drops;
        // the reference does not outlive the calls of this handle that take it.
        unsafe { &mut *LINE.0.get() }
    }

    fn put_uart(&mut self, byte: u8) {
        // Budget accounting is racy only on the unlocked fatal path, where an occasional
        // early write into a full FIFO merely loses a character on real hardware.
        if TX_BUDGET.load(Ordering::Relaxed) == 0 {
            let mut spins = 0u32;
            // Bounded: a missing UART reads as 0xff (empty), a stuck one must not hang us.
            while inb(LSR) & LSR_THR_EMPTY == 0 && spins < 1_000_000 {
                core::hint::spin_loop();
                spins += 1;
            }
            TX_BUDGET.store(FIFO_DEPTH, Ordering::Relaxed);
        }
        TX_BUDGET.fetch_sub(1, Ordering::Relaxed);
        outb(THR, byte);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.hand_over();
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.put(b));
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments, newline: bool) {
    let mut console = Console::lock();
    let _ = console.write_fmt(args);
    if newline {
        console.put(b'\n');
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*), false) };
}

/// Prints a line to the serial console; the line is not interleaved with other vCPUs' output.
#[macro_export]
macro_rules! println {
    () => { $crate::serial::_print(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*), true) };
}

/// The next received byte, if one is waiting (two port reads; no lock: one task reads).
pub fn read_byte() -> Option<u8> {
    let lsr = inb(LSR);
    // 0xff is what a missing UART reads as: no data then, not an endless stream of 0xff.
    if lsr == 0xff || lsr & LSR_DATA_READY == 0 {
        return None;
    }
    Some(inb(RBR))
}

/// Ends the VM with `status` through the debug-exit port; parks if nothing listens there.
pub fn exit(status: u8) -> ! {
    outb(DEBUG_EXIT_PORT, status);
    cpu::park()
}
