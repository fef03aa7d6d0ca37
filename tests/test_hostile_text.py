"""Guest and image text is inert on the host's terminal (issue 14, part 6).

Every string an image or a guest chose that vmrt prints itself (error messages quoting a
command name, the guest agent's ERROR text, LaunchError evidence and --debug logs, ps/inspect/
images/top output, the monitor's notes in the container log) has its terminal controls escaped
(``vmrt.formatting.inert``): the attacker's ``ESC ] 0 ; pwned BEL`` (retitle the window), ``ESC
[ 2 J`` (clear the screen), C1 controls and bidi overrides arrive as ``\\x1b]0;pwned\\x07...``,
still naming the thing. The container's own stdout/stderr (run, logs, attach, exec) stays raw,
as under Docker: that stream is the container's terminal.

The attacker tests run in both isolation modes against the real CLI, runc and QEMU.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ocibuild import BUSYBOX, Layer, OciLayout, busybox_layer
from support import Vmrt

from vmrt import agentbuild, formatting
from vmrt.formatting import inert

MODES = ("process", "vm")
EVIL = "\x1b]0;pwned\x07\x1b[2J"                     # retitle the terminal, clear the screen
EVIL_MORE = EVIL + "\u009b31m\u202e\x7f\r"           # C1 CSI, a bidi override, DEL, CR
# what must never reach the terminal: C0 but \n and \t, DEL, C1, bidi controls and separators
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def assert_inert(data: bytes, *, debug: bool = False) -> str:
    """The bytes a vmrt command printed: valid UTF-8 without one terminal control (and, but
    with --debug, no traceback)."""
    assert b"\x1b" not in data and b"\x07" not in data, data
    text = data.decode("utf-8")  # no raw byte of a broken sequence either
    assert not RAW.search(text), text
    assert debug or "Traceback" not in text, text
    return text


# --- the escaping itself ------------------------------------------------------------------

@given(st.text())
def test_inert_leaves_no_control(text: str) -> None:
    out = inert(text)
    assert not RAW.search(out) and "\n" not in out and "\t" not in out
    assert inert(out) == out  # printable text is left as it is
    block = inert(text, block=True)
    assert not RAW.search(block) and block.count("\n") == text.count("\n")


@given(st.binary())
def test_inert_takes_any_bytes(data: bytes) -> None:
    out = inert(data)
    assert not RAW.search(out) and not re.search("[\ud800-\udfff]", out)
    out.encode("utf-8")  # printable as UTF-8 whatever the bytes were


def test_inert_names_what_it_escapes() -> None:
    assert inert(EVIL + "nope") == "\\x1b]0;pwned\\x07\\x1b[2Jnope"
    assert inert("a\u009bb\u202ec\x7f\r\n\t") == "a\\x9bb\\u202ec\\x7f\\x0d\\x0a\\x09"
    assert inert(b"caf\xc3\xa9 \xff") == "caf\u00e9 \\xff"
    assert inert("line 1\nline\t2\r", block=True) == "line 1\nline\t2\\x0d"
    assert inert("plain text: caf\u00e9 \u4e2d\u6587 \U0001f600") == "plain text: caf\u00e9 \u4e2d\u6587 \U0001f600"


def test_tables_and_templates_escape_cells_json_escapes_itself() -> None:
    rows = [{"Name": "box", "Command": f"sh -c '{EVIL}'"}]
    cols = [("NAMES", "Name", 0), ("COMMAND", "Command", 0)]
    for fmt in (None, "table", "{{.Command}}", "table {{.Name}}\\t{{.Command}}", "json", "{{json .}}"):
        lines = formatting.emit(fmt, rows, cols)
        assert_inert("\n".join(lines).encode())
        assert "pwned" in "".join(lines)
    assert json.loads(formatting.emit("json", rows, cols)[0]) == rows[0]  # JSON keeps the value exactly


# --- the attacks, through the real CLI -----------------------------------------------------

@pytest.fixture
def hostile_image(vmrt: Vmrt, tmp_path: Path) -> Iterator[str]:
    """busybox with control characters in its labels, command and working dir, and its own
    ``ps`` (first in PATH) that prints escape sequences: an image vmrt must show as data."""
    ps = ("#!/bin/sh\nprintf 'PID   USER     COMMAND\\n    1 root     "
          "\\033]0;pwned\\007\\033[2J\\233evil\\342\\200\\256\\n'\n")
    top = Layer().add_dir("usr").add_dir("usr/sbin").add_file("usr/sbin/ps", ps, mode=0o755)
    config = {"Cmd": ["/bin/sh", "-c", "while :; do /bin/busybox sleep 1; done", f"argv0{EVIL}"],
              "Labels": {"evil": EVIL_MORE, f"key{EVIL}": "v"},
              "WorkingDir": f"/work{EVIL}", "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"EVIL={EVIL}"]}
    lay = OciLayout(tmp_path / "layout")
    lay.add_image([busybox_layer(), top], config, ref="hostile-text")
    tar = tmp_path / "hostile-text.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted(lay.dir.iterdir()):
            tf.add(p, p.name)
    r = vmrt("load", "-i", str(tar))
    assert r.returncode == 0, r.stderr
    yield "hostile-text:latest"
    vmrt("rmi", "-f", "hostile-text:latest")


@pytest.mark.parametrize("mode", MODES)
def test_a_command_name_with_escapes_is_quoted_inert(vmrt: Vmrt, mode: str) -> None:
    """`vmrt run busybox $'\\x1b]0;pwned\\x07\\x1b[2Jnotfound'`: the 127 error names the command,
    escaped (runc's error in process mode, the guest agent's ERROR in VM mode)."""
    r = vmrt("run", "--rm", f"--isolation={mode}", "busybox", f"{EVIL}notfound", timeout=240)
    assert r.returncode == 127, r.stderr
    text = assert_inert(r.stderr)
    assert "pwned" in text and "notfound" in text and text.count("\n") == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_detached_start_failure_and_its_log_are_inert(vmrt: Vmrt, mode: str) -> None:
    """`run -d` of a missing command: the monitor (C, in VM mode the agent's ERROR text through its
    finish command) reports it to the starting vmrt and writes it to the container log."""
    name = f"hostile-text-d-{mode}"
    try:
        r = vmrt("run", "-d", "--name", name, f"--isolation={mode}", "busybox", f"{EVIL}notfound", timeout=240)
        assert r.returncode == 127, r.stderr
        assert "pwned" in assert_inert(r.stderr)
        logs = vmrt("logs", name)
        assert logs.returncode == 0, logs.stderr
        assert "pwned" in assert_inert(logs.stderr)  # vmrt's own line in the log, inert too
        ps = vmrt("ps", "-a", "--no-trunc", "--filter", f"name={name}")
        assert "pwned" in assert_inert(ps.stdout)
    finally:
        vmrt("rm", "-f", name)


@pytest.mark.parametrize("mode", MODES)
def test_hostile_image_text_is_inert_in_listings(vmrt: Vmrt, hostile_image: str, mode: str) -> None:
    name = f"hostile-text-{mode}"
    try:
        r = vmrt("run", "-d", "--name", name, f"--isolation={mode}", hostile_image, timeout=240)
        assert r.returncode == 0, r.stderr
        for args in (("ps", "--no-trunc"), ("ps", "--no-trunc", "--format", "{{.Command}}"),
                     ("ps", "--format", "table {{.Names}}\\t{{.Command}}"),
                     ("inspect", "-f", "{{.Config.Cmd}} {{.Config.WorkingDir}} {{.Config.Env}}", name),
                     ("image", "inspect", "-f", "{{.Config.Labels}} {{.Config.Cmd}}", hostile_image),
                     ("images",), ("top", name)):
            r = vmrt(*args)
            assert r.returncode == 0, (args, r.stderr)
            out = assert_inert(r.stdout) + assert_inert(r.stderr)
            if args[0] in ("inspect", "image") or "--no-trunc" in args:
                assert "pwned" in out, (args, out)
        if mode == "vm":  # the image's own ps, run inside the VM: its output is the image's text
            assert "\\x1b]0;pwned\\x07" in vmrt("top", name).stdout.decode()
        doc = vmrt("inspect", name)
        assert_inert(doc.stdout)  # JSON escapes by itself, and keeps the value exactly
        assert json.loads(doc.stdout)[0]["Config"]["WorkingDir"] == f"/work{EVIL}"
        doc = vmrt("image", "inspect", hostile_image)
        assert_inert(doc.stdout)
        assert json.loads(doc.stdout)[0]["Config"]["Labels"]["evil"] == EVIL_MORE
        # an exec of a command with escapes in its name: the 127 error, inert
        r = vmrt("exec", name, f"{EVIL}nope", timeout=120)
        assert r.returncode == 127 and "pwned" in assert_inert(r.stderr), r.stderr
    finally:
        vmrt("rm", "-f", name)


def test_a_guest_agent_error_is_inert(vmrt: Vmrt, tmp_path: Path) -> None:
    """An agent ERROR other than exec's: a working dir that cannot be made (under a file)."""
    r = vmrt("run", "--rm", "--isolation=vm", "-w", f"/etc/passwd/{EVIL}", "busybox", "true", timeout=240)
    assert r.returncode in (125, 126), r.stderr
    assert "pwned" in assert_inert(r.stderr)


