//! What `launch` is asked to run, from its flags or from a TOML file: the VM settings (shared
//! with `run`) and the devices as images, TAPs and switches, with ids given or defaulted and
//! checked before anything is started.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clap::{Args, FromArgMatches};
use serde::Deserialize;

use super::args::LaunchArgs;
pub use super::devflags::{DiskFlag, NetFlag};
use crate::run::VmArgs;
use splitvisor_vmm::config::{ByteSize, ConfigError, SerialConfig};

/// Device ids become file names in the runtime directory and values in `--disk`/`--net`.
const MAX_ID_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{origin}: {key} = {value:?}: {problem}")]
    BadValue {
        origin: String,
        key: &'static str,
        value: String,
        problem: String,
    },
    #[error("{origin}: {what} '{name}' must be 1 to {MAX_ID_LEN} letters, digits, '-' or '_'")]
    BadName {
        origin: String,
        what: &'static str,
        name: String,
    },
    #[error(
        "{origin}: device id '{id}' is used twice; give each disk and network card a distinct id"
    )]
    DuplicateId { origin: String, id: String },
    #[error(
        "{origin}: device id '{id}' is the name of switch '{switch}''s daemon; choose another id"
    )]
    IdTakenBySwitch {
        origin: String,
        id: String,
        switch: String,
    },
    #[error("{origin}: network card '{id}' needs exactly one of tap=NAME or switch=NAME")]
    NetBackend { origin: String, id: String },
    #[error("{origin}: disk '{id}' needs image=PATH")]
    NoImage { origin: String, id: String },
    #[error("{origin}: disk '{id}': cannot use image {path}")]
    Image {
        origin: String,
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A disk: an image file served by its own `splitvisor-blk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    pub image: PathBuf,
    pub readonly: bool,
    pub queues: Option<u16>,
    /// The rest of splitvisor-blk's options, passed on to it.
    pub options: DiskOptions,
}

/// splitvisor-blk options beyond image, readonly and queues (None/false: the daemon's default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// `--direct`: open the image with O_DIRECT.
    pub direct: bool,
    /// `--queue-size N`.
    pub queue_size: Option<u16>,
    /// `--serial ID`: the disk ID the guest reads (GET_ID).
    pub disk_id: Option<String>,
    /// `--share`: the image may be opened by another splitvisor-blk too (the target of a
    /// planned swap), so the daemon takes a shared lock.
    pub share: bool,
    /// `--poll-us N`: how long a queue's worker keeps polling after a batch.
    pub poll_us: Option<u64>,
}

/// splitvisor-net options of a card (None: the daemon's default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetOptions {
    /// `--mtu N` (one value per switch: every card of a switch must agree).
    pub mtu: Option<u16>,
    /// `--queues N` (TAP only).
    pub queues: Option<u16>,
}

/// What a network card is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A host TAP device, with a `splitvisor-net --tap` of its own.
    Tap(String),
    /// A virtual switch: one `splitvisor-net --switch` serves every card naming it.
    Switch(String),
}

/// A network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub id: String,
    pub backend: NetBackend,
    pub mac: Option<String>,
    pub options: NetOptions,
}

/// Everything launch runs: the VM and its devices, ids assigned and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    pub vm: VmArgs,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    /// The file's `socket_timeout` (seconds), which overrides `--socket-timeout`.
    pub socket_timeout: Option<u64>,
    /// The file's `reconnect_timeout` (seconds), instead of the one launch computes.
    pub reconnect_timeout: Option<u64>,
}

/// The name of the daemon serving switch `name` (its log is `NAME.log` in the runtime dir).
pub fn switch_daemon_name(switch: &str) -> String {
    format!("switch-{switch}")
}

/// The TOML file: the VM settings at the top level, `[[disk]]` and `[[net]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    memory: Option<SizeValue>,
    prefault: Option<bool>,
    vcpus: Option<u8>,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    acpi: Option<bool>,
    serial: Option<String>,
    stats: Option<bool>,
    connect_timeout: Option<u64>,
    reconnect_timeout: Option<u64>,
    socket_timeout: Option<u64>,
    api_socket: Option<PathBuf>,
    #[serde(default)]
    disk: Vec<FileDisk>,
    #[serde(default)]
    net: Vec<FileNet>,
}

/// `memory = "512M"` or `memory = 536870912`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Text(String),
    Bytes(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    id: Option<String>,
    #[serde(alias = "path")]
    image: Option<PathBuf>,
    #[serde(default, alias = "ro")]
    readonly: bool,
    queues: Option<u16>,
    #[serde(default)]
    direct: bool,
    queue_size: Option<u16>,
    #[serde(alias = "serial")]
    disk_id: Option<String>,
    #[serde(default)]
    share: bool,
    poll_us: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNet {
    id: Option<String>,
    tap: Option<String>,
    switch: Option<String>,
    mac: Option<String>,
    mtu: Option<u32>,
    queues: Option<u16>,
}

/// The file's directory (relative paths in it start there) and its name for messages.
struct FilePaths {
    base: PathBuf,
    origin: String,
}

impl FilePaths {
    fn resolve(&self, path: PathBuf) -> PathBuf {
        if path.is_relative() {
            self.base.join(path)
        } else {
            path
        }
    }

    fn bad(&self, key: &'static str, value: String, problem: String) -> SpecError {
        SpecError::BadValue {
            origin: self.origin.clone(),
            key,
            value,
            problem,
        }
    }
}

impl FileSpec {
    /// `run`'s defaults, overridden by what the file sets.
    fn vm_args(&self, paths: &FilePaths) -> Result<VmArgs, SpecError> {
        let mut vm = default_vm_args();
        match &self.memory {
            Some(SizeValue::Bytes(bytes)) => vm.memory = ByteSize(*bytes),
            Some(SizeValue::Text(text)) => {
                vm.memory = text
                    .parse()
                    .map_err(|e: ConfigError| paths.bad("memory", text.clone(), e.to_string()))?
            }
            None => {}
        }
        if let Some(serial) = &self.serial {
            vm.serial = match serial.parse() {
                Ok(SerialConfig::File(p)) => SerialConfig::File(paths.resolve(p)),
                Ok(other) => other,
                Err(e) => return Err(paths.bad("serial", serial.clone(), e.to_string())),
            };
        }
        vm.prefault = self.prefault.unwrap_or(vm.prefault);
        vm.vcpus = self.vcpus.unwrap_or(vm.vcpus);
        vm.kernel = self.kernel.clone().map(|p| paths.resolve(p)).or(vm.kernel);
        vm.initramfs = self
            .initramfs
            .clone()
            .map(|p| paths.resolve(p))
            .or(vm.initramfs);
        vm.cmdline = self.cmdline.clone().or(vm.cmdline);
        vm.acpi = self.acpi.unwrap_or(vm.acpi);
        vm.stats = self.stats.unwrap_or(vm.stats);
        vm.connect_timeout = self.connect_timeout.unwrap_or(vm.connect_timeout);
        vm.api_socket = self
            .api_socket
            .clone()
            .map(|p| paths.resolve(p))
            .or(vm.api_socket);
        Ok(vm)
    }
}

impl FileDisk {
    fn into_spec(self, index: usize, paths: &FilePaths) -> Result<DiskSpec, SpecError> {
        let id = self.id.unwrap_or_else(|| format!("disk{index}"));
        let Some(image) = self.image else {
            return Err(SpecError::NoImage {
                origin: paths.origin.clone(),
                id,
            });
        };
        Ok(DiskSpec {
            id,
            image: paths.resolve(image),
            readonly: self.readonly,
            queues: self.queues,
            options: DiskOptions {
                direct: self.direct,
                queue_size: self.queue_size,
                disk_id: self.disk_id,
                share: self.share,
                poll_us: self.poll_us,
            },
        })
    }
}

impl FileNet {
    fn into_spec(self, index: usize, paths: &FilePaths) -> Result<NetSpec, SpecError> {
        let id = self.id.unwrap_or_else(|| format!("net{index}"));
        let backend = match (self.tap, self.switch) {
            (Some(tap), None) => NetBackend::Tap(tap),
            (None, Some(switch)) => NetBackend::Switch(switch),
            _ => {
                return Err(SpecError::NetBackend {
                    origin: paths.origin.clone(),
                    id,
                })
            }
        };
        let mtu = match self.mtu {
            // The same check, and message, as `--net ...,mtu=N` and `splitvisor-net --mtu`.
            Some(mtu) => Some(
                splitvisor_vmm::device_values::parse_mtu(&mtu.to_string()).map_err(|problem| {
                    SpecError::BadValue {
                        origin: format!("{}: network card '{id}'", paths.origin),
                        key: "mtu",
                        value: mtu.to_string(),
                        problem,
                    }
                })?,
            ),
            None => None,
        };
        Ok(NetSpec {
            id,
            backend,
            mac: self.mac,
            options: NetOptions {
                mtu,
                queues: self.queues,
            },
        })
    }
}

impl LaunchSpec {
    /// The description from `--config FILE`, or else from the flags; checked.
    pub fn from_args(args: &LaunchArgs) -> Result<LaunchSpec, SpecError> {
        let spec = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::from_flags(args),
        };
        let origin = match &args.config {
            Some(path) => path.display().to_string(),
            None => "command line".to_string(),
        };
        spec.check(&origin)?;
        Ok(spec)
    }

    fn from_flags(args: &LaunchArgs) -> LaunchSpec {
        let disks = args.disk.iter().enumerate().map(|(i, d)| DiskSpec {
            id: d.id.clone().unwrap_or_else(|| format!("disk{i}")),
            image: d.image.clone().unwrap_or_default(),
            readonly: d.readonly,
            queues: d.queues,
            options: d.options.clone(),
        });
        let nets = args.net.iter().enumerate().map(|(i, n)| NetSpec {
            id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
            backend: match (&n.tap, &n.switch) {
                (Some(tap), _) => NetBackend::Tap(tap.clone()),
                (None, switch) => NetBackend::Switch(switch.clone().unwrap_or_default()),
            },
            mac: n.mac.clone(),
            options: n.options.clone(),
        });
        LaunchSpec {
            vm: args.vm.clone(),
            disks: disks.collect(),
            nets: nets.collect(),
            socket_timeout: None,
            reconnect_timeout: None,
        }
    }

    /// Reads the TOML file; relative paths in it are relative to the file's directory.
    pub fn from_file(path: &Path) -> Result<LaunchSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    fn from_toml(text: &str, path: &Path) -> Result<LaunchSpec, SpecError> {
        let file: FileSpec = toml::from_str(text).map_err(|e| SpecError::ParseFile {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let paths = FilePaths {
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            origin: path.display().to_string(),
        };
        Ok(LaunchSpec {
            vm: file.vm_args(&paths)?,
            socket_timeout: file.socket_timeout,
            reconnect_timeout: file.reconnect_timeout,
            disks: file
                .disk
                .into_iter()
                .enumerate()
                .map(|(i, d)| d.into_spec(i, &paths))
                .collect::<Result<_, _>>()?,
            nets: file
                .net
                .into_iter()
                .enumerate()
                .map(|(i, n)| n.into_spec(i, &paths))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Ids and names usable as file names and unique; MACs well-formed; images present.
    fn check(&self, origin: &str) -> Result<(), SpecError> {
        let ids = self.check_ids(origin)?;
        for net in &self.nets {
            check_net(net, &ids, origin)?;
        }
        self.check_switch_options(origin)?;
        for disk in &self.disks {
            check_queue_size(disk, origin)?;
            check_image(disk, origin)?;
        }
        Ok(())
    }

    /// One daemon serves a switch: its cards must agree on the MTU and cannot have queues=.
    fn check_switch_options(&self, origin: &str) -> Result<(), SpecError> {
        let mut mtus: Vec<(&str, Option<u16>)> = Vec::new();
        for net in &self.nets {
            let NetBackend::Switch(switch) = &net.backend else {
                continue;
            };
            let bad = |key: &'static str, value: String, problem: String| SpecError::BadValue {
                origin: format!("{origin}: network card '{}'", net.id),
                key,
                value,
                problem,
            };
            if let Some(queues) = net.options.queues {
                let problem = "queues applies to tap cards; a switch has one queue pair per card";
                return Err(bad("queues", queues.to_string(), problem.to_string()));
            }
            match mtus.iter().find(|(s, _)| s == switch) {
                Some((_, mtu)) if *mtu != net.options.mtu => {
                    let problem = format!(
                        "switch '{switch}' already has mtu {mtu:?} from another card; one \
                         daemon serves the switch, so its cards need the same mtu"
                    );
                    return Err(bad("mtu", format!("{:?}", net.options.mtu), problem));
                }
                Some(_) => {}
                None => mtus.push((switch, net.options.mtu)),
            }
        }
        Ok(())
    }

    /// Every device id, checked to be file-name safe and unique.
    fn check_ids(&self, origin: &str) -> Result<HashSet<&str>, SpecError> {
        let ids = self
            .disks
            .iter()
            .map(|d| &d.id)
            .chain(self.nets.iter().map(|n| &n.id));
        let mut seen = HashSet::new();
        for id in ids {
            if !is_file_name_safe(id) {
                return Err(bad_name(origin, "device id", id));
            }
            if !seen.insert(id.as_str()) {
                return Err(SpecError::DuplicateId {
                    origin: origin.to_string(),
                    id: id.clone(),
                });
            }
        }
        Ok(seen)
    }
}

/// A switch name usable as a file name and not taken by a device; a MAC `run` accepts.
fn check_net(net: &NetSpec, ids: &HashSet<&str>, origin: &str) -> Result<(), SpecError> {
    if let NetBackend::Switch(switch) = &net.backend {
        if !is_file_name_safe(switch) {
            return Err(bad_name(origin, "switch name", switch));
        }
        let daemon = switch_daemon_name(switch);
        if ids.contains(daemon.as_str()) {
            return Err(SpecError::IdTakenBySwitch {
                origin: origin.to_string(),
                id: daemon,
                switch: switch.clone(),
            });
        }
    }
    if let Some(mac) = &net.mac {
        // The check `run` and splitvisor-net make, with the same message.
        splitvisor_vmm::device_values::parse_mac(mac).map_err(|problem| SpecError::BadValue {
            origin: format!("{origin}: network card '{}'", net.id),
            key: "mac",
            value: mac.clone(),
            problem,
        })?;
    }
    Ok(())
}

/// A queue size the guest's rings fit in: the VMM offers rings of `QUEUE_SIZE` entries and
/// guests take them whole, so a daemon with smaller rings would fail the device at activation.
/// Other values (not a power of two, too large) are the daemon's to refuse, with its message.
fn check_queue_size(disk: &DiskSpec, origin: &str) -> Result<(), SpecError> {
    use splitvisor_vmm::vhost_user::QUEUE_SIZE;
    match disk.options.queue_size {
        Some(size) if size < QUEUE_SIZE => Err(SpecError::BadValue {
            origin: format!("{origin}: disk '{}'", disk.id),
            key: "queue_size",
            value: size.to_string(),
            problem: format!(
                "the VMM offers the guest rings of {QUEUE_SIZE} entries, so splitvisor-blk \
                 needs queue_size {QUEUE_SIZE} or more"
            ),
        }),
        _ => Ok(()),
    }
}

/// The image exists and is not a directory (the daemon reports anything subtler).
fn check_image(disk: &DiskSpec, origin: &str) -> Result<(), SpecError> {
    let usable = std::fs::metadata(&disk.image).and_then(|meta| {
        if meta.is_dir() {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "it is a directory",
            ))
        } else {
            Ok(())
        }
    });
    usable.map_err(|source| SpecError::Image {
        origin: origin.to_string(),
        id: disk.id.clone(),
        path: disk.image.clone(),
        source,
    })
}

fn bad_name(origin: &str, what: &'static str, name: &str) -> SpecError {
    SpecError::BadName {
        origin: origin.to_string(),
        what,
        name: name.to_string(),
    }
}

/// The VM settings `run` has when no flag is given (clap's defaults, so they cannot drift).
fn default_vm_args() -> VmArgs {
    let command = VmArgs::augment_args(clap::Command::new("defaults"));
    let matches = command.get_matches_from(["defaults"]);
    // Every VmArgs flag has a default or is optional, so this cannot fail.
    VmArgs::from_arg_matches(&matches).expect("VmArgs flags all have defaults")
}

fn is_file_name_safe(name: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod grammar_tests;
