//! A VM: KVM, its memfd-backed memory, the in-kernel irqchip, the buses and their devices,
//! and the vCPUs - built from a `VmConfig`, run until it ends.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use log::{debug, info};
use splitvisor_wire::host::signals;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::control::{AtaInfo, ControlParts, GuestInfo, VmControl};
use crate::api::upgrade_answer::PendingAnswer;
use crate::api::{ApiError, ApiListener};
use crate::attach::{AttachError, Attached, AttachedDevice, Attacher};
use crate::boot::acpi::{AcpiPlatform, MmioWindow};
use crate::boot::{self, vcpu_regs, BootEntry, BootError, BootRequest};
use crate::bus::{Bus, BusError, SharedDevice};
use crate::config::{KernelSource, VmConfig};
use crate::devices::debug_exit::DebugExit;
use crate::devices::pv_console::PvConsole;
use crate::devices::serial::{SerialConsole, SerialError};
use crate::devices::{acpi_power, i8042};
use crate::event_loop::EventLoop;
use crate::layout;
use crate::memory::{GuestMemory, MemoryError};
use crate::pause::PauseGate;
use crate::seccomp::ThreadKind;
use crate::snapshot::format::Manifest;
use crate::snapshot::take::{self, RestoreError, SnapshotSource, VcpuCaptures};
use crate::upgrade::exec::{ExecContext, Upgrader};
use crate::upgrade::resume::Handoff;
use crate::upgrade::Relaunch;
use crate::vcpu::{self, ExitCounters, Vcpu, VcpuContext, VcpuError};
use crate::vm_end::{EndSignal, VmEnd};

mod kvm;
mod restore;
use kvm::{create_kvm_vm, warn_if_pvm};
use restore::{prepare_restore, restore_state, snapshot_source, Start};
use vm_superio::serial::SerialState;

/// xAPIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_XAPIC_VCPUS: usize = 254;

