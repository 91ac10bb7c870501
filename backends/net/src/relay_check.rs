//! Requests the relay checks before the crates see them, because vhost-user-backend would
//! accept them and the daemon would pay later: memory whose file cannot back the mapping
//! (SIGBUS on the next guest access, for the switch on every port) and a SET_VRING_BASE that
//! does not fit a split ring's 16-bit index (silently truncated), and kick/call fds that are
//! not eventfds (a pipe at EOF as kick fd is a busy loop).

use std::fs::File;
use std::os::fd::OwnedFd;

use vhost::vhost_user::message::FrontendReq;

use crate::backend::with_causes;
use crate::fdcheck::{check_mappable, is_eventfd};

/// `u64 guest_phys_addr, u64 memory_size, u64 userspace_addr, u64 mmap_offset`.
const REGION_LEN: usize = 32;
/// SET_MEM_TABLE: `u32 num_regions, u32 padding`, then the regions.
const MEM_TABLE_HEADER: usize = 8;
/// ADD_MEM_REG: `u64 padding`, then one region.
const SINGLE_REGION_HEADER: usize = 8;

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Why `request` must not reach the crates, or `None`. Malformed payloads are left to the
/// crates' own parser, which rejects them.
pub fn refusal(request: u32, payload: &[u8], fds: &[OwnedFd]) -> Option<String> {
    if request == u32::from(FrontendReq::SET_VRING_BASE) {
        let (index, num) = (le_u32(payload, 0)?, le_u32(payload, 4)?);
        return (num > u32::from(u16::MAX)).then(|| {
            format!(
                "SET_VRING_BASE {num} for vring {index} does not fit a split ring's 16-bit index"
            )
        });
    }
    let ring_fds = [
        FrontendReq::SET_VRING_KICK,
        FrontendReq::SET_VRING_CALL,
        FrontendReq::SET_VRING_ERR,
    ];
    if let Some(req) = ring_fds.iter().find(|r| u32::from(**r) == request) {
        let fd = fds.first()?.try_clone().ok()?;
        return (!is_eventfd(&File::from(fd)))
            .then(|| format!("{req:?}: the fd is not an eventfd"));
    }
    let (name, first, count) = if request == u32::from(FrontendReq::SET_MEM_TABLE) {
        let count = le_u32(payload, 0)? as usize;
        ("SET_MEM_TABLE", MEM_TABLE_HEADER, count)
    } else if request == u32::from(FrontendReq::ADD_MEM_REG) {
        ("ADD_MEM_REG", SINGLE_REGION_HEADER, 1)
    } else {
        return None;
    };
    for (i, fd) in fds.iter().enumerate().take(count) {
        let at = first + i * REGION_LEN;
        let (gpa, size, offset) = (
            le_u64(payload, at)?,
            le_u64(payload, at + 8)?,
            le_u64(payload, at + 24)?,
        );
        let checked = fd
            .try_clone()
            .map_err(|e| format!("cannot duplicate the fd: {e}"))
            .and_then(|dup| {
                check_mappable(&File::from(dup), offset, size).map_err(|e| with_causes(&e))
            });
        if let Err(e) = checked {
            return Some(format!(
                "{name}: the file of the region at guest address {gpa:#x} ({size} bytes): {e}"
            ));
        }
    }
    None
}
