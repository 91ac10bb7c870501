//! The data-plane setup a backend needs to serve the driver's rings - memory table, inflight
//! region, vring addresses, positions, kick and call eventfds - and how it is taken back.
//! The same sequence starts a backend at activation, after a planned swap, and after a crash.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use splitvisor_wire::ring;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::deadline::{exchange, sequence, ExchangeError, SEQUENCE_TIMEOUT};
use crate::memory::GuestMemory;
use crate::virtio::QueueConfig;

/// What the driver set up at `DRIVER_OK`, kept so that any later backend can be given it.
pub struct Rings {
    pub driver_features: u64,
    pub queues: Vec<QueueConfig>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    /// The backend logs the pages it writes (VHOST_F_LOG_ALL, after SET_LOG_BASE): the VM is
    /// migrating (`handoff::start_logging`).
    pub log: bool,
}

impl Rings {
    /// Indices of the queues the driver made ready.
    pub fn ready(&self) -> impl Iterator<Item = usize> + '_ {
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, _)| i)
    }

    /// The used ring's `idx` of each ready queue, as the guest sees it: where a replacement
    /// backend resumes after its predecessor vanished without handing back its position.
    pub fn used_indices(&self, memory: &GuestMemory) -> Vec<(usize, u16)> {
        self.ready()
            .map(|i| {
                let at = GuestAddress(self.queues[i].used_ring + ring::USED_IDX);
                (i, memory.load::<u16>(at, Ordering::Acquire).unwrap_or(0))
            })
            .collect()
    }

    /// Waits until each queue's used index reached the position the stopped backend returned,
    /// i.e. every request it fetched is completed; false if `timeout` passed first.
    pub fn wait_completed(
        &self,
        memory: &GuestMemory,
        bases: &[(usize, u16)],
        timeout: std::time::Duration,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let used = self.used_indices(memory);
            if bases.iter().all(|b| used.contains(b)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Writes every kick eventfd once. A kick the guest made while no backend was listening
    /// (or that a stopped backend consumed) would otherwise be lost; a spurious one is harmless.
    pub fn kick_all(&self) {
        for i in self.ready() {
            let _ = self.kicks[i].write(1);
        }
    }

    /// Writes every call eventfd once, so the driver looks at each used ring. A backend that
    /// died between publishing a used entry and signalling its call fd (or one stopped by a
    /// swap that never signalled) leaves the driver waiting for an interrupt that never comes:
    /// Linux's virtio-blk, its request done but unseen, waits forever. A spurious used-buffer
    /// interrupt is harmless: the driver finds nothing new.
    pub fn call_all(&self) {
        for i in self.ready() {
            let _ = self.calls[i].write(1);
        }
    }
}

/// The inflight-tracking region a backend handed out (GET_INFLIGHT_FD). The VMM keeps it across
/// the backend's death so that its successor can resubmit what was in flight.
pub struct InflightRegion {
    pub file: File,
    pub info: VhostUserInflight,
}

impl InflightRegion {
    /// Another handle on the same region: the VMM keeps one while a successor tries it.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            info: self.info,
        })
    }
}

/// How the rings get their starting positions on a new backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// A fresh start (activation): every queue at 0, a new inflight region.
    Fresh,
    /// After a planned stop, at the positions the old backend returned (GET_VRING_BASE), with
    /// a new inflight region (nothing is in flight).
    Handover,
    /// After a crash: at the guest's used index, with the kept inflight region so that the
    /// backend resubmits what its predecessor had fetched but not completed.
    Recovery,
}

