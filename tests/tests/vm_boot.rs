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
            &["is not a loadable kernel", "ELF"],
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
        "--cmdline",
        "--serial",
        "--disk",
        "--net",
        "Exit status",
        "121",
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
