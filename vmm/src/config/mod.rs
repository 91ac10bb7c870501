//! What a VM is made of, parsed and validated from the command line before anything is created.

pub mod keys;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Smallest memory the guest contract can work with: the boot tables live below 1 MiB and the
/// guest image is linked at 1 MiB.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;

/// Where the guest's page tables can reach (see `boot::page_tables`).
pub const MAX_MEMORY_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("'{0}' is not a size: expected a number with an optional K, M, G or T suffix, e.g. 256M or 1G")]
    ParseSize(String),
    #[error("--memory {0} is too small: the guest needs at least {min} MiB", min = MIN_MEMORY_BYTES >> 20)]
    MemoryTooSmall(String),
    #[error(
        "--memory {value} is {value} bytes, too small for a guest (at least {min} MiB): did you \
         mean {value}M?",
        min = MIN_MEMORY_BYTES >> 20
    )]
    MemoryBareNumber { value: u64 },
    #[error("--memory {0} is too large: splitvisor supports at most {max} GiB", max = MAX_MEMORY_BYTES >> 30)]
    MemoryTooLarge(String),
    #[error("--memory {0} is not a whole number of MiB")]
    MemoryUnaligned(String),
    #[error(
        "--memory {requested} is more than this host has ({host_mib} MiB of RAM in /proc/meminfo)"
    )]
    MemoryExceedsHost { requested: String, host_mib: u64 },
    #[error("--vcpus 0: a VM needs at least one vCPU")]
    NoVcpus,
    #[error("--serial '{0}': expected stdio, file=PATH or none")]
    ParseSerial(String),
    #[error("--{flag} '{value}': '{item}' is not key=value")]
    NotKeyValue {
        flag: &'static str,
        value: String,
        item: String,
    },
    #[error("--{flag} '{value}': unknown key '{key}'; expected one of: {expected}{aliases}")]
    UnknownKey {
        flag: &'static str,
        value: String,
        key: String,
        expected: &'static str,
        /// ` (aliases: path for image, ...)` for the allowed keys that have aliases.
        aliases: String,
    },
    #[error("--{flag} '{value}': {problem}")]
    BadDevice {
        flag: &'static str,
        value: String,
        problem: String,
    },
    #[error("device id '{0}' is used twice; give each --disk/--net a distinct id=")]
    DuplicateId(String),
    #[error("only one emulated ATA disk is supported (the primary IDE master)")]
    TooManyAtaDisks,
}

/// A byte count written the way users write memory sizes (`256M`, `1G`, `4096K`, `65536`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::ParseSize(s.to_string());
        let trimmed = s.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, suffix) = trimmed.split_at(split);
        if digits.is_empty() {
            return Err(err());
        }
        let shift = match suffix
            .to_ascii_uppercase()
            .trim_end_matches("IB")
            .trim_end_matches('B')
        {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(err()),
        };
        let value: u64 = digits.parse().map_err(|_| err())?;
        value
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 40) {
            write!(f, "{}T", b >> 40)
        } else if b != 0 && b.is_multiple_of(1 << 30) {
            write!(f, "{}G", b >> 30)
        } else if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{}M", b >> 20)
        } else {
            write!(f, "{b}")
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    Stdio,
    File(PathBuf),
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
                _ => Err(ConfigError::ParseSerial(s.to_string())),
            },
        }
    }
}

/// The kernel to boot: a file, or the guest embedded in this binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    Embedded,
    File(PathBuf),
}

pub use crate::config::keys::{canonical_key, KEY_ALIASES};
pub use crate::config::keys::{parse_bool, parse_key_values};

/// A disk: served by a vhost-user backend daemon, or emulated inside the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskConfig {
    VhostUser {
        id: Option<String>,
        socket: PathBuf,
        /// The backend daemon's `--api-socket`, for `GET /metrics`'s `backend_stats`.
        stats: Option<PathBuf>,
    },
    Ata {
        id: Option<String>,
        path: PathBuf,
        readonly: bool,
    },
}

