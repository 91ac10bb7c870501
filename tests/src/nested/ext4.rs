//! ext4 images for nested tests: made on the host from files with `mkfs.ext4 -d`, attached to
//! L1 as writable disks, and checked afterwards with e2fsprogs (`e2fsck -fn` clean, file
//! contents through `debugfs`) against checksums the guest printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cases::Checks;
use super::NestedHost;
use crate::interop::{find_in_path, skip_unless_ci};
use crate::pattern::crc32;
use crate::workdir::Workdir;

/// e2fsprogs' checker and debugger on the host.
#[derive(Debug, Clone)]
pub struct E2fs {
    pub e2fsck: PathBuf,
    pub debugfs: PathBuf,
}

impl E2fs {
    /// Find both; print SKIP and return `None` without them, or panic when `CI` is set.
    pub fn require(test: &str) -> Option<E2fs> {
        match (find_in_path("e2fsck"), find_in_path("debugfs")) {
            (Some(e2fsck), Some(debugfs)) => Some(E2fs { e2fsck, debugfs }),
            _ => {
                let missing = ["e2fsck or debugfs not found".to_string()];
                skip_unless_ci(test, &missing, "install e2fsprogs");
                None
            }
        }
    }

    /// `e2fsck -fn IMAGE` must find the file system clean (exit 0).
    pub fn check_clean(&self, checks: &mut Checks, what: &str, image: &Path) {
        let out = Command::new(&self.e2fsck)
            .arg("-fn")
            .arg(image)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.e2fsck.display()));
        checks.that(
            &format!("{what}: e2fsck -fn {} is clean", image.display()),
            out.status.success(),
            format!(
                "{}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }

    /// The contents of `path` in the ext4 image (`debugfs -R "cat PATH"`).
    pub fn cat(&self, image: &Path, path: &str) -> Result<Vec<u8>, String> {
        let out = Command::new(&self.debugfs)
            .args(["-R", &format!("cat {path}")])
            .arg(image)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.debugfs.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("not found") {
            return Err(format!("debugfs cat {path}: {} {stderr}", out.status));
        }
        Ok(out.stdout)
    }

    /// The crc32 of `path` in the image, as busybox prints it.
    pub fn crc(&self, image: &Path, path: &str) -> Result<String, String> {
        self.cat(image, path).map(|data| crc_hex(&data))
    }
}

/// crc32 as busybox `crc32` prints it.
pub fn crc_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32(data))
}

/// A file for [`ext4_image`]: path inside the image, contents, permission bits.
pub type ImageFile<'a> = (&'a str, &'a [u8], u32);

/// A raw ext4 image `<workdir>/<name>.ext4` of `len` bytes made with `mkfs.ext4 -d` from
/// `files` (no root rights needed).
pub fn ext4_image(
    host: &NestedHost,
    workdir: &Workdir,
    name: &str,
    len: u64,
    files: &[ImageFile],
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = workdir.join(&format!("{name}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, data, mode) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let image = workdir.join(&format!("{name}.ext4"));
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(len).unwrap();
    drop(file);
    let out = Command::new(&host.mkfs)
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&dir)
        .arg(&image)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", host.mkfs.display()));
    assert!(
        out.status.success(),
        "mkfs.ext4 -d {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    image
}
