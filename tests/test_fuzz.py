"""Fuzzing in the test suite: every libFuzzer target of the C code (the guest agent's protocol
parser, the monitor's agent channel and json-file log) is built with clang and RUN for a bounded
time over its corpus and its regression seeds; and Hypothesis drives the host's parsers of guest
text that test_protocol.py does not (the exec client's frame reader, the guest's /proc/meminfo,
the Python json-file writer).

A crash, leak or hang fails the test with the reproducer's path and base64; fix the C code, then
copy the input into the target's ``regressions/`` directory (replayed by every run).
``VMRT_FUZZ_SECONDS`` sets each target's time (default 20). Longer runs by hand: see
guest-agent/README.md and monitor/README.md.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrt import logfile, stats
from vmrt.agent import exec_client
from vmrt.agent import protocol as P
from vmrt.errors import VmrtError
from vmrt.logfile import LogWriter

REPO = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("VMRT_FUZZ_SECONDS", "20"))
MAX_LEN = 70000  # a frame of 64 KiB and its header; a log line past the 16 KiB piece size

# target: (source dir whose Makefile builds it, corpus, regression seeds)
TARGETS = {
    "fuzz_proto": ("guest-agent", "guest-agent/fuzz/corpus", "guest-agent/fuzz/regressions"),
    "fuzz_monitor_agent": ("monitor", "monitor/fuzz/corpus/agent", "monitor/fuzz/regressions/agent"),
    "fuzz_monitor_log": ("monitor", "monitor/fuzz/corpus/log", "monitor/fuzz/regressions/log"),
}
ARTIFACTS = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")

needs_clang = pytest.mark.skipif(shutil.which("clang") is None, reason="clang (libFuzzer) not installed")


@pytest.fixture(scope="module")
def fuzz_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzzbin")
    for src in ("guest-agent", "monitor"):
        r = subprocess.run(["make", "-s", "-j2", "-C", str(REPO / src), "fuzz", f"O={out}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def _findings(d: Path) -> str:
    lines = []
    for f in sorted(d.iterdir()):
        if f.name.startswith(ARTIFACTS):
            lines.append(f"{f} (base64 {base64.b64encode(f.read_bytes()[:4096]).decode()})")
    return "\n".join(lines)


def _run(binary: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(cwd), "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    return subprocess.run([str(binary), f"-artifact_prefix={cwd}/", "-rss_limit_mb=2048", "-timeout=10",
                           f"-max_len={MAX_LEN}", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


@needs_clang
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_runs_clean(target: str, fuzz_bin: Path, tmp_path: Path) -> None:
    _, corpus, regressions = TARGETS[target]
    seeds = [REPO / corpus, REPO / regressions]
    assert (REPO / corpus).is_dir() and any((REPO / corpus).iterdir()), f"{corpus}: no seed corpus"
    binary = fuzz_bin / target
    # 1. every seed and regression input once
    r = _run(binary, ["-runs=0", *(str(d) for d in seeds if d.is_dir())], tmp_path, 300)
    assert r.returncode == 0, f"{target} fails on a seed:\n{_findings(tmp_path)}\n{r.stderr[-3000:]}"
    # 2. fuzz for a bounded time from a copy of the corpus (new inputs are written to the first dir)
    work = tmp_path / "corpus"
    shutil.copytree(REPO / corpus, work)
    r = _run(binary, [f"-max_total_time={SECONDS}", "-print_final_stats=1", str(work),
                      *(str(d) for d in seeds[1:] if d.is_dir())], tmp_path, SECONDS + 120)
    found = _findings(tmp_path)
    assert r.returncode == 0 and not found, \
        f"{target} found a bug; once fixed, copy the input into {regressions}/:\n{found}\n{r.stderr[-4000:]}"
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units:")]
    assert runs and int(runs[0].split(":")[-1]) > 100, r.stderr[-2000:]


# --- Hypothesis: the host's parsers of guest text ----------------------------------------------

def agent_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda b: P.encode(P.Msg.STDOUT, b), st.binary(max_size=200)),
        st.builds(lambda b: P.encode(P.Msg.STDERR, b), st.binary(max_size=200)),
        st.builds(lambda s: P.encode(P.Msg.EXIT, struct.pack(">III", s, 0, 0)), st.integers(0, 300)),
        st.builds(lambda c, m: P.encode(P.Msg.ERROR, struct.pack(">I", c) + m), st.integers(0, 2**32 - 1),
                  st.binary(max_size=80)),
        st.builds(lambda p: P.encode(P.Msg.STARTED, p), st.binary(min_size=4, max_size=5)),
        st.builds(P.encode_pong, st.integers(0, 2**64 - 1)),
        st.binary(max_size=40),  # garbage, a cut frame, another client's leftovers
    )


@given(st.lists(agent_frames(), max_size=12), st.integers(1, 97))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_exec_client_frame_reader_survives_any_agent(frames: list[bytes], chunk: int) -> None:
    """What an exec port carries is the guest's: any bytes end in a status or a VmrtError
    (one line for the CLI), never another exception or a hang."""
    ours, guest = socket.socketpair()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        ours.setblocking(False)
        relay = exec_client._Relay(ours, P.ExecSpec(args=["sh"]), null, null, null)
        data = b"".join(frames)
        fed = 0
        status = None
        for _ in range(len(data) // chunk + 3):
            if fed < len(data):
                guest.sendall(data[fed:fed + chunk])
                fed += chunk
            elif guest.fileno() >= 0:
                guest.close()
            try:
                status = relay._receive()
            except VmrtError:
                return
            if status is not None:
                assert 0 <= status <= 255
                return
        raise AssertionError("the exec client neither ended nor failed after the channel closed")
    finally:
        ours.close()
        guest.close()
        os.close(null)


def test_exec_client_error_text_reaches_the_error() -> None:
    ours, guest = socket.socketpair()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        relay = exec_client._Relay(ours, P.ExecSpec(args=["sh"]), null, null, null)
        guest.sendall(P.encode(P.Msg.STDOUT, b"an earlier client's") +
                      P.encode(P.Msg.ERROR, struct.pack(">I", 127) + b"exec: \x1b[2Jnope: not found"))
        with pytest.raises(VmrtError) as e:
            relay._receive()
        assert e.value.exit_code == 127 and "\x1b[2Jnope" in str(e.value)  # escaped when printed
    finally:
        ours.close()
        guest.close()
        os.close(null)


MEMINFO = b"MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     600 kB\nBuffers: 0 kB\n"


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda a, b, junk: b"MemTotal: %s kB\n%sMemAvailable: %s kB\n" % (a, junk, b),
                           st.binary(max_size=24), st.binary(max_size=24), st.binary(max_size=40)),
                 st.builds(lambda t, a: b"MemTotal: %d kB\nMemAvailable: %d kB\n" % (t, a),
                           st.integers(0, 2**70), st.integers(0, 2**70))))
@settings(max_examples=500)
def test_guest_meminfo_parser_takes_any_text(text: bytes) -> None:
    """stats' GUEST MEM comes from the guest's /proc/meminfo: nonsense is no figure, never an error."""
    used = stats.meminfo_used(text)
    assert used is None or (isinstance(used, int) and used >= 0)


def test_guest_meminfo_parser_reads_meminfo() -> None:
    assert stats.meminfo_used(MEMINFO) == 400 * 1024
    assert stats.meminfo_used(b"MemTotal: \xd9\xa1 kB\nMemAvailable: 1 kB\n") is None  # a non-ASCII digit
    assert stats.meminfo_used(b"MemTotal: 1 kB\nMemAvailable: 2 kB\n") is None


@given(st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=600)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_python_log_writer_writes_json_lines_for_any_output(tmp_path_factory: pytest.TempPathFactory,
                                                            chunks: list[tuple[str, bytes]]) -> None:
    """The Python monitor's json-file writer (used without a built C monitor): any output bytes
    become valid JSON lines that hold all of it (bad UTF-8 as U+FFFD)."""
    path = tmp_path_factory.mktemp("log") / "container.log"
    w = LogWriter(path, logfile.Limits(1 << 30, 1))
    w.PIECE = 64  # type: ignore[misc]  # small pieces: the splitting is exercised by short inputs
    for stream, data in chunks:
        w.feed(stream, data)
    w.close()
    got: dict[str, str] = {"stdout": "", "stderr": ""}
    for line in path.read_bytes().splitlines(keepends=True):
        assert line.endswith(b"\n")
        rec = json.loads(line)
        assert set(rec) == {"log", "stream", "time"} and rec["stream"] in got
        assert rec["log"] and len(rec["log"].encode()) <= 3 * 64
        got[rec["stream"]] += rec["log"]
    for stream in got:
        raw = b"".join(d for s, d in chunks if s == stream)
        assert got[stream].encode("utf-8", "surrogatepass").count(b"\n") == raw.count(b"\n")
