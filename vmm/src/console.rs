//! The console's input side: with `--serial stdio`, what arrives on stdin goes to the guest's
//! serial port. A terminal is put in raw mode and reads QEMU's escapes (Ctrl-A x quits); a
//! pipe or file is forwarded byte for byte until its end. One thread reads, and `Console`,
//! the guard `Vm::run` holds, stops it and restores the terminal.
//!
//! Input that the 64-byte receive FIFO cannot take yet waits here and goes in when the guest
//! has emptied the FIFO (vm-superio's `in_buffer_empty` event, an eventfd the reader polls), so
//! nothing is lost and nothing spins. A pipe is not read further while input waits, which
//! pushes back on the writer; a terminal is always read, so that Ctrl-A x works even when the
//! guest never reads its serial port.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialConsole;
use crate::terminal::{self, RawTerminal, TerminalError, TerminalKind};
use crate::vm_end::{EndSignal, VmEnd};

/// Ctrl-A, QEMU's console escape character.
pub const ESCAPE: u8 = 0x01;
/// How often the reader looks at whether the VM ended, besides being told to stop.
const POLL_TIMEOUT_MS: libc::c_int = 200;
/// A pipe is not read further while this much input waits for the guest.
const PIPE_PENDING_LIMIT: usize = 4096;
/// Typed input beyond this, waiting for a guest that does not read, is dropped (with a warning).
const TERMINAL_PENDING_LIMIT: usize = 1 << 20;

const HELP: &str = "\nsplitvisor console escapes:\n\
    C-a h    print this help\n\
    C-a x    quit (the VM ends, exit status 130)\n\
    C-a C-a  send C-a to the guest\n";

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("--serial stdio: cannot duplicate stdin for the console input")]
    DuplicateStdin(#[source] io::Error),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error("cannot create an eventfd for the console input")]
    EventFd(#[source] io::Error),
    #[error("cannot start the console input thread")]
    SpawnThread(#[source] io::Error),
}

/// What one input byte means, through QEMU's escapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    /// A byte for the guest.
    Guest(u8),
    /// Nothing (yet): the escape character, or an escape sequence QEMU ignores.
    Nothing,
    Quit,
    Help,
}

/// QEMU's escape handling: after Ctrl-A, `x` quits, `h` or `?` prints help, Ctrl-A sends one
/// Ctrl-A, and any other key is swallowed together with the Ctrl-A (as QEMU does).
#[derive(Debug, Default)]
struct Escapes {
    armed: bool,
}

impl Escapes {
    fn feed(&mut self, byte: u8) -> Key {
        if !self.armed {
            if byte == ESCAPE {
                self.armed = true;
                return Key::Nothing;
            }
            return Key::Guest(byte);
        }
        self.armed = false;
        match byte {
            ESCAPE => Key::Guest(ESCAPE),
            b'x' | b'X' => Key::Quit,
            b'h' | b'H' | b'?' => Key::Help,
            _ => Key::Nothing,
        }
    }
}

/// Moves input bytes into the serial receive FIFO, holding what does not fit yet.
struct Forwarder {
    serial: Arc<Mutex<SerialConsole>>,
    pending: VecDeque<u8>,
    /// Escape handling, for a terminal only: a pipe's bytes go through unchanged.
    escapes: Option<Escapes>,
    dropped: u64,
}

impl Forwarder {
    fn new(serial: Arc<Mutex<SerialConsole>>, interactive: bool) -> Self {
        Self {
            serial,
            pending: VecDeque::new(),
            escapes: interactive.then(Escapes::default),
            dropped: 0,
        }
    }

    /// Takes bytes read from the input; returns true (ignoring the rest) on Ctrl-A x.
    fn input(&mut self, bytes: &[u8]) -> bool {
        let mut quit = false;
        for &byte in bytes {
            let key = match self.escapes.as_mut() {
                Some(escapes) => escapes.feed(byte),
                None => Key::Guest(byte),
            };
            match key {
                Key::Guest(byte) => self.push(byte),
                Key::Nothing => {}
                Key::Help => {
                    let _ = io::stderr().write_all(HELP.as_bytes());
                }
                Key::Quit => {
                    quit = true;
                    break;
                }
            }
        }
        self.flush();
        quit
    }

    fn push(&mut self, byte: u8) {
        if self.escapes.is_some() && self.pending.len() >= TERMINAL_PENDING_LIMIT {
            if self.dropped == 0 {
                warn!("the guest is not reading its serial console; dropping typed input");
            }
            self.dropped += 1;
            return;
        }
        self.pending.push_back(byte);
    }

    /// Puts waiting bytes into the FIFO, as many as fit.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        while !self.pending.is_empty() {
            let taken = serial.enqueue(self.pending.as_slices().0);
            if taken == 0 {
                break;
            }
            self.pending.drain(..taken);
        }
    }
}

/// The console input while the VM runs; dropping it stops the reader and restores the
/// terminal. `Vm::run` holds it until the VM has ended.
pub struct Console {
    /// The reader thread and the eventfd that tells it to stop.
    reader: Option<(EventFd, JoinHandle<()>)>,
    /// Dropped after `Drop::drop` has stopped the reader: the terminal is restored last.
    _raw: Option<RawTerminal>,
}

