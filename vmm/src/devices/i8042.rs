//! The least of an i8042 keyboard controller a VM needs: the "pulse reset line" command, which
//! is how Linux reboots with `reboot=k` (and its fallback after the ACPI reset register).
//! There is no keyboard: the FADT says no 8042 is present, so Linux does not probe one.

use std::sync::{Arc, Mutex};

use log::debug;

use crate::bus::{Bus, BusDevice, BusError};
use crate::layout;
use crate::vm_end::{EndSignal, VmEnd};

/// Command 0xfe: pulse output line 0 (the CPU reset line) low.
const CMD_PULSE_RESET: u8 = 0xfe;

/// Which of the two (non-adjacent) ports an instance serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    Data,
    /// Reads give the status register, writes take commands.
    Command,
}

pub struct I8042 {
    port: Port,
    end: Arc<EndSignal>,
}

impl BusDevice for I8042 {
    /// Status 0: output buffer empty (nothing to read) and input buffer empty, so Linux's
    /// `kb_wait()` sends its command without spinning. Data reads 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match (self.port, value) {
            (Port::Command, CMD_PULSE_RESET) => self.end.end(VmEnd::Reboot {
                how: "i8042 reset pulse",
            }),
            (port, value) => debug!("i8042 {port:?} port write {value:#x} ignored"),
        }
    }
}

/// Puts the data port (0x60) and the command/status port (0x64) on the port I/O bus. They are
/// inserted separately: 0x61 in between is the PIT/speaker port, which KVM's in-kernel PIT
/// serves.
pub fn attach(pio: &mut Bus, end: Arc<EndSignal>) -> Result<(), BusError> {
    for (port, base, name) in [
        (Port::Data, layout::I8042_DATA_PORT, "i8042-data"),
        (Port::Command, layout::I8042_COMMAND_PORT, "i8042-command"),
    ] {
        let device = I8042 {
            port,
            end: end.clone(),
        };
        pio.insert(base.into(), 1, name, Arc::new(Mutex::new(device)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn attached() -> (Bus, Arc<EndSignal>) {
        let end = Arc::new(EndSignal::default());
        let mut pio = Bus::new();
        attach(&mut pio, end.clone()).unwrap();
        (pio, end)
    }

    #[test]
    fn the_reset_pulse_reboots() {
        let (pio, end) = attached();
        assert!(pio.write(layout::I8042_COMMAND_PORT.into(), &[0xfe]));
        // Synchronous: the bound only keeps a broken device from hanging the test.
        assert_eq!(
            end.wait_timeout(Duration::from_secs(5)),
            Some(VmEnd::Reboot {
                how: "i8042 reset pulse"
            })
        );
    }

    #[test]
    fn status_reads_empty_and_other_writes_do_nothing() {
        let (pio, end) = attached();
        let mut status = [0xffu8];
        assert!(pio.read(layout::I8042_COMMAND_PORT.into(), &mut status));
        assert_eq!(status, [0]);
        let mut data = [0xffu8];
        assert!(pio.read(layout::I8042_DATA_PORT.into(), &mut data));
        assert_eq!(data, [0]);
        // 0xfe on the data port is a keyboard byte, not the reset command.
        pio.write(layout::I8042_DATA_PORT.into(), &[0xfe]);
        pio.write(layout::I8042_COMMAND_PORT.into(), &[0xad]); // disable keyboard
        assert!(!end.is_stopping());
    }

    #[test]
    fn the_pit_speaker_port_is_left_alone() {
        let (pio, _end) = attached();
        assert!(!pio.read(0x61, &mut [0u8]));
        assert!(!pio.read(0x62, &mut [0u8]));
    }
}
