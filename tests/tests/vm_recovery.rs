//! Crash recovery end to end: under `splitvisor launch`, the disk's `splitvisor-blk` is killed
//! with SIGKILL twenty times at random moments while the guest runs write-then-verify rounds.
//! Launch restarts the daemon on the same socket; the VMM reconnects, hands it the inflight
//! region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and the rings, and the daemon resubmits what
//! its predecessor had in flight. The guest must see no error, its verification must pass, and
//! the image must hold exactly what it wrote.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use splitvisor_tests::api;
use splitvisor_tests::image;
use splitvisor_tests::launch::Launch;
use splitvisor_tests::pattern::nonce;
use splitvisor_tests::pattern::{self, BLK_VERIFY_REGION};
use splitvisor_tests::vm::require_kvm;
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

const IMAGE_LEN: u64 = 8 << 20;
const KILLS: u64 = 20;

fn backend(api: &Path) -> Value {
    api::get(api, "/vm")["devices"][0].clone()
}

fn median_max(mut values: Vec<u64>) -> (u64, u64) {
    values.sort_unstable();
    (values[values.len() / 2], values[values.len() - 1])
}

#[test]
fn twenty_backend_crashes_under_launch_lose_no_write() {
    if !require_kvm("twenty_backend_crashes_under_launch_lose_no_write") {
        return;
    }
    let workdir = Workdir::new("recovery");
    let image = image::zeroed(workdir.join("disk.img"), IMAGE_LEN);
    let api = workdir.join("api.sock");
    let launch = Launch::spawn(
        [
            "--disk",
            &format!("image={}", image.display()),
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "blk-verify,seconds=40",
        ],
        &workdir,
        "launch",
    );
    poll_until(
        "the guest to bring its disk up",
        Duration::from_secs(30),
        || (api.exists() && backend(&api)["driver_ok"] == true).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", launch.stderr_so_far()));

    let seed = nonce();
    let mut pid = launch.wait_serving("disk0", None, Duration::from_secs(10));
    let (mut outages, mut first_io) = (Vec::new(), Vec::new());
    for kill in 1..=KILLS {
        // A random moment: the guest always has requests in flight.
        std::thread::sleep(Duration::from_millis(
            300 + pattern::splitmix64(seed ^ kill) % 500,
        ));
        let before = backend(&api)["counters"]["completed_requests"]
            .as_u64()
            .unwrap();
        assert_eq!(launch.kill_daemon("disk0"), pid);
        pid = launch.wait_serving("disk0", Some(pid), Duration::from_secs(10));
        // Recovered, and the guest's I/O goes on.
        let record = poll_until("the VMM to recover", Duration::from_secs(15), || {
            let device = backend(&api);
            let b = &device["backend"];
            let progressed = device["counters"]["completed_requests"].as_u64() > Some(before);
            let last = b["history"].as_array()?.last()?.clone();
            (b["recoveries"] == kill
                && b["state"] == "connected"
                && progressed
                && !last["first_completion_us"].is_null())
            .then_some(last)
        })
        .unwrap_or_else(|e| {
            panic!(
                "kill {kill}: {e}\n{}\n{}",
                launch.stdout_so_far(),
                launch.stderr_so_far()
            )
        });
        assert_eq!(record["kind"], "recovery", "{record}");
        assert_eq!(record["inflight_region"], true, "{record}");
        outages.push(record["outage_ms"].as_u64().unwrap());
        first_io.push(
            record["stall_us"].as_u64().unwrap() + record["first_completion_us"].as_u64().unwrap(),
        );
    }

    let run = launch.wait(Duration::from_secs(120));
    assert_eq!(run.run.code(), Some(0), "{run}");
    let result = run.run.result();
    assert_eq!(result["status"], "pass", "{run}");
    assert_eq!(result["io_errors"], 0, "{run}");
    assert_eq!(result["mismatched_sectors"], 0, "{run}");
    // Every write the guest saw complete is in the image: it holds exactly the last round.
    let last_seed = u64::from_str_radix(result["pattern_seed"].as_str().unwrap(), 16).unwrap();
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes[..BLK_VERIFY_REGION] == pattern::sectors(last_seed, 0, BLK_VERIFY_REGION)[..],
        "the image differs from the guest's last round"
    );
    assert!(bytes[BLK_VERIFY_REGION..].iter().all(|&b| b == 0));
    assert!(run.leftovers().is_empty(), "{:?}", run.leftovers());

    let (outage_p50, outage_max) = median_max(outages);
    let (io_p50, io_max) = median_max(first_io);
    eprintln!(
        "{KILLS} crashes: backend away (lost until rings resumed) median {outage_p50} ms, max {outage_max} ms; \
         restarted backend answering -> first completed guest I/O median {io_p50} us, max {io_max} us"
    );
}
