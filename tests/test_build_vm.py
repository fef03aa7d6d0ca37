"""``vmrt build --isolation=vm``: RUN steps in micro-VMs, their layers streamed by the guest.

The stream the guest agent writes (VMRTWLK2, guest-agent/walk.c with WALK_CONTENT) is played
by an attacker against the host's parser (vmrt/agent/walk.py ``ContentParser``) without a VM;
the agent's walk itself is built here and run over a real directory (as tests/test_api_archive.py
runs the metadata walk); xattrs of a process step's layer go into the tar and back out of the
safe unpacker. The rest builds real Dockerfiles in VMs (marked ``vm``) and runs what they made
in both isolations.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import subprocess
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Vmrt, agent_walk, one_line_error
from test_api import DOCKER
from test_api import api as api_for_build  # the service fixture, registered here under this name

from vmrt.agent import protocol as P
from vmrt.agent import walk
from vmrt.build import Builder, BuildError
from vmrt.errors import LaunchError, ProtocolError
from vmrt.images import buildlayer, unpack
from vmrt.images.store import Store

assert api_for_build  # imported for pytest to find

REPO = Path(__file__).resolve().parent.parent
MADE = ("vmb:1", "vmb:2", "vmb:api", "vmb:cached", "vmb:onbase", "vmb:onchild")
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep, v2


# --- the content stream, written by an attacker ------------------------------------------------------
def _rec(path: bytes, kind: bytes = b"f", payload: bytes = b"", *, flags: int = 0, mode: int = 0o644,
         size: int | None = None, mtime: int = 0, dev: tuple[int, int] = (0, 0), owner: tuple[int, int] = (0, 0),
         xattrs: bytes = b"", xlen: int | None = None, plen: int | None = None) -> bytes:
    return walk.RECORD2.pack(len(path) if plen is None else plen, kind[0], flags, mode,
                             len(payload) if size is None else size, mtime, *dev, *owner,
                             len(xattrs) if xlen is None else xlen) + path + xattrs + payload


def _xa(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + struct.pack(">I", len(value)) + name + value


def _end(count: int) -> bytes:
    return walk.RECORD2.pack(0, 0, 0, 0, count, 0, 0, 0, 0, 0, 0)


def _read_all(stream: bytes, max_bytes: int = 1 << 30) -> list[tuple[walk.ContentEntry, bytes]]:
    f = io.BytesIO(stream)
    out = []
    for e in walk.ContentParser(f.read, max_bytes).entries():
        out.append((e, e.data.read() if e.data is not None else b""))
    return out


def _refused(stream: bytes, why: str, max_bytes: int = 1 << 30) -> None:
    with pytest.raises(ProtocolError) as e:
        _read_all(stream, max_bytes)
    msg = str(e.value)
    assert msg.startswith(walk.WHAT) and why in msg and "\n" not in msg and len(msg) < 400, msg


def test_the_content_stream_is_parsed_strictly() -> None:
    """A well-formed stream gives its entries (contents, link targets, hard links, xattrs, owners);
    anything else is refused in one line: bad paths as the metadata walk's, a lying size (a
    file longer than what the stream may hold, refused from its header; a stream that ends
    inside a file), a link target empty, too long or with a NUL, a hard link to nothing listed
    before (or to a directory, or itself), xattrs outside user.* and security.capability, twice,
    cut, or on a link, an owner of all ones, a size on a directory, a redirect dir, bytes
    after the end."""
    good = [_rec(b"etc", b"d", mode=0o755, xattrs=_xa(b"user.dir", b"1")),
            _rec(b"etc/conf", b"f", b"hello\n", owner=(1000, 50), mtime=5 * 10**9,
                 xattrs=_xa(b"user.note", b"v\xff") + _xa(b"security.capability", CAP)),
            _rec(b"etc/again", b"h", b"etc/conf"), _rec(b"etc/l", b"l", b"../x", mode=0o777),
            _rec(b"etc/gone", b"c"), _rec(b"opt", b"d", flags=walk.OPAQUE), _rec(b"opt/p", b"p"),
            _rec(b"empty", b"f")]
    got = _read_all(walk.MAGIC2 + b"".join(good) + _end(len(good)))
    names = [e.path for e, _ in got]
    assert names == ["etc", "etc/conf", "etc/again", "etc/l", "etc/gone", "opt", "opt/p", "empty"]
    conf, data = got[1]
    assert data == b"hello\n" and (conf.uid, conf.gid, conf.mtime_ns) == (1000, 50, 5 * 10**9)
    assert conf.xattrs == {"user.note": b"v\xff", "security.capability": CAP}
    assert got[2][0].hardlink and got[2][0].link == "etc/conf" and got[3][0].link == "../x"
    assert got[4][0].rdev == 0 and stat.S_ISCHR(got[4][0].mode) and got[5][0].opaque
    assert _read_all(walk.MAGIC2 + _rec(b"f", b"f", b"x" * 10) + _end(1))[0][1] == b"x" * 10
    head, d = walk.MAGIC2, _rec(b"d", b"d")
    for stream, why, bound in [
            (head + _rec(b"a" * 4097) + _end(1), "a path of 4097 bytes", 0),
            (head + d + _rec(b"d/../../etc/passwd") + _end(2), "'..'", 0),
            (head + _rec(b"/etc/passwd") + _end(1), "an absolute path", 0),
            (head + _rec(b"etc\0passwd") + _end(1), "a NUL byte", 0),
            (head + _rec(b"nodir/x") + _end(1), "before its directory", 0),
            (head + _rec(b"x") + _rec(b"x", b"d") + _end(2), "listed twice", 0),
            (head + _rec(b"x", b"?") + _end(1), "an unknown type", 0),
            (head + _rec(b"x", flags=walk.OPAQUE) + _end(1), "flags 0x01", 0),
            (head + _rec(b"x", b"d", flags=4) + _end(1), "flags 0x04", 0),
            (head + _rec(b"x", b"d", flags=walk.REDIRECT) + _end(1), "redirect_dir", 0),
            (head + _rec(b"x", mode=0o4000 | 0o10000) + _end(1), "mode bits", 0),
            (head + _rec(b"x", dev=(1, 3)) + _end(1), "a device number", 0),
            (head + _rec(b"x", owner=(2**32 - 1, 0)) + _end(1), "an owner", 0),
            (head + _rec(b"x", size=2**62) + _end(1), "more than the stream may hold", 0),  # before reading
            (head + _rec(b"x", b"f", b"abc", size=100), "inside a record", 0),  # a file cut short
            (head + _rec(b"x", b"f", b"x" * 200), "more than the stream may hold", 150),  # from its header
            (head + b"".join(_rec(b"d%d" % i, b"d") for i in range(9)), "more than 150 bytes", 150),
            (head + _rec(b"x", b"d", size=5) + _end(1), "a size of 5 bytes", 0),
            (head + _rec(b"x", b"l", b"") + _end(1), "a link target of 0 bytes", 0),
            (head + _rec(b"x", b"l", b"a" * 4097) + _end(1), "a link target of 4097 bytes", 0),
            (head + _rec(b"x", b"l", b"a\0b") + _end(1), "a NUL byte", 0),
            (head + _rec(b"x", b"h", b"nothing") + _end(1), "no regular file listed before", 0),
            (head + d + _rec(b"x", b"h", b"d") + _end(2), "no regular file listed before", 0),
            (head + _rec(b"x", b"h", b"x") + _end(1), "no regular file listed before", 0),
            (head + _rec(b"x", xattrs=_xa(b"trusted.overlay.opaque", b"y")) + _end(1), "only user.*", 0),
            (head + _rec(b"x", xattrs=_xa(b"security.selinux", b"s0")) + _end(1), "only user.*", 0),
            (head + _rec(b"x", xattrs=_xa(b"user.a", b"1") * 2) + _end(1), "twice", 0),
            (head + _rec(b"x", xattrs=_xa(b"user.a", b"1")[:-3], xlen=8) + _end(1), "a bad xattr record", 0),
            (head + _rec(b"x", xattrs=b"\x01\x00") + _end(1), "a cut xattr record", 0),
            (head + _rec(b"x", xattrs=_xa(b"user.\0a", b"")) + _end(1), "only user.*", 0),
            (head + _rec(b"x", b"l", b"t", xattrs=_xa(b"user.a", b"")) + _end(1), "xattrs on", 0),
            (head + _rec(b"x", xlen=walk.XATTRS_MAX + 1), "an xattr block of", 0),
            (head + _rec(b"x") + _end(7), "a bad end record", 0),
            (head + _end(0) + b"more", "bytes after the end record", 0),
            (head + _rec(b"x"), "cut short", 0),
            (walk.MAGIC + _end(0), "no magic", 0),
            (b"", "no walk stream", 0)]:
        _refused(stream, why, bound or 1 << 30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=48) | st.sampled_from([walk.MAGIC2, _rec(b"a", b"d"), _rec(b"a/b", b"f", b"xy"),
                                                            _rec(b"a/c", b"h", b"a/b"), _end(1), _end(2)]),
                max_size=10))
def test_any_content_stream_gives_entries_or_one_refusal(chunks: list[bytes]) -> None:
    """Whatever bytes a guest writes, the parser gives entries or a ProtocolError, nothing else."""
    try:
        _read_all(b"".join(chunks))
    except ProtocolError as e:
        assert "\n" not in str(e)


def test_a_stream_entry_becomes_layer_entries_as_a_process_steps_would(tmp_path: Path) -> None:
    """add_upper (the VM path) maps whiteouts, opaque dirs, hard links, devices and the agent's
    own /etc files as from_upper maps a process step's upper dir."""
    stream = walk.MAGIC2 + b"".join([
        _rec(b"etc", b"d", mode=0o755), _rec(b"etc/hosts", b"f", b"127.0.0.1 agent\n"),
        _rec(b"etc/new", b"f", b"n\n", xattrs=_xa(b"security.capability", CAP)), _rec(b"etc/hl", b"h", b"etc/new"),
        _rec(b"del", b"c"), _rec(b"opq", b"d", flags=walk.OPAQUE), _rec(b"dev1", b"c", dev=(1, 3)),
        _rec(b"sock", b"s")]) + _end(8)
    layer = buildlayer.LayerTar(tmp_path)
    notes: list[str] = []
    try:
        for e in walk.ContentParser(io.BytesIO(stream).read, 1 << 20).entries():
            buildlayer.add_upper(layer, e.path, e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime_ns // 10**9, rdev=e.rdev,
                                 opaque=e.opaque, link=e.link, hardlink=e.hardlink, xattrs=e.xattrs, size=e.size,
                                 data=e.data, notice=notes.append)
        layer.tar.close()
        layer.file.seek(0)
        with tarfile.open(fileobj=layer.file) as tf:
            members = {m.name: m for m in tf.getmembers()}
            assert tf.extractfile(members["etc/new"]).read() == b"n\n"  # type: ignore[union-attr]
    finally:
        layer.close()
    assert set(members) == {"etc", "etc/new", "etc/hl", ".wh.del", "opq", "opq/.wh..wh..opq"}
    assert members["etc/hl"].islnk() and members["etc/hl"].linkname == "etc/new"
    assert members["etc/new"].pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAP
    assert len(notes) == 2 and "/dev1" in notes[0] and "/sock" in notes[1]