impl DiskConfig {
    pub fn id(&self) -> Option<&str> {
        match self {
            DiskConfig::VhostUser { id, .. } | DiskConfig::Ata { id, .. } => id.as_deref(),
        }
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bad = |problem: &str| ConfigError::BadDevice {
            flag: "disk",
            value: value.to_string(),
            problem: problem.to_string(),
        };
        let pairs = parse_key_values(
            "disk",
            value,
            "socket, image, emulated, readonly, id, stats",
            &["readonly"],
        )?;
        let (mut id, mut socket, mut path, mut emulated, mut readonly) =
            (None, None, None, None, false);
        let mut stats = None;
        for (key, val) in pairs {
            match key.as_str() {
                "socket" => socket = Some(PathBuf::from(val)),
                "stats" => stats = Some(PathBuf::from(val)),
                "image" => path = Some(PathBuf::from(val)),
                "emulated" => emulated = Some(val),
                "readonly" => readonly = parse_bool("disk", value, &key, &val)?,
                _ => id = Some(val),
            }
        }
        match (socket, path, emulated.as_deref()) {
            (Some(socket), None, None) if !readonly => {
                Ok(DiskConfig::VhostUser { id, socket, stats })
            }
            (Some(_), None, None) => Err(bad(
                "readonly applies to emulated disks; start the backend daemon with --readonly",
            )),
            (None, Some(_), Some(_)) if stats.is_some() => Err(bad(
                "stats= names a backend daemon's --api-socket; an emulated disk has none",
            )),
            (None, Some(path), Some("ata")) => Ok(DiskConfig::Ata { id, path, readonly }),
            (None, Some(_), Some(other)) => Err(bad(&format!(
                "emulated={other}: the only emulated disk is ata"
            ))),
            (None, Some(_), None) => Err(bad(
                "path= needs emulated=ata; a paravirtualized disk is served by a backend daemon (socket=PATH)",
            )),
            (Some(_), Some(_), _) => Err(bad("give either socket= or path=, not both")),
            _ => Err(bad("expected socket=PATH or path=IMAGE,emulated=ata")),
        }
    }
}

/// A network card served by a vhost-user backend daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub id: Option<String>,
    pub socket: PathBuf,
    pub mac: Option<[u8; 6]>,
    /// The backend daemon's `--api-socket`, for `GET /metrics`'s `backend_stats`.
    pub stats: Option<PathBuf>,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| ConfigError::BadDevice {
            flag: "net",
            value: value.to_string(),
            problem,
        };
        let (mut id, mut socket, mut mac, mut stats) = (None, None, None, None);
        for (key, val) in parse_key_values("net", value, "socket, mac, id, stats", &[])? {
            match key.as_str() {
                "socket" => socket = Some(PathBuf::from(val)),
                "stats" => stats = Some(PathBuf::from(val)),
                "mac" => {
                    mac = Some(
                        crate::device_values::parse_mac(&val)
                            .map_err(|e| bad(format!("mac={val}: {e}")))?,
                    )
                }
                _ => id = Some(val),
            }
        }
        let socket = socket.ok_or_else(|| bad("expected socket=PATH".to_string()))?;
        Ok(NetConfig {
            id,
            socket,
            mac,
            stats,
        })
    }
}

/// Everything `splitvisor run` needs to build and start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub memory: ByteSize,
    /// Allocate all guest memory before boot.
    pub prefault: bool,
    pub vcpus: u8,
    pub kernel: KernelSource,
    /// An initramfs for a Linux kernel.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line as given; `None`: the default for the kind of kernel.
    pub cmdline: Option<String>,
    /// Whether a Linux guest gets ACPI tables.
    pub acpi: bool,
    pub serial: SerialConfig,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// How long to wait for a backend's socket to accept a connection.
    pub connect_timeout: std::time::Duration,
    /// How long a device waits for its backend to come back after losing it (0: fail at once).
    pub reconnect_timeout: std::time::Duration,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<std::path::PathBuf>,
}

