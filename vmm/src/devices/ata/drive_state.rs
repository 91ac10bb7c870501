//! The drive's state in a snapshot (`device_state::AtaState`): every register, the PIO
//! data phase in progress and its sector buffer, put back into a drive opened on the same
//! image.

use super::{Drive, Fifo, Transfer, SECTOR};
use crate::device_state::{AtaState, AtaTransfer};

#[derive(Debug, thiserror::Error)]
pub enum DriveStateError {
    #[error("the snapshot's ATA image had {saved} sectors, {path} has {here}: restore with the same image")]
    OtherSize { path: String, saved: u64, here: u64 },
    #[error("the snapshot's ATA state is unusable: {0}")]
    Invalid(&'static str),
}

fn pair(f: Fifo) -> (u8, u8) {
    (f.current, f.previous)
}

fn fifo((current, previous): (u8, u8)) -> Fifo {
    Fifo { current, previous }
}

impl Drive {
    pub fn save(&self) -> AtaState {
        AtaState {
            path: self.path.display().to_string(),
            readonly: self.readonly,
            sectors: self.sectors,
            irq_pending: self.irq_pending,
            features: pair(self.features),
            count: pair(self.count),
            lba_low: pair(self.lba_low),
            lba_mid: pair(self.lba_mid),
            lba_high: pair(self.lba_high),
            device: self.device,
            error: self.error,
            status: self.status,
            control: self.control,
            transfer: match self.transfer {
                Transfer::Idle => AtaTransfer::Idle,
                Transfer::In { next, left } => AtaTransfer::In { next, left },
                Transfer::Out { lba, left } => AtaTransfer::Out { lba, left },
            },
            buffer: self.buf.to_vec(),
            position: self.pos,
        }
    }

    /// Puts `state` back; the image must have the saved size and the buffer must be a sector.
    pub fn restore(&mut self, state: &AtaState) -> Result<(), DriveStateError> {
        if state.sectors != self.sectors {
            return Err(DriveStateError::OtherSize {
                path: self.path.display().to_string(),
                saved: state.sectors,
                here: self.sectors,
            });
        }
        let buffer: [u8; SECTOR] = state
            .buffer
            .as_slice()
            .try_into()
            .map_err(|_| DriveStateError::Invalid("the sector buffer is not 512 bytes"))?;
        if state.position > SECTOR {
            return Err(DriveStateError::Invalid(
                "the buffer position is past its end",
            ));
        }
        self.irq_pending = state.irq_pending;
        self.features = fifo(state.features);
        self.count = fifo(state.count);
        self.lba_low = fifo(state.lba_low);
        self.lba_mid = fifo(state.lba_mid);
        self.lba_high = fifo(state.lba_high);
        self.device = state.device;
        self.error = state.error;
        self.status = state.status;
        self.control = state.control;
        self.transfer = match state.transfer {
            AtaTransfer::Idle => Transfer::Idle,
            AtaTransfer::In { next, left } => Transfer::In { next, left },
            AtaTransfer::Out { lba, left } => Transfer::Out { lba, left },
        };
        *self.buf = buffer;
        self.pos = state.position;
        Ok(())
    }
}
