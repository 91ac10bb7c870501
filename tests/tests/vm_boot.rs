//! The foundation, end to end: the real `splitvisor` binary boots the project's own guest under
//! real KVM; the guest's RESULT line and the exit status tell what happened; bad input gets a
//! clear message and a non-zero status.

use splitvisor_tests::vm::{require_kvm, run_splitvisor, run_with_env, VM_TIMEOUT};

fn run(args: &[&str]) -> splitvisor_tests::vm::VmRun {
    run_splitvisor(args, VM_TIMEOUT)
}

#[test]
fn selftest_passes_and_reports_vcpus_and_memory() {
    if !require_kvm("selftest_passes_and_reports_vcpus_and_memory") {
        return;
    }
    for (vcpus, memory, mib) in [
        ("1", "64M", 64),
        ("2", "512M", 512),
        ("2", "64M", 64),
        ("1", "512M", 512),
    ] {
        let run = run(&[
            "run",
            "--cmdline",
            "selftest",
            "--vcpus",
            vcpus,
            "--memory",
            memory,
        ]);
        let result = run.assert_passed();
        assert_eq!(result["task"], "selftest");
        assert_eq!(result["vcpus"].to_string(), vcpus, "{run}");
        assert_eq!(result["memory_mib"], mib, "{run}");
        assert_eq!(
            result["vcpus_online"].to_string(),
            vcpus,
            "every vCPU ran\n{run}"
        );
        // Everything but the first MiB and the guest image was written and read back.
        let tested = result["memory_tested_mib"]
            .as_u64()
            .expect("memory_tested_mib");
        assert!(
            tested + 8 >= mib,
            "tested only {tested} MiB of {mib}\n{run}"
        );
    }
}

#[test]
fn exit_task_status_becomes_the_vmm_exit_status() {
    if !require_kvm("exit_task_status_becomes_the_vmm_exit_status") {
        return;
    }
    for status in [0, 1, 7, 42, 255] {
        let cmdline = format!("exit={status}");
        let run = run(&["run", "--cmdline", &cmdline]);
        assert_eq!(run.code(), Some(status), "{run}");
        assert_eq!(run.result()["exit_status"], status, "{run}");
    }
}

#[test]
fn guest_cpu_exception_is_reported_with_status_3() {
    if !require_kvm("guest_cpu_exception_is_reported_with_status_3") {
        return;
    }
    let run = run(&["run", "--cmdline", "fault=ud"]);
    assert_eq!(run.code(), Some(3), "{run}");
    assert!(run.stdout.contains("EXCEPTION vector=6"), "{run}");
}

#[test]
fn unknown_guest_task_is_a_bad_command_line() {
    if !require_kvm("unknown_guest_task_is_a_bad_command_line") {
        return;
    }
    let run = run(&["run", "--cmdline", "no-such-task"]);
    assert_eq!(run.code(), Some(2), "{run}");
    assert_eq!(run.result()["status"], "fail", "{run}");
}