impl VmConfig {
    /// Checks what can be checked without KVM: memory bounds and alignment, vCPU count.
    /// Limits that depend on the host (KVM's vCPU maximum) are checked when the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shown = self.memory.to_string();
        let as_mib = self.memory.0.checked_mul(1 << 20);
        if self.memory.0 != 0
            && self.memory.0 < MIN_MEMORY_BYTES
            && as_mib.is_some_and(|b| (MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&b))
        {
            // A bare number that makes sense as MiB, not as bytes: `--memory 512`.
            return Err(ConfigError::MemoryBareNumber {
                value: self.memory.0,
            });
        }
        if self.memory.0 < MIN_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooSmall(shown));
        }
        if self.memory.0 > MAX_MEMORY_BYTES {
            return Err(ConfigError::MemoryTooLarge(shown));
        }
        if !self.memory.0.is_multiple_of(1 << 20) {
            return Err(ConfigError::MemoryUnaligned(shown));
        }
        if let Some(host) = host_memory_bytes() {
            if self.memory.0 > host {
                return Err(ConfigError::MemoryExceedsHost {
                    requested: shown,
                    host_mib: host >> 20,
                });
            }
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let ata_disks = self
            .disks
            .iter()
            .filter(|d| matches!(d, DiskConfig::Ata { .. }))
            .count();
        if ata_disks > 1 {
            return Err(ConfigError::TooManyAtaDisks);
        }
        let ids = self.disk_ids().into_iter().chain(self.net_ids());
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if !seen.insert(id.clone()) {
                return Err(ConfigError::DuplicateId(id));
            }
        }
        Ok(())
    }

    /// Each disk's id: the one given, or `disk0`, `disk1`, ... by position.
    pub fn disk_ids(&self) -> Vec<String> {
        let given = self.disks.iter().map(|d| d.id().map(str::to_string));
        default_ids("disk", given)
    }

    /// Each network card's id: the one given, or `net0`, `net1`, ... by position.
    /// Each vhost-user device's id and its backend daemon's stats socket (`stats=`), if given.
    pub fn backend_stats_sockets(&self) -> Vec<(String, PathBuf)> {
        let disks = self
            .disks
            .iter()
            .zip(self.disk_ids())
            .filter_map(|(d, id)| match d {
                DiskConfig::VhostUser {
                    stats: Some(path), ..
                } => Some((id, path.clone())),
                _ => None,
            });
        let nets = self
            .nets
            .iter()
            .zip(self.net_ids())
            .filter_map(|(n, id)| Some((id, n.stats.clone()?)));
        disks.chain(nets).collect()
    }

    pub fn net_ids(&self) -> Vec<String> {
        default_ids("net", self.nets.iter().map(|n| n.id.clone()))
    }
}

fn default_ids(prefix: &str, given: impl Iterator<Item = Option<String>>) -> Vec<String> {
    given
        .enumerate()
        .map(|(i, id)| id.unwrap_or_else(|| format!("{prefix}{i}")))
        .collect()
}

