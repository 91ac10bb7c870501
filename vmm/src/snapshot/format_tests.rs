//! Each refusal of a snapshot that does not fit: missing files, truncated files, another
//! format version, a different memory size/layout, vCPU count or device set; and a sparse
//! memory file round trip. No KVM needed.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::blob::Blob;
use super::format::*;
use super::irqchip::IrqchipState;
use super::memory_file;
use super::vcpu_state::VcpuState;
use crate::memory::create_guest_memory;

fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: None,
        regs: Blob::of(&kvm_bindings::kvm_regs::default()),
        sregs: Blob::of(&kvm_bindings::kvm_sregs::default()),
        fpu: None,
        xsave: None,
        xcrs: None,
        msrs: Vec::new(),
        msrs_refused: Vec::new(),
        lapic: None,
        events: None,
        mp_state: None,
        debug_regs: None,
        tsc_khz: None,
        unavailable: Vec::new(),
    }
}

fn device(id: &str, kind: &str) -> DeviceState {
    DeviceState {
        id: id.into(),
        kind: kind.into(),
        state: Default::default(),
    }
}

fn manifest(memory_size: u64) -> Manifest {
    let memory = create_guest_memory(memory_size, false).unwrap();
    Manifest {
        format_version: FORMAT_VERSION,
        created_by: "test".into(),
        memory: memory_file::layout_of(&memory),
        vcpus: vec![vcpu(0), vcpu(1)],
        vm: IrqchipState::default(),
        devices: vec![device("disk0", "virtio-blk"), device("net0", "virtio-net")],
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("splitvisor-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_err(dir: &Path) -> String {
    crate::error_chain(&Manifest::read(dir).unwrap_err())
}

#[test]
fn manifest_round_trips() {
    let dir = temp_dir("roundtrip");
    let saved = manifest(8 << 20);
    saved.write(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    assert!(text.starts_with("{\n  \"format_version\": 1,"), "{text}");
    let back = Manifest::read(&dir).unwrap();
    assert_eq!(back.memory, saved.memory);
    assert_eq!(back.devices, saved.devices);
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs, saved.vcpus[1].regs);
}

#[test]
fn missing_manifest_is_named() {
    let dir = temp_dir("missing");
    let err = read_err(&dir);
    assert!(
        err.starts_with(&format!(
            "{}: no such file;",
            dir.join(MANIFEST_FILE).display()
        )),
        "{err}"
    );
}

#[test]
fn truncated_manifest_is_refused() {
    let dir = temp_dir("truncated");
    manifest(8 << 20).write(&dir).unwrap();
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = read_err(&dir);
    assert!(
        err.starts_with(&format!("{}: the file is truncated", path.display())),
        "{err}"
    );
}

#[test]
fn other_version_is_refused_before_anything_else() {
    let dir = temp_dir("version");
    // A future version whose other fields this build could not parse at all.
    std::fs::write(
        dir.join(MANIFEST_FILE),
        r#"{"format_version": 7, "memory": "elsewhere"}"#,
    )
    .unwrap();
    assert_eq!(
        read_err(&dir),
        format!(
            "{}: snapshot format version 7, but this splitvisor reads only version 1; restore it with the splitvisor that wrote it",
            dir.join(MANIFEST_FILE).display()
        )
    );
}

#[test]
fn memory_size_vcpu_count_and_device_set_must_match() {
    let saved = manifest(16 << 20);
    let same = memory_file::layout_of(&create_guest_memory(16 << 20, false).unwrap());
    let smaller = memory_file::layout_of(&create_guest_memory(8 << 20, false).unwrap());
    let devices = saved.devices.clone();
    saved.check_target(&same, 2, &devices).unwrap();

    let err = saved.check_target(&smaller, 2, &devices).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the snapshot has 16777216 bytes of guest memory but the VM to restore into has 8388608: start it with --memory 16M"
    );
    let err = saved.check_target(&same, 1, &devices).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the snapshot has 2 vCPU(s) but the VM to restore into has 1: start it with --vcpus 2"
    );
    let other = [device("disk0", "virtio-blk"), device("disk1", "virtio-blk")];
    let err = saved.check_target(&same, 2, &other).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the snapshot's devices differ from the VM's: missing in the VM: net0 (virtio-net); not in the snapshot: disk1 (virtio-blk); give the same --disk/--net ids as when it was taken"
    );
}

#[test]
fn memory_is_saved_sparse_and_restored() {
    let dir = temp_dir("memory");
    let size = 64 << 20;
    let memory = create_guest_memory(size, false).unwrap();
    let marks = [
        (0x1000u64, 0x1122_3344u32),
        (0x20_0ff8, 7),
        (size - 4, 0xdead_beef),
    ];
    for (addr, value) in marks {
        memory.write_obj(value, GuestAddress(addr)).unwrap();
    }
    let layout = memory_file::save(&dir, &memory).unwrap();
    let file = std::fs::File::open(dir.join(MEMORY_FILE)).unwrap();
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), size);
    use std::os::unix::fs::MetadataExt;
    // Four touched pages (one write spans two), not 64 MiB: the zero pages are holes.
    assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());

    let fresh = create_guest_memory(size, false).unwrap();
    memory_file::restore(&dir, &layout, &fresh).unwrap();
    for (addr, value) in marks {
        assert_eq!(fresh.read_obj::<u32>(GuestAddress(addr)).unwrap(), value);
    }
    assert_eq!(fresh.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0);
}

#[test]
fn truncated_or_missing_memory_file_and_other_size_are_refused() {
    let dir = temp_dir("memory-bad");
    let memory = create_guest_memory(16 << 20, false).unwrap();
    memory.write_obj(1u64, GuestAddress(0x3000)).unwrap();
    let layout = memory_file::save(&dir, &memory).unwrap();

    let smaller = create_guest_memory(8 << 20, false).unwrap();
    let err = memory_file::restore(&dir, &layout, &smaller).unwrap_err();
    assert!(
        matches!(err, SnapshotError::MemorySizeMismatch { .. }),
        "{err}"
    );

    let path = dir.join(MEMORY_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let fresh = create_guest_memory(16 << 20, false).unwrap();
    let err = memory_file::restore(&dir, &layout, &fresh).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: the file is truncated (4194304 bytes, the manifest says 16777216 bytes of guest memory); the snapshot was not written completely, take it again",
            path.display()
        )
    );
    std::fs::remove_file(&path).unwrap();
    let err = memory_file::restore(&dir, &layout, &fresh).unwrap_err();
    assert!(matches!(err, SnapshotError::Missing { .. }), "{err}");
}

#[test]
fn device_states_keep_their_documented_tags_and_round_trip() {
    use super::format::{AtaState, DeviceData, VhostUserState, VirtioMmioState};
    let states = [
        ("stateless", DeviceData::Stateless),
        (
            "virtio-mmio",
            DeviceData::VirtioMmio(VirtioMmioState {
                mmio_base: 0xd000_0000,
                status: 0xf,
                vhost_user: Some(VhostUserState {
                    socket: "/run/blk.sock".into(),
                    vring_bases: vec![(0, 3198)],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        ("ata", DeviceData::Ata(AtaState::default())),
    ];
    for (tag, state) in states {
        let device = DeviceState {
            id: "d".into(),
            kind: "k".into(),
            state,
        };
        let json = serde_json::to_value(&device).unwrap();
        let shown = json["state"].to_string();
        assert!(
            shown.starts_with(&format!("\"{tag}")) || shown.starts_with(&format!("{{\"{tag}\"")),
            "{shown}"
        );
        assert_eq!(serde_json::from_value::<DeviceState>(json).unwrap(), device);
    }
}
