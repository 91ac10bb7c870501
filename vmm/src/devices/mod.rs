//! Devices emulated inside the VMM. Everything here costs a VM exit per register access, so
//! only what must be here is: the console, the debug-exit port, the power-off/reset registers a
//! Linux guest uses (ACPI and i8042), and the deliberately slow emulated disk that shows what
//! paravirtualization buys.

pub mod acpi_power;
pub mod ata;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
