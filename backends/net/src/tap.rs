//! The real TAP device: one non-blocking /dev/net/tun fd per queue pair, with IFF_VNET_HDR
//! (12-byte header) and offloads set from what the guest negotiated.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::ring::VNET_HDR_LEN;
use crate::rxtx::Tap;

const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening or configuring the TAP, each naming the device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is longer than {max} bytes", max = libc::IFNAMSIZ - 1)]
    NameTooLong(String),
    #[error("failed to open {TUN_PATH} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error("TAP {0}: permission denied; creating or attaching a TAP needs CAP_NET_ADMIN (root)")]
    NoPermission(String),
    #[error("TAP {0} is busy: another process has it open, or it exists with other flags (multi-queue / vnet_hdr); pick another name or delete it")]
    Busy(String),
    #[error("TAP {0}: name is in use by a non-TAP interface or the flags are incompatible")]
    Incompatible(String, #[source] io::Error),
    #[error("TAP {0}: TUNSETIFF failed")]
    SetIff(String, #[source] io::Error),
    #[error("TAP {0}: setting the vnet header size failed")]
    SetVnetHdrSize(String, #[source] io::Error),
    #[error("TAP {0}: setting offloads {1:#x} failed")]
    SetOffload(String, u32, #[source] io::Error),
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    name: String,
}

/// `struct ifreq` with the union reduced to the flags member that TUNSETIFF uses.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TapQueue {
    /// Open `queues` fds of the TAP `name`, creating it if needed.
    pub fn open_all(name: &str, queues: usize) -> Result<Vec<TapQueue>, TapError> {
        (0..queues)
            .map(|_| TapQueue::open(name, queues > 1))
            .collect()
    }

    fn open(name: &str, multi_queue: bool) -> Result<TapQueue, TapError> {
        if name.len() >= libc::IFNAMSIZ || name.is_empty() {
            return Err(TapError::NameTooLong(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => TapError::NoPermission(name.to_string()),
                _ => TapError::OpenTun(e),
            })?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back) a `struct ifreq`; `req` has its layout and
        // size (40 bytes) and lives for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::NoPermission(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EINVAL) => TapError::Incompatible(name, err),
                _ => TapError::SetIff(name, err),
            });
        }
        let tap = TapQueue {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(TapError::SetVnetHdrSize(tap.name, err));
        }
        Ok(tap)
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// TUNSETOFFLOAD: which offloaded (partial checksum / GSO) frames the TAP may hand us.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(TapError::SetOffload(self.name.clone(), flags, err));
        }
        Ok(())
    }
}

impl Tap for TapQueue {
    fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            // SAFETY: the iovecs point to mapped guest memory (Tap contract) and the count
            // matches the slice.
            let ret = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
            if ret >= 0 {
                return Ok(ret as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let ret = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }
}
