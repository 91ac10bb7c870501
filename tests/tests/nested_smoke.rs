//! The nested-SVM harness end to end with the project's own guest: inside one L1 boot (QEMU TCG
//! emulating AMD SVM, a real `kvm-amd`), `splitvisor run --cmdline selftest --vcpus 2`, then
//! `splitvisor-blk` serving a tmpfs image to `splitvisor run --disk socket=... --cmdline
//! blk-verify`, then the same on a writable extra disk of L1 (`/dev/vdb`, a host file), whose
//! bytes the host checks after L1 is gone. Every RESULT line must say pass and every run exit 0.
//! A second L1 boot checks what network tests inside L1 build on: an extra L1 module (`tun`)
//! and host programs with their libraries (`ip`, `ping`) in the chroot.
//!
//! Needs QEMU, the Debian cloud kernel, busybox-static and e2fsprogs (`.ci/install-deps.sh`);
//! skips without them unless `CI` is set. Takes ~20 s on an idle 2-core host.

use serde_json::Value;
use splitvisor_tests::nested::{NestedHost, NestedOptions};
use splitvisor_tests::netns::NetTools;
use splitvisor_tests::pattern::{self, SECTOR};
use splitvisor_tests::pattern::{nonce, random_bytes};

const DISK_LEN: usize = 4 << 20;
/// Where and how much `blk-verify` writes on the extra disk.
const WRITE_SECTOR: u64 = 1000;
const WRITE_LEN: usize = 256 << 10;

/// The script inside L1: each splitvisor run's output goes to the console, followed by a line
/// `SV:<name>-exit=<status>`. `blk NAME IMAGE TASK` serves IMAGE with splitvisor-blk to one
/// `splitvisor run --cmdline TASK`.
fn script(seed: u64) -> String {
    format!(
        r#"
blk() {{
    splitvisor-blk --socket /tmp/$1.sock --image $2 --log-level warn &
    daemon=$!
    i=0
    while [ ! -S /tmp/$1.sock ]; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then echo SV:error=no-$1-socket; exit 1; fi
        sleep 0.1
    done
    splitvisor run --disk socket=/tmp/$1.sock --cmdline "$3"
    echo SV:$1-exit=$?
    kill $daemon
    wait $daemon
    echo SV:$1-daemon-exit=$?
}}
echo SV:nproc=$(nproc)
echo SV:vdb-serial=$(cat /sys/block/vdb/serial)
splitvisor run --cmdline selftest --vcpus 2
echo SV:selftest-exit=$?
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
blk tmpfs /tmp/disk.img blk-verify
blk vdb /dev/vdb blk-verify,offset={WRITE_SECTOR},size={WRITE_LEN},seed={seed}
"#
    )
}

/// The `RESULT {json}` lines of the output, in order.
fn results(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, json)| json))
        .map(|json| serde_json::from_str(json).unwrap_or_else(|e| panic!("RESULT {json}: {e}")))
        .collect()
}

#[test]
fn selftest_and_blk_verify_pass_under_nested_svm() {
    let Some(host) = NestedHost::require("selftest_and_blk_verify_pass_under_nested_svm") else {
        return;
    };
    let workdir = splitvisor_tests::workdir::Workdir::new("smoke");
    let disk_path = workdir.join("vdb.img");
    let disk = random_bytes(nonce(), DISK_LEN);
    std::fs::write(&disk_path, &disk).unwrap();
    let seed = nonce() >> 1;
    let options = NestedOptions::default().disk("smoke-vdb", &disk_path);
    let run = host.run(&script(seed), &[], &options);
    eprintln!(
        "nested smoke: {:?} in all, L1 boot {:?}, script {:?}",
        run.elapsed, run.boot, run.script
    );
    run.assert_success();
    let report = run.report();
    assert_eq!(run.expect("nproc"), "2", "{report}");
    assert_eq!(run.expect("vdb-serial"), "smoke-vdb", "{report}");
    for name in ["selftest", "tmpfs", "vdb"] {
        assert_eq!(run.expect(&format!("{name}-exit")), "0", "{name}\n{report}");
    }
    assert_eq!(run.marker("error"), None, "{report}");
    let results = results(&run.lines);
    let tasks: Vec<&Value> = results.iter().map(|r| &r["task"]).collect();
    assert_eq!(tasks, ["selftest", "blk-verify", "blk-verify"], "{report}");
    for result in &results {
        assert_eq!(result["status"], "pass", "{report}");
    }
    assert_eq!(results[0]["vcpus_online"], 2, "{report}");
    assert_eq!(results[1]["dev"], "virtio", "{report}");
    assert_eq!(
        results[2]["pattern_seed"],
        format!("{seed:016x}"),
        "{report}"
    );

    // What blk-verify wrote through splitvisor-blk on L1's /dev/vdb is in the host's file, and
    // nothing else changed.
    let mut expected = disk;
    let start = (WRITE_SECTOR * SECTOR) as usize;
    expected[start..start + WRITE_LEN].copy_from_slice(&pattern::sectors(
        seed,
        WRITE_SECTOR,
        WRITE_LEN,
    ));
    let actual = std::fs::read(&disk_path).unwrap();
    assert_eq!(actual.len(), DISK_LEN, "{report}");
    let first_diff = actual.iter().zip(&expected).position(|(a, e)| a != e);
    assert_eq!(
        first_diff, None,
        "the host's image differs at this byte\n{report}"
    );
}

#[test]
fn l1_loads_extra_modules_and_runs_host_programs() {
    let test = "l1_loads_extra_modules_and_runs_host_programs";
    let (Some(host), Some(net)) = (NestedHost::require(test), NetTools::require(test)) else {
        return;
    };
    // By full path: busybox's sh would run its own `ip` and `ping` applets.
    let script = r#"
/bin/ip tuntap add dev tap0 mode tap || exit 1
/bin/ip link set tap0 up || exit 1
echo SV:tap-type=$(cat /sys/class/net/tap0/type)
/bin/ip link set lo up || exit 1
/bin/ping -c 1 -W 10 127.0.0.1 >/tmp/ping.out 2>&1
echo SV:ping-exit=$?
echo SV:ping-received=$(grep -o '[0-9]* received' /tmp/ping.out)
"#;
    let options = NestedOptions::default()
        .module("tun")
        .program(&net.ip)
        .program(&net.ping);
    let run = host.run(script, &[], &options);
    eprintln!("nested modules/programs: {:?} in all", run.elapsed);
    run.assert_success();
    let report = run.report();
    // ARPHRD_ETHER: a TAP device.
    assert_eq!(run.expect("tap-type"), "1", "{report}");
    assert_eq!(run.expect("ping-exit"), "0", "{report}");
    assert_eq!(run.expect("ping-received"), "1 received", "{report}");
}