# --- the RUN tags, both sides ----------------------------------------------------------------------
HARNESS = r"""
#include <stdio.h>
#include "proto.h"
static struct vmrt_run run;
static uint8_t buf[VMRT_MAX_PAYLOAD + 1];
int main(void)
{
	char err[256];
	size_t n = fread(buf, 1, sizeof buf, stdin);
	if (vmrt_run_parse(buf, n, &run, err, sizeof err) < 0)
		printf("error %s\n", err);
	else
		printf("walk=%d content=%d after=%d\n", run.walk, run.walk_content, run.walk_after);
	return 0;
}
"""


def test_walk_tags_are_checked_alike_by_host_and_agent(tmp_path: Path) -> None:
    """WALK_CONTENT (35) only with WALK_UPPER; WALK_AFTER (36, a build step) never with WALK_UPPER or
    a terminal; both empty: the host's encoder and decoder and the agent's parser (proto.c) agree."""
    (tmp_path / "h.c").write_text(HARNESS)
    subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-I", str(REPO / "guest-agent"), "-o", str(tmp_path / "parse"),
                    str(tmp_path / "h.c"), str(REPO / "guest-agent/proto.c")], check=True)

    def agent(payload: bytes) -> str:
        return subprocess.run([str(tmp_path / "parse")], input=payload, capture_output=True,
                              check=True).stdout.decode().strip()

    def raw(*records: tuple[int, bytes]) -> bytes:
        return struct.pack(">BI", P.Tag.ARG, 2) + b"sh" + b"".join(struct.pack(">BI", t, len(v)) + v
                                                                   for t, v in records)
    assert (P.Tag.WALK_CONTENT, P.Tag.WALK_AFTER) == (35, 36)
    after = P.encode_run(P.RunSpec(args=["sh"], walk_after=True))[8:]
    assert P.decode_run(after).walk_after and agent(after) == "walk=0 content=0 after=1"
    content = P.encode_run(P.RunSpec(args=["x"], walk=True, walk_content=True))[8:]
    back = P.decode_run(content)
    assert back.walk and back.walk_content and agent(content) == "walk=1 content=1 after=0"
    for bad, host, agent_words in [
            (raw((P.Tag.WALK_CONTENT, b"")), "WALK_CONTENT without WALK_UPPER", "WALK_CONTENT without WALK_UPPER"),
            (raw((P.Tag.WALK_AFTER, b""), (P.Tag.WALK_UPPER, b"")), "WALK_AFTER with", "WALK_AFTER with"),
            (raw((P.Tag.WALK_AFTER, b""), (P.Tag.TTY, struct.pack(">HH", 24, 80))), "WALK_AFTER with",
             "WALK_AFTER with"),
            (raw((P.Tag.WALK_AFTER, b"x")), "WALK_AFTER must be empty", "error"),
            (raw((P.Tag.WALK_CONTENT, b"x"), (P.Tag.WALK_UPPER, b"")), "WALK_CONTENT must be empty", "error")]:
        with pytest.raises(ProtocolError) as e:
            P.decode_run(bad)
        assert host in str(e.value)
        said = agent(bad)
        assert said.startswith("error") and agent_words in said, said
    with pytest.raises(ProtocolError):
        P.encode_run(P.RunSpec(args=["sh"], walk_after=True, tty=(24, 80)))
    with pytest.raises(ProtocolError):
        P.encode_run(P.RunSpec(args=["sh"], walk_content=True))


