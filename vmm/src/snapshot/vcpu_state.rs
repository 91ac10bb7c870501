//! One vCPU's architectural state, captured from KVM and put back into a fresh vCPU: general and
//! special registers, FPU/XSAVE and XCRs, MSRs, LAPIC, pending events, MP state, debug
//! registers, CPUID and the TSC frequency. What the host's KVM cannot give is recorded as
//! unavailable (with its errno) instead of failing the whole capture.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, kvm_msr_entry, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use log::warn;
use serde::{Deserialize, Serialize};

use super::blob::{Blob, BlobError};
use super::format::Unavailable;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{ioctl} on vCPU {index} failed")]
    Ioctl {
        index: u8,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("vCPU {index}: saved state is unusable")]
    Decode {
        index: u8,
        #[source]
        source: BlobError,
    },
    #[error(
        "vCPU {index}: KVM accepted only {set} of the {total} saved MSRs; MSR {msr:#x} was refused"
    )]
    MsrRefused {
        index: u8,
        set: usize,
        total: usize,
        msr: u32,
    },
}

/// What this host's KVM lets us capture, found once per VM (the same for every vCPU).
#[derive(Debug, Clone)]
pub struct CaptureSupport {
    /// `KVM_GET_MSR_INDEX_LIST`; the ones `KVM_GET_MSRS` refuses are dropped at capture.
    pub msr_indices: Vec<u32>,
    /// Whether a vCPU's XSAVE area fits `kvm_xsave` (4 KiB). It does not when the host has
    /// dynamically enabled XSTATE features (AMX), which need `KVM_GET_XSAVE2` with a larger
    /// buffer; then only the legacy FPU state is captured.
    pub xsave_fits: bool,
}

impl CaptureSupport {
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, VcpuStateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(VcpuStateError::MsrIndexList)?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        Ok(Self {
            msr_indices: list.as_slice().to_vec(),
            xsave_fits: usize::try_from(xsave2)
                .map_or(true, |size| size <= std::mem::size_of::<kvm_xsave>()),
        })
    }
}

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// The saved state of one vCPU. Every `Blob` is the raw bytes of the kvm-bindings struct named
/// in the field's comment; a `None` part was unavailable at capture (see `unavailable`) and is
/// left as the fresh vCPU has it at restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    /// `kvm_cpuid_entry2` array (`KVM_GET_CPUID2`).
    pub cpuid: Option<Blob>,
    /// `kvm_regs`.
    pub regs: Blob,
    /// `kvm_sregs`.
    pub sregs: Blob,
    /// `kvm_fpu` (also restored from `xsave` when that is present).
    pub fpu: Option<Blob>,
    /// `kvm_xsave`.
    pub xsave: Option<Blob>,
    /// `kvm_xcrs`.
    pub xcrs: Option<Blob>,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that `KVM_GET_MSRS` returned.
    pub msrs: Vec<Msr>,
    /// MSRs of the index list that `KVM_GET_MSRS` refused on this host.
    pub msrs_refused: Vec<u32>,
    /// `kvm_lapic_state`.
    pub lapic: Option<Blob>,
    /// `kvm_vcpu_events`.
    pub events: Option<Blob>,
    /// `kvm_mp_state.mp_state`.
    pub mp_state: Option<u32>,
    /// `kvm_debugregs`.
    pub debug_regs: Option<Blob>,
    /// `KVM_GET_TSC_KHZ`.
    pub tsc_khz: Option<u32>,
    pub unavailable: Vec<Unavailable>,
}

