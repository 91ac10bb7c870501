//! The VM-wide interrupt and timer state in KVM: the two 8259 PICs and the IOAPIC of the
//! in-kernel irqchip, the in-kernel PIT (only Linux guests get one), and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use log::warn;
use serde::{Deserialize, Serialize};

use super::blob::{Blob, BlobError};
use super::format::Unavailable;

#[derive(Debug, thiserror::Error)]
pub enum IrqchipError {
    #[error("{ioctl} for the {part} failed")]
    Ioctl {
        ioctl: &'static str,
        part: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved {0} is unusable")]
    Decode(&'static str, #[source] BlobError),
    #[error("the snapshot has PIT state but this VM has no in-kernel PIT: create it (KVM_CREATE_PIT2) before restoring, as for a Linux guest")]
    NoPit,
}

/// VM-wide interrupt controller and clock state. Each `Blob` is the raw bytes of the
/// kvm-bindings struct named in its comment; `None` means unavailable at capture (see
/// `unavailable`) or, for `pit`, that the VM had no PIT.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IrqchipState {
    /// `kvm_irqchip` with `chip_id` `KVM_IRQCHIP_PIC_MASTER`.
    pub pic_master: Option<Blob>,
    /// `kvm_irqchip` with `chip_id` `KVM_IRQCHIP_PIC_SLAVE`.
    pub pic_slave: Option<Blob>,
    /// `kvm_irqchip` with `chip_id` `KVM_IRQCHIP_IOAPIC`.
    pub ioapic: Option<Blob>,
    /// `kvm_pit_state2`.
    pub pit: Option<Blob>,
    /// `kvm_clock_data`: kvmclock's value (ns) when captured.
    pub clock: Option<Blob>,
    pub unavailable: Vec<Unavailable>,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

/// Captures what the VM has; a missing PIT (ENXIO: none was created) is not an error, any other
/// refusal is recorded in `unavailable` with a warning.
pub fn capture(vm: &VmFd) -> IrqchipState {
    let mut state = IrqchipState::default();
    let [master, slave, ioapic] = CHIPS.map(|(chip_id, part)| {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map(|()| Blob::of(&chip))
            .map_err(|e| Unavailable::new(format!("{part} (KVM_GET_IRQCHIP)"), &e))
    });
    let mut keep = |result: Result<Blob, Unavailable>| {
        result.map_err(|part| state.unavailable.push(part)).ok()
    };
    let (master, slave, ioapic) = (keep(master), keep(slave), keep(ioapic));
    state.pic_master = master;
    state.pic_slave = slave;
    state.ioapic = ioapic;
    state.pit = match vm.get_pit2() {
        Ok(pit) => Some(Blob::of(&pit)),
        Err(e) if e.errno() == libc::ENXIO => None,
        Err(e) => {
            state
                .unavailable
                .push(Unavailable::new("PIT (KVM_GET_PIT2)".to_string(), &e));
            None
        }
    };
    state.clock = match vm.get_clock() {
        Ok(clock) => Some(Blob::of(&clock)),
        Err(e) => {
            state
                .unavailable
                .push(Unavailable::new("kvmclock (KVM_GET_CLOCK)".to_string(), &e));
            None
        }
    };
    for part in &state.unavailable {
        warn!("snapshot: {part}");
    }
    state
}

/// Puts the saved state into `vm`, whose irqchip (and PIT, if one was saved) exist already.
/// kvmclock continues from the saved value: the time the VM spent saved is not seen by the
/// guest as elapsed.
pub fn restore(vm: &VmFd, state: &IrqchipState) -> Result<(), IrqchipError> {
    let saved = [&state.pic_master, &state.pic_slave, &state.ioapic];
    for ((_, part), blob) in CHIPS.iter().zip(saved) {
        let Some(blob) = blob else { continue };
        let chip: kvm_irqchip = blob.to(part).map_err(|e| IrqchipError::Decode(part, e))?;
        vm.set_irqchip(&chip)
            .map_err(|source| IrqchipError::Ioctl {
                ioctl: "KVM_SET_IRQCHIP",
                part,
                source,
            })?;
    }
    if let Some(pit) = &state.pit {
        let pit: kvm_pit_state2 = pit.to("PIT").map_err(|e| IrqchipError::Decode("PIT", e))?;
        vm.set_pit2(&pit).map_err(|source| match source.errno() {
            libc::ENXIO => IrqchipError::NoPit,
            _ => IrqchipError::Ioctl {
                ioctl: "KVM_SET_PIT2",
                part: "PIT",
                source,
            },
        })?;
    }
    if let Some(clock) = &state.clock {
        let saved: kvm_clock_data = clock
            .to("kvmclock")
            .map_err(|e| IrqchipError::Decode("kvmclock", e))?;
        // Only the value: the flags KVM_GET_CLOCK reports (TSC_STABLE, REALTIME with its
        // host time) describe the old host and are refused or misread on set.
        let clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(|source| IrqchipError::Ioctl {
            ioctl: "KVM_SET_CLOCK",
            part: "kvmclock",
            source,
        })?;
    }
    Ok(())
}
