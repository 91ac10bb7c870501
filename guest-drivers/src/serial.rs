//! The serial console (8250/16550 UART at COM1, polled) with `print!`/`println!` and polled
//! input (`read_byte`), and the debug-exit port that ends the VM with a status byte.
//!
//! On the PVM hosts every port access from CPL 3 is a VM exit costing ~100 us, so the writer
//! checks the line status once per 16 bytes (the 16550 FIFO depth) rather than once per byte.

use crate::cpu;
use crate::port::{inb, outb};
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
}

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

    pub fn new_unlocked() -> Console {
        Console { locked: false }
    }

    fn put(&mut self, byte: u8) {
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
