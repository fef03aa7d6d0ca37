#!/usr/bin/env python3
"""Write a few valid frame streams (both directions) into the fuzz seed corpus."""
import os
import struct
import sys


def frame(t, p=b""):
    return struct.pack(">HBBI", 0x7652, 3, t, len(p)) + p


def rec(tag, v):
    return struct.pack(">BI", tag, len(v)) + v


out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
os.makedirs(out, exist_ok=True)
run = (rec(1, b"sh") + rec(1, b"-c") + rec(1, b"echo hi; cat") + rec(2, b"PATH=/bin")
       + rec(3, b"/tmp") + rec(4, b"box") + rec(5, struct.pack(">I", 1000))
       + rec(6, struct.pack(">I", 1000)) + rec(7, struct.pack(">II", 1, 2))
       + rec(8, struct.pack(">HH", 24, 80)) + rec(9, b"")
       + rec(10, struct.pack(">Q", 1700000000123456789)) + rec(11, b"rootfs")
       + rec(12, b"") + rec(99, b"unknown tag"))
seeds = {
    "ping_pong": frame(0x48, struct.pack(">Q", 1)) + frame(0x48, struct.pack(">Q", 2**64 - 1))
    + frame(0x07, struct.pack(">Q", 0)),
    "run_full": frame(0x41, run),
    "run_restored": frame(0x41, rec(1, b"true") + rec(11, b"rootfs") + rec(22, b"") + rec(23, bytes(range(64)))),
    "run_net": frame(0x41, rec(1, b"true") + rec(15, b"/etc/hosts") + rec(16, b"etc/hosts") + rec(17, bytes(4))
                     + rec(24, bytes([10, 0, 0, 2, 24, 10, 0, 0, 1, 0x02, 0x56, 0x4D, 0, 0, 2, 0x05, 0xDC, 0]))),
    "run_net6": frame(0x41, rec(1, b"true") + rec(24, bytes([10, 0, 0, 2, 24, 10, 0, 0, 1, 0x02, 0x56, 0x4D, 0, 0, 2,
                                                               0x05, 0xDC, 0]))
                      + rec(26, bytes([0xFD, 0, 0, 1] + [0] * 11 + [2]) + bytes([64])
                            + bytes([0xFD, 0, 0, 1] + [0] * 11 + [1]))),
    "run_disk": frame(0x41, rec(1, b"true") + rec(25, struct.pack(">Q", 10 << 30) + b"vda")),
    "run_disk_scratch": frame(0x41, rec(1, b"true") + rec(25, struct.pack(">Q", 10 << 30) + b"vda") + rec(27, b"")),
    "run_restored_fresh": frame(0x41, rec(1, b"true") + rec(22, b"") + rec(28, b"")),
    "run_policy": frame(0x41, rec(1, b"true") + rec(30, bytes(range(16))) + rec(31, b"/proc/kcore")
                        + rec(31, b"/sys/firmware") + rec(32, b"/proc/sys")),
    "run_min_stdin": frame(0x41, rec(1, b"cat") + rec(9, b"")) + frame(0x42, b"hello\n")
    + frame(0x43) + frame(0x44, struct.pack(">I", 15)) + frame(0x45, struct.pack(">HH", 50, 132))
    + frame(0x48, struct.pack(">Q", 7)) + frame(0x46),
    "exec_stream": frame(0x47, rec(1, b"sh") + rec(1, b"-c") + rec(1, b"id -u") + rec(2, b"PATH=/bin")
                         + rec(3, b"/tmp") + rec(5, struct.pack(">I", 1000)) + rec(9, b"") + rec(21, b"")
                         + rec(4, b"ignored"))
    + frame(0x42, b"in") + frame(0x43) + frame(0x44, struct.pack(">I", 2)),
    "exec_walk": frame(0x47, rec(1, b"vmrt-walk-upper") + rec(33, b"")) + frame(0x41, rec(1, b"x") + rec(33, b"")),
    "agent_stream": frame(0x01, struct.pack(">HHQQ", 3, 0, 1, 2) + b"vmrt-agent 0.3.0")
    + frame(0x02, struct.pack(">I", 42)) + frame(0x07, struct.pack(">Q", 7)) + frame(0x03, b"out") + frame(0x04, b"err")
    + frame(0x05, struct.pack(">III", 143, 15, 0)) + frame(0x06, struct.pack(">I", 127) + b"x"),
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
