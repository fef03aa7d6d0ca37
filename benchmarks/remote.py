#!/usr/bin/env python3
"""`vmrt -H ssh://...` beside the local command, and where the difference goes (issue 21).

    python3 benchmarks/remote.py [--runs 15] [--write docs/BENCHMARKS.md]

Starts its own sshd (Debian's OpenSSH, a generated host key, 127.0.0.1 on a free port, root
login by a generated key; stopped after), then, interleaved, same machine, same state root,
warm-up runs discarded:

  local    vmrt run --rm --isolation=process busybox true
  remote   vmrt -H ssh://root@127.0.0.1:PORT run --rm --isolation=process busybox true
           (through the connection master the warm-up started: vmrt/remote/mux.py)
  remote, own connection   the same with VMRT_SSH_PERSIST=0 (a connection per command)

and the parts of the remote one, each timed on its own:

  python          `python -c pass` (both commands pay it)
  cli import      `vmrt --version` (both pay it)
  paramiko        `python -c "import paramiko"` minus `python -c pass` (remote only)
  connect+auth    TCP, key exchange, host key check, publickey auth (remote only)
  exec true       one SSH exec channel running `true`: sshd's session setup and the remote
                  user's login shell with its startup files (bash reads ~/.bashrc under sshd)
  exec vmrt       the same running the remote `vmrt --version`

Target (issue 21): remote within 0.3 s of local. A benchmark, never a test; needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmrt.remote import client  # noqa: E402
from vmrt.remote.target import parse_host  # noqa: E402

PY = sys.executable
RUN = ["run", "--rm", "--isolation=process", "busybox", "true"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.decode()}")
    return time.monotonic() - t


def start_sshd(base: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = base / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", base / "host_key"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", home / ".ssh" / "id_ed25519"], check=True)
    (base / "authorized_keys").write_text((home / ".ssh" / "id_ed25519.pub").read_text())
    (home / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{port} " + " ".join((base / "host_key.pub").read_text().split()[:2]) + "\n")
    (base / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host_key'}", f"PidFile {base / 'pid'}",
        f"AuthorizedKeysFile {base / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "PrintMotd no", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", base / "sshd_config"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, home


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms"


def p90(xs: list[float]) -> str:
    return f"{sorted(xs)[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))] * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--write", type=Path, help="Append a dated section to this markdown file.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrt-bench-ssh-") as tmp:
        proc, port, home = start_sshd(Path(tmp))
        try:
            env = {k: v for k, v in os.environ.items() if k not in ("VMRT_HOST", "VMRT_CONTEXT", "SSH_AUTH_SOCK")}
            runtime = Path(tmp) / "run"
            runtime.mkdir(mode=0o700)
            renv = {**env, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
            own = {**renv, "VMRT_SSH_PERSIST": "0"}
            url = f"ssh://root@127.0.0.1:{port}"
            local = [PY, "-m", "vmrt", *RUN]
            remote = [PY, "-m", "vmrt", "-H", url, *RUN]
            for _ in range(2):
                timed(local, env)
                timed(remote, renv)
            res: dict[str, list[float]] = {k: [] for k in (
                "local", "remote", "remote, own connection", "python", "cli import", "paramiko", "connect+auth",
                "exec true", "exec vmrt")}
            os.environ["HOME"] = str(home)  # the in-process probes' ~/.ssh
            target = parse_host(url)
            for _ in range(a.runs):
                res["local"].append(timed(local, env))
                res["remote"].append(timed(remote, renv))
                res["remote, own connection"].append(timed(remote, own))
                py = timed([PY, "-c", "pass"], env)
                res["python"].append(py)
                res["cli import"].append(timed([PY, "-m", "vmrt", "--version"], env))
                res["paramiko"].append(timed([PY, "-c", "import paramiko"], env) - py)
                t = time.monotonic()
                c = client.connect(target)
                res["connect+auth"].append(time.monotonic() - t)
                for key, command in (("exec true", "true"), ("exec vmrt", "vmrt --version")):
                    t = time.monotonic()
                    chan = c.get_transport().open_session()
                    chan.exec_command(command)
                    assert chan.recv_exit_status() == 0
                    res[key].append(time.monotonic() - t)
                c.close()
        finally:
            kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid]
            proc.terminate()
            proc.wait(10)
            for pid in kids:  # its connections: the connection master then ends too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(1)
    diff = statistics.median(res["remote"]) - statistics.median(res["local"])
    diff_own = statistics.median(res["remote, own connection"]) - statistics.median(res["local"])
    load = os.getloadavg()[0]
    lines = ["| measure | median | p90 |", "|---|---|---|"]
    lines += [f"| {k} | {med(v)} | {p90(v)} |" for k, v in res.items()]
    lines.append(f"| **remote - local** | **{diff * 1000:.0f} ms** | |")
    lines.append(f"| **remote, own connection - local** | **{diff_own * 1000:.0f} ms** | |")
    out = "\n".join(lines)
    print(out)
    print(f"target: within 300 ms: {'met' if diff <= 0.3 else 'missed'}; runs={a.runs}, load average {load:.2f}")
    if a.write:
        with open(a.write, "a") as f:
            f.write(f"\n### vmrt -H ssh:// vs local ({datetime.date.today()}, `python3 benchmarks/remote.py "
                    f"--runs {a.runs}`, {os.cpu_count()} CPUs, load average {load:.2f})\n\n{out}\n")


if __name__ == "__main__":
    main()
