#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into corpus/<target>/seed-*: well-formed inputs
that reach deep (a full request, a full vhost-user handshake) for the fuzzer to mutate. The
layouts are the ones documented at each target's entry point. Re-run after changing one."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# virtio constants (virtio spec; the Rust side takes them from virtio-bindings)
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def image(parts, size):
    """A memory image of `size` bytes with each (address, bytes) placed."""
    img = bytearray(size)
    for addr, data in parts:
        img[addr:addr + len(data)] = data
    return bytes(img)


def blk_chain(kind, sector=0, data_len=512, data_write=None, extra=()):
    """Descriptors 0.. of one request: header at 0x100, data at 0x200, status at 0x600."""
    if data_write is None:
        data_write = kind in (T_IN, T_GET_ID)
    descs = [desc(0x100, 16, NEXT, 1)]
    if data_len:
        descs.append(desc(0x200, data_len, NEXT | (WRITE if data_write else 0), 2))
    descs.append(desc(0x600, 1, WRITE, 0))
    header = struct.pack("<IIQ", kind, 0, sector)
    return [(0, b"".join(descs)), (0x100, header)] + list(extra)


def blk_request():
    for name, kind, sector, length, extra in [
        ("read", T_IN, 3, 512, ()),
        ("write", T_OUT, 15, 512, [(0x200, bytes(range(256)) * 2)]),
        ("flush", T_FLUSH, 0, 0, ()),
        ("get-id", T_GET_ID, 0, 20, ()),
        ("discard", T_DISCARD, 0, 32,
         [(0x200, struct.pack("<QII", 2, 4, 0) + struct.pack("<QII", 8, 1, 0))]),
        ("write-zeroes", T_WRITE_ZEROES, 0, 16, [(0x200, struct.pack("<QII", 1, 2, 1))]),
        ("read-past-end", T_IN, 16, 512, ()),
    ]:
        img = image(blk_chain(kind, sector, length, None, extra), 0x700)
        write("blk_request", name, bytes([4, 0, 0]) + img)
    # Read-only device, write request; indirect table at 0x80 holding the whole request.
    img = image(blk_chain(T_OUT, 1, 512), 0x700)
    write("blk_request", "write-readonly", bytes([4, 2, 0]) + img)
    table = image(blk_chain(T_IN, 2, 1024), 0x700)
    indirect = bytearray(table)
    indirect[0x80:0xb0] = table[0:0x30]
    indirect[0:16] = desc(0x80, 48, INDIRECT, 0)
    write("blk_request", "indirect-read", bytes([3, 1, 0]) + bytes(indirect))
    loop = image([(0, desc(0x100, 16, NEXT, 1) + desc(0x200, 512, NEXT, 0))], 0x200)
    write("blk_request", "loop", bytes([4, 0, 0]) + loop)


def split_ring(size, desc_at, avail_at, used_at, heads, avail_idx=None, used_event=0):
    if avail_idx is None:
        avail_idx = len(heads)
    ring = [h for h in heads] + [0] * (size - len(heads))
    avail = struct.pack("<HH", 0, avail_idx) + struct.pack("<%dH" % size, *ring[:size])
    avail += struct.pack("<H", used_event)
    return [(avail_at, avail), (used_at, bytes(4 + 8 * size + 2))]


