//! Tests of kernel detection and loading: the embedded guest, synthetic bzImages and ELF notes,
//! and the host's own Linux kernel when there is one.

use super::*;
use crate::memory::create_guest_memory;
use std::io::Write;

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("splitvisor-{name}-{}", std::process::id()));
    File::create(&path).unwrap().write_all(bytes).unwrap();
    path
}

/// The smallest image BzImage::load accepts: a setup header with the given protocol version.
fn synthetic_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
    let mut image = vec![0u8; 0x4000];
    image[0x1f1] = 4; // setup_sects
    image[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
    image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    image
}

#[test]
fn embedded_guest_is_detected_and_loads_above_one_mib() {
    let mem = create_guest_memory(64 << 20, false).unwrap();
    let kernel = load(&mem, &KernelSource::Embedded).unwrap();
    assert_eq!(kernel.format, KernelFormat::SplitvisorGuest);
    assert!(
        kernel.entry >= layout::HIGH_RAM_START,
        "entry {:#x}",
        kernel.entry
    );
    assert!(kernel.setup_header.is_none());
}

#[test]
fn bzimage_is_told_apart_by_its_header_magic() {
    let image = synthetic_bzimage(0x020f, XLF_KERNEL_64);
    let format = detect(&mut Cursor::new(&image)).unwrap();
    assert_eq!(format, Some(KernelFormat::LinuxBzImage));
    assert_eq!(detect(&mut Cursor::new(b"short")).unwrap(), None);
    assert_eq!(detect(&mut Cursor::new(vec![0u8; 4096])).unwrap(), None);
}

#[test]
fn bzimage_without_a_64_bit_entry_is_refused_naming_its_protocol() {
    let mem = create_guest_memory(64 << 20, false).unwrap();
    let path = temp_file("old-bzimage", &synthetic_bzimage(0x0206, 0));
    let err = load(&mem, &KernelSource::File(path.clone())).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(
        matches!(
            err,
            KernelError::NoLongModeEntry {
                version: 0x0206,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("protocol 2.06") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
}

#[test]
fn modern_bzimage_enters_at_startup_64() {
    let mem = create_guest_memory(64 << 20, false).unwrap();
    let path = temp_file("new-bzimage", &synthetic_bzimage(0x020f, XLF_KERNEL_64));
    let kernel = load(&mem, &KernelSource::File(path.clone())).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(kernel.format, KernelFormat::LinuxBzImage);
    assert_eq!(kernel.entry, 0x10_0000 + BZIMAGE_64BIT_ENTRY_OFFSET);
    assert_eq!(kernel.setup_header.map(|h| h.version), Some(0x020f));
}

#[test]
fn notes_are_walked_with_their_padding() {
    let mut notes = Vec::new();
    // A Xen PVH note first (name "Xen", 8-byte desc), then ours.
    notes.extend_from_slice(&[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
    notes.extend_from_slice(b"Xen\0");
    notes.extend_from_slice(&[0; 8]);
    assert!(!notes_contain(
        &notes,
        SPLITVISOR_NOTE_NAME,
        SPLITVISOR_NOTE_TYPE
    ));
    notes.extend_from_slice(&[11, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0]);
    notes.extend_from_slice(b"splitvisor\0\0");
    notes.extend_from_slice(&1u32.to_le_bytes());
    assert!(notes_contain(
        &notes,
        SPLITVISOR_NOTE_NAME,
        SPLITVISOR_NOTE_TYPE
    ));
    // Truncated or absurd sizes end the walk instead of panicking.
    assert!(!notes_contain(
        &notes[..20],
        SPLITVISOR_NOTE_NAME,
        SPLITVISOR_NOTE_TYPE
    ));
    let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    assert!(!notes_contain(
        &huge,
        SPLITVISOR_NOTE_NAME,
        SPLITVISOR_NOTE_TYPE
    ));
}

#[test]
fn host_linux_kernel_is_a_bzimage_with_a_64_bit_entry() {
    let Some(vmlinuz) = std::fs::read_dir("/boot").ok().and_then(|dir| {
        dir.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    }) else {
        eprintln!("SKIP: no /boot/vmlinuz-* on this host");
        return;
    };
    if File::open(&vmlinuz).is_err() {
        eprintln!("SKIP: {} is not readable", vmlinuz.display());
        return;
    }
    let mem = create_guest_memory(256 << 20, false).unwrap();
    let kernel = load(&mem, &KernelSource::File(vmlinuz)).unwrap();
    assert_eq!(kernel.format, KernelFormat::LinuxBzImage);
    let header = kernel.setup_header.unwrap();
    assert!(header.version >= MIN_64BIT_BOOT_PROTOCOL);
    assert!(kernel.footprint_end > kernel.entry);
}

#[test]
fn missing_kernel_names_the_path() {
    let mem = create_guest_memory(64 << 20, false).unwrap();
    let err = load(&mem, &KernelSource::File("/nonexistent/vmlinux".into())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
}

#[test]
fn non_kernel_file_is_rejected() {
    let mem = create_guest_memory(64 << 20, false).unwrap();
    let path = temp_file("notelf", b"this is not an ELF file at all, just text");
    let err = load(&mem, &KernelSource::File(path.clone())).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, KernelError::UnknownFormat(_)), "{err}");
    assert!(err.to_string().contains("neither an ELF"), "{err}");
}

#[test]
fn kernel_larger_than_memory_is_rejected() {
    // The embedded guest does not fit in a VM with less memory than its load address.
    let mem = create_guest_memory(1 << 20, false).unwrap();
    assert!(matches!(
        load(&mem, &KernelSource::Embedded),
        Err(KernelError::Load { .. })
    ));
}
