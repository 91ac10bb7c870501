//! Byte images of KVM's plain C structs (`kvm_regs`, `kvm_lapic_state`, ...) for the snapshot
//! manifest: stored as hex strings, and checked against the struct's size when loaded, so a
//! snapshot taken with other headers is refused instead of read as garbage.

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the saved {what} is {found} bytes, but this build's struct is {expected} bytes (snapshot from another KVM header version?)")]
    SizeMismatch {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("the saved {what} is not a hex string: bad digit at byte {at}")]
    BadHex { what: &'static str, at: usize },
}

/// KVM ABI structs made only of integers and arrays/unions of integers: every byte pattern is
/// a valid value, and they have no padding that could leak uninitialized memory because
/// every value here comes from `Default` (zeroed) or from the kernel, which fills it whole.
///
/// # Safety
/// Implement only for `#[repr(C)]` types whose every bit pattern is valid.
pub unsafe trait KvmPod: Default {}

// SAFETY: kvm-bindings' x86 ioctl structs, here and below: #[repr(C)], integer fields,
// integer arrays and unions of those only.
unsafe impl KvmPod for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_fpu {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_xsave {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_cpuid_entry2 {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_irqchip {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_clock_data {}

/// The bytes of one or more KVM structs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The bytes of `value`.
    pub fn of<T: KvmPod>(value: &T) -> Self {
        Self::of_slice(std::slice::from_ref(value))
    }

    /// The bytes of `values`, back to back.
    pub fn of_slice<T: KvmPod>(values: &[T]) -> Self {
        let len = std::mem::size_of_val(values);
        // SAFETY: `values` is a live slice of `len` bytes; `KvmPod` types are plain integers.
        let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), len) };
        Self(bytes.to_vec())
    }

    /// One `T` back from its bytes; `what` names it in the error.
    pub fn to<T: KvmPod>(&self, what: &'static str) -> Result<T, BlobError> {
        let expected = std::mem::size_of::<T>();
        if self.0.len() != expected {
            return Err(BlobError::SizeMismatch {
                what,
                expected,
                found: self.0.len(),
            });
        }
        let mut value = T::default();
        // SAFETY: exactly size_of::<T>() bytes are copied into a `T`, for which every byte
        // pattern is valid (`KvmPod`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.as_ptr(),
                (&mut value as *mut T).cast::<u8>(),
                expected,
            )
        };
        Ok(value)
    }

    /// A whole number of `T`s back from their bytes.
    pub fn to_vec<T: KvmPod>(&self, what: &'static str) -> Result<Vec<T>, BlobError> {
        let size = std::mem::size_of::<T>();
        if !self.0.len().is_multiple_of(size) {
            return Err(BlobError::SizeMismatch {
                what,
                expected: size * (self.0.len() / size + 1),
                found: self.0.len(),
            });
        }
        self.0
            .chunks_exact(size)
            .map(|chunk| Blob(chunk.to_vec()).to(what))
            .collect()
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(self.0.len() * 2);
        for byte in &self.0 {
            let _ = write!(text, "{byte:02x}");
        }
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        from_hex(&text).map_err(serde::de::Error::custom)
    }
}

fn from_hex(text: &str) -> Result<Blob, BlobError> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return Err(BlobError::BadHex {
            what: "blob",
            at: bytes.len(),
        });
    }
    let digit = |at: usize| {
        char::from(bytes[at])
            .to_digit(16)
            .ok_or(BlobError::BadHex { what: "blob", at })
    };
    (0..bytes.len() / 2)
        .map(|i| Ok((digit(2 * i)? * 16 + digit(2 * i + 1)?) as u8))
        .collect::<Result<Vec<u8>, BlobError>>()
        .map(Blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_lapic_state, kvm_regs};

    #[test]
    fn round_trips_through_json_and_checks_the_size() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x10_0000,
            ..Default::default()
        };
        let json = serde_json::to_string(&Blob::of(&regs)).unwrap();
        assert!(json.starts_with("\"8877665544332211"), "{json}");
        let back: Blob = serde_json::from_str(&json).unwrap();
        let again: kvm_regs = back.to("regs").unwrap();
        assert_eq!((again.rax, again.rip), (regs.rax, regs.rip));

        let err = back.to::<kvm_lapic_state>("LAPIC").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the saved LAPIC is 144 bytes, but this build's struct is 1024 bytes (snapshot from another KVM header version?)"
        );
        assert!(serde_json::from_str::<Blob>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
    }
}