def test_a_hostile_guest_console_is_inert(vmrt: Vmrt, tmp_path: Path) -> None:
    """A guest that writes escape sequences to its console and stops before its agent says HELLO
    (an initramfs of the attacker's): the error quotes the console's tail, and --debug's log
    lines (VMRT_DEBUG=1: any evidence too) are shown; all inert."""
    init = ("#!/bin/busybox sh\n/bin/busybox printf '\\033]0;pwned\\007\\033[2J\\233\\342\\200\\256"
            "guest says hi\\n' > /dev/console\n/bin/busybox reboot -f\n")  # reboot=t: QEMU exits
    cpio = agentbuild.Cpio()
    for d in ("bin", "dev", "proc", "sys"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes())
    cpio.file("init", init.encode())
    initrd = tmp_path / "hostile-initramfs.cpio"
    initrd.write_bytes(cpio.finish())
    r = vmrt("--debug", "run", "--rm", "--isolation=vm", "busybox", "true", timeout=240,
             env={"VMRT_DEBUG": "1", "VMRT_POOL": "off", "VMRT_SNAPSHOT": "off", "VMRT_INITRD": str(initrd),
                  "VMRT_TIMEOUT_AGENT_READY": "60"})
    assert r.returncode == 125, r.stderr
    text = assert_inert(r.stderr, debug=True)  # --debug: the traceback is wanted
    assert "\\x1b]0;pwned\\x07" in text and "guest says hi" in text, text


def test_container_stream_stays_raw(vmrt: Vmrt) -> None:
    """The container's own output is its terminal stream, relayed as Docker does: untouched."""
    r = subprocess.run(vmrt.cmd("run", "--rm", "--isolation=process", "busybox", "printf", "\\033[2J\\007ok"),
                       capture_output=True, env=vmrt.env, timeout=120)
    assert r.returncode == 0 and r.stdout == b"\x1b[2J\x07ok", r
