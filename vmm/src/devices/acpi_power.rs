//! The hardware-reduced ACPI power registers the FADT points at: sleep control (a guest powers
//! off by writing SLP_TYP = `_S5` with SLP_EN), sleep status, and the reset register.

use std::sync::{Arc, Mutex};

use log::{debug, warn};

use crate::boot::acpi::S5_SLEEP_TYPE;
use crate::bus::{Bus, BusDevice, BusError};
use crate::layout;
use crate::vm_end::{EndSignal, VmEnd};

/// Register offsets from `layout::ACPI_SLEEP_CONTROL_PORT`.
const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = (layout::ACPI_SLEEP_STATUS_PORT - layout::ACPI_SLEEP_CONTROL_PORT) as u64;
const RESET: u64 = (layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT) as u64;
const PORTS: u64 = RESET + 1;

/// Sleep control register (ACPI 6.5, 4.8.3.7): SLP_TYP in bits 2-4, SLP_EN in bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
const SLP_EN: u8 = 1 << 5;
/// Sleep status register: WAK_STS in bit 7, cleared by writing 1.
const WAK_STS: u8 = 1 << 7;

pub struct AcpiPower {
    end: Arc<EndSignal>,
    /// Set when the guest asked for a sleep state other than S5: splitvisor does not
    /// implement those, so the guest "wakes" at once (ACPICA polls WAK_STS after S1-S4).
    woke: bool,
}

impl AcpiPower {
    pub fn new(end: Arc<EndSignal>) -> Self {
        Self { end, woke: false }
    }

    fn sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            debug!("ACPI sleep control write {value:#x} without SLP_EN ignored");
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            self.end.end(VmEnd::PowerOff);
        } else {
            warn!(
                "the guest asked for ACPI sleep type {sleep_type}, which splitvisor does not \
                 implement (only S5, power off, = {S5_SLEEP_TYPE}); it keeps running"
            );
            self.woke = true;
        }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (SLEEP_STATUS, Some(first)) = (offset, data.first_mut()) {
            if self.woke {
                *first = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL => self.sleep_control(value),
            SLEEP_STATUS if value & WAK_STS != 0 => self.woke = false,
            RESET if value == layout::ACPI_RESET_VALUE => self.end.end(VmEnd::Reboot {
                how: "ACPI reset register",
            }),
            _ => debug!("ACPI power register write {value:#x} at offset {offset} ignored"),
        }
    }
}

/// Puts the three registers on the port I/O bus at `layout::ACPI_SLEEP_CONTROL_PORT`.
pub fn attach(pio: &mut Bus, end: Arc<EndSignal>) -> Result<(), BusError> {
    pio.insert(
        layout::ACPI_SLEEP_CONTROL_PORT.into(),
        PORTS,
        "acpi-power",
        Arc::new(Mutex::new(AcpiPower::new(end))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The device ends the VM synchronously, so an end is there at once; the bound only keeps
    /// a broken device from hanging the test.
    const BOUND: Duration = Duration::from_secs(5);

    fn slp(sleep_type: u8) -> u8 {
        SLP_EN | (sleep_type << SLP_TYP_SHIFT)
    }

    /// Drives the device through the port bus, as a vCPU would.
    fn attached() -> (Bus, Arc<EndSignal>) {
        let end = Arc::new(EndSignal::default());
        let mut pio = Bus::new();
        attach(&mut pio, end.clone()).unwrap();
        (pio, end)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (pio, end) = attached();
        // What Linux's acpi_hw_extended_sleep() writes for S5: SLP_TYP << 2 | SLP_EN.
        assert!(pio.write(layout::ACPI_SLEEP_CONTROL_PORT.into(), &[0x34]));
        assert_eq!(slp(S5_SLEEP_TYPE), 0x34);
        assert_eq!(end.wait_timeout(BOUND), Some(VmEnd::PowerOff));
        assert_eq!(VmEnd::PowerOff.exit_status(), 0);
    }

    #[test]
    fn other_sleep_types_and_writes_without_slp_en_do_nothing() {
        let (pio, end) = attached();
        let control = u64::from(layout::ACPI_SLEEP_CONTROL_PORT);
        let status = u64::from(layout::ACPI_SLEEP_STATUS_PORT);
        pio.write(control, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN
        let mut read = [0xffu8];
        pio.read(status, &mut read);
        assert_eq!(read, [0], "nothing happened, nothing woke");
        pio.write(control, &[slp(3)]); // S3
        assert!(!end.is_stopping());
        pio.read(status, &mut read);
        assert_eq!(read, [WAK_STS], "an ignored sleep wakes at once");
        pio.write(status, &[WAK_STS]);
        pio.read(status, &mut read);
        assert_eq!(read, [0], "WAK_STS is write-1-to-clear");
        assert!(!end.is_stopping());
    }

    #[test]
    fn the_reset_value_reboots_and_other_values_do_not() {
        let (pio, end) = attached();
        let reset = u64::from(layout::ACPI_RESET_PORT);
        pio.write(reset, &[layout::ACPI_RESET_VALUE.wrapping_add(1)]);
        assert!(!end.is_stopping());
        let mut read = [0xffu8];
        pio.read(reset, &mut read);
        assert_eq!(read, [0]);
        pio.write(reset, &[layout::ACPI_RESET_VALUE]);
        let why = end.wait_timeout(BOUND);
        assert_eq!(
            why,
            Some(VmEnd::Reboot {
                how: "ACPI reset register"
            })
        );
    }

    #[test]
    fn the_registers_sit_where_the_fadt_says() {
        let (pio, _end) = attached();
        let mut byte = [0u8];
        assert!(!pio.read(u64::from(layout::ACPI_SLEEP_CONTROL_PORT) - 1, &mut byte));
        assert!(pio.read(layout::ACPI_RESET_PORT.into(), &mut byte));
        assert!(!pio.read(u64::from(layout::ACPI_RESET_PORT) + 1, &mut byte));
    }
}
