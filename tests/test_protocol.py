"""The host-side protocol parser: round trips, and hypothesis-driven fuzzing."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrt.agent import protocol as P
from vmrt.errors import ProtocolError

text = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


def agent_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda b: P.encode(P.Msg.STDOUT, b), st.binary(max_size=300)),
        st.builds(lambda b: P.encode(P.Msg.STDERR, b), st.binary(max_size=300)),
        st.builds(lambda s, f: P.encode(P.Msg.EXIT, struct.pack(">III", s, 0, f)),
                  st.integers(0, 255), st.integers(0, 1)),
        st.builds(lambda v: P.encode(P.Msg.HELLO, struct.pack(">HHQQ", P.VERSION, 0, 5, 6) + v.encode()), text),
        st.builds(P.encode_pong, st.integers(0, 2**64 - 1)),
    )


@given(st.lists(agent_frames(), max_size=20), st.integers(1, 64))
def test_stream_in_any_chunking_yields_the_same_frames(frames: list[bytes], chunk: int) -> None:
    stream = b"".join(frames)
    dec = P.FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += list(dec.feed(stream[i:i + chunk]))
    dec.close()
    assert [P.encode(f.type, f.payload) for f in got] == frames


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_garbage_raises_only_protocol_error(data: bytes) -> None:
    dec = P.FrameDecoder()
    try:
        for fr in dec.feed(data):
            for fn in (P.decode_hello, P.decode_exit, P.decode_error, P.decode_started, P.decode_cookie):
                try:
                    fn(fr.payload)
                except ProtocolError:
                    pass
        dec.close()
    except ProtocolError:
        pass


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_run_decoder_raises_only_protocol_error(data: bytes) -> None:
    try:
        P.decode_run(data)
    except ProtocolError:
        pass


@given(st.lists(text, min_size=1, max_size=5), st.lists(text, max_size=5), st.integers(0, 2**32 - 2),
       st.booleans(), st.one_of(st.none(), st.tuples(st.integers(1, 500), st.integers(1, 500))))
def test_run_round_trip(args: list[str], env: list[str], uid: int, stdin: bool,
                        tty: tuple[int, int] | None) -> None:
    spec = P.RunSpec(args=args, env=env, uid=uid, gid=uid, groups=[1, 2], stdin=stdin, tty=tty,
                     time_ns=123, cwd="/w", hostname="h", readonly=True, caps=uid, no_new_privs=stdin)
    frame = P.encode_run(spec)
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(frame))
    assert P.decode_run(fr.payload) == spec


def test_truncated_stream_is_rejected() -> None:
    frame = P.encode(P.Msg.STDOUT, b"hello")
    dec = P.FrameDecoder()
    assert list(dec.feed(frame[:-1])) == []
    with pytest.raises(ProtocolError, match="inside a frame"):
        dec.close()


def test_oversized_and_bad_headers_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        list(P.FrameDecoder().feed(struct.pack(">HBBI", P.MAGIC, P.VERSION, 3, P.MAX_PAYLOAD + 1)))
    with pytest.raises(ProtocolError, match="magic"):
        list(P.FrameDecoder().feed(b"GET / HTTP/1.1\r\n"))
    with pytest.raises(ProtocolError, match="version"):
        list(P.FrameDecoder().feed(struct.pack(">HBBI", P.MAGIC, 9, 3, 0)))
    with pytest.raises(ProtocolError, match="not allowed"):
        list(P.FrameDecoder().feed(P.encode(P.Msg.RUN, b"")))
    with pytest.raises(ProtocolError):
        P.encode(P.Msg.STDOUT, bytes(P.MAX_PAYLOAD + 1))


def test_unknown_run_tags_are_skipped() -> None:
    payload = struct.pack(">BI", 1, 2) + b"sh" + struct.pack(">BI", 200, 3) + b"xyz"
    assert P.decode_run(payload).args == ["sh"]


def test_run_mounts_and_limits_roundtrip() -> None:
    spec = P.RunSpec(args=["sh"], mounts=[
        P.MountSpec("/data", "volumes/0", int(P.MountFlag.RO)),
        P.MountSpec("/scratch", None, int(P.MountFlag.TMPFS | P.MountFlag.NOEXEC), "size=1m,mode=1777")],
        memory_max=32 << 20, pids_max=10)
    frame = P.encode_run(spec)
    back = P.decode_run(frame[P.HDR_LEN:] if hasattr(P, "HDR_LEN") else frame[8:])
    assert back.mounts == spec.mounts and back.memory_max == 32 << 20 and back.pids_max == 10


NET_EXAMPLE = P.NetSpec("10.0.0.2", 24, "10.0.0.1", "02:56:4d:00:00:02", 1500)


def _net_payload(*values: bytes) -> bytes:
    return struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + b"".join(struct.pack(">BI", P.Tag.NET, len(v)) + v
                                                               for v in values)


@given(st.ip_addresses(v=4), st.integers(1, 32), st.one_of(st.none(), st.ip_addresses(v=4).filter(int)),
       st.binary(min_size=6, max_size=6), st.one_of(st.just(0), st.integers(68, 65535)))
def test_run_net_round_trip(addr: object, prefix: int, gw: object | None, mac: bytes, mtu: int) -> None:
    unicast = bytes([mac[0] & 0xFE]) + mac[1:]
    net = P.NetSpec(str(addr), prefix, None if gw is None else str(gw), unicast.hex(":"), mtu)
    spec = P.RunSpec(args=["sh"], hostname="h", seed=bytes(16), net=net)
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(P.encode_run(spec)))
    assert P.decode_run(fr.payload) == spec
    assert P.decode_run(P.encode_run(P.RunSpec(args=["sh"]))[8:]).net is None


def test_net_wire_layout() -> None:
    # u32 address, u8 prefix, u32 gateway, 6 bytes MAC, u16 MTU, u8 flags: 18 bytes, big-endian
    assert P.Tag.NET == 24 and P.VERSION == 3
    assert P.encode_net(NET_EXAMPLE) == bytes.fromhex("0a000002" "18" "0a000001" "02564d000002" "05dc" "00")
    nogw = P.NetSpec("192.168.1.9", 32, None, "AA:BB:CC:DD:EE:FF")
    assert P.encode_net(nogw) == bytes.fromhex("c0a80109" "20" "00000000" "aabbccddeeff" "0000" "00")
    assert P.decode_net(P.encode_net(nogw)) == P.NetSpec("192.168.1.9", 32, None, "aa:bb:cc:dd:ee:ff")
    frame = P.encode_run(P.RunSpec(args=["sh"], net=NET_EXAMPLE))
    assert frame.endswith(struct.pack(">BI", 24, 18) + P.encode_net(NET_EXAMPLE))


def test_net_is_checked_as_the_agent_does() -> None:
    good = P.encode_net(NET_EXAMPLE)
    for prefix in (0, 33, 255):
        with pytest.raises(ProtocolError, match=r"NET prefix must be 1\.\.32"):
            P.decode_run(_net_payload(good[:4] + bytes([prefix]) + good[5:]))
        with pytest.raises(ProtocolError, match=r"NET prefix must be 1\.\.32"):
            P.encode_net(P.NetSpec("10.0.0.2", prefix, None, "02:00:00:00:00:01"))
    with pytest.raises(ProtocolError, match="multicast"):
        P.decode_run(_net_payload(good[:9] + b"\x01" + good[10:]))
    with pytest.raises(ProtocolError, match="multicast"):
        P.encode_net(P.NetSpec("10.0.0.2", 24, None, "01:00:5e:00:00:01"))
    for bad in (good[:-1], good + b"\0", b""):
        with pytest.raises(ProtocolError, match="NET must be 18 bytes"):
            P.decode_run(_net_payload(bad))
    with pytest.raises(ProtocolError, match="more than one NET record"):
        P.decode_run(_net_payload(good, good))
    with pytest.raises(ProtocolError, match="MTU"):
        P.decode_run(_net_payload(good[:15] + struct.pack(">H", 67) + good[17:]))
    with pytest.raises(ProtocolError, match="MTU"):
        P.encode_net(P.NetSpec("10.0.0.2", 24, None, "02:00:00:00:00:01", 70000))
    with pytest.raises(ProtocolError, match="flags must be 0"):
        P.decode_run(_net_payload(good[:17] + b"\x01"))
    for net in (P.NetSpec("10.0.0.256", 24, None, "02:00:00:00:00:01"),
                P.NetSpec("10.0.0.2", 24, "::1", "02:00:00:00:00:01"),
                P.NetSpec("10.0.0.2", 24, None, "02:00:00:00:00"),
                P.NetSpec("10.0.0.2", 24, None, "02-00-00-00-00-01")):
        with pytest.raises(ProtocolError):
            P.encode_net(net)
    # an EXEC ignores NET, as it ignores the other RUN-only tags
    assert P.decode_exec(_net_payload(good)) == P.ExecSpec(args=["sh"])


def test_mount_records_need_a_mount_first() -> None:
    import struct
    payload = struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + struct.pack(">BI", P.Tag.MOUNT_FLAGS, 4) + b"\0\0\0\1"
    with pytest.raises(P.ProtocolError):
        P.decode_run(payload)


@given(st.lists(text, min_size=1, max_size=5), st.lists(text, max_size=5), st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 2**32 - 1), max_size=4), st.booleans(), st.booleans(),
       st.one_of(st.none(), st.tuples(st.integers(0, 65535), st.integers(0, 65535))))
def test_exec_round_trip(args: list[str], env: list[str], uid: int, groups: list[int], stdin: bool,
                         detach: bool, tty: tuple[int, int] | None) -> None:
    spec = P.ExecSpec(args=args, env=env, cwd="/srv/x", uid=uid, gid=uid ^ 1, groups=groups, tty=tty,
                      stdin=stdin, detach=detach)
    frame = P.encode_exec(spec)
    assert frame[2] == P.VERSION == 3 and frame[3] == P.Msg.EXEC == 0x47
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(frame))
    assert fr.type == P.Msg.EXEC
    assert P.decode_exec(fr.payload) == spec
    # the agent parses EXEC with the RUN parser: the shared records decode the same way
    run = P.decode_run(fr.payload)
    assert (run.args, run.env, run.cwd, run.uid, run.groups, run.tty, run.stdin) == (
        spec.args, spec.env, spec.cwd, spec.uid, spec.groups, spec.tty, spec.stdin)


def test_exec_ignores_run_only_tags_and_checks_its_own() -> None:
    payload = (struct.pack(">BI", P.Tag.ARG, 2) + b"id" + struct.pack(">BI", P.Tag.HOSTNAME, 1) + b"h"
               + struct.pack(">BI", P.Tag.MEMORY_MAX, 8) + bytes(8) + struct.pack(">BI", P.Tag.DETACH, 0))
    assert P.decode_exec(payload) == P.ExecSpec(args=["id"], detach=True)
    with pytest.raises(ProtocolError, match="DETACH"):
        P.decode_exec(struct.pack(">BI", P.Tag.ARG, 2) + b"id" + struct.pack(">BI", P.Tag.DETACH, 1) + b"x")
    with pytest.raises(ProtocolError, match="without ARG"):
        P.decode_exec(b"")
    with pytest.raises(ProtocolError):
        P.encode_exec(P.ExecSpec(args=[]))
    with pytest.raises(ProtocolError, match="not absolute"):
        P.encode_exec(P.ExecSpec(args=["true"], cwd="rel"))


def test_exec_is_host_to_agent_only_and_version_1_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not allowed"):
        list(P.FrameDecoder(P.FROM_AGENT).feed(P.encode_exec(P.ExecSpec(args=["true"]))))
    with pytest.raises(ProtocolError, match="version 1"):
        list(P.FrameDecoder().feed(struct.pack(">HBBI", P.MAGIC, 1, P.Msg.STDOUT, 0)))


@given(st.integers(0, 2**64 - 1))
def test_ping_pong_round_trip(cookie: int) -> None:
    ping = P.encode_ping(cookie)
    assert ping[:4] == bytes([0x76, 0x52, P.VERSION, 0x48]) and len(ping) == 16
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(ping))
    assert fr.type == P.Msg.PING and P.decode_cookie(fr.payload) == cookie
    # the agent echoes the cookie
    pong = P.encode_pong(P.decode_cookie(fr.payload))
    assert pong[:4] == bytes([0x76, 0x52, P.VERSION, 0x07])
    (back,) = list(P.FrameDecoder(P.FROM_AGENT).feed(pong))
    assert back.type == P.Msg.PONG and P.decode_cookie(back.payload) == cookie


def test_ping_pong_directions_sizes_and_version() -> None:
    assert P.VERSION == 3  # PING/PONG are new message types: a version-2 peer would reject them
    with pytest.raises(ProtocolError, match="not allowed"):
        list(P.FrameDecoder(P.FROM_AGENT).feed(P.encode_ping(1)))
    with pytest.raises(ProtocolError, match="not allowed"):
        list(P.FrameDecoder(P.FROM_HOST).feed(P.encode_pong(1)))
    for bad in (b"", bytes(7), bytes(9)):
        with pytest.raises(ProtocolError, match="8 bytes"):
            P.decode_cookie(bad)
    with pytest.raises(ProtocolError, match="version 2"):
        list(P.FrameDecoder().feed(struct.pack(">HBBI", P.MAGIC, 2, P.Msg.STDOUT, 0)))


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_exec_decoder_raises_only_protocol_error(data: bytes) -> None:
    try:
        P.decode_exec(data)
    except ProtocolError:
        pass


def test_exec_client_skips_an_earlier_sessions_leftovers() -> None:
    import socket

    from vmrt.agent.exec_client import _Relay
    a, b = socket.socketpair()
    try:
        r = _Relay(a, P.ExecSpec(args=["true"]), 0, 1, 2)
        stale = P.encode(P.Msg.STDOUT, b"old output") + P.encode(P.Msg.EXIT, struct.pack(">III", 0, 0, 0))
        mine = (P.encode(P.Msg.STARTED, struct.pack(">I", 7)) + P.encode(P.Msg.STDOUT, b"new")
                + P.encode(P.Msg.EXIT, struct.pack(">III", 3, 0, 0)))
        stream = stale[5:] + b"vR" + stale + mine  # a frame's tail, a lone magic, whole stale frames
        got = []
        for i in range(0, len(stream), 3):
            got += [(f.type, f.payload) for f in r._frames(stream[i:i + 3])]
        assert got == [(P.Msg.STARTED, struct.pack(">I", 7)), (P.Msg.STDOUT, b"new"),
                       (P.Msg.EXIT, struct.pack(">III", 3, 0, 0))]
    finally:
        a.close()
        b.close()


def _disk_payload(*values: bytes) -> bytes:
    return struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + b"".join(
        struct.pack(">BI", P.Tag.UPPER_DISK, len(v)) + v for v in values)


@given(st.integers(1, (1 << 55) - 1), st.from_regex(r"[a-z0-9]{1,31}", fullmatch=True))
def test_run_upper_disk_round_trip(sectors: int, name: str) -> None:
    disk = P.DiskSpec(name, sectors * 512)
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(P.encode_run(P.RunSpec(args=["sh"], upper_disk=disk))))
    assert P.decode_run(fr.payload).upper_disk == disk
    assert P.decode_run(P.encode_run(P.RunSpec(args=["sh"]))[8:]).upper_disk is None


def test_upper_disk_wire_layout_and_checks() -> None:
    # tag 25: u64 capacity (big-endian), then the name under /dev, as the agent parses it (proto.c)
    assert P.Tag.UPPER_DISK == 25
    frame = P.encode_run(P.RunSpec(args=["sh"], upper_disk=P.DiskSpec("vda", 64 << 20)))
    assert frame.endswith(struct.pack(">BIQ", 25, 11, 64 << 20) + b"vda")
    good = struct.pack(">Q", 1 << 30) + b"vda"
    for size in (0, 511, (1 << 30) + 1):
        with pytest.raises(ProtocolError, match="whole 512-byte sectors"):
            P.decode_run(_disk_payload(struct.pack(">Q", size) + b"vda"))
        with pytest.raises(ProtocolError, match="whole 512-byte sectors"):
            P.encode_disk(P.DiskSpec("vda", size))
    for name in (b"../sda", b"vda/", b"VDA", b"v\0a", b"\xff", b"a" * 32):
        with pytest.raises(ProtocolError):
            P.decode_run(_disk_payload(struct.pack(">Q", 1 << 30) + name))
    for bad in (good[:8], b""):
        with pytest.raises(ProtocolError, match="UPPER_DISK must be 9 to 39 bytes"):
            P.decode_run(_disk_payload(bad))
    with pytest.raises(ProtocolError, match="more than one UPPER_DISK record"):
        P.decode_run(_disk_payload(good, good))
    # an EXEC ignores it, as the other RUN-only tags
    assert P.decode_exec(_disk_payload(good)) == P.ExecSpec(args=["sh"])


def test_disk_scratch_needs_the_disk_and_is_empty() -> None:
    """DISK_SCRATCH (tag 27, run --rm): the agent skips its sync before EXIT; checked as proto.c does."""
    assert P.Tag.DISK_SCRATCH == 27
    disk = P.DiskSpec("vda", 64 << 20)
    frame = P.encode_run(P.RunSpec(args=["sh"], upper_disk=disk, disk_scratch=True))
    assert frame.endswith(struct.pack(">BI", 27, 0))
    assert P.decode_run(frame[8:]).disk_scratch and not P.decode_run(P.encode_run(
        P.RunSpec(args=["sh"], upper_disk=disk))[8:]).disk_scratch
    with pytest.raises(ProtocolError, match="DISK_SCRATCH without UPPER_DISK"):
        P.encode_run(P.RunSpec(args=["sh"], disk_scratch=True))
    with pytest.raises(ProtocolError, match="DISK_SCRATCH without UPPER_DISK"):
        P.decode_run(_payload((P.Tag.DISK_SCRATCH, b"")))
    with pytest.raises(ProtocolError, match="DISK_SCRATCH must be empty"):
        P.decode_run(_disk_payload(struct.pack(">Q", 1 << 30) + b"vda") + struct.pack(">BI", 27, 1) + b"x")


def test_share_fresh_needs_the_9p_share_and_is_empty() -> None:
    """SHARE_FRESH (tag 28, a restored VM on a user network): 9p cache=mmap; checked as proto.c does."""
    assert P.Tag.SHARE_FRESH == 28
    frame = P.encode_run(P.RunSpec(args=["sh"], share_9p=True, share_fresh=True))
    assert struct.pack(">BI", 28, 0) in frame
    assert P.decode_run(frame[8:]).share_fresh
    assert not P.decode_run(P.encode_run(P.RunSpec(args=["sh"], share_9p=True))[8:]).share_fresh
    with pytest.raises(ProtocolError, match="SHARE_FRESH without SHARE_9P"):
        P.encode_run(P.RunSpec(args=["sh"], share_fresh=True))
    with pytest.raises(ProtocolError, match="SHARE_FRESH without SHARE_9P"):
        P.decode_run(_payload((P.Tag.SHARE_FRESH, b"")))
    with pytest.raises(ProtocolError, match="SHARE_FRESH must be empty"):
        P.decode_run(_payload((P.Tag.SHARE_9P, b""), (P.Tag.SHARE_FRESH, b"x")))


def _payload(*records: tuple[int, bytes]) -> bytes:
    return struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + b"".join(struct.pack(">BI", t, len(v)) + v for t, v in records)


@given(st.binary(min_size=1, max_size=64).map(lambda b: b * 8),
       st.lists(st.from_regex(r"(/[a-z_]{1,12}){1,3}", fullmatch=True), max_size=5),
       st.lists(st.from_regex(r"(/[a-z_]{1,12}){1,3}", fullmatch=True), max_size=5))
def test_run_seccomp_and_masks_round_trip(prog: bytes, masked: list[str], ro: list[str]) -> None:
    spec = P.RunSpec(args=["sh"], seccomp=prog, masked=masked, ro_paths=ro)
    (fr,) = list(P.FrameDecoder(P.FROM_HOST).feed(P.encode_run(spec)))
    assert P.decode_run(fr.payload) == dataclasses.replace(spec, time_ns=None)


def test_seccomp_and_mask_records_are_checked() -> None:
    assert (P.Tag.SECCOMP, P.Tag.MASKED, P.Tag.RO_PATH) == (30, 31, 32)
    for bad in (b"", b"\0" * 7, b"\0" * 9, b"\0" * (4097 * 8)):
        with pytest.raises(ProtocolError, match="SECCOMP must be"):
            P.decode_run(_payload((P.Tag.SECCOMP, bad)))
    with pytest.raises(ProtocolError, match="more than one SECCOMP"):
        P.decode_run(_payload((P.Tag.SECCOMP, b"\0" * 8), (P.Tag.SECCOMP, b"\0" * 8)))
    for path in (b"proc/kcore", b"/proc/../etc", b"/proc//x", b"/proc/./x", b"/proc/x/", b"/p\0x"):
        with pytest.raises(ProtocolError):
            P.decode_run(_payload((P.Tag.MASKED, path)))
        with pytest.raises(ProtocolError):
            P.encode_run(P.RunSpec(args=["sh"], ro_paths=[path.decode()]))
    with pytest.raises(ProtocolError, match="more than 64 MASKED"):
        P.decode_run(_payload(*[(P.Tag.MASKED, f"/p{i}".encode()) for i in range(65)]))
    # an EXEC ignores them: the container's filter and masks apply
    assert P.decode_exec(_payload((P.Tag.SECCOMP, b"\0" * 8), (P.Tag.MASKED, b"/x"))) == P.ExecSpec(args=["sh"])