#[test]
fn serial_output_can_go_to_a_file() {
    if !require_kvm("serial_output_can_go_to_a_file") {
        return;
    }
    let path = std::env::temp_dir().join(format!("sv-serial-{}.log", std::process::id()));
    let dest = format!("file={}", path.display());
    let run = run(&["run", "--cmdline", "exit=0", "--serial", &dest]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        !run.stdout.contains("RESULT"),
        "the console went to the file\n{run}"
    );
    let console = std::fs::read_to_string(&path).expect("serial file");
    assert!(console.contains("RESULT {"), "{console}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_triple_fault_ends_the_vm_with_a_register_dump() {
    if !require_kvm("a_triple_fault_ends_the_vm_with_a_register_dump") {
        return;
    }
    // A kernel whose first instruction faults with no IDT: #UD -> #DF -> triple fault.
    let dir = std::env::temp_dir().join(format!("sv-tf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("ud2.elf");
    std::fs::write(&kernel, tiny_elf(&[0x0f, 0x0b])).unwrap();
    let run = run(&["run", "--kernel", kernel.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(run.code(), Some(121), "{run}");
    assert!(run.stderr.contains("triple fault"), "{run}");
    assert!(
        run.stderr.contains("rip 0000000000100078"),
        "register dump\n{run}"
    );
}

/// Bad input: a clear message naming the value, a non-zero status, never a panic.
#[test]
fn bad_input_is_rejected_with_a_clear_message() {
    let missing = "/nonexistent/kernel.elf";
    let not_elf = std::env::temp_dir().join(format!("sv-notelf-{}", std::process::id()));
    std::fs::write(&not_elf, b"plain text, not a kernel").unwrap();
    let missing_needles = [missing, "No such file"];
    let cases: Vec<(Vec<&str>, i32, &[&str])> = vec![
        (vec!["--kernel", missing], 1, &missing_needles),
        (
            vec!["--kernel", not_elf.to_str().unwrap()],
            1,
            &["is neither an ELF executable nor a Linux bzImage"],
        ),
        (vec!["--kernel", "/tmp"], 1, &["/tmp", "directory"]),
        (vec!["--memory", "0"], 1, &["--memory 0", "at least"]),
        (vec!["--memory", "4096T"], 1, &["--memory 4096T"]),
        (
            vec!["--memory", "40G"],
            1,
            &["--memory 40G", "more than this host has"],
        ),
        (
            vec!["--memory", "12X"],
            2,
            &["--memory", "'12X' is not a size"],
        ),
        (vec!["--memory", "1.5G"], 2, &["'1.5G' is not a size"]),
        (vec!["--vcpus", "0"], 1, &["--vcpus 0"]),
        (
            vec!["--vcpus", "255"],
            1,
            &["--vcpus 255", "more than KVM allows"],
        ),
        (vec!["--vcpus", "two"], 2, &["--vcpus", "two"]),
        (
            vec!["--serial", "tty"],
            2,
            &["--serial", "stdio, file=PATH or none"],
        ),
        (
            vec!["--disk", "socket=/x,bogus=1"],
            2,
            &["unknown key 'bogus'"],
        ),
    ];
    for (extra, code, needles) in cases {
        let mut args = vec!["run", "--cmdline", "selftest"];
        args.extend(&extra);
        let run = run(&args);
        assert_eq!(run.code(), Some(code), "{extra:?}\n{run}");
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{extra:?}: expected {needle:?}\n{run}"
            );
        }
        assert!(!run.stderr.contains("panicked"), "{extra:?}\n{run}");
    }
    std::fs::remove_file(not_elf).unwrap();
}

/// A bzImage with just a setup header (boot protocol `version`) and `code` at its 64-bit entry.
fn synthetic_bzimage(version: u16, code: &[u8]) -> Vec<u8> {
    const SETUP_SECTS: usize = 4;
    let protected_mode = (SETUP_SECTS + 1) * 512;
    let mut image = vec![0u8; protected_mode + 0x1000];
    image[0x1f1] = SETUP_SECTS as u8;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    let entry = protected_mode + 0x200;
    image[entry..entry + code.len()].copy_from_slice(code);
    image
}

/// Linux boot's bad inputs, each caught before the guest runs and named in the message.
#[test]
fn linux_boot_bad_input_names_the_file() {
    if !require_kvm("linux_boot_bad_input_names_the_file") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sv-linux-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let old = dir.join("old-bzImage");
    std::fs::write(&old, synthetic_bzimage(0x0206, &[])).unwrap();
    let modern = dir.join("bzImage");
    std::fs::write(&modern, synthetic_bzimage(0x020f, &[])).unwrap();
    let big_initrd = dir.join("big-initrd");
    std::fs::write(&big_initrd, vec![0x5au8; 20 << 20]).unwrap();
    let (old, modern, big_initrd) = (
        old.to_str().unwrap(),
        modern.to_str().unwrap(),
        big_initrd.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--kernel", modern, "--initramfs", "/nonexistent/initrd.gz"],
            vec!["--initramfs /nonexistent/initrd.gz", "No such file"],
        ),
        (
            vec!["--kernel", modern, "--initramfs", "/tmp"],
            vec!["--initramfs /tmp is a directory"],
        ),
        (
            vec!["--kernel", old],
            vec![old, "boot protocol 2.06", "2.12"],
        ),
        (
            vec![
                "--kernel",
                modern,
                "--initramfs",
                big_initrd,
                "--memory",
                "16M",
            ],
            vec![big_initrd, "do not fit in 16 MiB", "--memory"],
        ),
        (
            vec!["--initramfs", big_initrd],
            vec![big_initrd, "is for a Linux kernel", "splitvisor guest"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["run"];
        args.extend(&extra);
        let run = run(&args);
        assert_eq!(run.code(), Some(1), "{extra:?}\n{run}");
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{extra:?}: expected {needle:?}\n{run}"
            );
        }
        assert!(!run.stderr.contains("panicked"), "{extra:?}\n{run}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a PVM host a Linux kernel is not refused, but splitvisor says once why it will crawl.
/// The kernel here is a bzImage whose entry is `ud2` with no IDT: it triple-faults at once.
#[test]
fn linux_kernel_on_pvm_gets_one_warning() {
    if !require_kvm("linux_kernel_on_pvm_gets_one_warning") {
        return;
    }
    let path = std::env::temp_dir().join(format!("sv-ud2-bzimage-{}", std::process::id()));
    std::fs::write(&path, synthetic_bzimage(0x020f, &[0x0f, 0x0b])).unwrap();
    let run = run(&["run", "--kernel", path.to_str().unwrap(), "--memory", "64M"]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(run.code(), Some(121), "a triple fault\n{run}");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let warnings = run.stderr.matches("KVM is PVM").count();
    assert_eq!(
        warnings,
        usize::from(pvm),
        "one warning on PVM, none elsewhere\n{run}"
    );
}

#[test]
fn missing_or_inaccessible_kvm_is_explained() {
    let run = run_with_env(
        ["run", "--cmdline", "selftest"],
        &[("SPLITVISOR_KVM_DEVICE", "/nonexistent/kvm")],
        VM_TIMEOUT,
    );
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("/nonexistent/kvm"), "{run}");
    assert!(run.stderr.contains("needs KVM"), "{run}");

    // A device node KVM is not behind: /dev/null opens but is no KVM.
    let run = run_with_env(
        ["run", "--cmdline", "selftest"],
        &[("SPLITVISOR_KVM_DEVICE", "/dev/null")],
        VM_TIMEOUT,
    );
    assert_ne!(run.code(), Some(0), "{run}");
    assert!(!run.stderr.contains("panicked"), "{run}");
}

#[test]
fn help_documents_commands_flags_and_exit_statuses() {
    let top = run(&["--help"]);
    assert_eq!(top.code(), Some(0));
    assert!(top.stdout.contains("run"), "{top}");
    let run = run(&["run", "--help"]);
    for needle in [
        "--memory",
        "--vcpus",
        "--kernel",
        "--initramfs",
        "--acpi",
        "--cmdline",
        "--serial",
        "--disk",
        "--net",
        "Exit status",
        "120",
        "121",
        "Ctrl-A x",
    ] {
        assert!(run.stdout.contains(needle), "missing {needle}\n{run}");
    }
}

/// A minimal x86-64 ELF executable: one PT_LOAD at 1 MiB holding `code`, entry at its start.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    let header_len = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + header_len).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    let size = header_len + code.len() as u64;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// The guest's console output goes a line per exit through the paravirtual console port: the
/// banner and RESULT lines arrive whole, and `run --stats` counts a handful of port exits
/// instead of one per character (about 300 for this run through the UART alone).
#[test]
fn console_lines_cost_one_exit_each() {
    if !require_kvm("console_lines_cost_one_exit_each") {
        return;
    }
    let run = run(&["run", "--cmdline", "exit=0", "--stats"]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        run.stdout
            .contains("splitvisor-guest: running task `exit`\n"),
        "{run}"
    );
    let stats_line = run
        .stdout
        .lines()
        .chain(run.stderr.lines())
        .find_map(|l| l.strip_prefix("VMM-STATS "))
        .unwrap_or_else(|| panic!("no VMM-STATS line\n{run}"));
    let stats: serde_json::Value = serde_json::from_str(stats_line).expect("VMM-STATS is JSON");
    let by_device = &stats["exits"]["pio_by_device"];
    let lines = run.stdout.lines().count() as u64;
    let pv = by_device["pv-console"].as_u64().unwrap_or(0);
    assert!(
        pv > 0 && pv <= lines,
        "{pv} pv-console exits for {lines} lines: {stats}"
    );
    let pio = stats["exits"]["pio"].as_u64().unwrap_or(u64::MAX);
    assert!(pio < 50, "{pio} port exits: {stats}");
}
