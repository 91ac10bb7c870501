//! What a VM is made of, parsed and validated from the command line before anything is created.

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
        if b != 0 && b.is_multiple_of(1 << 30) {
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

/// Everything `splitvisor run` needs to build and start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub memory: ByteSize,
    pub vcpus: u8,
    pub kernel: KernelSource,
    pub cmdline: String,
    pub serial: SerialConfig,
}

impl VmConfig {
    /// Checks what can be checked without KVM: memory bounds and alignment, vCPU count.
    /// Limits that depend on the host (KVM's vCPU maximum) are checked when the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shown = self.memory.to_string();
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
        Ok(())
    }
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
            vcpus,
            kernel: KernelSource::Embedded,
            cmdline: String::new(),
            serial: SerialConfig::Stdio,
        }
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
            Err(ConfigError::MemoryTooLarge("1024G".into()))
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