def queue_worker():
    size, desc_at, avail_at, used_at = 4, 0x0, 0x40, 0x60
    base = blk_chain(T_IN, 1, 512)
    for name, flags, heads, avail_idx, resubmit in [
        ("one-read", 0, [0], None, []),
        ("one-read-event-idx", 1 | 8, [0], None, []),
        ("resubmit", 8, [], 0, [0]),
        ("bad-head", 0, [7], None, []),
        ("avail-runs-ahead", 0, [0], 9, []),
        ("same-head-twice", 1, [0, 0], None, []),
    ]:
        parts = base + split_ring(size, desc_at, avail_at, used_at, heads, avail_idx)
        header = bytes([2, flags, desc_at // 16, avail_at // 16, used_at // 16])
        header += struct.pack("<HHB", 0, 0, len(resubmit))
        header += b"".join(struct.pack("<H", h) for h in resubmit)
        write("queue_worker", name, header + image(parts, 0x700))


# vhost-user (vhost-user spec; the Rust side uses the vhost crate's definitions)
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 12, 13, 15, 16
GET_QUEUE_NUM, SET_VRING_ENABLE, GET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD = 17, 18, 24, 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38
VERSION_1, PROTOCOL_FEATURES, EVENT_IDX, INDIRECT_DESC = 1 << 32, 1 << 30, 1 << 29, 1 << 28
P_MEM_SLOTS = 1 << 15
P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT = 1 << 0, 1 << 3, 1 << 9, 1 << 12
NEED_REPLY = 0x8
USER_BASE = 0x7f0000000000  # the frontend's virtual address of guest address 0


def msg(code, payload=b"", fds="", need_reply=False):
    """fds: one letter per fd, 'm' the memfd, 'e' a fresh eventfd."""
    kinds = len(fds)
    for i, k in enumerate(fds):
        if k == "m":
            kinds |= 4 << i
    return bytes([code, NEED_REPLY if need_reply else 0, kinds, len(payload)]) + payload


def u64(v):
    return struct.pack("<Q", v)


def state(index, num):
    return struct.pack("<II", index, num)


def mem_region(gpa, size, user, offset):
    return struct.pack("<QQQQ", gpa, size, user, offset)


def vring_start(index, size, desc_at, avail_at, used_at, reply=False):
    addr = struct.pack("<II", index, 0) + struct.pack(
        "<QQQQ", USER_BASE + desc_at, USER_BASE + used_at, USER_BASE + avail_at, 0)
    return [
        msg(SET_VRING_NUM, state(index, size), need_reply=reply),
        msg(SET_VRING_ADDR, addr, need_reply=reply),
        msg(SET_VRING_BASE, state(index, 0), need_reply=reply),
        msg(SET_VRING_CALL, u64(index), "e"),
        msg(SET_VRING_KICK, u64(index), "e"),
        msg(SET_VRING_ENABLE, state(index, 1), need_reply=reply),
    ]


def vhost_user_messages():
    ring = blk_chain(T_IN, 1, 512) + split_ring(4, 0, 0x40, 0x60, [0])
    img = image(ring, 0x700)
    prefix = bytes([1, 1, len(img) // 16]) + img  # 2 queues of 4; the memfd holds the ring
    features = VERSION_1 | PROTOCOL_FEATURES
    handshake = [
        msg(GET_FEATURES), msg(GET_PROTOCOL_FEATURES),
        msg(SET_PROTOCOL_FEATURES, u64(P_MQ | P_REPLY_ACK | P_CONFIG | P_INFLIGHT | P_MEM_SLOTS)),
        msg(SET_OWNER), msg(GET_QUEUE_NUM), msg(GET_MAX_MEM_SLOTS),
    ]
    table = struct.pack("<II", 1, 0) + mem_region(0, 0x10000, USER_BASE, 0)
    for name, feats, tail in [
        ("full-start", features, []),
        ("event-idx-indirect", features | EVENT_IDX | INDIRECT_DESC, []),
        ("no-protocol-features", VERSION_1, []),
        ("stop-and-restart", features,
         [msg(GET_VRING_BASE, state(0, 0))] + vring_start(0, 4, 0, 0x40, 0x60)[3:5]),
        ("reset-owner", features, [msg(RESET_OWNER), msg(GET_VRING_BASE, state(0, 0))]),
    ]:
        seq = handshake + [msg(SET_FEATURES, u64(feats), need_reply=True),
                           msg(SET_MEM_TABLE, table, "m", need_reply=True)]
        seq += vring_start(0, 4, 0, 0x40, 0x60, reply=True) + tail + [msg(GET_VRING_BASE, state(0, 0))]
        write("vhost_user_messages", name, prefix + b"".join(seq))
    inflight = struct.pack("<QQHH", 0, 0, 2, 4) + bytes(4)
    seq = handshake + [
        msg(GET_INFLIGHT_FD, inflight),
        msg(SET_INFLIGHT_FD, struct.pack("<QQHH", 0x1000, 0, 2, 4) + bytes(4), "m"),
        msg(SET_FEATURES, u64(features)),
        msg(ADD_MEM_REG, u64(0) + mem_region(0, 0x10000, USER_BASE, 0), "m"),
    ] + vring_start(0, 4, 0, 0x40, 0x60) + [msg(GET_VRING_BASE, state(0, 0)),
                                             msg(REM_MEM_REG, u64(0) + mem_region(0, 0x10000, USER_BASE, 0), "m")]
    write("vhost_user_messages", "inflight-and-add-mem-reg", prefix + b"".join(seq))
    config = struct.pack("<III", 0, 60, 0) + bytes(60)
    write("vhost_user_messages", "get-config", prefix + b"".join(handshake + [msg(GET_CONFIG, config)]))
    big = struct.pack("<II", 1, 0) + mem_region(0, 0x100000, USER_BASE, 0)
    write("vhost_user_messages", "region-past-memfd",
          prefix + b"".join(handshake + [msg(SET_MEM_TABLE, big, "m", need_reply=True)]))


def http_request():
    for name, text in [
        ("get-vm", b"GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"),
        ("put-backend", b"PUT /devices/disk0/backend HTTP/1.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 22\r\n\r\n{\"socket\": \"/tmp/s.s\"}"),
        ("query", b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
        ("chunked", b"PUT /vm/shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("bad-length", b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        ("short-body", b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"),
        ("no-colon", b"GET /vm HTTP/1.1\r\nbroken\r\n\r\n"),
        ("http2", b"GET /vm HTTP/2\r\n\r\n"),
        ("bare-lf", b"GET / HTTP/1.1\nA: b\n\n"),
        ("not-utf8", b"GET /\xff HTTP/1.1\r\n\r\n"),
    ]:
        write("http_request", name, text)


def net_rxtx():
    # Ring of 4 at desc 0, avail 0x40, used 0x60; frame buffers at 0x200.
    spec = bytes([2, 0, 0, 0x4, 0x6]) + struct.pack("<HH", 0, 0)
    spec_idx = bytes([2, 1, 0, 0x4, 0x6]) + struct.pack("<HH", 0, 0)
    frame = bytes(12) + bytes([0xff] * 6) + bytes([0x52, 0x54, 0, 0, 0, 0xa]) + b"\x08\x00" + bytes(46)
    one = [(0, desc(0x200, 12, NEXT, 1) + desc(0x300, len(frame) - 12, 0, 0)),
           (0x200, frame[:12]), (0x300, frame[12:])] + split_ring(4, 0, 0x40, 0x60, [0])
    write("net_rxtx", "tap-tx", bytes([0]) + spec + image(one, 0x400))
    write("net_rxtx", "tap-tx-event-idx", bytes([0]) + spec_idx + image(one, 0x400))
    bad = [(0, desc(0x200, 12, WRITE, 0))] + split_ring(4, 0, 0x40, 0x60, [0])
    write("net_rxtx", "tap-tx-writable", bytes([0]) + spec + image(bad, 0x400))
    loop = [(0, desc(0x200, 64, NEXT, 0))] + split_ring(4, 0, 0x40, 0x60, [0])
    write("net_rxtx", "tap-tx-loop", bytes([0]) + spec + image(loop, 0x400))
    rxbufs = [(0, desc(0x200, 1526, WRITE, 0) + desc(0x900, 64, WRITE, 0))]
    rxbufs += split_ring(4, 0, 0x40, 0x60, [0, 1])
    frames = bytes([1, 2]) + struct.pack("<H", len(frame)) + frame + struct.pack("<H", 100) + bytes(100)
    write("net_rxtx", "tap-rx-merged", bytes([1]) + spec + frames + image(rxbufs, 0xa00))
    frames = bytes([0, 1]) + struct.pack("<H", 2000) + bytes(2000)
    write("net_rxtx", "tap-rx-too-big", bytes([1]) + spec_idx + frames + image(rxbufs, 0xa00))
    rx_ring = [(0, desc(0x100, 1526, WRITE, 0))] + split_ring(4, 0, 0x40, 0x60, [0])
    rx_img = image(rx_ring, 0x100)
    write("net_rxtx", "switch-flood", bytes([2]) + spec + spec + bytes([len(rx_img) // 16]) + rx_img
          + image(one, 0x400))
    write("net_rxtx", "switch-no-rx-buffers", bytes([2]) + spec + spec + bytes([0]) + image(one, 0x400))


if __name__ == "__main__":
    blk_request()
    queue_worker()
    vhost_user_messages()
    http_request()
    net_rxtx()
