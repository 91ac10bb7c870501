//! Live migration of the project's guest between two VMMs over a stream (issue 15, part 2):
//! the source copies memory while the VM runs (pre-copy with KVM's dirty log and the
//! vhost-user backends', `dirty`; only when every backend serving rings can log its writes),
//! pauses the VM, sends the memory left and the snapshot's state (the manifest types of
//! `snapshot::format`), hands its vhost-user backends over by closing its connections, and
//! ends once the destination says the VM runs there. The conversation:
//!
//! ```text
//! source                                   destination (`splitvisor run --incoming ADDR`)
//! Hello {versions, memory, vCPUs, devices} ->
//!                                         <- Verdict (refused: the source goes on unharmed)
//! Pages* (pre-copy rounds, VM running)    ->  written into a staging snapshot directory
//! (pause, capture, stop the rings)
//! Pages* [guest address][pages]           ->  (later pages overwrite earlier ones)
//! State  (the snapshot manifest)          ->
//! (close the vhost-user connections)
//! Handoff                                 ->  restores the VM, connects to the same backends
//!                                         <- Verdict (failed: the source reconnects, resumes)
//! (exits 0)                                   (runs the VM)
//! ```

pub mod dirty;
pub mod receive;
pub mod send;
pub mod wire;

use serde::{Deserialize, Serialize};

use crate::snapshot::format::{DeviceState, MemoryLayout};
use crate::snapshot::FORMAT_VERSION;

/// What the first frame starts with, so that a stray connection is told apart.
pub const MAGIC: &str = "splitvisor-migration";
/// The version of this conversation; a destination refuses another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// The source's first frame: what the destination must match before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub protocol_version: u32,
    /// The snapshot format (`snapshot::FORMAT_VERSION`) of the state that follows.
    pub format_version: u32,
    pub memory: MemoryLayout,
    pub vcpus: usize,
    /// Every device as `id (kind)`, the platform ones included.
    pub devices: Vec<String>,
}

impl Hello {
    pub fn new(memory: MemoryLayout, vcpus: usize, devices: &[DeviceState]) -> Self {
        Self {
            magic: MAGIC.into(),
            protocol_version: PROTOCOL_VERSION,
            format_version: FORMAT_VERSION,
            memory,
            vcpus,
            devices: devices.iter().map(DeviceState::key).collect(),
        }
    }

    /// Why a destination with this memory, vCPU count and devices (`None`: it takes the
    /// source's) cannot take the VM, in words for the user on the source's side.
    pub fn mismatch(
        &self,
        memory: &MemoryLayout,
        vcpus: usize,
        devices: Option<&[String]>,
    ) -> Option<String> {
        if self.magic != MAGIC {
            return Some(format!(
                "the peer is not a splitvisor migration source (magic {:?})",
                self.magic
            ));
        }
        if (self.protocol_version, self.format_version) != (PROTOCOL_VERSION, FORMAT_VERSION) {
            return Some(format!(
                "the source speaks migration protocol {} with state format {}, the destination {PROTOCOL_VERSION} with {FORMAT_VERSION}; migrate between the same splitvisor versions",
                self.protocol_version, self.format_version
            ));
        }
        if self.memory.size != memory.size {
            return Some(format!(
                "the VM has {} MiB of memory but the destination was started with --memory {}M; start it with --memory {}M",
                self.memory.size >> 20,
                memory.size >> 20,
                self.memory.size >> 20
            ));
        }
        if let Err(e) = self.memory.check_target(memory) {
            return Some(format!("the destination's memory layout differs: {e}"));
        }
        if self.vcpus != vcpus {
            return Some(format!(
                "the VM has {} vCPU(s) but the destination was started with --vcpus {vcpus}; start it with --vcpus {}",
                self.vcpus, self.vcpus
            ));
        }
        let devices = devices?;
        let missing: Vec<&str> = self
            .devices
            .iter()
            .filter(|d| !devices.contains(d))
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = devices
            .iter()
            .filter(|d| !self.devices.contains(d))
            .map(String::as_str)
            .collect();
        (!missing.is_empty() || !extra.is_empty()).then(|| {
            format!(
                "the destination's devices differ from the VM's (missing there: [{}], not in the VM: [{}]); give the destination the same --disk/--net ids, or none to take the VM's",
                missing.join(", "),
                extra.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::MemoryRegion;

    fn layout(size: u64) -> MemoryLayout {
        MemoryLayout {
            size,
            page_size: 4096,
            regions: vec![MemoryRegion {
                guest_addr: 0,
                size,
                file_offset: 0,
            }],
        }
    }

    #[test]
    fn a_destination_that_differs_is_told_what_to_change() {
        let devices = vec!["serial (serial)".to_string(), "disk0 (block)".to_string()];
        let hello = Hello {
            devices: devices.clone(),
            ..Hello::new(layout(256 << 20), 1, &[])
        };
        assert_eq!(hello.mismatch(&layout(256 << 20), 1, Some(&devices)), None);
        assert_eq!(hello.mismatch(&layout(256 << 20), 1, None), None);
        let memory = hello.mismatch(&layout(512 << 20), 1, None).unwrap();
        assert!(memory.contains("--memory 256M"), "{memory}");
        let vcpus = hello.mismatch(&layout(256 << 20), 2, None).unwrap();
        assert!(vcpus.contains("--vcpus 1"), "{vcpus}");
        let other = vec!["serial (serial)".to_string(), "disk1 (block)".to_string()];
        let set = hello.mismatch(&layout(256 << 20), 1, Some(&other)).unwrap();
        assert!(
            set.contains("[disk0 (block)]") && set.contains("[disk1 (block)]"),
            "{set}"
        );
        let old = Hello {
            protocol_version: 0,
            ..hello.clone()
        };
        let version = old.mismatch(&layout(256 << 20), 1, None).unwrap();
        assert!(version.contains("protocol 0"), "{version}");
    }
}
