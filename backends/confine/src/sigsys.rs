//! The SIGSYS handler of `--seccomp on`: says which system call of which thread kind the
//! filter refused, then lets the signal kill the process, so the failure names its cause.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    // Const-initialised and without a destructor, so reading it in a signal handler is safe.
    static KIND: Cell<&'static str> = const { Cell::new("unconfined") };
}

/// The `_sigsys` member of the kernel's `siginfo_t` (include/uapi/asm-generic/siginfo.h),
/// which the libc crate does not expose: three ints and padding, then the union.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

pub(crate) fn set_thread_kind(kind: &'static str) {
    KIND.with(|k| k.set(kind));
}

/// Installs the handler once per process.
pub(crate) fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; every field the kernel reads is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        // SA_RESETHAND: the default action (kill, core) applies to the re-raised signal.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        // SAFETY: `action` is initialised and the handler only calls async-signal-safe code.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose union is `_sigsys`.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(Cell::get);
    let mut buf = [0u8; 256];
    let mut len = 0;
    for part in [
        "splitvisor: seccomp: the ".as_bytes(),
        kind.as_bytes(),
        b" thread made system call ",
        decimal(nr, &mut [0u8; 12]),
        b", which its allow-list forbids; rerun with --seccomp log to see every such call (dmesg, type=1326) and report it\n",
    ] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write and raise are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        // SIGSYS is blocked in this handler: pending now, it kills the process on return.
        libc::raise(libc::SIGSYS);
    }
}

fn decimal(value: libc::c_int, out: &mut [u8; 12]) -> &[u8] {
    let mut n = i64::from(value).unsigned_abs();
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        out[at] = b'-';
    }
    &out[at..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_formats_without_allocating() {
        assert_eq!(super::decimal(0, &mut [0; 12]), b"0");
        assert_eq!(super::decimal(435, &mut [0; 12]), b"435");
        assert_eq!(super::decimal(i32::MIN, &mut [0; 12]), b"-2147483648");
    }
}
