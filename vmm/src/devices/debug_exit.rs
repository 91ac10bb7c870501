//! The debug-exit port: the guest writes a status byte and the VM ends with it.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::vm_end::{EndSignal, VmEnd};

pub struct DebugExit {
    end: Arc<EndSignal>,
}

impl DebugExit {
    pub fn new(end: Arc<EndSignal>) -> Self {
        Self { end }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Wider writes (outw/outl) carry the status in their low byte.
        if let Some(status) = data.first() {
            self.end.end(VmEnd::Guest(*status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_ends_the_vm_with_its_byte() {
        let end = Arc::new(EndSignal::default());
        DebugExit::new(end.clone()).write(0, &[42, 0, 0, 0]);
        assert_eq!(end.wait(), VmEnd::Guest(42));
    }
}
