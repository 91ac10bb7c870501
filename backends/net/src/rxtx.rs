//! The TAP frame path over descriptor chains: TX (guest -> TAP, header kept, copied out and
//! completed before the write) and RX (TAP -> guest, merged buffers), behind a small `Tap` trait.

use std::io;

use splitvisor_vhost_server::DeviceRing;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::loglimit::{burst_note, LogLimit, INTERVAL};
use crate::ring::{
    needs_interrupt, write_rx_frame, Mem, RingError, RxOutcome, UsedBatch, MAX_FRAME_LEN,
    VNET_HDR_LEN,
};
use crate::stats::{DropReason, QueueStats};

/// Most segments one TX frame may have (the kernel's UIO_MAXIOV is 1024).
pub const MAX_TX_SEGMENTS: usize = 256;

/// A TAP queue as the frame path sees it. Frames carry a 12-byte `virtio_net_hdr_v1` in front.
pub trait Tap {
    /// Write one frame given as a gather list. Every iovec points to memory that stays valid
    /// for the duration of the call.
    fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Read one frame into `buf`; `WouldBlock` when none is queued.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Errors that stop processing of a queue (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum RxTxError {
    #[error("failed to update the virtqueue")]
    Ring(#[from] RingError),
}

/// What one batch did, for the caller to count and signal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Used entries published.
    pub used: usize,
    /// Whether the driver asked for an interrupt.
    pub interrupt: bool,
    /// The switch held the next chain back for a destination without RX buffers: the queue
    /// waits for room (or `switch::BACKPRESSURE_WAIT`) rather than for a kick.
    pub held: bool,
}

/// Reusable per-queue scratch state, so the data path does not allocate per frame.
#[derive(Debug)]
pub struct TxScratch {
    /// The frame being sent, copied out of the guest's chain.
    frame: Vec<u8>,
    used: UsedBatch,
    /// Rate limit of the bad-chain warnings the guest can cause on this queue.
    bad_chain_log: LogLimit,
}

impl Default for TxScratch {
    fn default() -> Self {
        TxScratch {
            frame: Vec::with_capacity(MAX_FRAME_LEN),
            used: UsedBatch::default(),
            bad_chain_log: LogLimit::default(),
        }
    }
}

/// Descriptor ranges of one TX chain, validated against guest memory.
pub fn gather_tx_chain(
    chain: DescriptorChain<&Mem>,
    mem: &Mem,
    mut visit: impl FnMut(GuestAddress, usize) -> Result<(), DropReason>,
) -> Result<usize, DropReason> {
    let mut total = 0usize;
    let mut more = false;
    for desc in chain {
        // virtio-queue ends a chain silently after as many descriptors as its table holds (or
        // at a NEXT index outside the table): a last descriptor that still has NEXT is a loop.
        more = desc.has_next();
        if desc.is_write_only() {
            return Err(DropReason::WrongDirection);
        }
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(DropReason::BadAddress);
        }
        total += len;
        if total > MAX_FRAME_LEN {
            return Err(DropReason::TxTooLarge);
        }
        visit(desc.addr(), len)?;
    }
    if more {
        return Err(DropReason::ChainLoop);
    }
    if total < VNET_HDR_LEN {
        return Err(DropReason::TxTooShort);
    }
    Ok(total)
}

/// Send every available TX chain to the TAP; every chain goes back to the used ring.
///
/// Each frame is copied out of its chain, the chain is completed (published, its inflight
/// flag cleared), and only then is the copy written to the TAP. A daemon killed with SIGKILL
/// dies on its way back from a system call, so one killed in the middle of a TAP write has
/// written the frame and, in this order, also completed it: the next daemon neither sends it
/// again nor misses it. Only a kill in the few instructions between the used index store and
/// the write loses a frame; a chain popped and not completed is sent by the next daemon.
pub fn process_tx<T: Tap + ?Sized>(
    ring: &mut DeviceRing,
    mem: &Mem,
    tap: &T,
    scratch: &mut TxScratch,
    stats: &QueueStats,
) -> Result<Batch, RxTxError> {
    let old_used = ring.queue().next_used();
    let mut used = 0;
    // At most a ring's worth per call: a used ring laid over the avail index would otherwise
    // feed this loop with its own completions forever.
    for _ in 0..ring.queue().size() {
        let Some(chain) = ring.pop(mem) else { break };
        let head = chain.head_index();
        let gathered = copy_tx_chain(chain, mem, &mut scratch.frame);
        scratch.used.push(head, 0);
        used += scratch.used.publish(ring, mem)?;
        match gathered {
            Ok(len) => {
                let iov = libc::iovec {
                    iov_base: scratch.frame.as_mut_ptr().cast(),
                    iov_len: scratch.frame.len(),
                };
                match tap.write_frame(&[iov]) {
                    Ok(_) => stats.count_tx(len - VNET_HDR_LEN),
                    Err(e) => {
                        log::debug!("TAP write of a {len}-byte frame failed: {e}");
                        stats.count_drop(DropReason::TapWrite);
                    }
                }
            }
            Err(reason) => {
                warn_bad_chain(&mut scratch.bad_chain_log, head, reason);
                stats.count_drop(reason);
            }
        }
    }
    let interrupt = needs_interrupt(ring.queue(), mem, old_used)?;
    Ok(Batch {
        used,
        interrupt,
        held: false,
    })
}

/// Copy the frame of a TX chain into `frame` (cleared first); returns its length.
fn copy_tx_chain(
    chain: DescriptorChain<&Mem>,
    mem: &Mem,
    frame: &mut Vec<u8>,
) -> Result<usize, DropReason> {
    frame.clear();
    let mut segments = 0;
    gather_tx_chain(chain, mem, |addr, len| {
        if segments == MAX_TX_SEGMENTS {
            return Err(DropReason::TooManySegments);
        }
        segments += 1;
        let start = frame.len();
        frame.resize(start + len, 0);
        mem.read_slice(&mut frame[start..], addr)
            .map_err(|_| DropReason::BadAddress)
    })
}

/// Log a dropped TX chain, rate limited per queue (a guest can send any number).
fn warn_bad_chain(limit: &mut LogLimit, head: u16, reason: DropReason) {
    let verdict = limit.check();
    if verdict.suppressed > 0 {
        log::warn!(
            "{} more dropped TX chain(s) in the last {}s were not logged (see the drop counters)",
            verdict.suppressed,
            INTERVAL.as_secs()
        );
    }
    if verdict.log {
        log::warn!(
            "dropping TX chain {head}: {}{}",
            reason.name(),
            burst_note(&verdict)
        );
    }
}

/// RX state of one queue: the frame read from the TAP that is waiting for guest buffers.
pub struct RxState {
    buf: Box<[u8]>,
    pending: usize,
    used: UsedBatch,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            buf: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
            pending: 0,
            used: UsedBatch::default(),
        }
    }
}

