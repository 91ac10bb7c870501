//! Command-line parsing per docs/boot-protocol.md: device announcements (`virtio_mmio.device=`,
//! `ata=primary`), options (`ip=...`), and the task word with its `key=value` parameters.

use core::fmt;

/// Option words the guest recognises and skips when looking for the task.
const OPTION_KEYS: [&str; 9] = [
    "tsc_khz",
    "ip",
    "console",
    "earlyprintk",
    "loglevel",
    "quiet",
    "debug",
    "panic",
    "noapic",
];
/// Virtio-mmio devices the guest keeps track of.
pub const MAX_VIRTIO_MMIO: usize = 16;

/// A `virtio_mmio.device=<size>@<base>:<irq>` announcement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Why a command line was rejected (exit status 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    NoTask,
    BadVirtioMmio(&'a str),
    TooManyVirtioMmio,
    BadAta(&'a str),
    BadParam(&'a str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            CmdlineError::NoTask => write!(f, "no task on the command line"),
            CmdlineError::BadVirtioMmio(w) => {
                write!(
                    f,
                    "bad virtio_mmio.device word `{w}` (want <size>@<base>:<irq>)"
                )
            }
            CmdlineError::TooManyVirtioMmio => {
                write!(f, "more than {MAX_VIRTIO_MMIO} virtio-mmio devices")
            }
            CmdlineError::BadAta(w) => write!(f, "bad ata word `{w}` (want ata=primary)"),
            CmdlineError::BadParam(p) => write!(f, "bad task parameter `{p}` (want key=value)"),
        }
    }
}

/// The task word: `name[=value][,key=value...]`, e.g. `bench=blk,rw=randread,bs=4k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task<'a> {
    pub name: &'a str,
    pub value: Option<&'a str>,
    params: &'a str,
}

impl<'a> Task<'a> {
    fn parse(word: &'a str) -> Task<'a> {
        let (head, params) = word.split_once(',').unwrap_or((word, ""));
        let (name, value) = match head.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (head, None),
        };
        Task {
            name,
            value,
            params,
        }
    }

    /// The `key=value` parameters after the first comma, in order.
    pub fn params(&self) -> impl Iterator<Item = Result<(&'a str, &'a str), CmdlineError<'a>>> {
        self.params
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').ok_or(CmdlineError::BadParam(p)))
    }
}

/// Everything the command line says.
pub struct Cmdline<'a> {
    pub task: Task<'a>,
    virtio_mmio: [VirtioMmioDevice; MAX_VIRTIO_MMIO],
    virtio_mmio_count: usize,
    pub ata_primary: bool,
    /// `tsc_khz=N`: the TSC frequency, for guests on hosts whose CPUID does not tell it.
    pub tsc_khz: Option<u64>,
    /// `ip=ADDR/PREFIX`: the guest's IPv4 address for the network tasks (unparsed).
    pub ip: Option<&'a str>,
    /// Words after the task, which the guest ignores (reported as a warning).
    pub ignored: Option<&'a str>,
}

impl<'a> Cmdline<'a> {
    pub fn parse(line: &'a str) -> Result<Cmdline<'a>, CmdlineError<'a>> {
        let mut task = None;
        let mut ignored = None;
        let mut virtio_mmio = [VirtioMmioDevice::default(); MAX_VIRTIO_MMIO];
        let mut virtio_mmio_count = 0;
        let mut ata_primary = false;
        let mut tsc_khz = None;
        let mut ip = None;
        for word in line.split_ascii_whitespace() {
            let key = word.split_once('=').map_or(word, |(k, _)| k);
            if key == "virtio_mmio.device" {
                let spec = &word[key.len() + 1..];
                let dev = parse_virtio_mmio(spec).ok_or(CmdlineError::BadVirtioMmio(word))?;
                let slot = virtio_mmio
                    .get_mut(virtio_mmio_count)
                    .ok_or(CmdlineError::TooManyVirtioMmio)?;
                *slot = dev;
                virtio_mmio_count += 1;
            } else if key == "ata" {
                if word != "ata=primary" {
                    return Err(CmdlineError::BadAta(word));
                }
                ata_primary = true;
            } else if key == "tsc_khz" {
                tsc_khz = word.split_once('=').and_then(|(_, v)| parse_u64(v));
            } else if key == "ip" {
                ip = word.split_once('=').map(|(_, v)| v);
            } else if key.contains('.') || OPTION_KEYS.contains(&key) {
                // Another device announcement or an option for some other consumer.
            } else if task.is_none() {
                task = Some(Task::parse(word));
            } else if ignored.is_none() {
                ignored = Some(word);
            }
        }
        Ok(Cmdline {
            task: task.ok_or(CmdlineError::NoTask)?,
            virtio_mmio,
            virtio_mmio_count,
            ata_primary,
            tsc_khz,
            ip,
            ignored,
        })
    }

    /// The announced virtio-mmio devices, in command-line order.
    pub fn virtio_mmio(&self) -> &[VirtioMmioDevice] {
        &self.virtio_mmio[..self.virtio_mmio_count]
    }
}

/// Parses Linux's `<size>@<base>:<irq>[:<id>]`, e.g. `4K@0xd0000000:5`.
fn parse_virtio_mmio(spec: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = spec.split_once('@')?;
    let mut fields = rest.split(':');
    let base = parse_u64(fields.next()?)?;
    let irq = u32::try_from(parse_u64(fields.next()?)?).ok()?;
    Some(VirtioMmioDevice {
        base,
        size: parse_size(size)?,
        irq,
    })
}

/// A decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A number with an optional K/M/G suffix (binary units), e.g. `4K`, `64M`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(digits)?.checked_mul(1 << shift)
}
