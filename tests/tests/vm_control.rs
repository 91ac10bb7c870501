//! The control API and backend swaps, end to end: a guest doing disk I/O under real KVM against
//! real `splitvisor-blk` daemons, driven through `--api-socket` by a raw HTTP client and by
//! `splitvisor ctl`. Checks each endpoint and its errors, pause/resume by the guest's progress,
//! twenty swaps under a write-and-verify loop (and the image's bytes afterwards), and swaps that
//! must fail without disturbing the guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use splitvisor_tests::api::{self, completed_requests, raw_request, request};
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::image;
use splitvisor_tests::pattern::{self, BLK_VERIFY_REGION};
use splitvisor_tests::vm::{ctl, require_kvm, RunningVm, VM_TIMEOUT};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::{mode, Workdir};

/// Starts a VM on `socket` with the API on `<dir>/api.sock`, running `task`, and waits until
/// the guest's driver has brought the disk up.
fn start_vm(dir: &Workdir, socket: &Path, task: &str) -> (RunningVm, PathBuf) {
    let api = dir.join("api.sock");
    let disk = format!("socket={}", socket.display());
    let vm = RunningVm::spawn(
        [
            "run",
            "--disk",
            &disk,
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            task,
        ],
        dir.path(),
        "vm",
    );
    poll_until(
        "the guest to bring its disk up",
        Duration::from_secs(30),
        || {
            if !api.exists() {
                return None;
            }
            (api::get(&api, "/vm")["devices"][0]["driver_ok"] == true).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stdout_so_far()));
    (vm, api)
}

