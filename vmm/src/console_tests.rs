//! Tests of the console input: bytes from a pipe reach the UART the way the guest reads them
//! (LSR data-ready, then RBR), a full FIFO loses nothing, and QEMU's Ctrl-A escapes.

use std::io::Write;
use std::time::{Duration, Instant};

use super::*;
use crate::bus::BusDevice;
use crate::config::SerialConfig;

const RBR: u64 = 0;
const LSR: u64 = 5;
const LSR_DATA_READY: u8 = 0x01;
const DEADLINE: Duration = Duration::from_secs(10);

fn serial() -> Arc<Mutex<SerialConsole>> {
    let (console, _irq) = SerialConsole::new(&SerialConfig::None).unwrap();
    Arc::new(Mutex::new(console))
}

/// Reads the UART as a polling guest does, until `count` bytes came or the deadline passed.
fn guest_reads(serial: &Arc<Mutex<SerialConsole>>, count: usize) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        let mut uart = serial.lock().unwrap();
        let mut lsr = [0u8];
        uart.read(LSR, &mut lsr);
        if lsr[0] & LSR_DATA_READY == 0 {
            drop(uart);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut rbr = [0u8];
        uart.read(RBR, &mut rbr);
        got.push(rbr[0]);
    }
    got
}

fn data_ready(serial: &Arc<Mutex<SerialConsole>>) -> bool {
    let mut lsr = [0u8];
    serial.lock().unwrap().read(LSR, &mut lsr);
    lsr[0] & LSR_DATA_READY != 0
}

/// A reader over a pipe; returns the write end and the guard.
fn reader(
    serial: &Arc<Mutex<SerialConsole>>,
    end: &Arc<EndSignal>,
    interactive: bool,
) -> (File, Console) {
    let (read, write) = io::pipe().unwrap();
    let drained = serial.lock().unwrap().drained_event().unwrap();
    let reader = spawn_reader(
        File::from(std::os::fd::OwnedFd::from(read)),
        interactive,
        serial.clone(),
        drained,
        end.clone(),
    )
    .unwrap();
    let console = Console {
        reader: Some(reader),
        _raw: None,
    };
    (File::from(std::os::fd::OwnedFd::from(write)), console)
}

#[test]
fn piped_bytes_reach_the_receive_buffer() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    assert!(!data_ready(&serial));
    let (mut pipe, _console) = reader(&serial, &end, false);
    pipe.write_all(b"hello splitvisor\n").unwrap();
    assert_eq!(guest_reads(&serial, 17), b"hello splitvisor\n");
    assert!(!data_ready(&serial), "nothing more than what was sent");
}

#[test]
fn a_full_fifo_loses_nothing() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (mut pipe, _console) = reader(&serial, &end, false);
    // Ten times the FIFO, in one write, while the guest is not reading yet.
    let sent: Vec<u8> = (0..640u32).map(|i| (i % 251) as u8).collect();
    pipe.write_all(&sent).unwrap();
    // Wait until the FIFO is full, so that the rest must wait for the guest to drain it.
    let deadline = Instant::now() + DEADLINE;
    while serial.lock().unwrap().receive_room() > 0 {
        assert!(Instant::now() < deadline, "the FIFO never filled");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(guest_reads(&serial, sent.len()), sent);
}

#[test]
fn end_of_input_does_not_end_the_vm_and_the_reader_stops_when_dropped() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (mut pipe, console) = reader(&serial, &end, false);
    pipe.write_all(b"x").unwrap();
    drop(pipe);
    assert_eq!(guest_reads(&serial, 1), b"x");
    assert!(!end.is_stopping());
    let start = Instant::now();
    drop(console);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_reader_without_input_stops_at_once() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (_pipe, console) = reader(&serial, &end, true);
    let start = Instant::now();
    drop(console);
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "stop is not waiting for the poll timeout"
    );
}

#[test]
fn ctrl_a_x_ends_the_vm_with_console_quit() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (mut pipe, _console) = reader(&serial, &end, true);
    pipe.write_all(b"ab\x01xcd").unwrap();
    assert_eq!(end.wait_timeout(DEADLINE), Some(VmEnd::ConsoleQuit));
    assert_eq!(guest_reads(&serial, 2), b"ab");
    assert!(
        !data_ready(&serial),
        "nothing after the quit reached the guest"
    );
}

#[test]
fn ctrl_a_ctrl_a_sends_one_ctrl_a_and_other_escapes_are_swallowed() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (mut pipe, _console) = reader(&serial, &end, true);
    // Split across writes: the escape state carries over between reads.
    pipe.write_all(b"a\x01").unwrap();
    pipe.write_all(b"\x01b\x01zc").unwrap();
    assert_eq!(guest_reads(&serial, 4), b"a\x01bc");
    assert!(!end.is_stopping());
}

#[test]
fn a_pipe_passes_ctrl_a_unchanged() {
    let (serial, end) = (serial(), Arc::new(EndSignal::default()));
    let (mut pipe, _console) = reader(&serial, &end, false);
    pipe.write_all(b"\x01x\x01\x01").unwrap();
    assert_eq!(guest_reads(&serial, 4), b"\x01x\x01\x01");
    assert!(!end.is_stopping());
}

#[test]
fn forwarder_holds_what_the_fifo_cannot_take() {
    let serial = serial();
    let mut forwarder = Forwarder::new(serial.clone(), false);
    assert!(!forwarder.input(&[7u8; 100]));
    assert_eq!(forwarder.pending.len(), 100 - 64, "the FIFO holds 64 bytes");
    assert_eq!(guest_reads(&serial, 64), [7u8; 64]);
    forwarder.flush();
    assert!(forwarder.pending.is_empty());
    assert_eq!(guest_reads(&serial, 36), [7u8; 36]);
}

#[test]
fn escapes_match_qemu() {
    let mut e = Escapes::default();
    assert_eq!(e.feed(b'a'), Key::Guest(b'a'));
    assert_eq!(e.feed(ESCAPE), Key::Nothing);
    assert_eq!(e.feed(ESCAPE), Key::Guest(ESCAPE));
    assert_eq!(e.feed(ESCAPE), Key::Nothing);
    assert_eq!(e.feed(b'h'), Key::Help);
    assert_eq!(e.feed(ESCAPE), Key::Nothing);
    assert_eq!(e.feed(b'q'), Key::Nothing);
    assert_eq!(e.feed(b'q'), Key::Guest(b'q'));
    assert_eq!(e.feed(ESCAPE), Key::Nothing);
    assert_eq!(e.feed(b'x'), Key::Quit);
}
