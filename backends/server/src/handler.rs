//! The state of one frontend connection and the answer to each vhost-user request.
//!
//! Ring life cycle (vhost-user spec, "Ring states"): a ring starts when it has its size,
//! addresses and kick fd and is enabled (SET_VRING_ENABLE, or at once when
//! VHOST_USER_F_PROTOCOL_FEATURES was not negotiated); GET_VRING_BASE and SET_VRING_ENABLE(0)
//! stop it after the request in progress. At start the inflight region, if the frontend gave
//! one, decides what is resubmitted and where the avail ring resumes.

use splitvisor_wire::host::error::error_chain;
use std::fmt::Display;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use super::chain::DescriptorTable;
use super::dirty_log::DirtyLog;
use super::fdcheck::is_eventfd;
use super::inflight::{self, InflightQueue, InflightRegion, Recovery};
use super::memory::{MemoryTable, MAX_MEM_SLOTS};
use super::worker::{ring_layout_problem, CallFd, QueueSetup, RunningQueue};
use super::VhostUserDevice;

/// A request the handler checked and refused. vhost's `BackendReqHandler` has answered it (a
/// failed REPLY_ACK when the frontend asked for one) before passing the error up, so the
/// connection stays usable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

/// Log `msg` and turn it into the error the frontend gets as a failed REPLY_ACK.
fn refuse(msg: impl Display) -> Error {
    let msg = msg.to_string();
    warn!("refusing request: {msg}");
    Error::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, Refusal(msg)))
}

/// Log `msg` for a request whose reply cannot carry an error: the connection has to end.
fn unanswerable(msg: impl Display) -> Error {
    let msg = msg.to_string();
    warn!("cannot answer request: {msg}");
    Error::ReqHandlerError(io::Error::other(msg))
}

/// Whether `e` is a refusal the frontend was told about (serving goes on), not a broken
/// connection or a message vhost could not parse (and left unanswered).
pub fn is_refusal(e: &Error) -> bool {
    matches!(e, Error::ReqHandlerError(io) if io.get_ref().is_some_and(|inner| inner.is::<Refusal>()))
}

/// Guest addresses of one split ring.
#[derive(Debug, Clone, Copy)]
struct RingAddrs {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

/// What the frontend told us about one vring.
struct Vring {
    /// Ring size from SET_VRING_NUM; 0 until then (the device maximum is used).
    size: u16,
    addrs: Option<RingAddrs>,
    /// Avail index to start from when no inflight history says otherwise (SET_VRING_BASE).
    base: u16,
    kick: Option<File>,
    call: CallFd,
    enabled: bool,
    running: Option<RunningQueue>,
}

impl Vring {
    fn new() -> Self {
        Vring {
            size: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(Mutex::new(None)),
            enabled: false,
            running: None,
        }
    }

    /// Stop the worker, keeping its position as the base of a later start.
    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            if let Some(queue) = running.stop() {
                self.base = queue.next_avail();
            }
        }
    }
}

/// Answers the requests of one frontend connection for device `D`.
pub struct FrontendHandler<D: VhostUserDevice> {
    device: Arc<D>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    memory: MemoryTable,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
    /// The frontend's dirty page log (SET_LOG_BASE), used while it negotiates LOG_ALL.
    log: Option<Arc<DirtyLog>>,
}

impl<D: VhostUserDevice> FrontendHandler<D> {
    pub fn new(device: Arc<D>) -> Self {
        let vrings = (0..device.num_queues()).map(|_| Vring::new()).collect();
        FrontendHandler {
            device,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            memory: MemoryTable::default(),
            vrings,
            inflight: None,
            log: None,
        }
    }

