//! Connection slots of an HTTP server on a Unix socket (the VMM's API, the daemons' stats). A slot is either reading its request or handling it; when all
//! are taken, a newcomer takes the slot of the client that has been sending its request the
//! longest (its connection is shut down), so that clients which connect and send slowly, or
//! nothing, cannot lock everyone else out. Only when every slot is handling a request (e.g.
//! swaps waiting for backends, each bounded) is a newcomer refused.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use log::debug;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Reading { since: Instant },
    Handling,
}

struct Entry {
    id: u64,
    /// Another handle on the client's connection, to shut it down when it is evicted.
    stream: UnixStream,
    phase: Phase,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: Vec<Entry>,
}

pub struct Slots {
    limit: usize,
    table: Arc<Mutex<Table>>,
}

/// A taken slot; freed when dropped.
pub struct Slot {
    id: u64,
    table: Arc<Mutex<Table>>,
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Slots {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            table: Arc::default(),
        }
    }

    /// A slot for the client on `stream`, evicting the slowest reader if all are taken; `None`
    /// if every slot is handling a request (or the connection cannot be tracked).
    pub fn take(&self, stream: &UnixStream) -> Option<Slot> {
        let handle = stream.try_clone().ok()?;
        let mut table = lock(&self.table);
        if table.entries.len() >= self.limit {
            let oldest = table
                .entries
                .iter()
                .enumerate()
                .filter_map(|(at, e)| match e.phase {
                    Phase::Reading { since } => Some((since, at)),
                    Phase::Handling => None,
                })
                .min()?
                .1;
            let evicted = table.entries.swap_remove(oldest);
            debug!("api: every slot is taken; dropping the client that sends its request slowest");
            // Its thread's read fails now and the thread ends.
            let _ = evicted.stream.shutdown(Shutdown::Both);
        }
        table.next_id += 1;
        let id = table.next_id;
        table.entries.push(Entry {
            id,
            stream: handle,
            phase: Phase::Reading {
                since: Instant::now(),
            },
        });
        Some(Slot {
            id,
            table: self.table.clone(),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).entries.len()
    }
}

impl Slot {
    /// The request has arrived: from now on the slot is not taken away.
    pub fn handling(&self) {
        if let Some(entry) = lock(&self.table)
            .entries
            .iter_mut()
            .find(|e| e.id == self.id)
        {
            entry.phase = Phase::Handling;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        if let Some(at) = table.entries.iter().position(|e| e.id == self.id) {
            table.entries.swap_remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn slow_readers_make_room_and_handlers_do_not() {
        let slots = Slots::new(2);
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let (c, _c_peer) = UnixStream::pair().unwrap();
        let (d, _d_peer) = UnixStream::pair().unwrap();
        let slot_a = slots.take(&a).unwrap();
        let slot_b = slots.take(&b).unwrap();
        slot_b.handling();
        // Full: the reader `a` makes room for `c`; its connection is shut down.
        let slot_c = slots.take(&c).expect("a reader is evicted");
        assert_eq!(slots.len(), 2);
        let mut buf = [0; 1];
        assert_eq!((&a).read(&mut buf).unwrap(), 0, "a's server side sees EOF");
        assert_eq!(a_peer.read(&mut buf).unwrap(), 0, "a's client sees EOF");
        drop(slot_a);
        assert_eq!(slots.len(), 2, "an evicted slot's drop frees nothing else");
        // Both handling: the newcomer is refused.
        slot_c.handling();
        assert!(slots.take(&d).is_none());
        drop(slot_b);
        assert!(
            slots.take(&d).is_some(),
            "a finished request frees its slot"
        );
    }
}