impl Console {
    /// The raw terminal's descriptor and its settings before, if the console made one raw.
    pub fn terminal(&self) -> Option<(std::os::fd::RawFd, libc::termios)> {
        self._raw.as_ref().map(RawTerminal::saved)
    }

    fn idle() -> Self {
        Self {
            reader: None,
            _raw: None,
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.reader.take() {
            if let Err(e) = stop.write(1) {
                warn!("could not tell the console input thread to stop: {e}");
            }
            // The reader catches nothing; a panic there was already reported by the hook.
            let _ = thread.join();
        }
    }
}

/// Starts forwarding stdin to the guest if the serial console is on stdio (`--serial
/// stdio`); with a terminal on stdin that terminal goes raw until the returned guard drops.
pub fn start(
    serial: &Arc<Mutex<SerialConsole>>,
    end: &Arc<EndSignal>,
) -> Result<Console, ConsoleError> {
    let drained = {
        let serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
        if !serial.reads_stdin() {
            return Ok(Console::idle());
        }
        serial.drained_event().map_err(ConsoleError::EventFd)?
    };
    let stdin = io::stdin();
    let interactive = match terminal::kind(stdin.as_fd()) {
        TerminalKind::NotATerminal => false,
        TerminalKind::Foreground => true,
        TerminalKind::Background => {
            warn!("stdin is the terminal of a background job: the guest's console takes no input (run splitvisor in the foreground to type to the guest)");
            return Ok(Console::idle());
        }
    };
    // A duplicate, read without std's buffering: what poll reports is what read gets.
    let input = File::from(
        stdin
            .as_fd()
            .try_clone_to_owned()
            .map_err(ConsoleError::DuplicateStdin)?,
    );
    let raw = if interactive {
        let raw = RawTerminal::enter(input.as_fd())?;
        info!("console: the terminal is raw; Ctrl-A x quits, Ctrl-A h helps");
        Some(raw)
    } else {
        None
    };
    let reader = spawn_reader(input, interactive, serial.clone(), drained, end.clone())?;
    Ok(Console {
        reader: Some(reader),
        _raw: raw,
    })
}

/// Starts the reader thread over `input` (stdin, or a pipe in tests); returns the eventfd
/// that stops it and its handle.
fn spawn_reader(
    input: File,
    interactive: bool,
    serial: Arc<Mutex<SerialConsole>>,
    drained: EventFd,
    end: Arc<EndSignal>,
) -> Result<(EventFd, JoinHandle<()>), ConsoleError> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::EventFd)?;
    let reader = Reader {
        input,
        eof: false,
        interactive,
        drained,
        stop: stop.try_clone().map_err(ConsoleError::EventFd)?,
        end,
        forwarder: Forwarder::new(serial, interactive),
    };
    let thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || reader.run())
        .map_err(ConsoleError::SpawnThread)?;
    Ok((stop, thread))
}

struct Reader {
    input: File,
    eof: bool,
    interactive: bool,
    drained: EventFd,
    stop: EventFd,
    end: Arc<EndSignal>,
    forwarder: Forwarder,
}

impl Reader {
    fn run(mut self) {
        crate::seccomp::confine(crate::seccomp::ThreadKind::Console);
        let mut buf = [0u8; 4096];
        loop {
            if self.end.is_stopping() || (self.eof && self.forwarder.pending.is_empty()) {
                return;
            }
            let pending = self.forwarder.pending.len();
            let want_input = !self.eof && (self.interactive || pending < PIPE_PENDING_LIMIT);
            // A negative fd makes poll skip the entry.
            let mut fds = [
                poll_entry(self.stop.as_raw_fd()),
                poll_entry(if want_input {
                    self.input.as_raw_fd()
                } else {
                    -1
                }),
                poll_entry(if pending > 0 {
                    self.drained.as_raw_fd()
                } else {
                    -1
                }),
            ];
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_TIMEOUT_MS) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("console input stopped: poll failed: {error}");
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            if fds[2].revents != 0 {
                // Reset the counter so the next drain is seen as new; then refill the FIFO.
                let _ = self.drained.read();
                self.forwarder.flush();
            }
            if fds[1].revents != 0 && self.read_input(&mut buf) {
                return;
            }
        }
    }

    /// Reads what is there and forwards it; true if the reader must stop (quit).
    fn read_input(&mut self, buf: &mut [u8]) -> bool {
        let n = match self.input.read(buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                return false
            }
            Err(e) => {
                // EIO: the terminal hung up. Either way there is nothing more to read.
                warn!("console input: reading stdin failed: {e}; the guest gets no more input");
                0
            }
        };
        if n == 0 {
            // The end of a pipe or file; the VM goes on (the guest may still be working).
            self.eof = true;
            return false;
        }
        let quit = self.forwarder.input(&buf[..n]);
        if quit {
            self.end.end(VmEnd::ConsoleQuit);
        }
        quit
    }
}

fn poll_entry(fd: libc::c_int) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
#[path = "console_tests.rs"]
mod tests;
