"""``vmrt check isolation``: benign probes, run the same way in both modes.

Each probe is read inside a container by one shell script (busybox tools) and
compared with the host's own value, so the table says what the boundary hid:
``host's`` (the container sees the host's value), ``own`` (a value of its own:
a guest kernel), ``hidden`` (namespaces hide it), ``absent`` (a different
kernel: there is nothing of the host to see). No probe attempts an escape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import bundle, seccomp, syscalls
from .errors import VmrtError
from .formatting import inert
from .proc import vmrt_here

MODES = ("process", "vm")
# Syscalls the default seccomp profile allows that the guest kernel answers with ENOSYS where a
# Debian host's kernel has them, and why (docs/ISOLATION.md lists the same; the ENOSYS probe and
# tests/test_policy.py pin it).
INTENDED_ENOSYS: dict[str, str] = {}
SCRIPT = r"""
echo "kernel=$(uname -r)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "pids=$(ls -d /proc/[0-9]* 2>/dev/null | wc -l)"
echo "mounts=$(cat /proc/mounts | tr '\n' '|')"
echo "ifaces=$(for i in /sys/class/net/*; do echo "${i##*/}=$(cat $i/address)"; done 2>/dev/null | tr '\n' ' ')"
if [ -r /proc/modules ]; then echo "modules=$(wc -l < /proc/modules)"; else echo "modules=-"; fi
if d=$(dmesg 2>/dev/null); then echo "dmesg=$(echo "$d" | wc -l)"; else echo "dmesg=-"; fi
echo "firmware=$(ls /sys/firmware 2>/dev/null | tr '\n' ' ')"
echo "self_fd=$(for f in /proc/self/fd/*; do readlink $f; done 2>/dev/null | tr '\n' ' ')"
echo "proc1_exe=$(readlink /proc/1/exe 2>&1)"
echo "families=$(for f in unix:unix inet:tcp inet6:if_inet6 packet:packet netlink:netlink; do
  [ -e /proc/net/${f#*:} ] && printf '%s ' ${f%%:*}; done)"
echo "pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null) / $(cat /proc/sys/kernel/threads-max 2>/dev/null)"
echo "namespaces=$(ls /proc/self/ns 2>/dev/null | tr '\n' ' ')"
echo "cgroups=$(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null || echo -)"
if [ -x /.vmrt-probe/vmrt-enosys ]; then echo "enosys=$(/.vmrt-probe/vmrt-enosys $PROBE_NRS | tr '\n' ',')"; fi
"""
# the ENOSYS probe's programs, bound read-only into the probe container
PROBE_DIR = "/.vmrt-probe"
PROBES = [
    ("kernel", "kernel release (uname -r)"),
    ("boot_id", "boot id"),
    ("uptime", "uptime"),
    ("pids", "host PIDs"),
    ("mounts", "host mounts / paths"),
    ("ifaces", "host network interfaces"),
    ("modules", "/proc/modules"),
    ("dmesg", "dmesg"),
    ("firmware", "/sys/firmware"),
    ("self_fd", "/proc/self/fd"),
    ("proc1_exe", "/proc/1/exe"),
    ("workdir_fd", "-w /proc/self/fd/N"),
    # what the kernel behind the container offers programs (issue 16): where the modes differ, a
    # program finds out here rather than by failing
    ("families", "address families (/proc/net)"),
    ("pid_max", "pid_max / threads-max"),
    ("namespaces", "namespaces (/proc/self/ns)"),
    ("cgroups", "cgroup controllers"),
    ("io_uring", "io_uring_setup"),
    ("enosys", "ENOSYS of the allowed syscalls"),
    # the host side: the process that runs the tenant's code there (process mode: the container's
    # init; VM mode: QEMU, which parses everything the guest does)
    ("host_proc", "host: its process"),
    ("host_uid", "host: that process's uid"),
    ("host_caps", "host: its capabilities"),
    ("host_seccomp", "host: seccomp, no_new_privs"),
    ("host_root", "host: its root directory"),
    ("host_cgroup", "host: its memory cgroup"),
    ("vm_driver", "host: VM driver, confinement"),
]


def _host() -> dict[str, Any]:
    def read(p: str) -> str:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return ""
    return {
        "kernel": os.uname().release,
        "boot_id": read("/proc/sys/kernel/random/boot_id"),
        "uptime": float(read("/proc/uptime").split()[0]),
        "pids": sum(1 for p in os.listdir("/proc") if p.isdigit()),
        # by name and MAC: a container's own eth0 is not the host's eth0
        "ifaces": {f"{i}={read(f'/sys/class/net/{i}/address')}" for i in os.listdir("/sys/class/net")} - {
            "lo=00:00:00:00:00:00"},
    }


def _vmrt(args: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vmrt_here(*args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=300)


def classify(raw: dict[str, str], host: dict[str, Any], state_root: str) -> dict[str, str]:
    """One verdict per probe, from the container's raw values and the host's."""
    same_kernel = raw.get("kernel") == host["kernel"] and raw.get("boot_id") == host["boot_id"]
    out: dict[str, str] = {}
    out["kernel"] = f"{raw.get('kernel')} ({'host' if raw.get('kernel') == host['kernel'] else 'own'})"
    bid = raw.get("boot_id", "")
    out["boot_id"] = f"{bid[:8]}… ({'host' if bid == host['boot_id'] else 'own'})" if bid else "denied"
    try:
        up = float(raw.get("uptime", "nan"))
        out["uptime"] = f"{up:.0f}s ({'host' if abs(up - host['uptime']) < 30 else 'own'})"
    except ValueError:
        out["uptime"] = "denied"
    n = int(raw["pids"]) if raw.get("pids", "").isdigit() else 0   # the container's output
    out["pids"] = (f"{n} seen ({'visible' if n >= host['pids'] // 2 else 'hidden'})" if same_kernel
                   else f"{n} seen (absent: other kernel)")
    leaks = state_root in raw.get("mounts", "")
    out["mounts"] = ("host paths in /proc/mounts" if leaks else "no host paths") + (
        "" if same_kernel else " (absent: other kernel)")
    ifaces = set(raw.get("ifaces", "").split()) - {"lo=00:00:00:00:00:00"}
    shown = ifaces & host["ifaces"]
    out["ifaces"] = (f"visible: {' '.join(sorted(shown))}" if shown and same_kernel
                     else "hidden" if same_kernel else "absent (other kernel)")
    mods = raw.get("modules", "-")
    out["modules"] = "not readable" if mods == "-" else f"{mods} lines ({'host' if same_kernel else 'own'})"
    dm = raw.get("dmesg", "-")
    out["dmesg"] = "not readable" if dm == "-" else f"{dm} lines ({'host' if same_kernel else 'own'})"
    fw = raw.get("firmware", "").strip()
    out["firmware"] = (fw or "empty") + ("" if not fw else f" ({'host' if same_kernel else 'own'})")
    fds = raw.get("self_fd", "").split()
    hostish = [t for t in fds if t.startswith("/") and not t.startswith(("/dev/", "/proc/"))]
    out["self_fd"] = f"host files: {' '.join(hostish)}" if hostish else "nothing of the host"
    exe = raw.get("proc1_exe", "")
    out["proc1_exe"] = f"{exe} (container's)" if exe.startswith("/") and not exe.startswith(state_root) else exe
    out["workdir_fd"] = raw.get("workdir_fd", "")
    for key in ("families", "pid_max", "namespaces", "cgroups"):
        out[key] = " ".join(raw.get(key, "").split()) or "-"
    out.update(enosys_rows(raw.get("enosys", "")))
    return out


def probe_numbers() -> dict[int, str]:
    """{number: name}: the syscalls the default profile allows outright, and io_uring_setup,
    which it refuses: what the ENOSYS probe asks about."""
    table = syscalls.numbers()
    names = [*syscalls.allowed(seccomp.default_profile(list(bundle.DEFAULT_CAPS))), "io_uring_setup"]
    return {table[n]: n for n in names}


def enosys_rows(text: str) -> dict[str, str]:
    """The probe's "NR ENOSYS|ok," answers as the io_uring and ENOSYS rows."""
    if not text:
        return {"io_uring": "not probed", "enosys": "not probed"}
    names = probe_numbers()
    answers: dict[str, str] = {}
    for item in filter(str.strip, text.split(",")):   # the container's output: parsed strictly
        nr, _, verdict = item.strip().partition(" ")
        if not nr.isdigit() or int(nr) not in names or verdict not in ("ENOSYS", "ok", "unknown"):
            return {"io_uring": "unreadable probe output", "enosys": "unreadable probe output"}
        answers[names[int(nr)]] = verdict
    missing = sorted(n for n, v in answers.items() if v == "ENOSYS" and n != "io_uring_setup")
    return {"io_uring": "refused (ENOSYS)" if answers.get("io_uring_setup") == "ENOSYS" else "allowed",
            "enosys": f"{len(missing)} of {len(answers) - 1}" + (f": {' '.join(missing)}" if missing else "")}


def host_side(pid: int, run_root: str, jail_uid_base: int) -> dict[str, str]:
    """What the host gives the process that runs a container's code (read from /proc)."""
    try:
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        root = os.readlink(f"/proc/{pid}/root")
        cgroup = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        own_ns = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError as e:
        return {"host_proc": f"unreadable ({e.strerror})"}
    uid = int(status["Uid"].split()[0])
    caps = int(status["CapEff"].strip(), 16)
    mem = next((ln.split(":", 2)[2] for ln in cgroup if ":memory:" in ln or ln.startswith("0::")), "?")
    return {
        "host_proc": os.path.basename(cmd),
        "host_uid": f"{uid} ({'root' if uid == 0 else 'jail range' if uid >= jail_uid_base else 'unprivileged'})",
        "host_caps": "none" if caps == 0 else f"{bin(caps).count('1')} (CapEff {caps:#x})",
        "host_seccomp": f"{ {'0': 'off', '1': 'strict', '2': 'filter'}.get(status.get('Seccomp', '').strip(), '?')}, "
                        f"no_new_privs={status.get('NoNewPrivs', '?').strip()}",
        "host_root": (root.replace(run_root, "<run root>", 1) if root != "/" else
                      "/ of the host" if own_ns else "/ of its own mount namespace (its rootfs)"),
        "host_cgroup": mem,
    }


def _host_probe(mode: str, image: str, env: dict[str, str] | None, run_root: str,
                jail_uid_base: int) -> dict[str, str]:
    name = f"vmrt-check-{os.getpid()}-{mode}"
    r = _vmrt(["run", "-d", "--name", name, f"--isolation={mode}", "--network", "none", image, "sleep", "300"], env)
    try:
        if r.returncode != 0:
            return {"host_proc": f"could not start a container ({r.returncode})"}
        pid = _vmrt(["inspect", "--format", "{{.State.Pid}}", name], env).stdout.strip()
        return host_side(int(pid), run_root, jail_uid_base) if pid.isdigit() else {"host_proc": "no PID"}
    finally:
        _vmrt(["rm", "-f", name], env)


def run_probes(image: str, env: dict[str, str] | None, state_root: str, run_root: str = "/run/vmrt",
               jail_uid_base: int = 1 << 30, probe: Path | None = None) -> dict[str, dict[str, str]]:
    """Every probe in both modes; ``probe`` is the built ENOSYS probe (None: those rows say so)."""
    host = _host()
    result: dict[str, dict[str, str]] = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix="vmrt-probe-") as d:
            os.chmod(d, 0o755)    # the probe program only: no tenant data
            mount: list[str] = []
            if probe is not None:
                shutil.copy2(probe, Path(d) / probe.name)
                mount = ["-v", f"{d}:{PROBE_DIR}:ro", "-e", f"PROBE_NRS={' '.join(map(str, probe_numbers()))}"]
            r = _vmrt(["run", "--rm", f"--isolation={mode}", *mount, image, "sh", "-c", SCRIPT], env)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise VmrtError(f"probe run in {mode} mode failed ({r.returncode}): {last}")
        raw = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        # a working directory through a descriptor the runtime leaked (CVE-2024-21626 shape)
        verdicts = []
        for fd in range(3, 9):
            w = _vmrt(["run", "--rm", f"--isolation={mode}", "-w", f"/proc/self/fd/{fd}", image,
                       "sh", "-c", "ls ../../../ >/dev/null 2>&1 && pwd"], env)
            verdicts.append("refused" if w.returncode == 125 else f"ran in {w.stdout.strip() or '?'}")
        raw["workdir_fd"] = ("refused (fds 3-8)" if set(verdicts) == {"refused"}
                             else "; ".join(f"fd {i + 3}: {v}" for i, v in enumerate(verdicts)))
        result[mode] = classify(raw, host, state_root)
        result[mode].update(_host_probe(mode, image, env, run_root, jail_uid_base))
    return result


def table(result: dict[str, dict[str, str]]) -> str:
    w0 = max(len(t) for _, t in PROBES)
    # every cell was read inside a container (the image's own sh): escaped before it is printed
    cells = {mode: {k: inert(v) for k, v in result[mode].items()} for mode in MODES}
    w1 = max(len("process"), *(len(cells["process"].get(k, "")) for k, _ in PROBES))
    lines = [f"{'PROBE':<{w0}}  {'PROCESS':<{w1}}  VM"]
    for key, title in PROBES:
        lines.append(f"{title:<{w0}}  {cells['process'].get(key, ''):<{w1}}  {cells['vm'].get(key, '')}")
    return "\n".join(lines)