/// Sends the whole data-plane setup to `frontend` and starts every ready queue at `bases`.
/// Returns the inflight region now in use, if the backend tracks inflight requests. Every
/// message is bounded by the message deadline, and all of them by the sequence deadline.
#[allow(clippy::too_many_arguments)]
pub fn start(
    frontend: &mut Frontend,
    protocol: VhostUserProtocolFeatures,
    backend_features: u64,
    memory: &GuestMemory,
    rings: &Rings,
    bases: &[(usize, u16)],
    resume: Resume,
    kept: Option<InflightRegion>,
) -> Result<Option<InflightRegion>, ExchangeError> {
    let _sequence = sequence(SEQUENCE_TIMEOUT);
    let inflight = if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
        let region = match (resume, kept) {
            (Resume::Recovery, Some(kept)) => kept,
            _ => {
                let ask = VhostUserInflight {
                    num_queues: rings.queues.len() as u16,
                    queue_size: rings.queues.iter().map(|q| q.size).max().unwrap_or(0),
                    ..Default::default()
                };
                let (info, file) =
                    exchange(frontend, "GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
                InflightRegion { file, info }
            }
        };
        exchange(frontend, "SET_INFLIGHT_FD", |f| {
            f.set_inflight_fd(&region.info, region.file.as_raw_fd())
        })?;
        Some(region)
    } else {
        None
    };
    let protocol_bit = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let log_bit = match rings.log {
        true => VhostUserVirtioFeatures::LOG_ALL.bits(),
        false => 0,
    };
    exchange(frontend, "SET_FEATURES", |f| {
        f.set_features(rings.driver_features | protocol_bit | log_bit)
    })?;
    let regions = memory_regions(memory);
    exchange(frontend, "SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
    for &(index, base) in bases {
        let queue = &rings.queues[index];
        let addresses =
            vring_addresses(memory, queue, rings.log).map_err(|source| ExchangeError::Failed {
                message: "SET_VRING_ADDR",
                source,
            })?;
        exchange(frontend, "SET_VRING_NUM", |f| {
            f.set_vring_num(index, queue.size)
        })?;
        exchange(frontend, "SET_VRING_ADDR", |f| {
            f.set_vring_addr(index, &addresses)
        })?;
        exchange(frontend, "SET_VRING_BASE", |f| {
            f.set_vring_base(index, base)
        })?;
        exchange(frontend, "SET_VRING_CALL", |f| {
            f.set_vring_call(index, &rings.calls[index])
        })?;
        exchange(frontend, "SET_VRING_KICK", |f| {
            f.set_vring_kick(index, &rings.kicks[index])
        })?;
        exchange(frontend, "SET_VRING_ENABLE", |f| {
            f.set_vring_enable(index, true)
        })?;
    }
    Ok(inflight)
}

/// Stops every ready queue on `frontend` (GET_VRING_BASE: the backend finishes what it is doing
/// and stops) and returns where each one stopped.
pub fn stop(frontend: &mut Frontend, rings: &Rings) -> Result<Vec<(usize, u16)>, ExchangeError> {
    let _sequence = sequence(SEQUENCE_TIMEOUT);
    rings
        .ready()
        .map(|index| {
            exchange(frontend, "SET_VRING_ENABLE", |f| {
                f.set_vring_enable(index, false)
            })?;
            let base = exchange(frontend, "GET_VRING_BASE", |f| f.get_vring_base(index))?;
            Ok((index, base as u16))
        })
        .collect()
}

/// The memory table: every guest RAM region with its memfd and offset.
fn memory_regions(memory: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
    memory
        .iter()
        .filter_map(|region| {
            let file = region.file_offset()?;
            Some(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

/// Vring addresses in the VMM's address space (vhost-user translates them through the memory
/// table), after checking each ring lies in guest RAM.
fn vring_addresses(
    memory: &GuestMemory,
    q: &QueueConfig,
    log: bool,
) -> Result<VringConfigData, vhost::Error> {
    let host = |gpa: u64, len: u64| -> Result<u64, vhost::Error> {
        if !memory.check_range(GuestAddress(gpa), len as usize) {
            return Err(vhost::Error::InvalidGuestMemory);
        }
        memory
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| vhost::Error::InvalidGuestMemory)
    };
    Ok(VringConfigData {
        queue_max_size: q.max_size,
        queue_size: q.size,
        // With the log: the backend logs its used ring writes at the ring's guest address.
        flags: match log {
            true => VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
            false => 0,
        },
        desc_table_addr: host(q.desc_table, ring::desc_table_len(q.size))?,
        avail_ring_addr: host(q.avail_ring, ring::avail_ring_len(q.size))?,
        used_ring_addr: host(q.used_ring, ring::used_ring_len(q.size))?,
        log_addr: log.then_some(q.used_ring),
    })
}