    /// Whether the server can log the device's writes: it sees them only for the queues it
    /// serves itself (a device that drives a queue writes guest memory on its own).
    fn can_log(&self) -> bool {
        (0..self.device.num_queues()).all(|q| !self.device.drives_queue(q))
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Stop every worker (disconnect, RESET_OWNER).
    pub fn stop_all_queues(&mut self) {
        for vring in &mut self.vrings {
            vring.stop();
        }
    }

    fn offered_features(&self) -> u64 {
        let log = match self.can_log() {
            true => VhostUserVirtioFeatures::LOG_ALL.bits(),
            false => 0,
        };
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | log
    }

    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        let mut p = splitvisor_wire::protocol::SERVER_OFFERS;
        if self.device.config_space().is_some() {
            p |= VhostUserProtocolFeatures::CONFIG;
        }
        if self.can_log() {
            p |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        p
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        let count = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or_else(|| {
            refuse(format!(
                "vring {index} does not exist (the device has {count})"
            ))
        })
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// Start vring `index` if it is complete, enabled and not running yet.
    fn try_start(&mut self, index: usize) -> Result<()> {
        let max = self.device.max_queue_size();
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        let indirect = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC);
        let region = self.inflight.clone();
        let log = match self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() {
            0 => None,
            _ => self.log.clone(),
        };
        let memory = self.memory.atomic();
        let device = self.device.clone();
        let vring = &mut self.vrings[index];
        let (Some(addrs), Some(kick), true, None) =
            (vring.addrs, &vring.kick, vring.enabled, &vring.running)
        else {
            return Ok(());
        };
        let size = if vring.size == 0 { max } else { vring.size };
        let mut queue = Queue::new(max).map_err(|e| refuse(format!("queue {index}: {e}")))?;
        queue.set_size(size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(addrs.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(addrs.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(addrs.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let mem = memory.memory();
        if !queue.is_valid(&*mem) {
            return Err(refuse(format!(
                "queue {index}: ring of {size} at {:#x}/{:#x}/{:#x} is misaligned or outside guest memory",
                addrs.desc.0, addrs.avail.0, addrs.used.0
            )));
        }
        if let Some(problem) = ring_layout_problem(addrs.desc, addrs.avail, addrs.used, size) {
            return Err(refuse(format!(
                "queue {index}: ring of {size} cannot be served: {problem}"
            )));
        }
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| refuse(format!("queue {index}: cannot read the used index: {e}")))?
            .0;
        let mut tracking = region.and_then(|r| InflightQueue::new(r, index));
        if let Some(t) = &tracking {
            if t.capacity() < size {
                warn!(
                    "queue {index}: the inflight region tracks {} descriptors but the ring has {size}; \
                     this queue runs without inflight tracking",
                    t.capacity()
                );
                tracking = None;
            }
        }
        let driven = self.device.drives_queue(index);
        let recovery = match tracking.as_mut() {
            Some(t) if driven => {
                t.restart(used_idx);
                Recovery {
                    resubmit: Vec::new(),
                    next_avail: Some(used_idx),
                }
            }
            Some(t) => {
                // The worker publishes batches: the used ring says which heads are done.
                let ring = GuestAddress(queue.used_ring());
                let used_head_at = |i: u16| {
                    let elem = ring.checked_add(4 + 8 * u64::from(i % size))?;
                    let id: u32 = mem.read_obj(elem).ok()?;
                    u16::try_from(u32::from_le(id)).ok()
                };
                t.recover_with(index, size, used_idx, used_head_at)
            }
            // A driven queue takes the ring over at the guest's used index, region or not.
            None if driven => Recovery {
                resubmit: Vec::new(),
                next_avail: Some(used_idx),
            },
            None => Recovery::default(),
        };
        let next_avail = match recovery.next_avail {
            Some(from_region) => {
                if from_region != vring.base {
                    info!(
                        "queue {index}: resuming at avail index {from_region} (used {used_idx} + {} in flight), \
                         not at the frontend's base {}",
                        recovery.resubmit.len(),
                        vring.base
                    );
                }
                from_region
            }
            None => vring.base,
        };
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        let kick = kick
            .try_clone()
            .map_err(|e| refuse(format!("queue {index}: cannot duplicate the kick fd: {e}")))?;
        let setup = QueueSetup {
            index,
            queue,
            table: DescriptorTable {
                addr: addrs.desc,
                size,
                indirect,
            },
            kick,
            call: vring.call.clone(),
            memory,
            inflight: tracking,
            resubmit: recovery.resubmit,
            log,
        };
        let start = match driven {
            true => RunningQueue::start_driven,
            false => RunningQueue::start,
        };
        let running = start(setup, device)
            .map_err(|e| refuse(format!("queue {index}: cannot start its worker: {e}")))?;
        vring.running = Some(running);
        info!("queue {index}: started, {size} entries, avail index {next_avail}, used index {used_idx}");
        Ok(())
    }

    fn check_stopped(&self, what: &str) -> Result<()> {
        if self.vrings.iter().any(|v| v.running.is_some()) {
            return Err(refuse(format!(
                "{what} while queues are running; stop them first"
            )));
        }
        Ok(())
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for FrontendHandler<D> {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all_queues();
        self.vrings = (0..self.device.num_queues())
            .map(|_| Vring::new())
            .collect();
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        Err(refuse("RESET_DEVICE is not offered"))
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let unknown = features & !self.offered_features();
        if unknown != 0 {
            return Err(refuse(format!(
                "SET_FEATURES with unoffered bits {unknown:#x}"
            )));
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.vrings.len() {
                self.vrings[index].enabled = true;
                self.try_start(index)?;
            }
        }
        self.device.features_acked(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.memory
            .set(regions, files)
            .map_err(|e| refuse(format!("SET_MEM_TABLE: {}", error_chain(&e))))?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = self.device.max_queue_size();
        let vring = self.vring(index)?;
        if vring.running.is_some() {
            return Err(refuse(format!("SET_VRING_NUM on running vring {index}")));
        }
        match u16::try_from(num) {
            Ok(n) if n > 0 && n <= max && n.is_power_of_two() => {
                vring.size = n;
                Ok(())
            }
            _ => Err(refuse(format!(
                "vring {index}: size {num} is not a power of two between 1 and {max}"
            ))),
        }
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let translate = |addr| self.memory.to_guest(addr).map_err(refuse);
        let addrs = RingAddrs {
            desc: translate(descriptor)?,
            avail: translate(available)?,
            used: translate(used)?,
        };
        let vring = self.vring(index)?;
        if vring.running.is_some() {
            return Err(refuse(format!("SET_VRING_ADDR on running vring {index}")));
        }
        vring.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let vring = self.vring(index)?;
        vring.base = u16::try_from(base).map_err(|_| {
            refuse(format!(
                "SET_VRING_BASE {base} for vring {index} does not fit a split ring's 16-bit index"
            ))
        })?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let count = self.vrings.len();
        let Some(vring) = self.vrings.get_mut(index as usize) else {
            return Err(unanswerable(format!(
                "GET_VRING_BASE for vring {index}, the device has {count}"
            )));
        };
        vring.stop();
        // A stopped ring restarts only with a new SET_VRING_KICK.
        vring.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(vring.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let vring = self.vring(u32::from(index))?;
        let Some(fd) = fd else {
            return Err(refuse(format!(
                "vring {index}: polling without a kick fd is not supported"
            )));
        };
        if !is_eventfd(&fd) {
            return Err(refuse(format!(
                "vring {index}: the kick fd is not an eventfd"
            )));
        }
        // A new kick fd for a running ring: restart the worker on it where it stopped.
        vring.stop();
        vring.kick = Some(fd);
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let vring = self.vring(u32::from(index))?;
        if fd.as_ref().is_some_and(|f| !is_eventfd(f)) {
            return Err(refuse(format!(
                "vring {index}: the call fd is not an eventfd"
            )));
        }
        *vring.call.lock().unwrap_or_else(|e| e.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // Nothing is ever reported on the error fd; accepting it keeps frontends happy.
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let offered = self.offered_protocol();
        match VhostUserProtocolFeatures::from_bits(features) {
            Some(f) if offered.contains(f) => {
                self.acked_protocol = f;
                Ok(())
            }
            _ => Err(refuse(format!(
                "SET_PROTOCOL_FEATURES {features:#x} is not a subset of the offered {:#x}",
                offered.bits()
            ))),
        }
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let vring = self.vring(index)?;
        vring.enabled = enable;
        if enable {
            self.try_start(index as usize)
        } else {
            vring.stop();
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let config = self.device.config_space().unwrap_or(&[]);
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => Ok(config[start..end].to_vec()),
            _ => Err(refuse(format!(
                "GET_CONFIG {offset}+{size} is outside the {}-byte config space",
                config.len()
            ))),
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // The config space has no driver-writable field this server offers (no CONFIG_WCE);
        // writes are acknowledged and ignored, as vhost-user-backend did before.
        log::debug!(
            "SET_CONFIG {offset}+{} ignored: read-only config space",
            buf.len()
        );
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(refuse("GPU_SET_SOCKET is not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(unanswerable("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        let len = match inflight::check_geometry(num_queues, queue_size, self.vrings.len()) {
            Ok(()) => inflight::region_len(num_queues, queue_size),
            Err(e) => {
                // The reply has no error field: a region of size 0 means "none" to frontends.
                warn!("GET_INFLIGHT_FD: {e}; answering with no region");
                0
            }
        };
        let file = inflight::create_region_file(len).map_err(unanswerable)?;
        info!("GET_INFLIGHT_FD: {len}-byte region for {num_queues} queue(s) of {queue_size}");
        Ok((
            VhostUserInflight {
                mmap_size: len as u64,
                mmap_offset: 0,
                num_queues,
                queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        self.check_stopped("SET_INFLIGHT_FD")?;
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        let region = InflightRegion::map(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            num_queues,
            queue_size,
            self.vrings.len(),
        )
        .map_err(|e| refuse(format!("SET_INFLIGHT_FD: {}", error_chain(&e))))?;
        info!(
            "SET_INFLIGHT_FD: tracking {} queue(s) of {} descriptors",
            region.num_queues(),
            region.queue_size()
        );
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        self.memory
            .add(region, fd)
            .map_err(|e| refuse(format!("ADD_MEM_REG: {}", error_chain(&e))))?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        self.memory.remove(region).map_err(refuse)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(unanswerable("SET_DEVICE_STATE_FD is not supported"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(refuse("CHECK_DEVICE_STATE is not supported"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(unanswerable("GET_SHMEM_CONFIG is not supported"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        // Running queues keep the log they started with: the frontend restarts them (as
        // QEMU's does) to log into a new one.
        let mapped = DirtyLog::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| unanswerable(format!("SET_LOG_BASE: {}", error_chain(&e))))?;
        info!("dirty log of {} bytes set", log.mmap_size);
        self.log = Some(Arc::new(mapped));
        Ok(())
    }
}
