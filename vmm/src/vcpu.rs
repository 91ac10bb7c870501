//! One vCPU: its KVM file descriptor, its start-up state, and the `KVM_RUN` loop that hands
//! port and MMIO exits to the buses. No device address appears here.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, warn};

use crate::boot::{cpuid, lapic, vcpu_regs, BootEntry, BootProtocol};
use crate::bus::Bus;
use crate::pause::PauseGate;
use crate::snapshot::take::VcpuCaptures;
use crate::vm_end::{EndSignal, VmEnd};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU for vCPU {0} failed")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("setting up vCPU {index} ({step}) failed")]
    Configure {
        index: u8,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Exit counts by kind, shared by all vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub other: AtomicU64,
}

/// What a vCPU thread needs besides its own fd.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub end: Arc<EndSignal>,
    pub exits: Arc<ExitCounters>,
    pub pause: Arc<PauseGate>,
    /// A snapshot's request to capture this vCPU while it is parked.
    pub capture: Arc<VcpuCaptures>,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` and puts it in the boot state. For the project's guest every vCPU
    /// starts at the entry point (its contract); for Linux only the boot CPU does, and the
    /// others wait in KVM for the kernel's INIT/SIPI, as on real hardware.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        index: u8,
        count: u8,
        boot: &BootEntry,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        let step = |step: &'static str| {
            move |source| VcpuError::Configure {
                index,
                step,
                source,
            }
        };
        let mut ids = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(step("KVM_GET_SUPPORTED_CPUID"))?;
        // The guest times its benchmarks with the TSC; tell it the frequency (KVM's leaf).
        let tsc_khz = fd.get_tsc_khz().ok();
        cpuid::filter(&mut ids, index, count, tsc_khz);
        fd.set_cpuid2(&ids).map_err(step("KVM_SET_CPUID2"))?;
        let linux = matches!(boot.protocol, BootProtocol::Linux { .. });
        if linux {
            // Linux expects what firmware leaves behind: LINT0 in virtual-wire mode (the
            // 8259's ExtINT, used until the IOAPIC is set up) and LINT1 as NMI.
            let mut lapic = fd.get_lapic().map_err(step("KVM_GET_LAPIC"))?;
            lapic::set_virtual_wire(&mut lapic);
            fd.set_lapic(&lapic).map_err(step("KVM_SET_LAPIC"))?;
            fd.set_msrs(&lapic::boot_msrs())
                .map_err(step("KVM_SET_MSRS"))?;
            if index > 0 {
                return Ok(Self { index, fd });
            }
        }
        let sregs = fd.get_sregs().map_err(step("KVM_GET_SREGS"))?;
        fd.set_sregs(&vcpu_regs::sregs(sregs, &boot.protocol))
            .map_err(step("KVM_SET_SREGS"))?;
        fd.set_regs(&vcpu_regs::regs(boot, index))
            .map_err(step("KVM_SET_REGS"))?;
        fd.set_fpu(&vcpu_regs::fpu()).map_err(step("KVM_SET_FPU"))?;
        if index > 0 {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(step("KVM_SET_MP_STATE"))?;
        }
        Ok(Self { index, fd })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU, for snapshot capture and restore (`snapshot::vcpu_state`).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Runs until the VM ends; any reason this vCPU finds to end it is recorded in `ctx.end`.
    pub fn run(&mut self, ctx: &VcpuContext) {
        loop {
            let (index, fd) = (self.index, &mut self.fd);
            ctx.pause
                .park_if_requested(&ctx.end, || ctx.capture.serve(index, fd));
            if ctx.end.is_stopping() {
                return;
            }
            if let Some(why) = self.run_once(ctx) {
                ctx.end.end(why);
                return;
            }
        }
    }

    /// One `KVM_RUN`; returns why the VM must end, if it must.
    fn run_once(&mut self, ctx: &VcpuContext) -> Option<VmEnd> {
        let index = self.index;
        let kvm_run: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // The access width of a port exit; `data` holds `count` of them for string I/O.
        let io_width = || {
            // SAFETY: read only after a KVM_EXIT_IO, when `io` is the union member KVM filled
            // in; the mapping lives as long as the vCPU fd and `io` does not overlap the data
            // bytes the exit borrows.
            usize::from(unsafe { (*kvm_run).__bindgen_anon_1.io.size })
        };
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.exits.pio.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.write_repeated(u64::from(port), io_width(), data) {
                    debug!("vCPU {index}: write to unclaimed port {port:#x} ignored");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.exits.pio.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.read_repeated(u64::from(port), io_width(), data) {
                    // What an empty ISA bus returns.
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.exits.mmio.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.write(addr, data) {
                    debug!("vCPU {index}: MMIO write to unclaimed {addr:#x} ignored");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.exits.mmio.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::Hlt) => {
                // Only reached without an in-kernel LAPIC to wake us: a halted CPU that
                // nothing can wake just waits for the VM to end.
                ctx.exits.other.fetch_add(1, Ordering::Relaxed);
                while ctx.end.wait_timeout(Duration::from_secs(3600)).is_none() {}
            }
            Ok(VcpuExit::Shutdown) => {
                return Some(VmEnd::Shutdown {
                    vcpu: index,
                    detail: self.dump_registers(),
                })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(VmEnd::Shutdown {
                    vcpu: index,
                    detail: format!("system event {kind}\n{}", self.dump_registers()),
                })
            }
            Ok(VcpuExit::InternalError) => {
                let suberror = self.internal_suberror();
                return Some(VmEnd::InternalError {
                    vcpu: index,
                    detail: format!(
                        "KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({})\n{}",
                        describe_suberror(suberror),
                        self.dump_registers()
                    ),
                });
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VmEnd::InternalError {
                    vcpu: index,
                    detail: format!(
                        "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu}\n{}",
                        self.dump_registers()
                    ),
                })
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let what = format!("{other:?}");
                return Some(VmEnd::VcpuFailed {
                    vcpu: index,
                    detail: format!("unexpected exit {what}\n{}", self.dump_registers()),
                });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Some(VmEnd::VcpuFailed {
                    vcpu: index,
                    detail: format!("KVM_RUN failed: {e}"),
                })
            }
        }
        None
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the union is
        // the one KVM filled in.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// The registers in the layout of the kernel's `kvm_show_regs`, for crash reports.
    pub fn dump_registers(&self) -> String {
        let mut out = String::new();
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return format!("(registers unavailable: {e})"),
        };
        let _ = writeln!(
            out,
            "rip {:016x}  rsp {:016x}  rflags {:016x}",
            regs.rip, regs.rsp, regs.rflags
        );
        let rows = [
            [
                ("rax", regs.rax),
                ("rbx", regs.rbx),
                ("rcx", regs.rcx),
                ("rdx", regs.rdx),
            ],
            [
                ("rsi", regs.rsi),
                ("rdi", regs.rdi),
                ("rbp", regs.rbp),
                ("r8 ", regs.r8),
            ],
            [
                ("r9 ", regs.r9),
                ("r10", regs.r10),
                ("r11", regs.r11),
                ("r12", regs.r12),
            ],
            [
                ("r13", regs.r13),
                ("r14", regs.r14),
                ("r15", regs.r15),
                ("cr2", sregs.cr2),
            ],
        ];
        for row in rows {
            for (name, value) in row {
                let _ = write!(out, "{name} {value:016x}  ");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "cr0 {:016x}  cr3 {:016x}  cr4 {:016x}  efer {:016x}",
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        );
        for (name, seg) in [
            ("cs", sregs.cs),
            ("ss", sregs.ss),
            ("ds", sregs.ds),
            ("tr", sregs.tr),
        ] {
            let _ = writeln!(
                out,
                "{name} {:04x} base {:016x} limit {:08x} type {:x} dpl {} l {} db {} present {}",
                seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l, seg.db, seg.present
            );
        }
        let _ = write!(
            out,
            "gdt {:016x}/{:04x}  idt {:016x}/{:04x}",
            sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit
        );
        out
    }
}

fn describe_suberror(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        _ => "unknown",
    }
}

/// Run on a vCPU thread: a panic there must end the VM with a report, not leave it hanging.
pub fn run_catching_panics(mut vcpu: Vcpu, ctx: VcpuContext) {
    let index = vcpu.index();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(&ctx)));
    if let Err(panic) = result {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        warn!("vCPU {index} thread panicked: {message}");
        ctx.end.end(VmEnd::VcpuFailed {
            vcpu: index,
            detail: format!("the vCPU thread panicked: {message}"),
        });
    }
}
