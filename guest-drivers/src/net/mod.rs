//! A minimal IPv4 stack over the virtio-net driver: Ethernet, ARP (answers requests for our
//! address, resolves peers with retries, a small cache), IPv4 (header checksum; fragments are
//! dropped), ICMP echo (answers requests, sends requests and matches replies) and UDP echo on
//! port 7, and a counter of the datagrams that arrive on the stream port (`bench=net`).
//! Everything is polled from the task's loop; nothing runs on interrupts.

use crate::blk::BlkError;
use crate::time;
use crate::virtio::net::VirtioNet;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Largest frame the stack handles: room for the bench stream's largest datagram, a 1500-byte
/// UDP payload (42 bytes of headers on top; no jumbo frames beyond that).
pub const MAX_FRAME: usize = ETH_HDR + 20 + 8 + 1500;
/// Shortest Ethernet frame without FCS: shorter ones are padded.
const MIN_FRAME: usize = 60;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const UDP_ECHO_PORT: u16 = 7;
/// The `bench=net` stream's UDP port (the discard service): the sender uses it as source and
/// destination port, the receiver counts what arrives on it.
pub const STREAM_PORT: u16 = 9;
/// Ethernet + IPv4 + UDP header bytes in front of a UDP payload.
pub const UDP_FRAME_OVERHEAD: usize = ETH_HDR + 20 + 8;
/// ICMP echo identifier of the requests this guest sends ("SV").
pub const PING_ID: u16 = 0x5356;
const ARP_CACHE: usize = 8;
/// Most frames one `poll` handles.
const POLL_BUDGET: usize = 256;

/// Parses `a.b.c.d/prefix` (prefix defaults to 24).
pub fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|&p| p <= 32)?),
        None => (s, 24),
    };
    Some((parse_ipv4(addr)?, prefix))
}

pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in out.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An address formatter: `Ip(a)` prints `a.b.c.d`.
pub struct Ip(pub [u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// A MAC formatter.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The Internet checksum (ones' complement sum of 16-bit words), folded, not inverted.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn ip_at(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

fn mac_at(b: &[u8], off: usize) -> [u8; 6] {
    let mut m = [0; 6];
    m.copy_from_slice(&b[off..off + 6]);
    m
}

/// An echo reply to one of our requests.
#[derive(Clone, Copy)]
pub struct EchoReply {
    pub seq: u16,
    pub from: [u8; 4],
    pub tsc: u64,
}

/// Datagrams that arrived on `STREAM_PORT` (from `from`, when set), with the TSC of the first
/// and of the latest batch (`last_tsc` is the poller's to update).
#[derive(Clone, Copy, Default)]
pub struct StreamCount {
    pub from: Option<[u8; 4]>,
    pub datagrams: u64,
    pub payload_bytes: u64,
    pub first_tsc: u64,
    pub last_tsc: u64,
}

#[derive(Clone, Copy, Default)]
pub struct StackStats {
    pub pings_answered: u64,
    pub udp_echoed: u64,
    pub arp_replies_sent: u64,
    pub bad_frames: u64,
}

pub struct Stack {
    pub nic: VirtioNet,
    pub ip: [u8; 4],
    pub prefix: u8,
    arp: [Option<([u8; 4], [u8; 6])>; ARP_CACHE],
    arp_next: usize,
    ip_id: u16,
    pub stats: StackStats,
    /// The latest echo reply to a request with `PING_ID`, taken by the pinger.
    pub echo_reply: Option<EchoReply>,
    /// What arrived on the stream port.
    pub stream: StreamCount,
    rx: [u8; MAX_FRAME],
    tx: [u8; MAX_FRAME],
}

impl Stack {
    pub fn new(nic: VirtioNet, ip: [u8; 4], prefix: u8) -> Stack {
        Stack {
            nic,
            ip,
            prefix,
            arp: [None; ARP_CACHE],
            arp_next: 0,
            ip_id: 1,
            stats: StackStats::default(),
            echo_reply: None,
            stream: StreamCount::default(),
            rx: [0; MAX_FRAME],
            tx: [0; MAX_FRAME],
        }
    }

    /// Whether `addr` is on our subnet (the stack has no gateway).
    pub fn on_link(&self, addr: [u8; 4]) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.ip) & mask
    }

    pub fn arp_lookup(&self, addr: [u8; 4]) -> Option<[u8; 6]> {
        self.arp.iter().flatten().find(|e| e.0 == addr).map(|e| e.1)
    }

    fn arp_learn(&mut self, addr: [u8; 4], mac: [u8; 6]) {
        if addr == [0; 4] || mac == BROADCAST || mac[0] & 1 != 0 {
            return;
        }
        if let Some(e) = self.arp.iter_mut().flatten().find(|e| e.0 == addr) {
            e.1 = mac;
            return;
        }
        self.arp[self.arp_next] = Some((addr, mac));
        self.arp_next = (self.arp_next + 1) % ARP_CACHE;
    }

    /// Handles the frames waiting on the RX ring (at most POLL_BUDGET, so that a peer sending
    /// faster than we handle frames cannot keep the caller from its deadlines), then publishes
    /// the buffers given back; returns how many frames there were.
    pub fn poll(&mut self) -> Result<usize, BlkError> {
        let mut n = 0;
        loop {
            if n == POLL_BUDGET {
                self.nic.publish_rx();
                break;
            }
            let rx = &mut self.rx;
            let mut len = 0;
            let got = self.nic.recv(|frame| {
                if frame.len() <= MAX_FRAME {
                    rx[..frame.len()].copy_from_slice(frame);
                    len = frame.len();
                }
            })?;
            if !got {
                // Drained: hand the reposted buffers to the device.
                self.nic.publish_rx();
                break;
            }
            n += 1;
            if len == 0 {
                self.stats.bad_frames += 1;
                continue;
            }
            self.handle(len)?;
        }
        Ok(n)
    }

    /// Sends the first `len` bytes of `self.tx` (padded to the Ethernet minimum).
    fn transmit(&mut self, len: usize) -> Result<(), BlkError> {
        if len < MIN_FRAME {
            self.tx[len..MIN_FRAME].fill(0);
        }
        let len = len.max(MIN_FRAME);
        let tx = &self.tx;
        self.nic.send(|buf| {
            buf[..len].copy_from_slice(&tx[..len]);
            len
        })
    }

    fn eth_header(&mut self, dst: [u8; 6], ethertype: u16) {
        self.tx[0..6].copy_from_slice(&dst);
        self.tx[6..12].copy_from_slice(&self.nic.mac);
        put16(&mut self.tx, 12, ethertype);
    }

    fn handle(&mut self, len: usize) -> Result<(), BlkError> {
        if len < ETH_HDR {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        let dst = mac_at(&self.rx, 0);
        if dst != self.nic.mac && dst != BROADCAST {
            return Ok(());
        }
        match be16(&self.rx, 12) {
            ETHERTYPE_ARP => self.handle_arp(len),
            ETHERTYPE_IPV4 => self.handle_ipv4(len),
            _ => Ok(()),
        }
    }

    fn handle_arp(&mut self, len: usize) -> Result<(), BlkError> {
        let a = ETH_HDR;
        let r = &self.rx;
        if len < a + 28 || be16(r, a) != 1 || be16(r, a + 2) != ETHERTYPE_IPV4 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        if r[a + 4] != 6 || r[a + 5] != 4 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        let op = be16(r, a + 6);
        let (sha, spa, tpa) = (mac_at(r, a + 8), ip_at(r, a + 14), ip_at(r, a + 24));
        if tpa != self.ip {
            return Ok(());
        }
        self.arp_learn(spa, sha);
        if op == 1 {
            self.eth_header(sha, ETHERTYPE_ARP);
            let t = &mut self.tx;
            put16(t, a, 1);
            put16(t, a + 2, ETHERTYPE_IPV4);
            t[a + 4] = 6;
            t[a + 5] = 4;
            put16(t, a + 6, 2);
            t[a + 8..a + 14].copy_from_slice(&self.nic.mac);
            t[a + 14..a + 18].copy_from_slice(&self.ip);
            t[a + 18..a + 24].copy_from_slice(&sha);
            t[a + 24..a + 28].copy_from_slice(&spa);
            self.stats.arp_replies_sent += 1;
            self.transmit(a + 28)?;
        }
        Ok(())
    }

    /// Sends an ARP request for `addr` (broadcast).
    pub fn send_arp_request(&mut self, addr: [u8; 4]) -> Result<(), BlkError> {
        let a = ETH_HDR;
        self.eth_header(BROADCAST, ETHERTYPE_ARP);
        let t = &mut self.tx;
        put16(t, a, 1);
        put16(t, a + 2, ETHERTYPE_IPV4);
        t[a + 4] = 6;
        t[a + 5] = 4;
        put16(t, a + 6, 1);
        t[a + 8..a + 14].copy_from_slice(&self.nic.mac);
        t[a + 14..a + 18].copy_from_slice(&self.ip);
        t[a + 18..a + 24].fill(0);
        t[a + 24..a + 28].copy_from_slice(&addr);
        self.transmit(a + 28)
    }

    fn handle_ipv4(&mut self, len: usize) -> Result<(), BlkError> {
        let i = ETH_HDR;
        let r = &self.rx;
        if len < i + 20 || r[i] >> 4 != 4 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        let ihl = usize::from(r[i] & 0xf) * 4;
        let total = usize::from(be16(r, i + 2));
        if ihl < 20 || total < ihl || i + total > len || checksum(&r[i..i + ihl]) != 0 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        // Fragments (MF set or a non-zero offset) are not reassembled.
        if be16(r, i + 6) & 0x3fff != 0 {
            return Ok(());
        }
        let (src, dst) = (ip_at(r, i + 12), ip_at(r, i + 16));
        if dst != self.ip {
            return Ok(());
        }
        let src_mac = mac_at(r, 6);
        let proto = r[i + 9];
        let payload = i + ihl..i + total;
        self.arp_learn(src, src_mac);
        match proto {
            PROTO_ICMP => self.handle_icmp(src, src_mac, payload),
            PROTO_UDP => self.handle_udp(src, src_mac, payload),
            _ => Ok(()),
        }
    }

    /// Writes an IPv4 header at `self.tx[14..34]` for `payload_len` bytes; returns the frame
    /// length.
    fn ipv4_header(&mut self, dst: [u8; 4], proto: u8, payload_len: usize) -> usize {
        let i = ETH_HDR;
        let total = 20 + payload_len;
        let id = self.ip_id;
        self.ip_id = self.ip_id.wrapping_add(1);
        let t = &mut self.tx;
        t[i] = 0x45;
        t[i + 1] = 0;
        put16(t, i + 2, total as u16);
        put16(t, i + 4, id);
        put16(t, i + 6, 0x4000); // DF
        t[i + 8] = 64;
        t[i + 9] = proto;
        put16(t, i + 10, 0);
        t[i + 12..i + 16].copy_from_slice(&self.ip);
        t[i + 16..i + 20].copy_from_slice(&dst);
        let c = checksum(&t[i..i + 20]);
        put16(t, i + 10, c);
        i + total
    }

    fn handle_icmp(
        &mut self,
        src: [u8; 4],
        src_mac: [u8; 6],
        p: core::ops::Range<usize>,
    ) -> Result<(), BlkError> {
        let r = &self.rx;
        let msg = &r[p.clone()];
        if msg.len() < 8 || checksum(msg) != 0 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        match (msg[0], msg[1]) {
            (8, 0) => {
                let n = msg.len();
                if ETH_HDR + 20 + n > MAX_FRAME {
                    return Ok(());
                }
                let o = ETH_HDR + 20;
                self.tx[o..o + n].copy_from_slice(&self.rx[p]);
                self.tx[o] = 0;
                put16(&mut self.tx, o + 2, 0);
                let c = checksum(&self.tx[o..o + n]);
                put16(&mut self.tx, o + 2, c);
                self.eth_header(src_mac, ETHERTYPE_IPV4);
                let len = self.ipv4_header(src, PROTO_ICMP, n);
                self.stats.pings_answered += 1;
                self.transmit(len)
            }
            (0, 0) if be16(msg, 4) == PING_ID => {
                self.echo_reply = Some(EchoReply {
                    seq: be16(msg, 6),
                    from: src,
                    tsc: time::now(),
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn udp_checksum(&self, src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
        let mut sum = sum16(&src, 0);
        sum = sum16(&dst, sum);
        sum += u32::from(PROTO_UDP) + udp.len() as u32;
        match !fold(sum16(udp, sum)) {
            0 => 0xffff,
            c => c,
        }
    }

    fn handle_udp(
        &mut self,
        src: [u8; 4],
        src_mac: [u8; 6],
        p: core::ops::Range<usize>,
    ) -> Result<(), BlkError> {
        let msg = &self.rx[p.clone()];
        if msg.len() < 8 {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        let ulen = usize::from(be16(msg, 4));
        if ulen < 8 || ulen > msg.len() {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        let udp = &msg[..ulen];
        if be16(udp, 6) != 0
            && fold(sum16(
                udp,
                sum16(&src, sum16(&self.ip, u32::from(PROTO_UDP) + ulen as u32)),
            )) != 0xffff
        {
            self.stats.bad_frames += 1;
            return Ok(());
        }
        if be16(udp, 2) == STREAM_PORT {
            self.count_stream(src, ulen - 8);
            return Ok(());
        }
        if be16(udp, 2) != UDP_ECHO_PORT || ETH_HDR + 20 + ulen > MAX_FRAME {
            return Ok(());
        }
        let (sport, dport) = (be16(udp, 0), be16(udp, 2));
        let o = ETH_HDR + 20;
        self.tx[o..o + ulen].copy_from_slice(&self.rx[p.start..p.start + ulen]);
        put16(&mut self.tx, o, dport);
        put16(&mut self.tx, o + 2, sport);
        put16(&mut self.tx, o + 6, 0);
        let c = self.udp_checksum(self.ip, src, &self.tx[o..o + ulen]);
        put16(&mut self.tx, o + 6, c);
        self.eth_header(src_mac, ETHERTYPE_IPV4);
        let len = self.ipv4_header(src, PROTO_UDP, ulen);
        self.stats.udp_echoed += 1;
        self.transmit(len)
    }

    fn count_stream(&mut self, src: [u8; 4], payload: usize) {
        let s = &mut self.stream;
        if s.from.is_some_and(|from| from != src) {
            return;
        }
        // The TSC is read for the first datagram only: on PVM hosts a guest `rdtsc` can cost
        // as much as a whole datagram, so the receive loop stamps `last_tsc` once per batch.
        if s.datagrams == 0 {
            s.first_tsc = time::now();
            s.last_tsc = s.first_tsc;
        }
        s.datagrams += 1;
        s.payload_bytes += payload as u64;
    }

    /// Writes into `out` a whole frame carrying one stream datagram to `dst` (port
    /// `STREAM_PORT` both ways): Ethernet, IPv4 (DF, checksummed), UDP with checksum 0 (none,
    /// which IPv4 allows) and `payload_len` bytes of payload (byte k = k mod 256). Returns the
    /// frame length, or `None` if `out` or `MAX_FRAME` cannot hold it.
    pub fn stream_frame(
        &mut self,
        dst: [u8; 4],
        dst_mac: [u8; 6],
        payload_len: usize,
        out: &mut [u8],
    ) -> Option<usize> {
        let o = ETH_HDR + 20;
        let udp_len = 8 + payload_len;
        if o + udp_len > MAX_FRAME.min(out.len()) {
            return None;
        }
        let t = &mut self.tx;
        put16(t, o, STREAM_PORT);
        put16(t, o + 2, STREAM_PORT);
        put16(t, o + 4, udp_len as u16);
        put16(t, o + 6, 0);
        for (k, b) in t[o + 8..o + udp_len].iter_mut().enumerate() {
            *b = k as u8;
        }
        self.eth_header(dst_mac, ETHERTYPE_IPV4);
        let len = self.ipv4_header(dst, PROTO_UDP, udp_len);
        if len < MIN_FRAME {
            self.tx[len..MIN_FRAME].fill(0);
        }
        let len = len.max(MIN_FRAME);
        out[..len].copy_from_slice(&self.tx[..len]);
        Some(len)
    }

    /// Sends an ICMP echo request with `PING_ID`, `seq` and `payload_len` bytes of payload.
    pub fn send_echo_request(
        &mut self,
        dst: [u8; 4],
        dst_mac: [u8; 6],
        seq: u16,
        payload_len: usize,
    ) -> Result<(), BlkError> {
        let o = ETH_HDR + 20;
        let n = 8 + payload_len.min(MAX_FRAME - o - 8);
        let t = &mut self.tx;
        t[o] = 8;
        t[o + 1] = 0;
        put16(t, o + 2, 0);
        put16(t, o + 4, PING_ID);
        put16(t, o + 6, seq);
        for (k, b) in t[o + 8..o + n].iter_mut().enumerate() {
            *b = k as u8;
        }
        let c = checksum(&t[o..o + n]);
        put16(t, o + 2, c);
        self.eth_header(dst_mac, ETHERTYPE_IPV4);
        let len = self.ipv4_header(dst, PROTO_ICMP, n);
        self.transmit(len)
    }
}