#[test]
fn api_reports_pauses_resumes_and_stops_the_vm() {
    if !require_kvm("api_reports_pauses_resumes_and_stops_the_vm") {
        return;
    }
    let dir = Workdir::new("api");
    let img = image::zeroed(dir.join("disk.img"), 16 << 20);
    let daemon = Daemon::shared_blk(&dir, "blk", &img);
    let (vm, api) = start_vm(&dir, &daemon.socket, "blk-verify,seconds=60");

    assert_eq!(mode(&api), 0o600, "API socket mode");

    let status = api::get(&api, "/vm");
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 1);
    assert_eq!(status["guest"]["kind"], "splitvisor guest");
    assert_eq!(status["guest"]["kernel"], "<embedded guest>");
    assert_eq!(status["memory_bytes"], 256u64 << 20);
    let disk = &status["devices"][0];
    assert_eq!(disk["id"], "disk0");
    assert_eq!(disk["kind"], "block");
    assert_eq!(disk["transport"], "virtio-mmio");
    assert_eq!(disk["backend"]["socket"], daemon.socket.to_str().unwrap());
    assert_eq!(disk["backend"]["state"], "connected");
    assert_eq!(disk["needs_reset"], false);

    // Paused, the guest completes nothing (requests queued before the pause may still finish).
    let paused = request(&api, "PUT", "/vm/pause", None);
    assert_eq!(
        (paused.status, &paused.body["state"]),
        (200, &Value::from("paused"))
    );
    std::thread::sleep(Duration::from_millis(200));
    let before = completed_requests(&api).expect("completed_requests");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        completed_requests(&api).expect("completed_requests"),
        before,
        "no guest progress while paused"
    );
    assert_eq!(api::get(&api, "/vm")["state"], "paused");
    let resumed = request(&api, "PUT", "/vm/resume", None);
    assert_eq!(
        (resumed.status, &resumed.body["state"]),
        (200, &Value::from("running"))
    );
    poll_until(
        "guest progress after resume",
        Duration::from_secs(10),
        || (completed_requests(&api).expect("completed_requests") > before).then_some(()),
    )
    .unwrap();

    let metrics = api::get(&api, "/metrics");
    assert!(metrics["exits"]["mmio"].as_u64().unwrap() > 0, "{metrics}");
    assert!(
        metrics["devices"]["disk0"]["completed_requests"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(metrics["devices"]["disk0"]["mmio_exits"].as_u64().unwrap() > 0);

    // Errors: a status and a JSON message, never a crash.
    let wrong_method = request(&api, "GET", "/vm/pause", None);
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("PUT"));
    assert_eq!(request(&api, "POST", "/vm", None).status, 405);
    let unknown = request(&api, "GET", "/nope", None);
    assert_eq!(unknown.status, 404);
    assert!(unknown.body["error"].as_str().unwrap().contains("/nope"));
    let bad_json = request(&api, "PUT", "/devices/disk0/backend", Some("{\"socket\": "));
    assert_eq!(bad_json.status, 400);
    assert!(bad_json.body["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let no_field = request(
        &api,
        "PUT",
        "/devices/disk0/backend",
        Some("{\"path\": \"/x\"}"),
    );
    assert_eq!(no_field.status, 400, "{:?}", no_field.body);
    let no_device = request(
        &api,
        "PUT",
        "/devices/disk7/backend",
        Some("{\"socket\": \"/x\"}"),
    );
    assert_eq!(no_device.status, 404);
    assert!(no_device.body["error"].as_str().unwrap().contains("disk7"));
    let garbage = raw_request(&api, b"HELLO\r\n\r\n");
    assert_eq!(garbage.status, 400);
    assert!(garbage.body["error"].is_string());
    let chunked = raw_request(
        &api,
        b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(chunked.status, 411);
    assert_eq!(
        api::get(&api, "/vm")["state"],
        "running",
        "errors changed nothing"
    );

    // The command-line client.
    let (code, text, _) = ctl(&api, &["status"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("VM running: 1 vCPU(s), 256 MiB"), "{text}");
    assert!(
        text.contains("disk0") && text.contains(daemon.socket.to_str().unwrap()),
        "{text}"
    );
    let (code, json, _) = ctl(&api, &["--json", "metrics"]);
    assert_eq!(code, 0);
    let parsed: Value = serde_json::from_str(&json).expect("ctl --json prints JSON");
    assert!(parsed["devices"]["disk0"].is_object());
    let (code, _, err) = ctl(&api, &["swap", "disk7", "/x.sock"]);
    assert_eq!(code, 1);
    assert!(err.contains("disk7") && err.contains("HTTP 404"), "{err}");

    let stop = request(&api, "PUT", "/vm/shutdown", None);
    assert_eq!(stop.status, 200);
    let run = vm.wait(Duration::from_secs(10));
    assert_eq!(run.code(), Some(130), "{run}");
    assert!(run.stderr.contains("PUT /vm/shutdown"), "{run}");
    assert!(!api.exists(), "the API socket is removed at exit");
}

#[test]
fn twenty_swaps_under_guest_io_lose_nothing() {
    if !require_kvm("twenty_swaps_under_guest_io_lose_nothing") {
        return;
    }
    let dir = Workdir::new("swap20");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let a = Daemon::shared_blk(&dir, "a", &img);
    let b = Daemon::shared_blk(&dir, "b", &img);
    let (vm, api) = start_vm(&dir, &a.socket, "blk-verify,seconds=15");

    let (mut stalls_us, mut first_completion_us) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let target = if i % 2 == 0 { &b.socket } else { &a.socket };
        let before = completed_requests(&api).expect("completed_requests");
        let (code, out, err) = ctl(&api, &["--json", "swap", "disk0", target.to_str().unwrap()]);
        assert_eq!(code, 0, "swap {i}: {err}");
        let answer: Value = serde_json::from_str(&out).expect("swap answer");
        assert_eq!(answer["swap"]["to"], target.to_str().unwrap());
        stalls_us.push(answer["swap"]["stall_us"].as_u64().expect("stall_us"));
        // The new backend serves: the guest makes progress before the next swap.
        poll_until(
            "guest progress after a swap",
            Duration::from_secs(5),
            || (completed_requests(&api).expect("completed_requests") > before + 8).then_some(()),
        )
        .unwrap_or_else(|e| panic!("swap {i}: {e}\n{}", vm.stdout_so_far()));
        let first = poll_until(
            "the first completion to be timed",
            Duration::from_secs(5),
            || {
                let status = api::get(&api, "/vm");
                let history = status["devices"][0]["backend"]["history"]
                    .as_array()?
                    .clone();
                history.last()?["first_completion_us"].as_u64()
            },
        )
        .unwrap();
        first_completion_us.push(first);
    }
    let backend = api::get(&api, "/vm")["devices"][0]["backend"].clone();
    assert_eq!(backend["swaps"], 20, "{backend}");
    assert_eq!(backend["socket"], a.socket.to_str().unwrap());

    let run = vm.wait(VM_TIMEOUT);
    let result = run.assert_passed();
    assert_eq!(result["io_errors"], 0, "{run}");
    assert_eq!(result["mismatched_sectors"], 0, "{run}");
    // The image holds exactly what the guest's last round wrote.
    let seed = u64::from_str_radix(result["pattern_seed"].as_str().unwrap(), 16).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[..BLK_VERIFY_REGION] == pattern::sectors(seed, 0, BLK_VERIFY_REGION)[..],
        "the image differs from the guest's last round"
    );
    assert!(
        bytes[BLK_VERIFY_REGION..].iter().all(|&b| b == 0),
        "nothing written outside the region"
    );

    stalls_us.sort_unstable();
    first_completion_us.sort_unstable();
    eprintln!(
        "20 swaps: rings stopped until running on the new backend: median {} us, max {} us; \
         rings handed over until the guest's next completed request: median {} us, max {} us",
        stalls_us[stalls_us.len() / 2],
        stalls_us[stalls_us.len() - 1],
        first_completion_us[first_completion_us.len() / 2],
        first_completion_us[first_completion_us.len() - 1]
    );
}

#[test]
fn failed_swaps_leave_the_old_backend_serving() {
    if !require_kvm("failed_swaps_leave_the_old_backend_serving") {
        return;
    }
    let dir = Workdir::new("swapfail");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let bigger = image::zeroed(dir.join("bigger.img"), 16 << 20);
    let a = Daemon::shared_blk(&dir, "a", &img);
    let other = Daemon::shared_blk(&dir, "other", &bigger);
    let (vm, api) = start_vm(&dir, &a.socket, "blk-verify,seconds=5");

    let missing = dir.join("missing.sock");
    let started = Instant::now();
    let (code, _, err) = ctl(&api, &["swap", "disk0", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("missing.sock") && err.contains("HTTP 502"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a missing socket fails fast"
    );

    let (code, _, err) = ctl(&api, &["swap", "disk0", other.socket.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("32768 sectors") && err.contains("16384") && err.contains("keeps its backend"),
        "{err}"
    );
    assert!(err.contains("HTTP 409"), "{err}");

    let backend = api::get(&api, "/vm")["devices"][0]["backend"].clone();
    assert_eq!(backend["socket"], a.socket.to_str().unwrap(), "{backend}");
    assert_eq!(backend["swaps"], 0);
    assert_eq!(backend["state"], "connected");
    let before = completed_requests(&api).expect("completed_requests");
    poll_until(
        "guest progress after the failed swaps",
        Duration::from_secs(5),
        || (completed_requests(&api).expect("completed_requests") > before).then_some(()),
    )
    .unwrap();
    let result = vm.wait(VM_TIMEOUT).assert_passed();
    assert_eq!(result["io_errors"], 0);
}
