//! splitvisor-guest: the project's own freestanding test and benchmark guest. The BSP reads its
//! task from the command line, runs it at CPL 3 and reports one `RESULT {json}` line.
//!
//! Boot path (see docs/boot-protocol.md): `boot.rs` (CPL 0, assembly) loads the descriptor
//! tables and drops every vCPU to CPL 3 at `splitvisor_main`; APs check in and park (`smp.rs`),
//! the BSP parses boot info and runs a task (`tasks/`). Drivers will live beside them
//! (`virtio/`, `ata.rs`, `net/`), using `port.rs` and the `bump.rs` heap.

#![no_std]
#![no_main]

mod ata;
mod blk;
mod boot;
mod bootinfo;
mod bump;
mod cmdline;
mod cpu;
mod image;
mod json;
// Shared with build.rs, which uses the constants the guest code does not.
#[allow(dead_code)]
mod layout;
mod mem;
mod mptable;
mod net;
mod port;
mod serial;
mod smp;
mod tasks;
mod time;
mod virtio;

use bootinfo::BootInfo;
use cmdline::Cmdline;
use core::fmt::Write;
use json::{JsonObject, Report};
use tasks::{Context, Outcome};

/// The first Rust code every vCPU runs, at CPL 3 on its own stack (called from boot.rs).
#[no_mangle]
extern "C" fn splitvisor_main(cpu_index: u64, start_info: u64) -> ! {
    if cpu_index != 0 {
        smp::ap_main();
    }
    serial::init();
    let entry = if boot::booted_via_pvh() {
        "PVH"
    } else {
        "direct 64-bit"
    };
    println!("splitvisor-guest: {entry} entry, running at CPL 3");
    let boot = match bootinfo::parse(start_info) {
        Ok(boot) => boot,
        Err(error) => {
            let mut report = Report::new();
            report.str("error", format_args!("{error}"));
            finish("", Outcome::Fail, None, &report);
        }
    };
    image::init_heap(&boot);
    let (image_start, image_end) = image::extent();
    println!(
        "splitvisor-guest: {} vCPU(s){}, {} MiB RAM, image [{image_start:#x}, {image_end:#x})",
        boot.vcpus,
        if boot.has_mp_table {
            ""
        } else {
            " (no MP table)"
        },
        boot.memory_mib()
    );
    println!("splitvisor-guest: command line `{}`", boot.cmdline);
    run_task(&boot)
}

fn run_task(boot: &BootInfo) -> ! {
    let mut report = Report::new();
    let cmdline = match Cmdline::parse(boot.cmdline) {
        Ok(cmdline) => cmdline,
        Err(error) => {
            println!("splitvisor-guest: bad command line: {error}");
            report.str("error", format_args!("{error}"));
            finish("", Outcome::BadCmdline, Some(boot), &report);
        }
    };
    for dev in cmdline.virtio_mmio() {
        println!(
            "splitvisor-guest: virtio-mmio device at {:#x} ({:#x} bytes), irq {}",
            dev.base, dev.size, dev.irq
        );
    }
    if cmdline.ata_primary {
        println!("splitvisor-guest: ATA disk on the primary IDE ports");
    }
    if let Some(word) = cmdline.ignored {
        println!("splitvisor-guest: ignoring `{word}` and later words after the task");
    }
    time::init(cmdline.tsc_khz);
    let task = cmdline.task;
    println!("splitvisor-guest: running task `{}`", task.name);
    let ctx = Context {
        boot,
        cmdline: &cmdline,
    };
    let outcome = tasks::run(&task, &ctx, &mut report);
    if outcome == Outcome::BadCmdline {
        println!(
            "splitvisor-guest: bad command line for task `{}`",
            task.name
        );
    }
    finish(task.name, outcome, Some(boot), &report)
}

/// Prints the one `RESULT {json}` line and ends the VM with the outcome's status.
fn finish(task: &str, outcome: Outcome, boot: Option<&BootInfo>, report: &Report) -> ! {
    {
        let mut console = serial::Console::lock();
        let _ = console.write_str("RESULT ");
        let _ = write_result(&mut console, task, outcome, boot, report);
        let _ = console.write_str("\n");
    }
    serial::exit(outcome.exit_status())
}

fn write_result<W: Write>(
    out: &mut W,
    task: &str,
    outcome: Outcome,
    boot: Option<&BootInfo>,
    report: &Report,
) -> core::fmt::Result {
    let mut obj = JsonObject::begin(out)?;
    obj.str("task", task)?;
    obj.str("status", outcome.status())?;
    // 0 = unknown: the boot information could not be read.
    obj.u64("vcpus", boot.map_or(0, |b| u64::from(b.vcpus)))?;
    obj.u64("memory_mib", boot.map_or(0, |b| b.memory_mib()))?;
    report.write_to(&mut obj)?;
    obj.end()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut console = serial::Console::new_unlocked();
    let _ = writeln!(console, "\nPANIC: {info}");
    // Hand-written rather than through Report, which is what might have panicked.
    let _ = writeln!(
        console,
        "RESULT {{\"task\":\"\",\"status\":\"fail\",\"vcpus\":0,\"memory_mib\":0,\"error\":\"guest panic\"}}"
    );
    serial::exit(1)
}

/// The precompiled `core` carries unwind tables that name this symbol although nothing can
/// unwind (panic = "abort", and link.ld discards .eh_frame); it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
