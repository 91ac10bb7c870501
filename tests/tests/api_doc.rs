//! docs/api.yaml against a live VMM under real KVM: every documented route (the `/api/v1/`
//! ones and their unversioned aliases) is asked on a running VM with a vhost-user disk, and
//! each answer's status must be documented for it and its body must have exactly the
//! documented shape. Errors (404, 405, an unknown device) too.

use std::path::PathBuf;

use serde_json::{json, Value};
use splitvisor_tests::api::{request, Answer};
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::image;
use splitvisor_tests::named::Host;
use splitvisor_tests::openapi::{check, doc, documented, response_schema};
use splitvisor_tests::vm::require_kvm;

/// `answer` must be documented for `method path` in `doc` and have the documented shape.
fn assert_documented(doc: &Value, op: &Value, method: &str, path: &str, answer: &Answer) {
    let Some(schema) = response_schema(doc, op, answer.status) else {
        panic!(
            "{method} {path}: status {} is not documented\n{}",
            answer.status, answer.body
        );
    };
    if let Err(why) = check(doc, schema, &answer.body, "") {
        panic!(
            "{method} {path} {}: {why}\nanswer: {}",
            answer.status, answer.body
        );
    }
}

#[test]
fn a_live_vmm_answers_every_documented_route_as_documented() {
    if !require_kvm("a_live_vmm_answers_every_documented_route_as_documented") {
        return;
    }
    let mut host = Host::new("apidoc");
    let img = image::zeroed(host.dir.join("d.img"), 16 << 20);
    // Shared: a second daemon on the same image is the target of the swaps below.
    let disk = format!("image={},share", img.display());
    let out = host.launch(
        "d",
        &["--disk", &disk, "--cmdline", "blk-verify,seconds=120"],
    );
    assert_eq!(out.code, Some(0), "{out}");
    let listed = host.list_json();
    let vm = &listed[0];
    let api = PathBuf::from(vm["api_socket"].as_str().expect("api_socket"));
    let first_backend = vm["vm"]["devices"][0]["backend"]["socket"]
        .as_str()
        .expect("disk0's backend")
        .to_string();
    let second = Daemon::shared_blk(&host.dir, "second", &img);
    let second_backend = second.socket.clone();
    // Each swap moves disk0 to the other backend.
    let mut swap_targets = [second_backend.display().to_string(), first_backend]
        .into_iter()
        .cycle();

    let doc = doc();
    let routes = documented(&doc);
    assert!(routes.len() >= 14, "{:?}", routes.keys());
    let mut shutdown = None;
    for ((method, path), op) in &routes {
        if path == "/api/v1/vm/shutdown" {
            shutdown = Some(*op);
            continue;
        }
        if path == "/vm/shutdown" {
            continue; // the alias of the one asked last: the VM can stop only once
        }
        let concrete = path.replace("{id}", "disk0");
        if path.ends_with("/vm/snapshot") {
            // A real snapshot of the VM with its vhost-user disk, which then runs on.
            let dir = host.dir.join("snap");
            let body = json!({ "dir": dir.display().to_string(), "then": "resume" }).to_string();
            let answer = request(&api, method, &concrete, Some(&body));
            assert_eq!(answer.status, 200, "{method} {concrete}: {}", answer.body);
            assert_documented(&doc, op, method, &concrete, &answer);
            assert_eq!(answer.body["state"], "running", "{}", answer.body);
            assert!(dir.join("snapshot.json").exists());
            continue;
        }
        if path.ends_with("/vm/migrate") && method == "PUT" {
            // A migration would end this VMM: one to nowhere fails as documented (502), one
            // to a malformed address is refused (400), and the VM runs on.
            let nowhere = host.dir.join("nowhere.sock").display().to_string();
            for (to, status) in [(format!("unix:{nowhere}"), 502), ("nowhere".into(), 400)] {
                let body = json!({ "to": to }).to_string();
                let answer = request(&api, method, &concrete, Some(&body));
                assert_eq!(
                    answer.status, status,
                    "{method} {concrete}: {}",
                    answer.body
                );
                assert_documented(&doc, op, method, &concrete, &answer);
            }
            continue;
        }
        let body = path
            .ends_with("/backend")
            .then(|| json!({ "socket": swap_targets.next().unwrap() }).to_string());
        let answer = request(&api, method, &concrete, body.as_deref());
        assert_eq!(answer.status, 200, "{method} {concrete}: {}", answer.body);
        assert_documented(&doc, op, method, &concrete, &answer);
    }

    // Errors have the documented shape too.
    let (vm_op, swap_op) = (
        routes[&("GET".to_string(), "/api/v1/vm".to_string())],
        routes[&(
            "PUT".to_string(),
            "/api/v1/devices/{id}/backend".to_string(),
        )],
    );
    let wrong_method = request(&api, "POST", "/api/v1/vm", None);
    assert_eq!(wrong_method.status, 405);
    assert_documented(&doc, vm_op, "POST", "/api/v1/vm", &wrong_method);
    let body = json!({ "socket": "/nonexistent.sock" }).to_string();
    let no_device = request(&api, "PUT", "/api/v1/devices/disk9/backend", Some(&body));
    assert_eq!(no_device.status, 404);
    assert_documented(
        &doc,
        swap_op,
        "PUT",
        "/api/v1/devices/disk9/backend",
        &no_device,
    );
    let nothing = request(&api, "GET", "/api/v1/nothing", None);
    assert_eq!(nothing.status, 404);
    assert_eq!(nothing.body.as_object().map(|o| o.len()), Some(1));
    assert!(nothing.body["error"].is_string(), "{}", nothing.body);
    let unversioned_new = request(&api, "GET", "/version", None);
    assert_eq!(
        unversioned_new.status, 404,
        "new endpoints are under /api/v1 only"
    );

    let shutdown = shutdown.expect("PUT /api/v1/vm/shutdown is documented");
    let answer = request(&api, "PUT", "/api/v1/vm/shutdown", None);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_documented(&doc, shutdown, "PUT", "/api/v1/vm/shutdown", &answer);
    assert_eq!(answer.body["state"], "stopping");
}
