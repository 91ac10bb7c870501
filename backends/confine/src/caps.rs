//! Dropping every Linux capability, for daemons whose privileged set-up (opening a TAP) is done.
//! Plain libc (capget/capset, prctl) rather than the `caps` crate: three calls do not justify a
//! dependency.

use crate::ConfineError;

/// `_LINUX_CAPABILITY_VERSION_3` (include/uapi/linux/capability.h): 64-bit sets in two words.
/// The libc crate has the syscall numbers but not this ABI.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// CAP_SETPCAP (include/uapi/linux/capability.h): needed to shrink the bounding set.
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the process for good: bounding set (when allowed to), ambient,
/// inheritable, permitted and effective sets. A process without any is left as it is.
pub fn drop_all_capabilities() -> Result<(), ConfineError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data words as capget(2) expects for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(ConfineError::ReadCapabilities(
            std::io::Error::last_os_error(),
        ));
    }
    if data[0].effective & (1 << CAP_SETPCAP) != 0 {
        drop_bounding_set()?;
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: a kernel older than ambient capabilities (4.3) has none to clear.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(ConfineError::ClearAmbient(e));
        }
    }
    let empty = [CapData::default(); 2];
    // SAFETY: header and two data words as capset(2) expects for version 3.
    if unsafe { libc::syscall(libc::SYS_capset, &header, empty.as_ptr()) } != 0 {
        return Err(ConfineError::SetCapabilities(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn drop_bounding_set() -> Result<(), ConfineError> {
    for cap in 0..64u32 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let source = std::io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if source.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(ConfineError::DropBoundingSet { cap, source });
        }
    }
    Ok(())
}