/// Captures vCPU `index`. It must be out of `KVM_RUN`, and a port/MMIO exit it took must have
/// been completed first (`complete_pending_io`), or the instruction's effect is lost.
pub fn capture(
    vcpu: &VcpuFd,
    index: u8,
    support: &CaptureSupport,
) -> Result<VcpuState, VcpuStateError> {
    let required = |ioctl: &'static str| {
        move |source| VcpuStateError::Ioctl {
            index,
            ioctl,
            source,
        }
    };
    let regs = Blob::of(&vcpu.get_regs().map_err(required("KVM_GET_REGS"))?);
    let sregs = Blob::of(&vcpu.get_sregs().map_err(required("KVM_GET_SREGS"))?);
    let mut gaps = Gaps {
        index,
        list: Vec::new(),
    };
    let cpuid = gaps.keep(
        "KVM_GET_CPUID2",
        vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map(|c| Blob::of_slice(c.as_slice())),
    );
    let fpu = gaps.keep("KVM_GET_FPU", vcpu.get_fpu().map(|f| Blob::of(&f)));
    let xsave = if support.xsave_fits {
        gaps.keep("KVM_GET_XSAVE", vcpu.get_xsave().map(|x| Blob::of(&x)))
    } else {
        gaps.list.push(Unavailable::other(
            format!("vCPU {index} KVM_GET_XSAVE"),
            "the XSAVE area is larger than 4 KiB (KVM_CAP_XSAVE2); only the FPU/SSE state is saved",
        ));
        None
    };
    let xcrs = gaps.keep("KVM_GET_XCRS", vcpu.get_xcrs().map(|x| Blob::of(&x)));
    let lapic = gaps.keep("KVM_GET_LAPIC", vcpu.get_lapic().map(|l| Blob::of(&l)));
    let events = gaps.keep(
        "KVM_GET_VCPU_EVENTS",
        vcpu.get_vcpu_events().map(|e| Blob::of(&e)),
    );
    let debug_regs = gaps.keep(
        "KVM_GET_DEBUGREGS",
        vcpu.get_debug_regs().map(|d| Blob::of(&d)),
    );
    let mp_state = gaps.keep("KVM_GET_MP_STATE", vcpu.get_mp_state().map(|m| m.mp_state));
    let tsc_khz = gaps.keep("KVM_GET_TSC_KHZ", vcpu.get_tsc_khz());
    let unavailable = gaps.list;
    let (msrs, msrs_refused) = capture_msrs(vcpu, index, &support.msr_indices)?;
    for part in &unavailable {
        warn!("snapshot: {part}");
    }
    Ok(VcpuState {
        index,
        cpuid,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        msrs,
        msrs_refused,
        lapic,
        events,
        mp_state,
        debug_regs,
        tsc_khz,
        unavailable,
    })
}

/// The parts a capture could not get, each with the failed ioctl's error.
struct Gaps {
    index: u8,
    list: Vec<Unavailable>,
}

impl Gaps {
    fn keep<T>(&mut self, ioctl: &str, result: Result<T, kvm_ioctls::Error>) -> Option<T> {
        result
            .map_err(|e| {
                let part = format!("vCPU {} {ioctl}", self.index);
                self.list.push(Unavailable::new(part, &e));
            })
            .ok()
    }
}

/// Reads `indices` in batches; `KVM_GET_MSRS` stops at the first MSR it refuses and returns
/// how many it read, so a refused one is set aside and the batch resumes after it.
fn capture_msrs(
    vcpu: &VcpuFd,
    index: u8,
    indices: &[u32],
) -> Result<(Vec<Msr>, Vec<u32>), VcpuStateError> {
    let (mut read, mut refused) = (Vec::new(), Vec::new());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msr_batch(batch.iter().map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        }));
        let count = vcpu
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Ioctl {
                index,
                ioctl: "KVM_GET_MSRS",
                source,
            })?;
        read.extend(msrs.as_slice()[..count].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        if let Some(&bad) = batch.get(count) {
            refused.push(bad);
            rest = &rest[count + 1..];
        } else {
            rest = &rest[count..];
        }
    }
    Ok((read, refused))
}

fn msr_batch(entries: impl Iterator<Item = kvm_msr_entry>) -> Msrs {
    let entries: Vec<kvm_msr_entry> = entries.collect();
    // Batches are cut at KVM_MAX_MSR_ENTRIES, the wrapper's only limit.
    Msrs::from_entries(&entries).unwrap_or_else(|_| unreachable!("batch within the limit"))
}

