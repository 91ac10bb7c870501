//! The guest's initramfs: a static busybox, the kernel modules a test needs (with their
//! dependencies, in load order), an `/init` that loads them (with their parameters from the
//! kernel command line, as modprobe would) and runs `/test.sh`, and nothing else.
//!
//! The guest reports through lines `SV:key=value` on the serial console; `/init` adds
//! `SV:init=ready` before the script and `SV:exit=<status>` after it, then powers off.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::CpioWriter;
use super::HostTools;

/// Kernel modules resolved against `/lib/modules/<version>`, dependencies first.
#[derive(Debug, Clone)]
pub struct ModuleSet {
    /// Module files to load, in order.
    pub files: Vec<PathBuf>,
}

impl ModuleSet {
    /// Resolve `names` (e.g. `virtio_blk`; `-` and `_` are the same) with `modules.dep`.
    /// Built-in modules (`modules.builtin`) need no file and are left out.
    pub fn resolve(dir: &Path, names: &[&str]) -> Result<ModuleSet, String> {
        let dep_text = std::fs::read_to_string(dir.join("modules.dep"))
            .map_err(|e| format!("cannot read {}/modules.dep: {e}", dir.display()))?;
        let builtin_text = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let builtin: HashSet<String> = builtin_text.lines().map(module_name).collect();
        let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
        for line in dep_text.lines() {
            let Some((file, rest)) = line.split_once(':') else {
                continue;
            };
            let list = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(file), (file.to_string(), list));
        }
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let name = name.replace('-', "_");
            if builtin.contains(&name) {
                continue;
            }
            let (file, _) = deps
                .get(&name)
                .ok_or_else(|| format!("module {name} not in {}", dir.display()))?;
            visit(file, &deps, &mut seen, &mut order);
        }
        Ok(ModuleSet {
            files: order.into_iter().map(|f| dir.join(f)).collect(),
        })
    }
}

/// `kernel/drivers/block/virtio_blk.ko[.xz]` -> `virtio_blk`.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Depth-first: every dependency before the module itself.
fn visit(
    file: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(file.to_string()) {
        return;
    }
    if let Some((_, list)) = deps.get(&module_name(file)) {
        for dep in list {
            visit(dep, deps, seen, order);
        }
    }
    order.push(file.to_string());
}

/// Read a module file, decompressing `.ko.xz` / `.ko.gz` / `.ko.zst` with the host tool
/// (busybox `insmod` in the guest takes plain ELF only).
fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    let Some(tool) = tool else {
        return std::fs::read(path).map_err(|e| format!("cannot read {name}: {e}"));
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run {tool} to decompress {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{tool} -dc {name} failed: {}", out.status));
    }
    Ok(out.stdout)
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    modules: Vec<String>,
    script: String,
}

impl Initramfs {
    /// An initramfs running `script` (a busybox `sh` script; its exit status is reported).
    pub fn new(script: &str) -> Initramfs {
        Initramfs {
            modules: Vec::new(),
            script: script.to_string(),
        }
    }

    /// Load these modules (and their dependencies) before the script.
    pub fn modules(mut self, names: &[&str]) -> Initramfs {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Write the archive to `out`.
    pub fn build(&self, tools: &HostTools, out: &Path) -> Result<(), String> {
        let names: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        let set = ModuleSet::resolve(&tools.modules, &names)?;
        let busybox = std::fs::read(&tools.busybox)
            .map_err(|e| format!("cannot read {}: {e}", tools.busybox.display()))?;
        let mut w = CpioWriter::new();
        for dir in ["bin", "dev", "proc", "sys", "tmp", "modules"] {
            w.dir(dir);
        }
        w.char_dev("dev/console", 5, 1);
        let io = |e: std::io::Error| e.to_string();
        w.file("bin/busybox", 0o755, &busybox).map_err(io)?;
        let mut loads = String::new();
        for (i, file) in set.files.iter().enumerate() {
            let name = module_name(&file.to_string_lossy());
            let target = format!("modules/{i:02}-{name}.ko");
            w.file(&target, 0o644, &read_module(file)?).map_err(io)?;
            loads.push_str(&format!(
                "insmod /{target} $(modparams {name}) || echo SV:insmod-failed={name}\n"
            ));
        }
        w.file("init", 0o755, init_script(&loads).as_bytes())
            .map_err(io)?;
        w.file("test.sh", 0o755, self.script.as_bytes())
            .map_err(io)?;
        std::fs::write(out, w.finish()).map_err(|e| format!("cannot write {}: {e}", out.display()))
    }
}

fn init_script(loads: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Like modprobe: parameters for module M on the kernel command line (M.param=value), e.g.
# virtio_mmio.device=..., which the kernel itself applies only to built-in modules.
modparams() {{
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$1".*=*) echo "${{arg#"$1".}}" ;; esac
    done
}}
{loads}echo SV:init=ready
sh /test.sh
rc=$?
if [ $rc -ne 0 ]; then dmesg | tail -n 40; fi
echo SV:exit=$rc
poweroff -f
"#
    )
}

/// Shell function for test scripts: `wait_block vda` waits up to 10 s for /dev/vda.
pub const WAIT_BLOCK_FN: &str = r#"wait_block() {
    i=0
    while [ ! -b /dev/$1 ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then echo SV:error=no-$1; return 1; fi
        sleep 0.1
    done
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("kernel/a/virtio-rng.ko.xz"), "virtio_rng");
    }

    #[test]
    fn dependencies_come_first() {
        let dir = std::env::temp_dir().join(format!("sv-modset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "k/b.ko: k/r.ko k/v.ko\nk/v.ko: k/r.ko\nk/r.ko:\nk/p.ko: k/v.ko k/r.ko\n",
        )
        .unwrap();
        std::fs::write(dir.join("modules.builtin"), "k/x.ko\n").unwrap();
        let set = ModuleSet::resolve(&dir, &["p", "b", "x"]).unwrap();
        let names: Vec<String> = set
            .files
            .iter()
            .map(|f| module_name(&f.to_string_lossy()))
            .collect();
        assert_eq!(names, ["r", "v", "p", "b"]);
        assert!(ModuleSet::resolve(&dir, &["missing"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// On a host with the interop kernel installed, virtio-net's chain resolves in load order.
    #[test]
    fn host_virtio_net_resolves_in_load_order() {
        let Ok(tools) = crate::interop::HostTools::find(&[]) else {
            return;
        };
        let set = ModuleSet::resolve(&tools.modules, &["virtio_pci", "virtio_net"]).unwrap();
        let names: Vec<String> = set
            .files
            .iter()
            .map(|f| module_name(&f.to_string_lossy()))
            .collect();
        let pos = |n: &str| names.iter().position(|m| m == n);
        for (before, after) in [
            ("virtio_ring", "virtio"),
            ("virtio", "virtio_pci"),
            ("virtio", "virtio_net"),
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
        ] {
            // Built-in modules are absent; loadable ones come in dependency order.
            if let (Some(b), Some(a)) = (pos(before), pos(after)) {
                assert!(b < a, "{before} after {after} in {names:?}");
            }
        }
        assert!(pos("virtio_net").is_some() || names.is_empty(), "{names:?}");
    }
}
