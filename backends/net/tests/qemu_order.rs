//! QEMU <= 7.2's vhost-user-net order: `SET_VRING_ENABLE` right after `SET_OWNER`, before any
//! `SET_FEATURES`. splitvisor-net (through the shared vhost-user server) acks it and applies it
//! once features are negotiated, instead of ending the connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use splitvisor_tests::frontend::net::negotiate;
use splitvisor_tests::frontend::raw::{GET_FEATURES, NEED_REPLY, REPLY, VERSION_1};
use splitvisor_tests::wait::{wait_until, TIMEOUT};
use splitvisor_tests::workdir::Workdir;
use vhost::vhost_user::message::FrontendReq;

const SET_OWNER: u32 = FrontendReq::SET_OWNER as u32;
const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;

fn send(sock: &mut UnixStream, words: &[u32]) {
    let msg: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    sock.write_all(&msg).unwrap();
}

#[test]
fn enable_before_set_features_is_acked_and_the_connection_goes_on() {
    let dir = Workdir::new("qemu-order");
    let sock = dir.join("a.sock");
    let daemon = common::start_switch(&dir, &[&sock], &[]);
    let mut raw = UnixStream::connect(&sock).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    send(&mut raw, &[SET_OWNER, VERSION_1, 0]);
    // vring 0, enabled, with a reply asked for.
    send(
        &mut raw,
        &[SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, 8, 0, 1],
    );
    let mut ack = [0u8; 20];
    raw.read_exact(&mut ack).expect("SET_VRING_ENABLE answered");
    assert_eq!(&ack[..4], &SET_VRING_ENABLE.to_le_bytes());
    assert_eq!(
        u32::from_le_bytes(ack[4..8].try_into().unwrap()),
        VERSION_1 | REPLY
    );
    assert_eq!(
        u64::from_le_bytes(ack[12..].try_into().unwrap()),
        0,
        "success"
    );
    // The connection is still served.
    send(&mut raw, &[GET_FEATURES, VERSION_1, 0]);
    let mut features = [0u8; 20];
    raw.read_exact(&mut features)
        .expect("GET_FEATURES answered");
    assert_eq!(&features[..4], &GET_FEATURES.to_le_bytes());
    drop(raw);
    assert!(
        wait_until(TIMEOUT, || daemon
            .log_text()
            .contains("before SET_FEATURES")),
        "{}",
        daemon.log_text()
    );
    // And a normal frontend after it.
    let (fe, _) = negotiate(&sock, 1);
    drop(fe);
}
