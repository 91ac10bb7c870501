//! Devices emulated inside the VMM. Everything here costs a VM exit per register access, so
//! only what must be here is: the console, the debug-exit port, and the deliberately slow
//! emulated disk that shows what paravirtualization buys.

pub mod ata;
pub mod debug_exit;
pub mod serial;