/// The host's RAM plus swap: guest memory is a memfd and can use no more than that.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib << 10)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(memory: u64, vcpus: u8) -> VmConfig {
        VmConfig {
            memory: ByteSize(memory),
            prefault: false,
            vcpus,
            kernel: KernelSource::Embedded,
            initramfs: None,
            cmdline: None,
            acpi: true,
            serial: SerialConfig::Stdio,
            disks: Vec::new(),
            nets: Vec::new(),
            connect_timeout: std::time::Duration::from_secs(1),
            reconnect_timeout: std::time::Duration::ZERO,
            api_socket: None,
        }
    }

    #[test]
    fn disk_strings_parse_into_backend_or_emulated_disks() {
        assert_eq!(
            "socket=/run/b.sock".parse(),
            Ok(DiskConfig::VhostUser {
                id: None,
                socket: "/run/b.sock".into(),
                stats: None,
            })
        );
        assert_eq!(
            "path=/img.raw,emulated=ata,readonly,id=legacy".parse(),
            Ok(DiskConfig::Ata {
                id: Some("legacy".into()),
                path: "/img.raw".into(),
                readonly: true
            })
        );
    }

    #[test]
    fn bad_disk_strings_name_the_problem() {
        let cases = [
            ("socket=/a,colour=red", "unknown key 'colour'"),
            ("path=/img", "path= needs emulated=ata"),
            ("path=/img,emulated=nvme", "emulated=nvme"),
            ("socket=/a,path=/b", "either socket= or path="),
            ("id=x", "expected socket=PATH or path=IMAGE,emulated=ata"),
            ("socket", "'socket' is not key=value"),
            ("path=/i,emulated=ata,readonly=maybe", "readonly=maybe"),
        ];
        for (input, expected) in cases {
            let err = input.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
            assert!(err.starts_with("--disk"), "{input}: {err}");
        }
    }

    #[test]
    fn stats_sockets_are_collected_per_device_id() {
        let mut cfg = config(64 << 20, 1);
        cfg.disks = vec![
            "socket=/a,stats=/a.api".parse().unwrap(),
            "socket=/b".parse().unwrap(),
        ];
        cfg.nets = vec!["socket=/n,id=lan,stats=/n.api".parse().unwrap()];
        assert_eq!(
            cfg.backend_stats_sockets(),
            vec![
                ("disk0".to_string(), "/a.api".into()),
                ("lan".to_string(), "/n.api".into())
            ]
        );
        let err = "path=/i,emulated=ata,stats=/s"
            .parse::<DiskConfig>()
            .unwrap_err();
        assert!(err.to_string().contains("emulated disk has none"), "{err}");
    }

    #[test]
    fn net_strings_parse_with_mac() {
        let net: NetConfig = "socket=/n.sock,mac=52:54:00:ab:cd:ef,id=lan"
            .parse()
            .unwrap();
        assert_eq!(net.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(net.id.as_deref(), Some("lan"));
        for bad in [
            "socket=/n,mac=52:54:00",
            "socket=/n,mac=zz:54:00:ab:cd:ef",
            "mac=52:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_ids_default_by_position_and_must_be_unique() {
        let mut cfg = config(256 << 20, 1);
        cfg.disks = vec![
            "socket=/a".parse().unwrap(),
            "socket=/b,id=data".parse().unwrap(),
            "socket=/c".parse().unwrap(),
        ];
        cfg.nets = vec!["socket=/n".parse().unwrap()];
        assert_eq!(cfg.disk_ids(), ["disk0", "data", "disk2"]);
        assert_eq!(cfg.net_ids(), ["net0"]);
        assert!(cfg.validate().is_ok());
        cfg.disks.push("socket=/d,id=net0".parse().unwrap());
        assert_eq!(cfg.validate(), Err(ConfigError::DuplicateId("net0".into())));
        cfg.disks.pop();
        cfg.disks.push("path=/x,emulated=ata".parse().unwrap());
        cfg.disks.push("path=/y,emulated=ata".parse().unwrap());
        assert_eq!(cfg.validate(), Err(ConfigError::TooManyAtaDisks));
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("256M".parse(), Ok(ByteSize(256 << 20)));
        assert_eq!("1G".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("1g".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("4096K".parse(), Ok(ByteSize(4 << 20)));
        assert_eq!("512MiB".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("2GB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("65536".parse(), Ok(ByteSize(65536)));
    }

    #[test]
    fn malformed_sizes_are_rejected_with_the_value() {
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "1 G B",
            "99999999999999999999",
            "16777216T",
        ] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert_eq!(
                err,
                ConfigError::ParseSize(bad.to_string()),
                "input {bad:?}"
            );
        }
        assert!(ConfigError::ParseSize("12X".into())
            .to_string()
            .contains("'12X' is not a size"));
    }

    #[test]
    fn sizes_display_in_the_unit_users_wrote() {
        assert_eq!(ByteSize(256 << 20).to_string(), "256M");
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn serial_destinations_parse() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!(
            "file=/tmp/x.log".parse(),
            Ok(SerialConfig::File("/tmp/x.log".into()))
        );
        for bad in ["file=", "tty", ""] {
            assert_eq!(
                bad.parse::<SerialConfig>(),
                Err(ConfigError::ParseSerial(bad.to_string()))
            );
        }
    }

    #[test]
    fn memory_and_vcpu_bounds_are_enforced() {
        assert!(config(256 << 20, 1).validate().is_ok());
        assert_eq!(
            config(0, 1).validate(),
            Err(ConfigError::MemoryTooSmall("0".into()))
        );
        assert_eq!(
            config(1 << 40, 1).validate(),
            Err(ConfigError::MemoryTooLarge("1T".into()))
        );
        assert_eq!(
            config((256 << 20) + 4096, 1).validate(),
            Err(ConfigError::MemoryUnaligned(
                ((256u64 << 20) + 4096).to_string()
            ))
        );
        assert_eq!(config(256 << 20, 0).validate(), Err(ConfigError::NoVcpus));
    }

    #[test]
    fn memory_beyond_the_host_is_rejected() {
        let host = host_memory_bytes().expect("/proc/meminfo is readable");
        let too_much = (host >> 20) + 1024;
        if too_much << 20 <= MAX_MEMORY_BYTES {
            let err = config(too_much << 20, 1).validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::MemoryExceedsHost { .. }),
                "{err}"
            );
        }
    }
}
