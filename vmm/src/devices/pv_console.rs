//! The paravirtual console port of the project's own guest: a whole line of console output in
//! one VM exit instead of one exit per character.
//!
//! On KVM a port write exits to the VMM once per byte, and `rep outsb` is no better (KVM's
//! emulator hands string port output over one element per exit), so a 40-byte line through the
//! UART costs 40 exits - tens of microseconds each on the PVM hosts. Here the guest writes the
//! guest-physical address of a buffer with one 32-bit `out`:
//!
//! ```text
//! u16 len (little endian, at most MAX_LINE); u8 bytes[len]
//! ```
//!
//! and the VMM passes the bytes to the UART's output in order (one write, one flush), so they
//! reach stdout, the `--serial` file or nowhere exactly as if the guest had written them one by
//! one. A 32-bit
//! read answers `MAGIC`: the guest uses the port only when it reads that (anything else, e.g.
//! the all-ones of an unhandled port under another VMM, means: use the UART).

use std::sync::{Arc, Mutex, PoisonError};

use log::warn;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::devices::serial::SerialConsole;
use crate::memory::GuestMemory;

/// What a 32-bit read of the port answers ("SVCN").
pub const MAGIC: u32 = 0x5356_434e;
/// Longest line one write may carry.
pub const MAX_LINE: u16 = 4094;
/// Bad writes that are logged; the guest could otherwise fill the log.
const LOGGED_ERRORS: u32 = 5;

pub struct PvConsole {
    memory: GuestMemory,
    serial: Arc<Mutex<SerialConsole>>,
    errors: u32,
}

impl PvConsole {
    pub fn new(memory: GuestMemory, serial: Arc<Mutex<SerialConsole>>) -> Self {
        Self {
            memory,
            serial,
            errors: 0,
        }
    }

    /// The line at `gpa`, or why it cannot be read.
    fn line(&self, gpa: u64) -> Result<Vec<u8>, String> {
        let len: u16 = self
            .memory
            .read_obj(GuestAddress(gpa))
            .map_err(|e| format!("length at {gpa:#x}: {e}"))?;
        let len = u16::from_le(len);
        if len > MAX_LINE {
            return Err(format!("length {len} at {gpa:#x} is above {MAX_LINE}"));
        }
        let mut bytes = vec![0u8; usize::from(len)];
        self.memory
            .read_slice(&mut bytes, GuestAddress(gpa + 2))
            .map_err(|e| format!("{len} bytes at {:#x}: {e}", gpa + 2))?;
        Ok(bytes)
    }

    fn refuse(&mut self, why: &str) {
        self.errors = self.errors.saturating_add(1);
        if self.errors <= LOGGED_ERRORS {
            let more = if self.errors == LOGGED_ERRORS {
                "; further bad writes are not logged"
            } else {
                ""
            };
            warn!("paravirtual console: ignoring a write: {why}{more}");
        }
    }
}

impl BusDevice for PvConsole {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() == 4 {
            data.copy_from_slice(&MAGIC.to_le_bytes());
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Ok(gpa) = <[u8; 4]>::try_from(data) else {
            self.refuse(&format!(
                "a {}-byte write; the port takes 32-bit addresses",
                data.len()
            ));
            return;
        };
        match self.line(u64::from(u32::from_le_bytes(gpa))) {
            Ok(bytes) => {
                // The UART's output: where the guest's own `out`s to it would go.
                let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
                serial.transmit(&bytes);
            }
            Err(why) => self.refuse(&why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SerialConfig;

    fn console(path: &std::path::Path) -> (PvConsole, GuestMemory) {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (serial, _irq) = SerialConsole::new(&SerialConfig::File(path.to_path_buf())).unwrap();
        let serial = Arc::new(Mutex::new(serial));
        (PvConsole::new(memory.clone(), serial), memory)
    }

    #[test]
    fn a_line_written_by_address_reaches_the_console_and_bad_ones_are_ignored() {
        let path = std::env::temp_dir().join(format!("splitvisor-pvcon-{}", std::process::id()));
        let (mut pv, memory) = console(&path);
        let mut probe = [0u8; 4];
        pv.read(0, &mut probe);
        assert_eq!(u32::from_le_bytes(probe), MAGIC);
        memory
            .write_obj(5u16.to_le(), GuestAddress(0x1000))
            .unwrap();
        memory
            .write_slice(b"hi!\n\n", GuestAddress(0x1002))
            .unwrap();
        pv.write(0, &0x1000u32.to_le_bytes());
        // Too long, outside memory, and not a 32-bit write: nothing is written.
        memory
            .write_obj(5000u16.to_le(), GuestAddress(0x2000))
            .unwrap();
        pv.write(0, &0x2000u32.to_le_bytes());
        pv.write(0, &0xffff_fff0u32.to_le_bytes());
        pv.write(0, &[1]);
        assert_eq!(pv.errors, 3);
        pv.serial.lock().unwrap().flush();
        let written = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(written, b"hi!\n\n");
    }
}
