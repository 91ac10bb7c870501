//! The console: vm-superio's 8250 UART on COM1, its output to stdout, a file or nowhere, its
//! interrupt through an irqfd, and the receive side that `console` feeds from stdin.

use std::io::{self, LineWriter, Write};

use log::warn;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::config::SerialConfig;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create --serial file {0}")]
    CreateFile(String, #[source] io::Error),
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    #[error("the snapshot's serial port state is unusable: its receive FIFO holds {0} bytes, more than the UART's 64")]
    RestoreState(usize),
}

/// Raises the serial IRQ by writing the eventfd KVM routes to GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the console input (through an eventfd it polls) when the guest has read the last
/// byte of the receive FIFO, so that input held back by a full FIFO goes in without polling.
pub struct InputEvents {
    drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Cannot fail short of the counter overflowing, which the reader's reads prevent.
        let _ = self.drained.write(1);
    }
}

type Output = Box<dyn Write + Send>;

pub struct SerialConsole {
    uart: Serial<IrqTrigger, InputEvents, Output>,
    /// `--serial stdio`: stdin feeds the guest's receive side.
    reads_stdin: bool,
}

impl SerialConsole {
    /// Builds the console; returns it with the eventfd to register as its irqfd.
    pub fn new(config: &SerialConfig) -> Result<(Self, EventFd), SerialError> {
        Self::with_state(config, &SerialState::default(), false)
    }

    /// Builds the console with the UART's registers and receive FIFO as saved in a snapshot;
    /// with `append`, a `file=` output is continued instead of started anew.
    pub fn with_state(
        config: &SerialConfig,
        state: &SerialState,
        append: bool,
    ) -> Result<(Self, EventFd), SerialError> {
        let out: Output = match config {
            SerialConfig::Stdio => Box::new(LineWriter::new(io::stdout())),
            SerialConfig::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .append(append)
                    .truncate(!append)
                    .open(path)
                    .map_err(|e| SerialError::CreateFile(path.display().to_string(), e))?;
                Box::new(LineWriter::new(file))
            }
            SerialConfig::None => Box::new(io::sink()),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let trigger = IrqTrigger(irq.try_clone().map_err(SerialError::EventFd)?);
        let events = InputEvents {
            drained: EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?,
        };
        Ok((
            Self {
                uart: Serial::from_state(state, trigger, events, out)
                    .map_err(|_| SerialError::RestoreState(state.in_buffer.len()))?,
                reads_stdin: matches!(config, SerialConfig::Stdio),
            },
            irq,
        ))
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// True for `--serial stdio`, where stdin is the guest's keyboard.
    pub fn reads_stdin(&self) -> bool {
        self.reads_stdin
    }

    /// An eventfd that becomes readable whenever the guest empties the receive FIFO.
    pub fn drained_event(&self) -> io::Result<EventFd> {
        self.uart.events().drained.try_clone()
    }

    /// Free space in the receive FIFO.
    pub fn receive_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Puts as much of `bytes` into the receive FIFO as fits (raising the data interrupt if
    /// the guest enabled it) and returns how many went in; 0 when the FIFO is full.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        if bytes.is_empty() || room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                // Only the interrupt failed: the bytes are in the FIFO for a polling guest.
                warn!("serial console input: {e}");
                bytes.len().min(room)
            }
        }
    }

    /// Transmits `bytes` as the UART would one by one, with one write to the output and one
    /// flush (the UART flushes after every byte, a system call each). In loopback mode (MCR
    /// bit 4) the bytes go through the UART, which loops them back to the receive side.
    pub fn transmit(&mut self, bytes: &[u8]) {
        const MCR_LOOP: u8 = 0x10;
        if self.uart.state().modem_control & MCR_LOOP != 0 {
            for byte in bytes {
                BusDevice::write(self, 0, &[*byte]);
            }
            return;
        }
        let out = self.uart.writer_mut();
        if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
            warn!("serial console write failed: {e}");
        }
    }

    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            warn!("flushing the serial console output failed: {e}");
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.uart.read(offset as u8);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *value) {
                warn!("serial console write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_the_data_register_reach_the_file() {
        let path = std::env::temp_dir().join(format!("splitvisor-serial-{}", std::process::id()));
        let (mut console, _irq) = SerialConsole::new(&SerialConfig::File(path.clone())).unwrap();
        for b in b"hello\n" {
            console.write(0, &[*b]);
        }
        console.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unwritable_file_is_named_in_the_error() {
        let err = SerialConsole::new(&SerialConfig::File("/nonexistent/dir/out".into()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/out"), "{err}");
    }
}
