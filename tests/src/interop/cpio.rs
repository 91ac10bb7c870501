//! A minimal writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Entries carry fixed metadata (uid/gid 0, mtime 0, sequential inode numbers), so the same
//! inputs always give the same archive bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// File types in the `mode` field (`S_IFDIR` etc.).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Builds a `newc` archive in memory.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl CpioWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory; parents must be added first.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(
            Header {
                name,
                mode: S_IFDIR | 0o755,
                nlink: 2,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )
    }

    /// A regular file with permission bits `perm` (e.g. `0o755`).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<&mut Self> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        Ok(self.entry(
            Header {
                name,
                mode: S_IFREG | (perm & 0o7777),
                nlink: 1,
                size,
                rdev: (0, 0),
            },
            data,
        ))
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(
            Header {
                name,
                mode: S_IFCHR | 0o600,
                nlink: 1,
                size: 0,
                rdev: (major, minor),
            },
            &[],
        )
    }

    /// Append the trailer and return the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(
            Header {
                name: TRAILER,
                mode: 0,
                nlink: 1,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        );
        self.out
    }

    fn entry(&mut self, h: Header<'_>, data: &[u8]) -> &mut Self {
        self.next_ino += 1;
        let ino = if h.name == TRAILER { 0 } else { self.next_ino };
        let name_size = h.name.len() + 1;
        let fields = [
            ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1,
        ];
        let mut header = String::from(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        header.push_str(&format!("{name_size:08x}{:08x}", 0));
        // Writing into a Vec cannot fail.
        let _ = self.out.write_all(header.as_bytes());
        let _ = self.out.write_all(h.name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_padding() {
        let mut w = CpioWriter::new();
        w.file("a", 0o644, b"xyz").unwrap();
        let out = w.finish();
        // 110-byte header, "a\0" padded to 4-byte alignment (112), data padded (116).
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000081a4");
        assert_eq!(&out[54..62], b"00000003");
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..115], b"xyz");
        assert!(out.len().is_multiple_of(4));
        let trailer = &out[116..];
        assert_eq!(&trailer[110..120], TRAILER.as_bytes());
    }

    #[test]
    fn deterministic() {
        let build = || {
            let mut w = CpioWriter::new();
            w.dir("bin").char_dev("console", 5, 1);
            w.file("bin/x", 0o755, b"data").unwrap();
            w.finish()
        };
        assert_eq!(build(), build());
    }
}
