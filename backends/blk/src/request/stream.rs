//! The data descriptors of a request as one byte stream: zero-copy transfers between the
//! image and guest memory (iovecs over the descriptors), and the bounce-buffer fallback.

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::{IoBuffer, Outcome, RequestError, CHUNK_SIZE};
use crate::disk::Disk;
use crate::iovec::IoVecs;

/// The data descriptors seen as one contiguous byte stream.
pub(super) struct DataStream<'a, G: ?Sized> {
    pub(super) mem: &'a G,
    pub(super) descs: &'a [Descriptor],
}

impl<G: GuestMemory + ?Sized> DataStream<'_, G> {
    /// Call `f(guest_addr, start..end)` for every piece of stream range `pos..pos+len`.
    fn pieces(
        &self,
        pos: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), RequestError> {
        let end = pos + len as u64;
        let mut desc_start = 0u64;
        for d in self.descs {
            let desc_end = desc_start + u64::from(d.len());
            let lo = pos.max(desc_start);
            let hi = end.min(desc_end);
            if lo < hi {
                // lo - desc_start < d.len() and the range was checked to lie in guest memory.
                let addr = GuestAddress(d.addr().0 + (lo - desc_start));
                f(addr, (lo - pos) as usize..(hi - pos) as usize).map_err(RequestError::Memory)?;
            }
            desc_start = desc_end;
        }
        Ok(())
    }

    pub(super) fn scatter(&self, pos: u64, bytes: &[u8]) -> Result<(), RequestError> {
        self.pieces(pos, bytes.len(), |addr, r| {
            self.mem.write_slice(&bytes[r], addr)
        })
    }

    pub(super) fn gather(&self, pos: u64, bytes: &mut [u8]) -> Result<(), RequestError> {
        let len = bytes.len();
        self.pieces(pos, len, |addr, r| self.mem.read_slice(&mut bytes[r], addr))
    }

    /// Build `iov` from the data descriptors; `false` when the disk needs aligned buffers
    /// (O_DIRECT) and some guest buffer is not, so the transfer must bounce.
    fn guest_iovecs(
        &self,
        iov: &mut IoVecs,
        disk: &dyn Disk,
        to_guest: bool,
    ) -> Result<bool, RequestError> {
        iov.clear();
        let access = if to_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for d in self.descs {
            // A descriptor that straddles memory regions yields one slice per region.
            let slices = self
                .mem
                .get_slices(d.addr(), d.len() as usize, access)
                .map_err(RequestError::Memory)?;
            for slice in slices {
                let slice = slice.map_err(RequestError::Memory)?;
                if to_guest {
                    // Written behind vm-memory's back: keep dirty tracking (if any) right.
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                // SAFETY: the slice lies in guest memory mapped for as long as `self.mem` is
                // borrowed, which outlives the transfer; the device holds no Rust reference
                // into it (the guest may touch it concurrently, as with any DMA).
                unsafe { iov.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
            }
        }
        Ok(disk
            .direct_alignment()
            .is_none_or(|align| iov.aligned(align)))
    }

    pub(super) fn disk_to_guest(
        &mut self,
        disk: &dyn Disk,
        offset: u64,
        len: u64,
        buf: &mut IoBuffer,
    ) -> Result<Outcome, RequestError> {
        let io_err = |source| RequestError::Io { op: "read", source };
        if self.guest_iovecs(&mut buf.iov, disk, true)? {
            let done = disk.read_vectored_at(&buf.iov, offset).map_err(io_err);
            buf.iov.clear();
            done?;
        } else {
            buf.iov.clear();
            let mut pos = 0;
            while pos < len {
                let chunk = buf.chunk((len - pos).min(CHUNK_SIZE as u64) as usize);
                disk.read_at(chunk, offset + pos).map_err(io_err)?;
                self.scatter(pos, chunk)?;
                pos += chunk.len() as u64;
            }
        }
        Ok(Outcome {
            // The used length is a u32; a transfer beyond 4 GiB reports the maximum.
            written: u32::try_from(len).unwrap_or(u32::MAX),
            read_bytes: len,
            write_bytes: 0,
        })
    }

    pub(super) fn guest_to_disk(
        &mut self,
        disk: &dyn Disk,
        offset: u64,
        len: u64,
        buf: &mut IoBuffer,
    ) -> Result<Outcome, RequestError> {
        let io_err = |source| RequestError::Io {
            op: "write",
            source,
        };
        if self.guest_iovecs(&mut buf.iov, disk, false)? {
            let done = disk.write_vectored_at(&buf.iov, offset).map_err(io_err);
            buf.iov.clear();
            done?;
        } else {
            buf.iov.clear();
            let mut pos = 0;
            while pos < len {
                let chunk = buf.chunk((len - pos).min(CHUNK_SIZE as u64) as usize);
                self.gather(pos, chunk)?;
                disk.write_at(chunk, offset + pos).map_err(io_err)?;
                pos += chunk.len() as u64;
            }
        }
        Ok(Outcome {
            written: 0,
            read_bytes: 0,
            write_bytes: len,
        })
    }
}
