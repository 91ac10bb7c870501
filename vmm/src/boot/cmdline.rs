//! The kernel command line in guest memory, NUL-terminated at `layout::CMDLINE`, where both
//! `hvm_start_info` and Linux's zero page point.

use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;

use crate::layout::CMDLINE;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("the kernel command line is {len} bytes; this kernel takes at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("the kernel command line is not valid: {0}")]
    Invalid(linux_loader::cmdline::Error),
    #[error("could not write the command line into guest memory")]
    Write(#[source] linux_loader::loader::Error),
}

/// Writes `cmdline` (at most `max` bytes without its NUL) at `layout::CMDLINE`.
pub fn write_cmdline(memory: &GuestMemory, cmdline: &str, max: usize) -> Result<(), CmdlineError> {
    if cmdline.len() >= max {
        return Err(CmdlineError::TooLong {
            len: cmdline.len(),
            max: max.saturating_sub(1),
        });
    }
    let mut line = Cmdline::new(max).map_err(CmdlineError::Invalid)?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(CmdlineError::Invalid)?;
    }
    linux_loader::loader::load_cmdline(memory, GuestAddress(CMDLINE), &line)
        .map_err(CmdlineError::Write)
}
