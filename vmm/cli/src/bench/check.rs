//! The flags of `splitvisor bench` checked before anything starts (no image, daemon or VM):
//! a bad `--bs`, `--qd`, `--seconds`, `--size`, `--repeat`, `--output` or `--plot` must not
//! cost a run first, and the message names the flag.

use std::path::Path;

use splitvisor_vmm::config::ByteSize;

use super::BenchArgs;

/// The largest request the block paths take (the guest's and blk-host's buffers are sized
/// for it).
pub const MAX_BS: u64 = 1 << 20;
/// Bytes of a sector: requests are whole sectors.
pub const SECTOR: u64 = 512;
pub const MAX_SECONDS: u32 = 3600;
/// More runs than this of one configuration is a typo, not a measurement plan.
pub const MAX_REPEAT: u32 = 100;
/// The guest's benchmark tracks at most this many requests in flight (bench_blk.rs MAX_QD).
pub const GUEST_MAX_QD: u32 = 256;

#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {reason}")]
pub struct FlagError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

pub fn invalid(flag: &'static str, value: impl ToString, reason: impl ToString) -> FlagError {
    FlagError {
        flag,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Whether `path` is one of the block paths, which take `--bs`, `--qd` and `--size`.
pub fn is_block(path: &str) -> bool {
    !path.starts_with("net-")
}

/// Checks every flag the requested paths use; `image_len` is the size of `--image` if given.
/// blk-host's own limits (queues, its deeper rings, --verify) are `blk_host::validate`'s.
pub fn validate(args: &BenchArgs, image_len: Option<u64>) -> Result<(), FlagError> {
    if args.repeat == 0 || args.repeat > MAX_REPEAT {
        let reason = format!("must be 1 to {MAX_REPEAT} runs of each configuration");
        return Err(invalid("--repeat", args.repeat, reason));
    }
    if args.seconds == 0 || args.seconds > MAX_SECONDS {
        let reason = format!("must be 1 to {MAX_SECONDS}");
        return Err(invalid("--seconds", args.seconds, reason));
    }
    if args.paths.iter().any(|p| is_block(p)) {
        block_flags(args, image_len)?;
    }
    if let Some(path) = &args.output {
        parent_exists("--output", path)?;
    }
    if let Some(path) = &args.plot {
        if path.extension().is_none_or(|e| e != "svg") {
            return Err(invalid(
                "--plot",
                path.display(),
                "must end in .svg (the chart is an SVG file)",
            ));
        }
        if !args.paths.iter().any(|p| is_block(p)) {
            let reason = "plots the block paths over --qd: add virtio, ata or blk-host to --paths";
            return Err(invalid("--plot", path.display(), reason));
        }
        parent_exists("--plot", path)?;
    }
    Ok(())
}

fn block_flags(args: &BenchArgs, image_len: Option<u64>) -> Result<(), FlagError> {
    let bs = args
        .bs
        .parse::<ByteSize>()
        .map_err(|_| invalid("--bs", &args.bs, "not a size (say 4k or 1M)"))?
        .0;
    if bs == 0 || !bs.is_multiple_of(SECTOR) || bs > MAX_BS {
        let reason = "must be a multiple of 512 bytes, at most 1M";
        return Err(invalid("--bs", &args.bs, reason));
    }
    // The guest caps at its own limit; blk-host checks its deeper rings itself.
    let in_guest = args.paths.iter().any(|p| p == "virtio");
    for (i, &qd) in args.qd.iter().enumerate() {
        if qd == 0 || (in_guest && qd > GUEST_MAX_QD) {
            let reason = format!("must be 1 to {GUEST_MAX_QD} for the virtio path");
            return Err(invalid("--qd", qd, reason));
        }
        if args.qd[..i].contains(&qd) {
            let list: Vec<String> = args.qd.iter().map(u32::to_string).collect();
            return Err(invalid("--qd", list.join(","), format!("lists {qd} twice")));
        }
    }
    let region = args
        .size
        .parse::<ByteSize>()
        .map_err(|_| invalid("--size", &args.size, "not a size (say 64M)"))?
        .0;
    let image = image_len.unwrap_or(args.image_size.0);
    if region < bs || region > image {
        let reason = format!("must be at least --bs and at most the image's {image} bytes");
        return Err(invalid("--size", &args.size, reason));
    }
    Ok(())
}

/// A file the run writes at its end: its directory must exist before the run starts.
fn parent_exists(flag: &'static str, path: &Path) -> Result<(), FlagError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        let reason = format!(
            "its directory {} does not exist; create it or write elsewhere",
            parent.display()
        );
        return Err(invalid(flag, path.display(), reason));
    }
    if path.is_dir() {
        return Err(invalid(flag, path.display(), "is a directory; name a file"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(argv: &[&str]) -> BenchArgs {
        let argv = std::iter::once("bench").chain(argv.iter().copied());
        Wrap::try_parse_from(argv).expect("flags parse").args
    }

    fn refused(argv: &[&str], flag: &str) {
        let err = validate(&args(argv), None)
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with(&format!("{flag} ")), "{err}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        refused(&["--repeat", "0"], "--repeat");
        refused(&["--repeat", "1000"], "--repeat");
        refused(&["--seconds", "0"], "--seconds");
        refused(&["--seconds", "99999"], "--seconds");
        refused(&["--bs", "1000"], "--bs");
        refused(&["--bs", "0"], "--bs");
        refused(&["--bs", "4M"], "--bs");
        refused(&["--qd", "1,0"], "--qd");
        refused(&["--qd", "4,4"], "--qd");
        refused(&["--qd", "300"], "--qd");
        refused(&["--size", "1G"], "--size");
        refused(&["--size", "1k"], "--size");
        refused(&["--output", "/nonexistent-dir/x.json"], "--output");
        refused(&["--output", "/tmp"], "--output");
        refused(&["--plot", "/nonexistent-dir/x.svg"], "--plot");
        refused(&["--plot", "x.png"], "--plot");
        refused(&["--paths", "net-switch", "--plot", "x.svg"], "--plot");
    }

    #[test]
    fn good_values_and_sweeps_pass() {
        let a = args(&["--qd", "1,4,16,32", "--repeat", "3", "--output", "x.csv"]);
        assert_eq!(a.qd, [1, 4, 16, 32]);
        validate(&a, None).expect("valid");
        // The network paths do not use --bs, --qd or --size.
        validate(&args(&["--paths", "net-switch", "--bs", "1000"]), None).expect("valid");
        // blk-host rings go deeper than the guest's; its own check bounds them.
        validate(&args(&["--paths", "blk-host", "--qd", "300"]), None).expect("valid");
    }
}
