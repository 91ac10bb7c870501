//! Interop: Linux's own virtio-net driver, through QEMU's vhost-user netdev and virtio-net-pci
//! frontend, served by `splitvisor-net --tap`. The TAP lives in a network namespace of the test's
//! own; from there the host pings the guest, sends it a few MiB over TCP (the guest reports the
//! length and CRC-32 of what arrived) and receives them back (the host compares every byte).
//!
//! Needs qemu-system-x86_64, a Debian kernel with virtio modules, busybox-static, iproute2,
//! iputils-ping and root (`.ci/install-deps.sh`); skips without them unless `CI` is set. QEMU runs
//! the guest under TCG, so every step has a generous but finite timeout.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use splitvisor_tests::daemon::{workspace_bin, Daemon};
use splitvisor_tests::interop::initramfs::Initramfs;
use splitvisor_tests::interop::qemu::Qemu;
use splitvisor_tests::interop::HostTools;
use splitvisor_tests::netns::{NetTools, Netns};
use splitvisor_tests::pattern::{crc32, nonce, random_bytes};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

const TEST: &str = "interop_net";
const MODULES: &[&str] = &["virtio_pci", "virtio_net"];
const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
const GUEST_MAC: &str = "52:54:00:5e:17:02";
/// The guest listens here for the host's data.
const TO_GUEST_PORT: u16 = 5000;
/// The host listens here for the guest's copy.
const TO_HOST_PORT: u16 = 5001;
/// A few MiB and an odd tail, so the last segment is not a full one.
const TRANSFER_LEN: usize = (3 << 20) + 4321;
const PINGS: u32 = 3;
/// Boot to a configured NIC: ~5 s on an idle host under TCG, much longer on a busy one.
const NIC_UP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the guest's `nc` may take to start listening, or to connect back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a single read or write on a test connection may stall.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole guest run, unless `SPLITVISOR_INTEROP_TIMEOUT_S` says otherwise.
const GUEST_TIMEOUT: Duration = Duration::from_secs(480);

/// The guest: find the NIC, configure it, then receive a TCP stream into /tmp/rx, report its
/// length and CRC-32, and send it back to the host.
fn guest_script() -> String {
    format!(
        r#"dev=""
i=0
while [ -z "$dev" ]; do
    for d in /sys/class/net/*; do
        [ "${{d##*/}}" != lo ] && dev=${{d##*/}}
    done
    if [ -z "$dev" ]; then
        i=$((i + 1))
        if [ $i -gt 100 ]; then echo SV:error=no-nic; exit 1; fi
        sleep 0.1
    fi
done
echo SV:mac=$(cat /sys/class/net/$dev/address)
ip addr add {GUEST_IP}/24 dev $dev || {{ echo SV:error=ip-addr; exit 1; }}
ip link set $dev up || {{ echo SV:error=link-up; exit 1; }}
echo SV:nic=up
# busybox nc quits when its stdin ends; a FIFO opened read-write never ends (nc itself holds
# the write side) and never has data, so nc runs until the host closes the connection.
mkfifo /tmp/hold
nc -l -p {TO_GUEST_PORT} <> /tmp/hold > /tmp/rx
echo SV:rx-rc=$?
echo SV:rx-bytes=$(wc -c < /tmp/rx)
echo SV:rx-crc=$(crc32 < /tmp/rx)
nc {HOST_IP} {TO_HOST_PORT} < /tmp/rx
echo SV:tx-rc=$?
"#
    )
}

