//! An uncompressed `vmlinux` ELF from a bzImage, so the tests can boot the same kernel in both
//! formats: the bzImage's payload (Documentation/arch/x86/boot.rst: `payload_offset` and
//! `payload_length` in the setup header) is the compressed ELF; the matching decompressor
//! program (lz4, gzip, xz or zstd) unpacks it.

use std::path::Path;
use std::process::{Command, Stdio};

/// The compression formats Linux uses for its payload, by magic, with the program that
/// decompresses each to stdout.
const DECOMPRESSORS: &[(&[u8], &str)] = &[
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    (&[0x1f, 0x8b], "gzip"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
];

/// Writes the ELF inside `bzimage` to `out`.
pub fn extract(bzimage: &Path, out: &Path) -> Result<(), String> {
    let image = std::fs::read(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    let field = |offset: usize| -> Result<usize, String> {
        image
            .get(offset..offset + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| format!("{} is too short for a bzImage", bzimage.display()))
    };
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(n) => usize::from(*n),
        None => return Err(format!("{} is too short for a bzImage", bzimage.display())),
    };
    let start = (setup_sects + 1) * 512 + field(0x248)?;
    let payload = image
        .get(start..start + field(0x24c)?)
        .ok_or_else(|| format!("{}: payload outside the file", bzimage.display()))?;
    let (_, program) = DECOMPRESSORS
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .ok_or_else(|| format!("{}: unknown payload compression", bzimage.display()))?;
    let compressed = out.with_extension("payload");
    std::fs::write(&compressed, payload).map_err(|e| format!("{}: {e}", compressed.display()))?;
    let output = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let status = Command::new(program)
        .args(["-dc"])
        .arg(&compressed)
        .stdout(output)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {program} (install it: .ci/install-deps.sh): {e}"))?;
    let _ = std::fs::remove_file(&compressed);
    // The decompressors complain about the padding after the stream but unpack it whole;
    // what counts is an ELF on the other side.
    let head = std::fs::read(out).map_err(|e| format!("{}: {e}", out.display()))?;
    if !head.starts_with(b"\x7fELF") {
        return Err(format!("{program} -dc gave no ELF (status {status})"));
    }
    Ok(())
}