/// Where KVM is, unless `SPLITVISOR_KVM_DEVICE` says otherwise.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {}: {source}; {hint}", .path.display())]
    OpenKvm {
        path: PathBuf,
        source: kvm_ioctls::Error,
        hint: &'static str,
    },
    #[error("--vcpus {requested} is more than KVM allows on this host: at most {max} (KVM's limit, and {MAX_XAPIC_VCPUS} for xAPIC IDs)")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("KVM_SET_USER_MEMORY_REGION for guest RAM at {0:#x} failed")]
    MapMemory(u64, #[source] kvm_ioctls::Error),
    #[error("creating the in-kernel interrupt controller failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel PIT (KVM_CREATE_PIT2) failed")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    TssAddress(#[source] kvm_ioctls::Error),
    #[error("could not prepare the guest for boot")]
    Boot(#[from] BootError),
    #[error("could not write the boot GDT")]
    BootGdt(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("registering the {0} interrupt with KVM failed")]
    Irqfd(&'static str, #[source] kvm_ioctls::Error),
    #[error("placing a device on the bus failed")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("could not start the thread for vCPU {0}")]
    SpawnVcpu(u8, #[source] std::io::Error),
    #[error("could not set up signal handling")]
    Signals(#[source] vmm_sys_util::errno::Error),
    #[error("could not start the signal-watching thread")]
    SpawnSignalThread(#[source] std::io::Error),
    #[error("could not start the VMM event loop")]
    EventLoop(#[source] std::io::Error),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("could not start counting device completions")]
    Sampler(#[source] std::io::Error),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error("could not restore the snapshot")]
    Snapshot(#[source] Box<RestoreError>),
    #[error("could not start the upgrade thread")]
    Upgrader(#[source] std::io::Error),
}

/// How often the used rings are sampled to count completed requests (see
/// `VhostUserDevice::sample_completions`): often enough that no queue completes 65536
/// requests in between.
const COMPLETION_SAMPLE_PERIOD: Duration = Duration::from_millis(10);

/// A snapshot to start the VM from instead of booting (`splitvisor run --restore DIR`).
pub struct RestoreFrom<'a> {
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
}

/// What a live upgrade of this VM needs (see `upgrade`), and the answer a just-upgraded VMM
/// owes.
#[derive(Default)]
struct UpgradeSetup {
    /// How to start the VMM again; `None`: upgrades are refused.
    relaunch: Option<Relaunch>,
    /// Descriptors inherited from the VMM's parent.
    keep_fds: Vec<RawFd>,
    upgrades: u64,
    was_paused: bool,
    answer: Option<PendingAnswer>,
}

pub struct Vm {
    _vm_fd: Arc<VmFd>,
    _memory: GuestMemory,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    serial: Arc<Mutex<SerialConsole>>,
    events: Arc<EventLoop>,
    control: Arc<VmControl>,
    api: Option<ApiListener>,
    upgrade: UpgradeSetup,
}

impl Vm {
    /// Creates the VM and everything in it; the vCPUs are ready at the entry point.
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        Self::build(config, Start::Boot)
    }

    /// Creates the VM as `config` says (its memory and vCPU count must be the snapshot's) and
    /// puts the snapshot's memory, interrupt controllers, clock, vCPUs and devices back: it
    /// continues where the snapshot was taken.
    pub fn restore(config: &VmConfig, from: &RestoreFrom) -> Result<Self, VmError> {
        Self::build(config, Start::Snapshot(from))
    }

    /// Takes the VM over from the process this one replaced (`upgrade`): its memory is the
    /// handed-over memfd, its state the captured one, its API the same listener. The upgrade
    /// request is answered once the vCPUs run (`answer_upgrade`).
    pub fn resume_upgrade(config: &VmConfig, handoff: Handoff) -> Result<Self, VmError> {
        let start = Start::Upgrade {
            manifest: &handoff.state.manifest,
            memory: &handoff.memory,
            started_at_ns: handoff.state.started_at_ns,
            api: handoff.api.as_ref(),
        };
        let mut vm = Self::build(config, start)?;
        info!(
            "upgrade: VM rebuilt {} us after the pause",
            crate::upgrade::monotonic_ns().saturating_sub(handoff.state.paused_at_ns) / 1000
        );
        vm.upgrade.keep_fds = handoff.state.keep_fds;
        vm.upgrade.upgrades = handoff.state.upgrades;
        vm.upgrade.was_paused = handoff.state.was_paused;
        Ok(vm)
    }

    /// Lets `PUT /vm/upgrade` re-execute the VMM as `relaunch` says.
    pub fn enable_upgrade(&mut self, relaunch: Relaunch) {
        self.upgrade.relaunch = Some(relaunch);
    }

    /// Sends `answer` to the upgrade request once the vCPUs run.
    pub fn answer_upgrade(&mut self, answer: PendingAnswer) {
        self.upgrade.answer = Some(answer);
    }

    fn build(config: &VmConfig, start: Start) -> Result<Self, VmError> {
        // Before the VMM opens anything: what it inherited, to keep across upgrades.
        let keep_fds = crate::upgrade::exec::open_descriptors();
        let (memory_file, api) = match start {
            Start::Upgrade { memory, api, .. } => (Some(memory), api),
            _ => (None, None),
        };
        let (kvm, vm_fd, memory) = create_kvm_vm(config, memory_file)?;
        let api = api_listener(config, api)?;
        let events = EventLoop::new().map_err(VmError::EventLoop)?;
        let end = Arc::new(EndSignal::default());
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let attached = Attacher {
            vm: &vm_fd,
            memory: &memory,
            mmio: &mut mmio,
            pio: &mut pio,
            events: &events,
            end: &end,
        }
        .attach_all(config)?;
        let boot_entry = match start.manifest() {
            Some(manifest) => prepare_restore(manifest, config, &memory, &attached)?,
            None => boot_guest(&vm_fd, &memory, config, &attached)?,
        };
        let serial_state = start.manifest().and_then(take::saved_serial);
        let serial = attach_platform_ports(
            &vm_fd,
            config,
            (&boot_entry, serial_state.as_ref()),
            (&end, matches!(start, Start::Upgrade { .. })),
            (&memory, &mut pio),
        )?;
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            end,
            exits: Arc::new(ExitCounters::default()),
            pause: Arc::new(PauseGate::default()),
            capture: Arc::new(VcpuCaptures::default()),
        };
        let vm_fd = Arc::new(vm_fd);
        let snapshot = snapshot_source(&kvm, &vm_fd, &memory, &ctx, &serial);
        sample_completions(&events, &attached.devices)?;
        let control = control_of(
            config,
            &boot_entry,
            &ctx,
            attached,
            (snapshot, start.started()),
        );

        let mut vcpus = (0..config.vcpus)
            .map(|i| Vcpu::new(&kvm, &vm_fd, i, config.vcpus, &boot_entry))
            .collect::<Result<Vec<_>, _>>()?;
        restore_state(&start, &vm_fd, &memory, &mut vcpus, control.devices())?;
        info!(
            "VM ready: {} vCPU(s), {} MiB",
            config.vcpus,
            config.memory.0 >> 20
        );
        Ok(Self {
            _vm_fd: vm_fd,
            _memory: memory,
            vcpus,
            ctx,
            serial,
            events,
            control,
            api,
            upgrade: UpgradeSetup {
                keep_fds,
                ..Default::default()
            },
        })
    }

    /// Exit and interrupt counts so far (see `stats`).
    pub fn stats(&self) -> serde_json::Value {
        crate::api::stats::snapshot(
            &self.ctx.exits,
            &self.ctx.pio,
            &self.ctx.mmio,
            self.control.devices(),
        )
    }

    /// The vhost-user devices, in the order they were attached.
    pub fn devices(&self) -> &[AttachedDevice] {
        self.control.devices()
    }

    /// Runs the vCPUs until the guest exits, a vCPU fails, or SIGINT/SIGTERM arrives.
    /// Returns how it ended and the final `stats`.
    pub fn run(mut self) -> Result<(VmEnd, serde_json::Value), VmError> {
        crate::vcpu_kick::install_handler().map_err(VmError::Signals)?;
        watch_termination_signals(self.ctx.end.clone())?;
        // After the signal watcher: SIGINT/SIGTERM end the VM in order, and this guard (dropped
        // when `run` returns, any way) restores the terminal after everything stopped.
        let console = crate::console::start(&self.serial, &self.ctx.end)?;
        self.start_upgrader(&console)?;
        if self.upgrade.was_paused {
            // Paused before the upgrade: the vCPUs park before their first KVM_RUN.
            self.ctx.pause.request_pause();
        }
        let event_thread = self.events.spawn().map_err(VmError::EventLoop)?;
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let index = vcpu.index();
            let ctx = self.ctx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    crate::seccomp::confine(ThreadKind::Vcpu);
                    vcpu::run_catching_panics(vcpu, ctx)
                })
                .map_err(|e| VmError::SpawnVcpu(index, e))?;
            threads.push(handle);
        }
        self.control
            .set_vcpu_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        let api = self
            .api
            .take()
            .map(|listener| listener.serve(self.control.clone()))
            .transpose()?;
        self.send_upgrade_answer();
        // Every thread is started: what is left here is waiting, stopping and reporting.
        crate::seccomp::confine(ThreadKind::Main);
        let end = self.ctx.end.wait();
        // No API request may kick a thread once it is joined.
        drop(api);
        self.control.clear_vcpu_threads();
        for thread in threads {
            crate::vcpu_kick::stop_vcpu_thread(thread);
        }
        self.events.stop();
        let _ = event_thread.join();
        self.serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .flush();
        let stats = self.stats();
        drop(console);
        Ok((end, stats))
    }

    /// After a live upgrade, once the vCPUs run: answers the upgrade request and says so.
    fn send_upgrade_answer(&mut self) {
        let Some(answer) = self.upgrade.answer.take() else {
            return;
        };
        let report = answer.send(self.control.status().state);
        crate::eprintln_whole!(
            "splitvisor: live upgrade {} done: now splitvisor {} ({}), pid {}, {} us downtime",
            report.upgrades,
            report.version,
            report.binary,
            report.pid,
            report.downtime_us
        );
    }

    /// Starts the upgrader thread (unconfined, see `upgrade::exec`) if upgrades are enabled;
    /// before the main thread confines itself, whose filter every thread it starts inherits.
    fn start_upgrader(&mut self, console: &crate::console::Console) -> Result<(), VmError> {
        let Some(relaunch) = self.upgrade.relaunch.take() else {
            return Ok(());
        };
        let memory = self
            ._memory
            .iter()
            .next()
            .and_then(|region| region.file_offset())
            .map(|fo| fo.file().try_clone())
            .transpose()
            .map_err(VmError::Upgrader)?
            .ok_or_else(|| VmError::Upgrader(std::io::Error::other("guest memory has no file")))?;
        // Resolved now, while the binary is surely where it was started from.
        let binary = std::env::current_exe().map_err(VmError::Upgrader)?;
        let upgrader = Upgrader::spawn(ExecContext {
            memory,
            api: self.api.as_ref().map(ApiListener::raw_fd),
            relaunch,
            keep_fds: self.upgrade.keep_fds.clone(),
            terminal: console.terminal(),
            serial: self.serial.clone(),
            upgrades: self.upgrade.upgrades,
        })
        .map_err(VmError::Upgrader)?;
        self.control.set_upgrader(upgrader, binary);
        Ok(())
    }
}

/// The API's socket, bound first (a socket in use is a configuration error worth failing on
/// before boot), or after a live upgrade the listener the old process handed over.
fn api_listener(
    config: &VmConfig,
    inherited: Option<&UnixListener>,
) -> Result<Option<ApiListener>, VmError> {
    Ok(match (inherited, config.api_socket.as_deref()) {
        (Some(listener), Some(path)) => Some(ApiListener::adopt(listener, path)?),
        (_, path) => path.map(ApiListener::bind).transpose()?,
    })
}

/// Loads the kernel and writes the boot tables (ACPI describing the attached devices, for
/// Linux); a Linux guest also gets the in-kernel PIT.
fn boot_guest(
    vm_fd: &VmFd,
    memory: &GuestMemory,
    config: &VmConfig,
    attached: &Attached,
) -> Result<BootEntry, VmError> {
    let acpi = config.acpi.then(|| AcpiPlatform {
        vcpus: config.vcpus,
        virtio_mmio: attached
            .devices
            .iter()
            .map(|d| MmioWindow {
                base: d.mmio_base,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: d.gsi,
            })
            .collect(),
    });
    let boot_entry = boot::prepare(
        memory,
        &BootRequest {
            kernel: &config.kernel,
            initramfs: config.initramfs.as_deref(),
            cmdline: config.cmdline.as_deref(),
            device_words: &attached.cmdline_words,
            vcpus: config.vcpus,
            acpi: acpi.as_ref(),
        },
    )?;
    vcpu_regs::write_boot_gdt(memory, &boot_entry.protocol).map_err(VmError::BootGdt)?;
    debug!(
        "{} guest, entry {:#x}",
        boot_entry.format.guest_kind(),
        boot_entry.entry
    );
    if boot_entry.format.is_linux() {
        warn_if_pvm();
        // Linux calibrates and ticks with the PIT until it has found better clocks.
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(VmError::Pit)?;
    }
    Ok(boot_entry)
}

/// The serial console, the debug-exit port and, for Linux, the power-off and reset ports.
/// The serial port starts as `serial_state` says when restoring a snapshot.
fn attach_platform_ports(
    vm_fd: &VmFd,
    config: &VmConfig,
    (boot_entry, serial_state): (&BootEntry, Option<&SerialState>),
    (end, upgraded): (&Arc<EndSignal>, bool),
    (memory, pio): (&GuestMemory, &mut Bus),
) -> Result<Arc<Mutex<SerialConsole>>, VmError> {
    // After a live upgrade, a --serial file goes on where the old process left it.
    let (console, serial_irq) = match serial_state {
        Some(state) => SerialConsole::with_state(&config.serial, state, upgraded)?,
        None => SerialConsole::new(&config.serial)?,
    };
    vm_fd
        .register_irqfd(&serial_irq, layout::SERIAL_GSI)
        .map_err(|e| VmError::Irqfd("serial", e))?;
    let serial = Arc::new(Mutex::new(console));
    pio.insert(
        layout::SERIAL_PORT.into(),
        layout::SERIAL_PORT_LEN,
        "serial",
        serial.clone() as SharedDevice,
    )?;
    if boot_entry.format.is_linux() {
        // How Linux powers off (ACPI S5) and reboots (ACPI reset register, or the keyboard
        // controller's reset pulse with reboot=k).
        acpi_power::attach(pio, end.clone())?;
        i8042::attach(pio, end.clone())?;
    } else {
        pio.insert(
            layout::PV_CONSOLE_PORT.into(),
            layout::PV_CONSOLE_PORT_LEN,
            "pv-console",
            Arc::new(Mutex::new(PvConsole::new(memory.clone(), serial.clone()))),
        )?;
    }
    pio.insert(
        layout::DEBUG_EXIT_PORT.into(),
        1,
        "debug-exit",
        Arc::new(Mutex::new(DebugExit::new(end.clone()))),
    )?;
    Ok(serial)
}

/// The control API's view of the VM.
fn control_of(
    config: &VmConfig,
    boot_entry: &BootEntry,
    ctx: &VcpuContext,
    attached: Attached,
    (snapshot, started): (Option<SnapshotSource>, std::time::Instant),
) -> Arc<VmControl> {
    Arc::new(VmControl::new(ControlParts {
        guest: guest_info(config, boot_entry),
        vcpus: config.vcpus,
        memory_bytes: config.memory.0,
        pause: ctx.pause.clone(),
        end: ctx.end.clone(),
        devices: attached.devices,
        ata: attached.ata.map(|(id, disk)| AtaInfo { id, disk }),
        exits: ctx.exits.clone(),
        pio: ctx.pio.clone(),
        mmio: ctx.mmio.clone(),
        backend_stats: config.backend_stats_sockets(),
        snapshot,
        started,
    }))
}

/// What `GET /vm` says the VM boots.
fn guest_info(config: &VmConfig, boot_entry: &BootEntry) -> GuestInfo {
    GuestInfo {
        kind: boot_entry.format.guest_kind(),
        kernel: match &config.kernel {
            KernelSource::Embedded => "<embedded guest>".to_string(),
            KernelSource::File(path) => path.display().to_string(),
        },
    }
}

/// Counts completed requests of every vhost-user device from its used rings, periodically.
fn sample_completions(events: &EventLoop, devices: &[AttachedDevice]) -> Result<(), VmError> {
    if devices.is_empty() {
        return Ok(());
    }
    let timer_error = |e: vmm_sys_util::errno::Error| VmError::Sampler(e.into());
    let mut timer = vmm_sys_util::timerfd::TimerFd::new().map_err(timer_error)?;
    timer
        .reset(COMPLETION_SAMPLE_PERIOD, Some(COMPLETION_SAMPLE_PERIOD))
        .map_err(timer_error)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&timer);
    let shared: Vec<_> = devices.iter().map(|d| d.device.clone()).collect();
    events
        .add(fd, vmm_sys_util::epoll::EventSet::IN, move |_| {
            let _ = timer.wait();
            // A device busy with its backend is sampled next time: the event loop must not wait.
            for device in &shared {
                if let Ok(mut device) = device.try_lock() {
                    device.device_mut().sample_completions();
                }
            }
            crate::event_loop::Next::Keep
        })
        .map_err(VmError::Sampler)?;
    Ok(())
}

/// SIGINT/SIGTERM end the VM in order instead of killing the process mid-write.
/// Blocking them here is inherited by the threads spawned later, so only the watcher receives
/// them.
fn watch_termination_signals(end: Arc<EndSignal>) -> Result<(), VmError> {
    signals::spawn_signal_thread(
        &signals::STOP,
        || crate::seccomp::confine(ThreadKind::Signals),
        move |signal| {
            info!("received signal {signal}; stopping the VM");
            end.end(VmEnd::Interrupted);
        },
    )
    .map_err(VmError::SpawnSignalThread)
}
