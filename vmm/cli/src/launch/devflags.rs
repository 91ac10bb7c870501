//! `launch --disk` and `--net`: the device grammar's keys as `key=value,...` flags, parsed and
//! checked before ids are assigned (the TOML file's `[[disk]]`/`[[net]]` take the same keys).

use std::path::PathBuf;
use std::str::FromStr;

use super::spec::{DiskOptions, NetOptions};
use splitvisor_vmm::config::{parse_bool, parse_key_values, ConfigError};

/// `--disk image=PATH[,readonly][,queues=N][,direct][,queue_size=N][,disk_id=ID][,share][,poll_us=N][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFlag {
    pub(super) id: Option<String>,
    pub(super) image: Option<PathBuf>,
    pub(super) readonly: bool,
    pub(super) queues: Option<u16>,
    pub(super) options: DiskOptions,
}

/// `--net tap=NAME|switch=NAME[,mac=..][,mtu=N][,queues=N][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFlag {
    pub(super) id: Option<String>,
    pub(super) tap: Option<String>,
    pub(super) switch: Option<String>,
    pub(super) mac: Option<String>,
    pub(super) options: NetOptions,
}

fn bad(flag: &'static str, value: &str, problem: String) -> ConfigError {
    ConfigError::BadDevice {
        flag,
        value: value.to_string(),
        problem,
    }
}

/// A count such as `queues=N`: a number (the daemon checks its range and says so).
fn number(flag: &'static str, value: &str, key: &str, val: &str) -> Result<u16, ConfigError> {
    val.parse()
        .map_err(|_| bad(flag, value, format!("{key}={val}: expected a number")))
}

impl FromStr for DiskFlag {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let keys = "image, readonly, queues, direct, queue_size, disk_id, share, poll_us, id";
        let pairs = parse_key_values("disk", value, keys, &["readonly", "direct", "share"])?;
        let mut disk = DiskFlag {
            id: None,
            image: None,
            readonly: false,
            queues: None,
            options: DiskOptions::default(),
        };
        for (key, val) in pairs {
            match key.as_str() {
                "image" => disk.image = Some(PathBuf::from(val)),
                "readonly" => disk.readonly = parse_bool("disk", value, &key, &val)?,
                "direct" => disk.options.direct = parse_bool("disk", value, &key, &val)?,
                "queues" => disk.queues = Some(number("disk", value, &key, &val)?),
                "queue_size" => disk.options.queue_size = Some(number("disk", value, &key, &val)?),
                "disk_id" => disk.options.disk_id = Some(val),
                "share" => disk.options.share = parse_bool("disk", value, &key, &val)?,
                "poll_us" => {
                    disk.options.poll_us = Some(val.parse().map_err(|_| {
                        bad("disk", value, format!("{key}={val}: expected microseconds"))
                    })?)
                }
                _ => disk.id = Some(val),
            }
        }
        if disk.image.is_none() {
            return Err(bad("disk", value, "expected image=PATH".to_string()));
        }
        Ok(disk)
    }
}

impl FromStr for NetFlag {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut net = NetFlag {
            id: None,
            tap: None,
            switch: None,
            mac: None,
            options: NetOptions::default(),
        };
        let keys = "tap, switch, mac, mtu, queues, id";
        for (key, val) in parse_key_values("net", value, keys, &[])? {
            match key.as_str() {
                "tap" => net.tap = Some(val),
                "switch" => net.switch = Some(val),
                // Checked with the TOML file's MACs, in `LaunchSpec::check`.
                "mac" => net.mac = Some(val),
                "mtu" => {
                    let mtu = splitvisor_vmm::device_values::parse_mtu(&val)
                        .map_err(|e| bad("net", value, format!("mtu={val}: {e}")))?;
                    net.options.mtu = Some(mtu);
                }
                "queues" => net.options.queues = Some(number("net", value, &key, &val)?),
                _ => net.id = Some(val),
            }
        }
        if net.tap.is_some() == net.switch.is_some() {
            return Err(bad(
                "net",
                value,
                "expected exactly one of tap=NAME or switch=NAME".to_string(),
            ));
        }
        Ok(net)
    }
}