/// Why an RX batch stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The TAP has nothing more to read.
    TapEmpty,
    /// The guest has no (more) RX buffers; a frame may be pending.
    OutOfBuffers,
}

/// Move frames from the TAP into the RX queue until the TAP is empty or buffers run out.
pub fn process_rx<T: Tap + ?Sized>(
    ring: &mut DeviceRing,
    mem: &Mem,
    tap: &T,
    rx: &mut RxState,
    mrg_rxbuf: bool,
    stats: &QueueStats,
) -> Result<(Batch, RxStop), RxTxError> {
    let old_used = ring.queue().next_used();
    let stop = loop {
        if rx.pending == 0 {
            match tap.read_frame(&mut rx.buf) {
                Ok(n) if n >= VNET_HDR_LEN => rx.pending = n,
                Ok(_) => {
                    stats.count_drop(DropReason::TapRead);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStop::TapEmpty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("TAP read failed: {e}");
                    stats.count_drop(DropReason::TapRead);
                    break RxStop::TapEmpty;
                }
            }
        }
        let frame = &rx.buf[..rx.pending];
        match write_rx_frame(ring, mem, frame, mrg_rxbuf, &mut rx.used) {
            RxOutcome::Delivered(_) => stats.count_rx(rx.pending - VNET_HDR_LEN),
            RxOutcome::NoBuffers => break RxStop::OutOfBuffers,
            RxOutcome::Dropped(reason) => {
                log::debug!(
                    "dropping RX frame of {} bytes: {}",
                    rx.pending,
                    reason.name()
                );
                stats.count_drop(reason);
            }
        }
        rx.pending = 0;
    };
    let used = rx.used.publish(ring, mem)?;
    let interrupt = needs_interrupt(ring.queue(), mem, old_used)?;
    Ok((
        Batch {
            used,
            interrupt,
            held: false,
        },
        stop,
    ))
}

/// An in-memory TAP for tests: frames written are recorded, frames to read are queued.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Default)]
pub struct MemTap {
    pub written: std::cell::RefCell<Vec<Vec<u8>>>,
    pub to_read: std::cell::RefCell<std::collections::VecDeque<Vec<u8>>>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl Tap for MemTap {
    fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut frame = Vec::new();
        for v in iov {
            // SAFETY: `Tap::write_frame`'s contract: each iovec points to `iov_len` mapped bytes.
            let part = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            frame.extend_from_slice(part);
        }
        let n = frame.len();
        self.written.borrow_mut().push(frame);
        Ok(n)
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .to_read
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
}

#[cfg(test)]
#[path = "rxtx_tests.rs"]
mod tests;