# --- the agent's content walk, run over a real directory ------------------------------------------
def _agent_walk(tmp_path: Path, rw: Path) -> bytes:
    """guest-agent/walk.c's content walk of ``rw``/upper: the raw stream."""
    return agent_walk(tmp_path, rw, content=True)


@pytest.mark.root
def test_the_agents_content_walk_streams_the_layer(tmp_path: Path) -> None:
    """The agent's walk (C) of an upper dir with a file, xattrs, a hard link, a symlink to the
    host's /etc (never followed: stored as a link), a whiteout, an opaque dir and a big file:
    parsed and written as a layer, it holds what a process step's from_upper makes of it."""
    upper = tmp_path / "rw" / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "f").write_bytes(b"content\n")
    os.chown(upper / "etc" / "f", 1234, 55)
    os.setxattr(upper / "etc" / "f", "user.note", b"n")
    os.setxattr(upper / "etc" / "f", "security.capability", CAP)
    os.setxattr(upper / "etc" / "f", "trusted.other", b"x")  # never carried
    os.link(upper / "etc" / "f", upper / "etc" / "f2")
    (upper / "etc" / "hostlink").symlink_to("/etc/shadow")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o600, 0)
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    big = os.urandom(3 << 20) + b"tail"
    (upper / "opq" / "big").write_bytes(big)
    stream = _agent_walk(tmp_path, upper.parent)
    assert stream.startswith(walk.MAGIC2)
    layers = {}
    for name, fill in (("vm", "stream"), ("process", "upper")):
        layer = buildlayer.LayerTar(tmp_path)
        try:
            if fill == "stream":
                for e in walk.ContentParser(io.BytesIO(stream).read, 1 << 30).entries():
                    buildlayer.add_upper(layer, e.path, e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime_ns // 10**9,
                                         rdev=e.rdev, opaque=e.opaque, link=e.link, hardlink=e.hardlink,
                                         xattrs=e.xattrs, size=e.size, data=e.data, notice=lambda m: None)
            else:
                buildlayer.from_upper(upper, layer, lambda m: None)
            layer.tar.close()
            layer.file.seek(0)
            with tarfile.open(fileobj=layer.file) as tf:
                layers[name] = {m.name: (m.type, m.mode, m.uid, m.gid, m.linkname if m.issym() else "", m.size,
                                         {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY")},
                                         tf.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                                for m in tf.getmembers()}
        finally:
            layer.close()
    vm, proc = layers["vm"], layers["process"]
    # the walk lists in readdir order: which name of the hard link comes first may differ
    for name in ("etc/f", "etc/f2"):
        vm.pop(name)
        proc.pop(name)
    assert vm == proc, (vm, proc)
    assert set(vm) == {"etc", "etc/hostlink", ".wh.gone", "opq", "opq/.wh..wh..opq", "opq/big"}
    assert vm["etc/hostlink"][4] == "/etc/shadow" and vm["opq/big"][7] == big
    got = _read_all(stream)
    f = next(e for e, _ in got if e.path in ("etc/f", "etc/f2") and not e.hardlink)
    assert (f.uid, f.gid) == (1234, 55) and f.xattrs == {"user.note": b"n", "security.capability": CAP}
    assert sum(1 for e, _ in got if e.hardlink) == 1


@pytest.mark.root
def test_process_step_xattrs_reach_the_layer_and_the_unpacked_image(tmp_path: Path) -> None:
    """A process step's user.* and security.capability xattrs go into its layer (PAX SCHILY.xattr)
    and the safe unpacker applies them again; trusted.* goes nowhere. (busybox, the image the
    tests build on, has no setfattr/setcap: the upper dir is made here as a RUN would leave it.)"""
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "bin").mkdir()
    (upper / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.setxattr(upper / "bin" / "tool", "security.capability", CAP)
    os.setxattr(upper / "bin" / "tool", "user.origin", b"step")
    os.setxattr(upper / "bin" / "tool", "trusted.evil", b"x")
    os.setxattr(upper / "bin", "user.dir", b"d")
    layer = buildlayer.LayerTar(tmp_path)
    try:
        buildlayer.from_upper(upper, layer, lambda m: None)
        layer.tar.close()
        layer.file.seek(0)
        data = layer.file.read()
    finally:
        layer.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tool = tf.getmember("bin/tool")
    assert set(k for k in tool.pax_headers if k.startswith("SCHILY")) == {
        "SCHILY.xattr.security.capability", "SCHILY.xattr.user.origin"}
    dest = tmp_path / "unpacked"
    dest.mkdir()
    unpack.extract(io.BytesIO(data), dest)
    assert os.getxattr(dest / "bin" / "tool", "security.capability") == CAP
    assert os.getxattr(dest / "bin" / "tool", "user.origin") == b"step"
    assert os.getxattr(dest / "bin", "user.dir") == b"d"
    assert "trusted.evil" not in os.listxattr(dest / "bin" / "tool")


# --- review findings: host memory, xattr names, links to what is left out, the run's own error ----------
class _Lazy:
    """A stream made as it is read (a guest's): ``read(n)`` as a pipe's."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts, self.buf = parts, b""

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            nxt = next(self.parts, None)
            if nxt is None:
                break
            self.buf += nxt
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _long_paths(count: int) -> Iterator[bytes]:
    """A chain of 14 directories of 200-byte names, then ``count`` files of 3 KB paths in it."""
    deep = b""
    yield walk.MAGIC2
    for _ in range(14):
        deep = (deep + b"/" if deep else b"") + b"d" * 200
        yield _rec(deep, b"d", mode=0o755)
    for i in range(count):
        yield _rec(deep + b"/" + b"%05d" % i + b"x" * 240, b"f", b"")
    yield _end(14 + count)


def test_a_walk_of_many_long_paths_keeps_no_path_in_host_memory(tmp_path: Path) -> None:
    """A guest listing 5,000 files of 3 KB paths (15 MB of names) through the parser into a
    LayerTar: the host keeps no TarInfo (tarfile's members list stays empty) and no path (the
    parser's and the layer's sets hold 16-byte digests): the peak stays far below the names' size."""
    layer = buildlayer.LayerTar(tmp_path)
    tracemalloc.start()
    try:
        for e in walk.ContentParser(_Lazy(_long_paths(5000)).read, 1 << 30).entries():
            buildlayer.add_upper(layer, e.path, e.mode, uid=e.uid, gid=e.gid, mtime=0, size=e.size, data=e.data,
                                 notice=lambda m: None)
            assert layer.tar.members == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        layer.close()
    assert layer.count == 5014 and all(len(k) == 16 for k in layer.names)
    assert peak < 6 << 20, peak  # the names alone are 15 MB
    assert layer.has("d" * 200) and not layer.has("d" * 199)


def test_metadata_has_a_budget_of_its_own() -> None:
    """Paths, xattr blocks and link targets count against ``meta_max`` whatever room the files'
    budget leaves: refused in one line as soon as they cross it, from the record's header."""
    with pytest.raises(ProtocolError) as e:
        for _ in walk.ContentParser(_Lazy(_long_paths(5000)).read, 1 << 30, meta_max=1 << 20).entries():
            pass
    msg = str(e.value)
    assert msg.startswith(walk.WHAT) and "more than 1048576 bytes of paths, xattrs and link targets" in msg, msg
    assert "\n" not in msg and ": entry " in msg
    links = walk.MAGIC2 + b"".join(_rec(b"l%d" % i, b"l", b"t" * 4000) for i in range(20)) + _end(20)
    # 80 KB of link targets against 64 KiB (the files' budget is 1 GiB); the default budget takes them
    with pytest.raises(ProtocolError, match="of paths, xattrs and link targets"):
        for _ in walk.ContentParser(io.BytesIO(links).read, 1 << 30, meta_max=64 << 10).entries():
            pass
    assert len(_read_all(links)) == 20


@pytest.mark.root  # unpacking sets the entries' owners (lchown)
def test_xattr_names_a_pax_record_cannot_carry_are_left_out_with_a_notice(tmp_path: Path) -> None:
    """``user.\\xff`` (not UTF-8: tarfile raised UnicodeEncodeError) and ``user.a=b`` (``=`` ends a PAX
    keyword: it came back as ``user.a``) are left out of the layer with a notice, in a VM step's
    stream and in a process step's upper dir; the other xattrs stay, byte for byte."""
    stream = walk.MAGIC2 + _rec(b"f", b"f", b"x", xattrs=_xa(b"user.\xff", b"1") + _xa(b"user.a=b", b"2") +
                                _xa(b"user.ok", b"3")) + _end(1)
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"x")
    for name, value in ((b"user.\xff", b"1"), (b"user.a=b", b"2"), (b"user.ok", b"3")):
        os.setxattr(upper / "f", name, value)
    for how in ("vm", "process"):
        layer = buildlayer.LayerTar(tmp_path)
        notes: list[str] = []
        try:
            if how == "vm":
                for e in walk.ContentParser(io.BytesIO(stream).read, 1 << 20).entries():
                    buildlayer.add_upper(layer, e.path, e.mode, uid=0, gid=0, mtime=0, xattrs=e.xattrs, size=e.size,
                                         data=e.data, notice=notes.append)
            else:
                buildlayer.from_upper(upper, layer, notes.append)
            layer.tar.close()
            layer.file.seek(0)
            data = layer.file.read()
        finally:
            layer.close()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            pax = tf.getmember("f").pax_headers
        assert {k: v for k, v in pax.items() if k.startswith("SCHILY")} == {"SCHILY.xattr.user.ok": "3"}, how
        assert len(notes) == 2 and all("skipping the xattr" in n and "/f" in n for n in notes), notes
        dest = tmp_path / f"unpacked-{how}"
        dest.mkdir()
        unpack.extract(io.BytesIO(data), dest)
        assert os.listxattr(dest / "f") == ["user.ok"]


@pytest.mark.root  # unpacking sets the entries' owners (lchown)
def test_a_hard_link_to_what_the_layer_leaves_out_is_left_out_too(tmp_path: Path) -> None:
    """A hard link to /etc/hosts (the agent's own, never content) or to an empty mount stub would
    name nothing in the layer (unpack fails); a hard link named /etc/hostname would bring the
    managed file in: each is left out with a notice, and the layer unpacks."""
    stream = walk.MAGIC2 + b"".join([
        _rec(b"etc", b"d", mode=0o755), _rec(b"etc/hosts", b"f", b"10.0.0.1 evil\n"), _rec(b"a", b"f", b"A\n"),
        _rec(b"stub", b"f", b""), _rec(b"to-hosts", b"h", b"etc/hosts"), _rec(b"etc/hostname", b"h", b"a"),
        _rec(b"to-stub", b"h", b"stub"), _rec(b"to-a", b"h", b"a")]) + _end(8)
    layer = buildlayer.LayerTar(tmp_path)
    notes: list[str] = []
    skipped = {"stub"}  # what the build's stub filter left out (vmrt/build.py _guest_walk)
    try:
        for e in walk.ContentParser(io.BytesIO(stream).read, 1 << 20).entries():
            if e.path == "stub":
                continue
            buildlayer.add_upper(layer, e.path, e.mode, uid=0, gid=0, mtime=0, link=e.link, hardlink=e.hardlink,
                                 size=e.size, data=e.data, notice=notes.append, skipped=skipped)
        layer.tar.close()
        layer.file.seek(0)
        data = layer.file.read()
    finally:
        layer.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
    assert names == ["etc", "a", "to-a"], names
    assert len(notes) == 3 and "/to-hosts" in notes[0] and "/etc/hostname" in notes[1] and "/to-stub" in notes[2]
    dest = tmp_path / "unpacked"
    dest.mkdir()
    unpack.extract(io.BytesIO(data), dest)
    assert (dest / "to-a").read_bytes() == b"A\n" and os.stat(dest / "to-a").st_nlink == 2


def test_the_runs_own_error_wins_over_a_walk_that_never_came(tmp_path: Path) -> None:
    """Builder._guest_walk: a run that fails before the guest's walk comes (a boot timeout, the VM's
    death) is reported as itself, not as 'no walk stream'; a walk with bad content that stopped
    the run is reported as the layer's fault; a run that ended well without a walk is one line."""
    fake = SimpleNamespace(cfg=SimpleNamespace(vm_storage_size="0", memory_mib=64))

    def walked(payload: bytes, error: Exception | None) -> None:
        layer = buildlayer.LayerTar(tmp_path)
        try:
            with Builder._guest_walk(fake, {}, layer, lambda m: None, set()) as w:  # type: ignore[arg-type]
                if payload:
                    os.write(w, payload)
                if error is not None:
                    raise error
        finally:
            layer.close()
    with pytest.raises(LaunchError, match="^the VM did not boot in 60 s$"):
        walked(b"", LaunchError("the VM did not boot in 60 s"))
    with pytest.raises(LaunchError, match="^the VM died$"):
        walked(walk.MAGIC2 + _rec(b"a", b"f", b"ab"), LaunchError("the VM died"))  # cut inside its walk
    with pytest.raises(BuildError, match="^the step's layer: .*not a content walk stream"):
        walked(b"VMRTWLK9" + bytes(100), LaunchError("cannot write the walk: Broken pipe"))
    with pytest.raises(BuildError, match="^the step's layer: .*no walk stream"):
        walked(b"", None)


# --- builds in VMs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _forget_what_the_module_built(vmrt_session: Vmrt) -> Iterator[None]:
    yield
    tags = set(vmrt_session("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode().split())
    mine = [t for t in MADE if t in tags]
    if mine:
        vmrt_session("rmi", "-f", *mine)
    vmrt_session("builder", "prune", "-a", "-f")


def _ctx(tmp: Path, dockerfile: str) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / "a.txt").write_text("alpha\n")
    return ctx


def _build(v: Vmrt, *args: str, ok: bool = True) -> str:
    r = v("build", "--isolation", "vm", *args, timeout=900)
    out = r.stdout.decode() + r.stderr.decode()
    if ok:
        assert r.returncode == 0, out
    return out


def _layer(v: Vmrt, ref: str, index: int) -> dict[str, tarfile.TarInfo]:
    store = Store(v.root)
    try:
        data = gzip.decompress(store.read_blob(store.get(ref).layers[index]["digest"]))
    finally:
        store.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def _in_both(v: Vmrt, ref: str, script: str) -> list[str]:
    outs = []
    for iso in ("process", "vm"):
        r = v("run", "--rm", "--isolation", iso, ref, "sh", "-c", script, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.decode())
    assert outs[0] == outs[1], outs
    return outs[0].split()


@pytest.mark.vm
@pytest.mark.usefixtures("_forget_what_the_module_built")
def test_vm_steps_create_modify_and_delete_with_env_user_and_workdir(vmrt: Vmrt, tmp_path: Path) -> None:
    """Three RUN steps in VMs: created, modified and deleted files (a whiteout, an opaque dir),
    a hard link and a symlink, with ENV, ARG, USER and WORKDIR applied as in process steps; the
    image runs the same in both isolations. The agent's own /etc files are no content."""
    ctx = _ctx(tmp_path, "FROM busybox\nARG GREET=hi\nENV WHO=vm\nWORKDIR /w\n"
                         "RUN mkdir -p /d/x && echo 1 > /d/x/f && echo $GREET-$WHO > f && echo del > /del "
                         "&& ln f hard && ln -s /etc/passwd sym && chmod 4755 f\n"
                         "RUN rm /del && rm -rf /d && mkdir -p /d && echo new > /d/n && echo more >> /w/f\n"
                         "USER 1000:1000\nRUN id -u > /tmp/uid; pwd > /tmp/pwd\n")
    out = _build(vmrt, "-t", "vmb:1", str(ctx))
    assert "Running in" in out and "Successfully tagged vmb:1" in out
    second = _layer(vmrt, "vmb:1", -2)
    assert ".wh.del" in second and "d/.wh..wh..opq" in second and "d/n" in second
    first = _layer(vmrt, "vmb:1", -3)
    assert "etc/hostname" not in first and "etc/hosts" not in first and "etc/resolv.conf" not in first
    assert first["w/sym"].issym() and first["w/sym"].linkname == "/etc/passwd"
    linked = [n for n in ("w/f", "w/hard") if first[n].islnk()]  # the name the walk met second
    assert len(linked) == 1 and first[linked[0]].linkname == ({"w/f", "w/hard"} - set(linked)).pop()
    assert first["w/f"].mode == first["w/hard"].mode == 0o4755
    assert _in_both(vmrt, "vmb:1", "cat /w/f; ls /d; test -e /del || echo gone; cat /tmp/uid /tmp/pwd; "
                                   "cat /w/hard; readlink /w/sym") == ["hi-vm", "more", "n", "gone", "1000", "/w",
                                                                       "hi-vm", "/etc/passwd"]
    # (the second step's append copied f up alone: overlayfs breaks the link, as under Docker)
    vmrt.assert_clean()


@pytest.mark.vm
@pytest.mark.usefixtures("_forget_what_the_module_built")
def test_vm_step_cache_hits(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY a.txt /a\nRUN cat /a > /b\n")
    first = _build(vmrt, "-t", "vmb:cached", str(ctx))
    again = _build(vmrt, "-t", "vmb:cached", str(ctx))
    assert "Running in" in first and "Running in" not in again and again.count("Using cache") == 2
    assert again.split("Successfully built ")[1].split()[0] == first.split("Successfully built ")[1].split()[0]
    assert _in_both(vmrt, "vmb:cached", "cat /b") == ["alpha"]
    vmrt.assert_clean()


@pytest.mark.vm
@pytest.mark.usefixtures("_forget_what_the_module_built")
def test_an_onbuild_run_triggered_in_a_vm_step(vmrt: Vmrt, tmp_path: Path) -> None:
    """A base image's ONBUILD COPY and RUN (stored by a process build) fire in a child built with
    --isolation=vm: the trigger's RUN runs in the guest (its kernel), with the copied file; the
    child's OnBuild list is empty."""
    base = _ctx(tmp_path / "base", "FROM busybox\nONBUILD COPY a.txt /from-child.txt\n"
                                   "ONBUILD RUN cat /from-child.txt > /triggered && uname -r >> /triggered\n")
    r = vmrt("build", "--isolation", "process", "-t", "vmb:onbase", str(base), timeout=300)
    assert r.returncode == 0, r.stderr
    child = _ctx(tmp_path / "child", "FROM vmb:onbase\nRUN echo child >> /triggered\n")
    out = _build(vmrt, "-t", "vmb:onchild", str(child))
    assert "# Executing 2 build triggers" in out and out.count("Running in") == 2, out
    r = vmrt("run", "--rm", "--isolation", "process", "vmb:onchild", "cat", "/triggered", timeout=120)
    lines = r.stdout.decode().split("\n")
    assert lines[0] == "alpha" and lines[2] == "child" and lines[1] not in ("", os.uname().release), lines
    r = vmrt("image", "inspect", "--format", "{{json .Config.OnBuild}}", "vmb:onchild")
    assert r.stdout.strip() in (b"null", b"[]"), r.stdout
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_vm_step_on_a_guest_tmpfs(vmrt: Vmrt, tmp_path: Path) -> None:
    """vm_storage_size 0: the step's writable layer is a tmpfs in the guest's RAM; the walk comes
    before the VM stops, so the layer is there all the same."""
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo ram > /on-tmpfs\n")
    r = vmrt("build", "--isolation", "vm", "-q", str(ctx), env={"VMRT_VM_STORAGE_SIZE": "0"}, timeout=900)
    assert r.returncode == 0, r.stderr
    image = r.stdout.decode().split()[-1]
    try:
        assert "on-tmpfs" in _layer(vmrt, image, -1)
        r = vmrt("run", "--rm", "--isolation", "process", image, "cat", "/on-tmpfs", timeout=120)
        assert r.stdout == b"ram\n", r.stderr
    finally:
        vmrt("rmi", image)
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_failing_vm_step_names_the_line_and_leaves_nothing(vmrt: Vmrt, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo ok > /ok\n\nRUN echo failing; exit 3\n")
    before = vmrt("images", "-q").stdout.decode().split()
    r = vmrt("build", "--isolation", "vm", "-t", "vmb:broken", str(ctx), timeout=900)
    assert r.returncode == 1, r.stderr
    errors = b"".join(ln for ln in r.stderr.splitlines(keepends=True) if not ln.startswith(b"vmrt: notice:"))
    assert one_line_error(errors) == \
        "vmrt: Dockerfile:4: The command '/bin/sh -c echo failing; exit 3' returned a non-zero code: 3"
    assert vmrt("images", "-q").stdout.decode().split() == before
    assert vmrt("ps", "-aq").stdout.decode().split() == []
    rw = vmrt.root / "rw"
    assert not any(rw.iterdir()) if rw.is_dir() else True
    assert not any((vmrt.run_root / "containers").iterdir()) if (vmrt.run_root / "containers").is_dir() else True
    vmrt.assert_clean()


@pytest.mark.vm
def test_a_vm_step_whose_vm_never_boots_tells_that(vmrt: Vmrt, tmp_path: Path) -> None:
    """A step whose VM does not boot in time fails with the boot's own line (it read 'the guest's
    walk ...: no walk stream (empty or cut short)', which hid it), and leaves nothing."""
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo never > /never\n")
    before = vmrt("images", "-q").stdout.decode().split()
    r = vmrt("build", "--isolation", "vm", str(ctx), env={"VMRT_TIMEOUT_AGENT_READY": "0.2"}, timeout=600)
    assert r.returncode == 1, r.stderr
    errors = b"".join(ln for ln in r.stderr.splitlines(keepends=True) if not ln.startswith(b"vmrt: notice:"))
    line = one_line_error(errors)
    assert line.startswith("vmrt: Dockerfile:2: ") and "timed out after 0.2s waiting for" in line, line
    assert "walk" not in line, line
    assert vmrt("images", "-q").stdout.decode().split() == before
    assert vmrt("ps", "-aq").stdout.decode().split() == []
    vmrt.assert_clean()


@pytest.mark.vm
@pytest.mark.usefixtures("_forget_what_the_module_built")
def test_a_vm_step_that_tries_to_escape_finds_only_its_vm(vmrt: Vmrt, tmp_path: Path) -> None:
    """A hostile RUN: writes /proc/sysrq-trigger, mounts, reads a host file by its path, makes a
    device node and a symlink to the host's secret for the host to follow. It reaches only the
    guest: the host's file is never read (the link is stored as a link), the host lives on."""
    secret = tmp_path / "host-secret"
    secret.write_text("HOST-ONLY\n")
    secret.chmod(0o600)
    ctx = _ctx(tmp_path, "FROM busybox\n"
                         f"RUN (echo b > /proc/sysrq-trigger) 2>/dev/null; echo sysrq=$? > /r; "
                         f"(mount -t tmpfs none /mnt) 2>/dev/null; echo mount=$? >> /r; "
                         f"(cat {secret}) >> /r 2>/dev/null; echo read=$? >> /r; "
                         f"(mknod /dev-node c 1 1) 2>/dev/null; ln -s {secret} /leak; true\n")
    _build(vmrt, "-t", "vmb:2", str(ctx))
    layer = _layer(vmrt, "vmb:2", -1)
    assert layer["leak"].issym() and layer["leak"].linkname == str(secret)
    assert "dev-node" not in layer
    r = vmrt("run", "--rm", "--isolation", "process", "vmb:2", "cat", "/r", timeout=120)
    text = r.stdout.decode()
    assert "HOST-ONLY" not in text and "read=0" not in text, text
    assert secret.read_text() == "HOST-ONLY\n"
    vmrt.assert_clean()


@pytest.mark.vm
@pytest.mark.usefixtures("_forget_what_the_module_built")
def test_post_build_with_isolation_hyperv_runs_steps_in_a_vm(request: pytest.FixtureRequest, vmrt: Vmrt,
                                                             tmp_path: Path) -> None:
    """`docker build --isolation hyperv` through the service (POST /build isolation=hyperv): the RUN
    step ran under the guest's kernel, not the host's."""
    api = request.getfixturevalue("api_for_build")
    ctx = _ctx(tmp_path, "FROM busybox\nRUN uname -r > /kernel\n")
    env = {**api.env(), "DOCKER_BUILDKIT": "0"}
    r = subprocess.run([DOCKER, "-H", f"unix://{api.sock}", "build", "--isolation", "hyperv", "-t", "vmb:api",
                        str(ctx)], capture_output=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    r = vmrt("run", "--rm", "--isolation", "process", "vmb:api", "cat", "/kernel", timeout=120)
    assert r.returncode == 0 and r.stdout.decode().strip() not in ("", os.uname().release), r.stdout
