//! The nested-SVM harness end to end with the project's own guest: inside one L1 boot (QEMU TCG
//! emulating AMD SVM, a real `kvm-amd`), `splitvisor run --cmdline selftest --vcpus 2`, then
//! `splitvisor-blk` serving a tmpfs image to `splitvisor run --disk socket=... --cmdline
//! blk-verify`. Both RESULT lines must say pass and both runs exit 0.
//!
//! Needs QEMU, the Debian cloud kernel, busybox-static and e2fsprogs (`.ci/install-deps.sh`);
//! skips without them unless `CI` is set. Takes ~1 minute on an idle 2-core host.

use serde_json::Value;
use splitvisor_tests::nested::{NestedHost, NestedOptions};

/// The script inside L1: each splitvisor run's output goes to the console, followed by a line
/// `SV:<name>-exit=<status>`.
const SCRIPT: &str = r#"
echo SV:nproc=$(nproc)
splitvisor run --cmdline selftest --vcpus 2
echo SV:selftest-exit=$?
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
splitvisor-blk --socket /tmp/blk.sock --image /tmp/disk.img --log-level warn &
blk=$!
i=0
while [ ! -S /tmp/blk.sock ]; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then echo SV:error=no-blk-socket; exit 1; fi
    sleep 0.1
done
splitvisor run --disk socket=/tmp/blk.sock --cmdline blk-verify
echo SV:blk-verify-exit=$?
kill $blk
wait $blk
echo SV:blk-daemon-exit=$?
"#;

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
    let run = host.run(SCRIPT, &[], &NestedOptions::default());
    eprintln!(
        "nested smoke: {:?} in all, L1 boot {:?}, script {:?}",
        run.elapsed, run.boot, run.script
    );
    run.assert_success();
    assert_eq!(run.expect("nproc"), "2", "{}", run.report());
    assert_eq!(run.expect("selftest-exit"), "0", "{}", run.report());
    assert_eq!(run.expect("blk-verify-exit"), "0", "{}", run.report());
    assert_eq!(run.marker("error"), None, "{}", run.report());
    let results = results(&run.lines);
    let tasks: Vec<&Value> = results.iter().map(|r| &r["task"]).collect();
    assert_eq!(tasks, ["selftest", "blk-verify"], "{}", run.report());
    for result in &results {
        assert_eq!(result["status"], "pass", "{}", run.report());
    }
    assert_eq!(results[0]["vcpus_online"], 2, "{}", run.report());
    assert_eq!(results[1]["dev"], "virtio", "{}", run.report());
}