/// Puts `state` into `vcpu`, a vCPU created for it that has not run yet. The order matters:
/// - CPUID first: it decides which XSAVE components and MSRs the vCPU has.
/// - TSC frequency before the MSRs, so `IA32_TSC` is taken at the saved rate.
/// - special registers before the LAPIC (`apic_base` picks xAPIC or x2APIC mode) and before
///   the MSRs (EFER, and MSRs only valid in long mode);
/// - LAPIC before the MSRs: `TSC_DEADLINE` and the x2APIC MSRs need the LAPIC in its mode;
/// - pending events last: setting registers can drop a queued exception or NMI, and KVM checks
///   an injected event against the mode set above.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let index = state.index;
    let ioctl = |ioctl: &'static str| {
        move |source| VcpuStateError::Ioctl {
            index,
            ioctl,
            source,
        }
    };
    let decode = |source| VcpuStateError::Decode { index, source };
    for part in &state.unavailable {
        warn!("restore: {part}; it keeps a fresh vCPU's value");
    }
    if let Some(cpuid) = &state.cpuid {
        let entries = cpuid
            .to_vec::<kvm_cpuid_entry2>("CPUID entries")
            .map_err(decode)?;
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuStateError::Decode {
            index,
            source: BlobError::SizeMismatch {
                what: "CPUID entries",
                expected: KVM_MAX_CPUID_ENTRIES,
                found: entries.len(),
            },
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    }
    if let Some(khz) = state.tsc_khz {
        restore_tsc_khz(vcpu, index, khz);
    }
    if let Some(mp_state) = state.mp_state {
        vcpu.set_mp_state(kvm_mp_state { mp_state })
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    vcpu.set_regs(&state.regs.to("registers").map_err(decode)?)
        .map_err(ioctl("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs.to("special registers").map_err(decode)?)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    restore_fpu(vcpu, state)?;
    if let Some(debug_regs) = &state.debug_regs {
        vcpu.set_debug_regs(&debug_regs.to("debug registers").map_err(decode)?)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(lapic) = &state.lapic {
        vcpu.set_lapic(&lapic.to("LAPIC").map_err(decode)?)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    restore_msrs(vcpu, index, &state.msrs)?;
    if let Some(events) = &state.events {
        vcpu.set_vcpu_events(&events.to("vCPU events").map_err(decode)?)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}

/// XSAVE holds the FPU/SSE/AVX state and more; the legacy FPU struct is the fallback.
fn restore_fpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let index = state.index;
    let ioctl = |ioctl: &'static str| {
        move |source| VcpuStateError::Ioctl {
            index,
            ioctl,
            source,
        }
    };
    let decode = |source| VcpuStateError::Decode { index, source };
    if let Some(xsave) = &state.xsave {
        let xsave: kvm_xsave = xsave.to("XSAVE area").map_err(decode)?;
        // SAFETY: a saved `xsave` exists only when the host's XSAVE area fits `kvm_xsave`
        // (`CaptureSupport::xsave_fits`, no dynamically enabled XSTATE features), so KVM reads
        // no more than the struct holds.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    } else if let Some(fpu) = &state.fpu {
        vcpu.set_fpu(&fpu.to("FPU state").map_err(decode)?)
            .map_err(ioctl("KVM_SET_FPU"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(&xcrs.to("XCRs").map_err(decode)?)
            .map_err(ioctl("KVM_SET_XCRS"))?;
    }
    Ok(())
}

/// A different TSC rate only skews the guest's time keeping; KVM may refuse to scale (no TSC
/// scaling on this host), which is worth a warning, not a failed restore.
fn restore_tsc_khz(vcpu: &VcpuFd, index: u8, khz: u32) {
    if vcpu.get_tsc_khz().ok() == Some(khz) {
        return;
    }
    if let Err(e) = vcpu.set_tsc_khz(khz) {
        warn!("restore: vCPU {index}: cannot set the saved TSC rate {khz} kHz ({e}); the guest's TSC runs at this host's rate");
    }
}

/// `KVM_SET_MSRS` stops at the first MSR it refuses and returns how many it set.
fn restore_msrs(vcpu: &VcpuFd, index: u8, msrs: &[Msr]) -> Result<(), VcpuStateError> {
    for (n, batch) in msrs.chunks(KVM_MAX_MSR_ENTRIES).enumerate() {
        let entries = msr_batch(batch.iter().map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        }));
        let set = vcpu
            .set_msrs(&entries)
            .map_err(|source| VcpuStateError::Ioctl {
                index,
                ioctl: "KVM_SET_MSRS",
                source,
            })?;
        if set < batch.len() {
            return Err(VcpuStateError::MsrRefused {
                index,
                set: n * KVM_MAX_MSR_ENTRIES + set,
                total: msrs.len(),
                msr: batch[set].index,
            });
        }
    }
    Ok(())
}

/// Finishes a port or MMIO exit the vCPU took: KVM completes the instruction (an `in`'s value,
/// a string I/O's next step) only at the next `KVM_RUN`, so state captured before that would
/// lose it. With `immediate_exit` set, `KVM_RUN` completes it and returns EINTR at once,
/// without running guest code.
pub fn complete_pending_io(vcpu: &mut VcpuFd, index: u8) -> Result<(), VcpuStateError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(source) => Err(VcpuStateError::Ioctl {
            index,
            ioctl: "KVM_RUN (immediate_exit, completing I/O)",
            source,
        }),
    }
}
