#!/usr/bin/env python3
"""Write the seed corpus of the monitor's fuzz targets (monitor/fuzz/corpus/{agent,log}/).

Both targets read a script: one set-up byte, then ops of [op][u16 little-endian length][bytes]
(see fuzz_agent.c and fuzz_log.c for what each op and set-up bit means).
"""
import os
import shutil
import struct
import sys


def frame(t: int, p: bytes = b"") -> bytes:
    return struct.pack(">HBBI", 0x7652, 3, t, len(p)) + p


def op(o: int, data: bytes = b"") -> bytes:
    return bytes([o]) + struct.pack("<H", len(data)) + data


HELLO, STARTED, STDOUT, STDERR, EXIT, ERROR, PONG = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
AGENT, ATTACH, CONSOLE, SIGNAL, CLOCK, REAPED, HANGUP = 0, 2, 3, 4, 5, 6, 7
STDIN_OPEN, PINGS, START_TIMEOUT, VIRTIOFSD = 1, 2, 4, 8


def started() -> bytes:
    return op(AGENT, frame(STARTED, struct.pack(">I", 42)))


def exit_(status: int = 0, sig: int = 0, oom: int = 0) -> bytes:
    return op(AGENT, frame(EXIT, struct.pack(">III", status, sig, oom)))


def error(code: int, msg: bytes) -> bytes:
    return op(AGENT, frame(ERROR, struct.pack(">I", code) + msg))


out = frame(STDOUT, b"hello\n") + frame(STDERR, b"oops\n") + frame(PONG, struct.pack(">Q", 1))
agent = {
    "run_output_exit": bytes([PINGS]) + started() + op(AGENT, out) + op(CLOCK, b"\x10\x00") + exit_(3),
    "exec_not_found": bytes([0]) + error(127, b'exec: "\x1b]0;pwned\x07\x1b[2Jnotfound": executable file not found'),
    "error_bad_utf8": bytes([0]) + error(126, b"exec: \xff\xfe\xc3(\xe2\x82 \xed\xa0\x80 \xf4\x90\x80\x80 denied"),
    "error_long": bytes([0]) + error(125, "\u00e9\u20ac\U0001f600".encode() * 150),
    "attach_stdin": bytes([STDIN_OPEN | PINGS]) + started() + op(ATTACH, b"input\n" * 20)
    + op(ATTACH, b"\x00" * 3000) + op(SIGNAL, b"\x00") + op(SIGNAL, b"\x04") + op(HANGUP, b"\x01") + exit_(0),
    "console": bytes([0]) + op(CONSOLE, b"vmrt-agent: init\r\n\x1b[2J") + op(HANGUP, b"\x02") + started() + exit_(1),
    "signal_before_start": bytes([START_TIMEOUT]) + op(SIGNAL, b"\x01"),
    "start_timeout": bytes([START_TIMEOUT]) + op(CLOCK, b"\xff\xff") + op(CLOCK, b"\xff\xff"),
    "hung": bytes([PINGS]) + started() + op(CLOCK, b"\x00\x04") + op(CLOCK, b"\xff\x0f"),
    "force_kill": bytes([0]) + started() + op(SIGNAL, b"\x07") + op(AGENT, frame(STDOUT, b"bye")) + exit_(137),
    "two_terms": bytes([0]) + started() + op(SIGNAL, b"\x00") + op(SIGNAL, b"\x00") + op(CLOCK, b"\x00\x02"),
    "protocol_error": bytes([0]) + started() + op(AGENT, b"GET / HTTP/1.1\r\n\r\n"),
    "qemu_then_exit": bytes([VIRTIOFSD]) + started() + op(REAPED, b"\x01\x00") + exit_(0, 0, 1),
    "virtiofsd_dies": bytes([VIRTIOFSD]) + started() + op(REAPED, b"\x02\x09"),
    "split_frames": bytes([0]) + started() + op(AGENT, frame(STDOUT, b"split line\n")[:5])
    + op(AGENT, frame(STDOUT, b"split line\n")[5:]) + exit_(0),
    "agent_eof": bytes([0]) + started() + op(HANGUP, b"\x00") + op(CLOCK, b"\x00\x01"),
    "big_output": bytes([0]) + started() + op(AGENT, frame(STDOUT, bytes(range(256)) * 66)),  # > 16 KiB: pieces
    "hello_again": bytes([0]) + op(AGENT, frame(HELLO, struct.pack(">HHQQ", 3, 0, 1, 2) + b"vmrt-agent 0.3.0"))
    + started() + exit_(0),
}

line = b"x" * 16382 + "\u20ac".encode() + b"y" * 100 + b"\xff\n"  # a character across the 16 KiB cut
log = {
    "lines": bytes([0]) + op(0, b"a\nb\n") + op(1, b"err\n") + op(2, b"piped\npartial") + op(0, b"\r\n"),
    "long_line": bytes([0]) + op(2, line),
    "every_byte": bytes([0]) + op(0, bytes(range(256))) + op(1, bytes(range(255, -1, -1))),
    "utf8_edges": bytes([0]) + op(0, b"\xc0\x80 \xe0\x80\x80 \xed\xa0\x80 \xf4\x8f\xbf\xbf \xf4\x90\x80\x80 \xe2\x82\n"),
    "rotate_3_files": bytes([0x81]) + b"".join(op(i & 1, b"line %d\n" % i * 9) for i in range(40)),
    "rotate_drop": bytes([0x01]) + b"".join(op(0, b"%d\n" % i * 30) for i in range(30)),
    "rotate_big_record": bytes([0xc1]) + op(0, b"z" * 5000 + b"\n") + op(1, b"small\n"),
}

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
for name, seeds in (("agent", agent), ("log", log)):
    d = os.path.join(root, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for k, v in seeds.items():
        with open(os.path.join(d, k), "wb") as f:
            f.write(v)