/// Host side of the transfers, run inside the namespace: send `data` to the guest, then accept
/// its connection back and return everything it sent.
fn transfer(data: &[u8]) -> Result<Vec<u8>, String> {
    let back_addr: SocketAddr = format!("{HOST_IP}:{TO_HOST_PORT}").parse().unwrap();
    let listener =
        TcpListener::bind(back_addr).map_err(|e| format!("cannot bind {back_addr}: {e}"))?;

    let guest_addr: SocketAddr = format!("{GUEST_IP}:{TO_GUEST_PORT}").parse().unwrap();
    let start = Instant::now();
    let mut stream = loop {
        // Refused until the guest's nc listens; retry.
        match TcpStream::connect_timeout(&guest_addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > CONNECT_TIMEOUT => {
                return Err(format!("cannot connect to the guest at {guest_addr}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(data)
        .map_err(|e| format!("sending to the guest: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    // The guest's nc exits at our end of stream; it has nothing to send on this connection.
    let mut extra = Vec::new();
    stream
        .read_to_end(&mut extra)
        .map_err(|e| format!("waiting for the guest to close: {e}"))?;
    if !extra.is_empty() {
        return Err(format!("the guest sent {} unexpected bytes", extra.len()));
    }
    let sent = start.elapsed();

    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let (mut back, peer) = poll_until("the guest to connect back", CONNECT_TIMEOUT, || {
        listener.accept().ok()
    })?;
    back.set_nonblocking(false)
        .and_then(|()| back.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut received = Vec::with_capacity(data.len());
    back.read_to_end(&mut received)
        .map_err(|e| format!("receiving from the guest ({peer}): {e}"))?;
    eprintln!(
        "host->guest {} bytes in {sent:?}; guest->host in {:?}",
        data.len(),
        start.elapsed() - sent
    );
    Ok(received)
}

#[test]
fn linux_virtio_net_pings_and_carries_tcp_through_splitvisor_net_tap() {
    let Some(tools) = HostTools::require(TEST, MODULES) else {
        return;
    };
    let Some(net) = NetTools::require(TEST) else {
        return;
    };
    let test_start = Instant::now();
    // Drop order (reverse of declaration) on success and on panic alike: QEMU, then the daemon
    // (closing the TAP), then the namespace, then the work directory (printing logs on failure).
    let workdir = Workdir::new("interop-net");
    let pid = std::process::id();
    let ns = Netns::add(&net, &format!("svin{pid}")).unwrap();
    let tap = format!("svitap{}", pid % 100_000);
    let socket = workdir.join("net.sock");
    let bin = workspace_bin("splitvisor-net", "splitvisor-net").unwrap();
    let mut args = ns.exec_args(&bin);
    args.extend([
        "--socket".as_ref(),
        socket.as_os_str(),
        "--tap".as_ref(),
        tap.as_ref(),
    ]);
    let mut daemon = Daemon::start(&workdir, "splitvisor-net", &net.ip, &args, &socket).unwrap();
    // The daemon opens the TAP just after binding its socket.
    let ip = net.ip.to_string_lossy();
    poll_until("the daemon's TAP", Duration::from_secs(10), || {
        ns.run(&[&ip, "link", "show", &tap]).ok()
    })
    .unwrap();
    ns.run(&[&ip, "addr", "add", &format!("{HOST_IP}/24"), "dev", &tap])
        .unwrap();
    ns.run(&[&ip, "link", "set", &tap, "up"]).unwrap();

    let initrd = workdir.join("initrd.cpio");
    Initramfs::new(&guest_script())
        .modules(MODULES)
        .build(&tools, &initrd)
        .unwrap();
    let mut qemu = Qemu::new(&tools, &initrd).vhost_user_net(&socket, GUEST_MAC);
    if std::env::var_os(splitvisor_tests::interop::qemu::ENV_TIMEOUT).is_none() {
        qemu = qemu.timeout(GUEST_TIMEOUT);
    }
    let mut guest = qemu.spawn(&workdir, "guest").unwrap();
    guest
        .wait_marker("nic", NIC_UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let booted = test_start.elapsed();
    assert_eq!(
        guest.wait_marker("mac", Duration::ZERO).ok().as_deref(),
        Some(GUEST_MAC),
        "the MAC Linux reads from the device"
    );

    let count = PINGS.to_string();
    let ping = ns
        .output(&[
            &net.ping.to_string_lossy(),
            "-c",
            &count,
            "-w",
            "60",
            GUEST_IP,
        ])
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && ping_out.contains(&format!("{PINGS} received")),
        "ping {GUEST_IP} from the TAP's namespace:\n{ping_out}{}\nconsole:\n{}",
        String::from_utf8_lossy(&ping.stderr),
        guest.serial_so_far()
    );

    let data = random_bytes(nonce(), TRANSFER_LEN);
    let received = ns
        .enter(|| transfer(&data))
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", guest.serial_so_far()));

    let run = guest.wait();
    eprintln!(
        "booted to a configured NIC in {booted:?}; test took {:?} in all",
        test_start.elapsed()
    );
    run.assert_passed();
    assert_eq!(run.expect("rx-rc"), "0", "the guest's nc -l failed");
    assert_eq!(
        run.expect("rx-bytes"),
        TRANSFER_LEN.to_string(),
        "bytes the guest received"
    );
    assert_eq!(
        run.expect("rx-crc"),
        format!("{:08x}", crc32(&data)),
        "CRC-32 of what the guest received"
    );
    assert_eq!(
        run.expect("tx-rc"),
        "0",
        "the guest's nc to the host failed"
    );
    assert_eq!(received.len(), data.len(), "bytes the host got back");
    if let Some(i) = received.iter().zip(&data).position(|(r, d)| r != d) {
        panic!("the guest's copy differs from what the host sent at byte {i}");
    }

    let status = daemon.stop().unwrap();
    assert!(status.success(), "splitvisor-net exited with {status}");
}
