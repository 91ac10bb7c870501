//! Scatter-gather lists of guest buffers for zero-copy transfers (`preadv`/`pwritev` straight
//! between the image and guest memory), and the loop that finishes a transfer the kernel did
//! only partly (short reads/writes, EINTR).

use std::io;

/// Most iovecs one `preadv`/`pwritev` call accepts (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// The buffers of one vectored transfer, in stream order.
///
/// Only `push` adds entries and its caller promises that each one stays valid (mapped,
/// writable for reads into it) and is not accessed through a Rust reference until the
/// transfer is done; `clear` forgets them all.
#[derive(Default)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers are only dereferenced by the syscalls/copies of the transfer that
// the pusher of the entries runs on its own thread; an `IoVecs` moved between threads is
// cleared before it is refilled (`process_chain` does this for every request).
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Forget every entry (keeps the allocation for the next request).
    pub fn clear(&mut self) {
        self.iov.clear();
    }

    /// Append `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes, and not be accessed through a Rust
    /// reference, until this list is cleared or dropped.
    pub unsafe fn push(&mut self, ptr: *mut u8, len: usize) {
        if len > 0 {
            self.iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            });
        }
    }

    /// The entries, for the syscalls.
    pub fn as_raw(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Total bytes described.
    pub fn total_len(&self) -> u64 {
        self.iov.iter().map(|v| v.iov_len as u64).sum()
    }

    /// True when every entry starts and ends on a multiple of `align` (O_DIRECT's rule).
    pub fn aligned(&self, align: usize) -> bool {
        self.iov
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
    }

    /// Call `f(ptr, len)` for every entry, in order.
    pub fn for_each(&self, mut f: impl FnMut(*mut u8, usize) -> io::Result<()>) -> io::Result<()> {
        self.iov
            .iter()
            .try_for_each(|v| f(v.iov_base.cast(), v.iov_len))
    }
}

/// Which way a vectored transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// File to buffers (`preadv`).
    Read,
    /// Buffers to file (`pwritev`).
    Write,
}

/// Transfer all of `iov` at `offset` of `fd`, repeating the call after a partial transfer or
/// EINTR. A read that hits the end of the file is `UnexpectedEof`, a write that makes no
/// progress `WriteZero`.
pub fn transfer_all(fd: i32, dir: Direction, iov: &IoVecs, offset: u64) -> io::Result<()> {
    let mut rest = std::borrow::Cow::Borrowed(iov.as_raw());
    let mut start = 0;
    let mut offset = offset;
    while start < rest.len() {
        let batch = &rest[start..rest.len().min(start + IOV_MAX)];
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // batch.len() <= IOV_MAX, which fits in c_int.
        let count = batch.len() as libc::c_int;
        // SAFETY: every entry was pushed under `IoVecs::push`'s contract (valid, unaliased
        // memory of its length); the kernel only touches those bytes.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(fd, batch.as_ptr(), count, off),
                Direction::Write => libc::pwritev(fd, batch.as_ptr(), count, off),
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(match dir {
                Direction::Read => io::ErrorKind::UnexpectedEof.into(),
                Direction::Write => io::ErrorKind::WriteZero.into(),
            });
        }
        // n > 0 was checked; it is at most the batch's total length.
        let mut done = n as usize;
        offset += done as u64;
        while done > 0 && start < rest.len() {
            let len = rest[start].iov_len;
            if done >= len {
                done -= len;
                start += 1;
            } else {
                // Partial entry: only now is a private copy of the list needed.
                let v = &mut rest.to_mut()[start];
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(done).cast();
                v.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn vectored_transfers_round_trip_and_report_eof() {
        let tmp = TempFile::new().unwrap();
        let mut file = tmp.as_file();
        file.write_all(&[0u8; 4096]).unwrap();
        let fd = file.as_raw_fd();
        let (mut a, mut b) = (vec![1u8; 1000], vec![2u8; 24]);
        let mut iov = IoVecs::default();
        // SAFETY: a and b outlive iov's use and are not touched meanwhile.
        unsafe {
            iov.push(a.as_mut_ptr(), a.len());
            iov.push(b.as_mut_ptr(), 0);
            iov.push(b.as_mut_ptr(), b.len());
        }
        assert_eq!(iov.total_len(), 1024);
        assert_eq!(iov.as_raw().len(), 2, "empty entries are dropped");
        transfer_all(fd, Direction::Write, &iov, 100).unwrap();
        a.fill(0);
        b.fill(0);
        transfer_all(fd, Direction::Read, &iov, 100).unwrap();
        assert_eq!((&a[..], &b[..]), (&[1u8; 1000][..], &[2u8; 24][..]));
        // 1024 bytes at 3584 reach past the 4096-byte end of the file.
        let err = transfer_all(fd, Direction::Read, &iov, 3584).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
