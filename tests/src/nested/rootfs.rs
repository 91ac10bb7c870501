//! The files disk of a nested run: a directory tree staged on the host - busybox with its
//! applet links, host programs with every shared library `ldd` lists (and the dynamic loader) at
//! the same paths, the test's files and script - turned into a read-only ext4 image with
//! `mkfs.ext4 -d` (no root, no loop mount). L1 mounts it and chroots into it.
//!
//! Layout inside the image (and so inside the chroot):
//! - `/bin`: busybox and its applets, the splitvisor binaries and other host programs;
//! - `/lib...`, `/lib64`, `/usr/lib...`: their shared libraries, where `ldd` found them;
//! - `/files/<name>`: the test's files;
//! - `/nested/test.sh`: the test's script;
//! - `/dev`, `/proc`, `/sys`, `/tmp`, `/run`: mount points (L1 mounts them before the chroot).

use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Directory of the test's files inside the chroot.
pub const FILES_DIR: &str = "/files";

/// A directory tree being staged for the image.
#[derive(Debug)]
pub struct RootFs {
    dir: PathBuf,
    bytes: u64,
}

impl RootFs {
    /// Start an empty tree in `dir` (created) with busybox installed.
    pub fn new(dir: &Path, busybox: &Path) -> Result<RootFs, String> {
        let mut fs = RootFs {
            dir: dir.to_path_buf(),
            bytes: 0,
        };
        for d in ["bin", "dev", "proc", "sys", "tmp", "run", "files", "nested"] {
            fs.mkdir(d)?;
        }
        fs.copy(busybox, "bin/busybox")?;
        for applet in busybox_applets(busybox)? {
            let link = fs.dir.join("bin").join(&applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link)
                    .map_err(|e| format!("cannot create {}: {e}", link.display()))?;
            }
        }
        Ok(fs)
    }

    /// Install the dynamically linked program `src` as `/bin/<name>` with its libraries.
    pub fn program(&mut self, src: &Path, name: &str) -> Result<(), String> {
        self.copy(src, format!("bin/{name}"))?;
        for lib in shared_libraries(src)? {
            let rel = relative(&lib)?;
            if !self.dir.join(&rel).exists() {
                // Copy the file itself: the links between the host's directories
                // (/lib64 -> /usr/lib64 etc.) are not reproduced in the image.
                self.copy(&lib, &rel)?;
            }
        }
        Ok(())
    }

    /// A file of the test at `/files/<name>` (a copy of the host file `src`).
    pub fn file(&mut self, src: &Path, name: &str) -> Result<(), String> {
        self.copy(src, format!("files/{}", checked_name(name)?))
    }

    /// A file of the test at `/files/<name>` with contents `data` and permissions `mode`.
    pub fn bytes(&mut self, name: &str, data: &[u8], mode: u32) -> Result<(), String> {
        self.write(&format!("files/{}", checked_name(name)?), data, mode)
    }

    /// The script L1 runs inside the chroot.
    pub fn script(&mut self, script: &str) -> Result<(), String> {
        self.write("nested/test.sh", script.as_bytes(), 0o755)
    }

    /// Make the ext4 image `out` of the tree with the host's `mkfs` (mkfs.ext4).
    pub fn build_image(&self, mkfs: &Path, out: &Path) -> Result<(), String> {
        // Data plus ~25% for metadata, inodes and the directories, at least 32 MiB.
        let size = (self.bytes + self.bytes / 4).max(32 << 20);
        let size = size.div_ceil(1 << 20) << 20;
        let file = std::fs::File::create(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        file.set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", out.display()))?;
        drop(file);
        let output = Command::new(mkfs)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-L",
                "nested",
            ])
            .args(["-E", "root_owner=0:0", "-d"])
            .arg(&self.dir)
            .arg(out)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", mkfs.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} -d {} {} failed ({}): {}",
                mkfs.display(),
                self.dir.display(),
                out.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    }

    fn mkdir(&self, rel: &str) -> Result<(), String> {
        let path = self.dir.join(rel);
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))
    }

    fn parent_of(&self, rel: &Path) -> Result<PathBuf, String> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        Ok(path)
    }

    fn copy(&mut self, src: &Path, rel: impl AsRef<Path>) -> Result<(), String> {
        let dst = self.parent_of(rel.as_ref())?;
        // A program replacing a busybox applet link: fs::copy would write through the link
        // into busybox itself.
        if dst.is_symlink() {
            std::fs::remove_file(&dst)
                .map_err(|e| format!("cannot replace {}: {e}", dst.display()))?;
        }
        // fs::copy follows a symlink source and keeps the permission bits.
        self.bytes += std::fs::copy(src, &dst)
            .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), dst.display()))?;
        Ok(())
    }

    fn write(&mut self, rel: &str, data: &[u8], mode: u32) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let dst = self.parent_of(Path::new(rel))?;
        std::fs::write(&dst, data).map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot chmod {}: {e}", dst.display()))?;
        self.bytes += data.len() as u64;
        Ok(())
    }
}

/// A file name for `/files`: relative, no `..` (subdirectories are fine).
fn checked_name(name: &str) -> Result<&str, String> {
    let ok = !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "bad file name {name:?} for {FILES_DIR}: use a relative path without .."
        ))
    }
}

/// `/lib/x86_64-linux-gnu/libc.so.6` -> `lib/x86_64-linux-gnu/libc.so.6`.
fn relative(abs: &Path) -> Result<PathBuf, String> {
    abs.strip_prefix("/")
        .map(Path::to_path_buf)
        .map_err(|_| format!("ldd listed a relative path {}", abs.display()))
}

/// The applet names of `busybox --list`.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("cannot run {} --list: {e}", busybox.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list failed: {}",
            busybox.display(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .map(str::to_string)
        .collect())
}

/// Every file `ldd` lists for `program`: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("cannot run ldd {}: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd fails on static binaries ("not a dynamic executable"): nothing to copy.
        return Ok(Vec::new());
    }
    parse_ldd(&text).map_err(|e| format!("ldd {}: {e}", program.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!("missing library: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f92)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f92)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f92)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn file_names_stay_inside_files() {
        assert!(checked_name("vmlinuz").is_ok());
        assert!(checked_name("l2/initrd.cpio").is_ok());
        assert!(checked_name("../etc/passwd").is_err());
        assert!(checked_name("/abs").is_err());
        assert!(checked_name("").is_err());
    }
}
