//! Devices emulated inside the VMM. Everything here costs a VM exit per register access, so
//! only what must be here is: the console (and the own guest's paravirtual console port, a
//! line per exit), the debug-exit port, the power-off/reset registers a
//! Linux guest uses (ACPI and i8042), and the deliberately slow emulated disk that shows what
//! paravirtualization buys.

pub mod acpi_power;
pub mod ata;
pub mod debug_exit;
pub mod i8042;
pub mod pv_console;
pub mod serial;
