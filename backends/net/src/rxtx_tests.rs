//! Unit tests of the TAP frame path against `MemTap` and mock split rings.

use super::*;
use crate::stats::{DropReason, QueueStats};
use crate::testutil::{frame, memory, read, Ring, BUF_BASE};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn tx_sends_header_and_payload_and_returns_chain() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let f = frame(60);
    mem.write_slice(&f[..12], GuestAddress(BUF_BASE)).unwrap();
    mem.write_slice(&f[12..], GuestAddress(BUF_BASE + 0x100))
        .unwrap();
    ring.add_chain(&[(BUF_BASE, 12, false), (BUF_BASE + 0x100, 60, false)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    let stats = QueueStats::default();
    let batch = process_tx(&mut q, &mem, &tap, &mut TxScratch::default(), &stats).unwrap();
    assert_eq!(batch.used, 1);
    assert_eq!(tap.written.borrow().as_slice(), &[f]);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(ring.used(0), (0, 0));
    assert_eq!(
        stats.tx_frames.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats.tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
        60
    );
}

#[test]
fn tx_malformed_chains_are_dropped_counted_and_returned() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(BUF_BASE, 12, false), (BUF_BASE + 0x100, 60, true)]);
    ring.add_chain(&[(BUF_BASE, 8, false)]);
    ring.add_chain(&[(0x1000_0000, 64, false)]);
    ring.add_chain(&[(BUF_BASE, 70_000, false), (BUF_BASE, 70_000, false)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    let stats = QueueStats::default();
    process_tx(&mut q, &mem, &tap, &mut TxScratch::default(), &stats).unwrap();
    assert!(tap.written.borrow().is_empty());
    assert_eq!(ring.used_idx(), 4);
    assert_eq!(stats.drops(DropReason::WrongDirection), 1);
    assert_eq!(stats.drops(DropReason::TxTooShort), 1);
    assert_eq!(stats.drops(DropReason::BadAddress), 1);
    assert_eq!(stats.drops(DropReason::TxTooLarge), 1);
}

#[test]
fn rx_merges_buffers_and_sets_num_buffers() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    for i in 0..3 {
        ring.add_chain(&[(BUF_BASE + i * 0x100, 40, true)]);
    }
    let mut q = ring.queue();
    let tap = MemTap::default();
    let f = frame(90);
    tap.to_read.borrow_mut().push_back(f.clone());
    let stats = QueueStats::default();
    let mut rx = RxState::default();
    let (batch, stop) = process_rx(&mut q, &mem, &tap, &mut rx, true, &stats).unwrap();
    assert_eq!(stop, RxStop::TapEmpty);
    assert_eq!(batch.used, 3);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(ring.used(0), (0, 40));
    assert_eq!(ring.used(1), (1, 40));
    assert_eq!(ring.used(2), (2, 22));
    let mut got = read(&mem, BUF_BASE, 40);
    got.extend(read(&mem, BUF_BASE + 0x100, 40));
    got.extend(read(&mem, BUF_BASE + 0x200, 22));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn rx_num_buffers_straddling_descriptors() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(BUF_BASE, 11, true), (BUF_BASE + 0x100, 100, true)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    tap.to_read.borrow_mut().push_back(frame(20));
    let mut rx = RxState::default();
    let stats = QueueStats::default();
    process_rx(&mut q, &mem, &tap, &mut rx, true, &stats).unwrap();
    assert_eq!(read(&mem, BUF_BASE + 10, 1), vec![1]);
    assert_eq!(read(&mem, BUF_BASE + 0x100, 1), vec![0]);
    assert_eq!(ring.used(0), (0, 32));
}

#[test]
fn rx_oversize_without_mrg_is_dropped_and_buffer_kept() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(BUF_BASE, 40, true)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    tap.to_read.borrow_mut().push_back(frame(90));
    tap.to_read.borrow_mut().push_back(frame(20));
    let stats = QueueStats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, false, &stats).unwrap();
    assert_eq!(stats.drops(DropReason::RxTooLarge), 1);
    // The small frame used the buffer the big one could not.
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(ring.used(0), (0, 32));
    assert_eq!(read(&mem, BUF_BASE + 10, 2), vec![1, 0]);
}

#[test]
fn rx_waits_for_buffers_then_delivers_pending_frame() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    let tap = MemTap::default();
    tap.to_read.borrow_mut().push_back(frame(20));
    let stats = QueueStats::default();
    let mut rx = RxState::default();
    let (_, stop) = process_rx(&mut q, &mem, &tap, &mut rx, true, &stats).unwrap();
    assert_eq!(stop, RxStop::OutOfBuffers);
    assert_eq!(ring.used_idx(), 0);
    ring.add_chain(&[(BUF_BASE, 64, true)]);
    let (batch, stop) = process_rx(&mut q, &mem, &tap, &mut rx, true, &stats).unwrap();
    assert_eq!((batch.used, stop), (1, RxStop::TapEmpty));
    assert_eq!(ring.used(0), (0, 32));
}

#[test]
fn rx_bad_chains_are_returned_empty() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(0x1000_0000, 64, true)]);
    ring.add_chain(&[(BUF_BASE, 64, false)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    tap.to_read.borrow_mut().push_back(frame(20));
    tap.to_read.borrow_mut().push_back(frame(20));
    let stats = QueueStats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, true, &stats).unwrap();
    assert_eq!(stats.drops(DropReason::BadAddress), 1);
    assert_eq!(stats.drops(DropReason::WrongDirection), 1);
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(ring.used(0), (0, 0));
    assert_eq!(ring.used(1), (1, 0));
}

#[test]
fn interrupt_honours_no_interrupt_flag() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(BUF_BASE, 12, false)]);
    let flags = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
    mem.write_obj(flags, ring.vq.avail_addr()).unwrap();
    let mut q = ring.queue();
    let tap = MemTap::default();
    let stats = QueueStats::default();
    let batch = process_tx(&mut q, &mem, &tap, &mut TxScratch::default(), &stats).unwrap();
    assert_eq!(
        batch,
        Batch {
            used: 1,
            interrupt: false,
            held: false,
        }
    );
}

#[test]
fn tx_looping_chain_is_dropped_counted_and_returned() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    ring.add_chain(&[(BUF_BASE, 512, false), (BUF_BASE, 512, false)]);
    // Descriptor 1 links back to descriptor 0: the chain never ends.
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let d1 = GuestAddress(ring.vq.desc_table_addr().0 + 16);
    mem.write_obj(next.to_le(), GuestAddress(d1.0 + 12))
        .unwrap();
    mem.write_obj(0u16.to_le(), GuestAddress(d1.0 + 14))
        .unwrap();
    ring.add_chain(&[(BUF_BASE, 60, false)]);
    let mut q = ring.queue();
    let tap = MemTap::default();
    let stats = QueueStats::default();
    process_tx(&mut q, &mem, &tap, &mut TxScratch::default(), &stats).unwrap();
    assert_eq!(tap.written.borrow().len(), 1, "only the good chain is sent");
    assert_eq!(tap.written.borrow()[0].len(), 60);
    assert_eq!(stats.drops(DropReason::ChainLoop), 1);
    assert_eq!(ring.used_idx(), 2);
}
