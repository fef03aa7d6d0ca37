"""Network namespaces and taps, made with plain syscalls (unshare, setns, a bind mount, the tun
ioctl): no netlink, so a container without a bridge never loads pyroute2."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from .. import fsmode
from ..config import Config
from ..errors import NetworkError

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(cfg: Config, container_id: str) -> Path:
    return cfg.run_root / "netns" / container_id


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run fn in a fresh thread (namespace switches stay in that thread, which then ends)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: B036 - carried to the caller
            box["error"] = e
    th = threading.Thread(target=target)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def create_netns(path: Path) -> None:
    """A new network namespace with its loopback up, kept alive by a bind mount at ``path``."""
    fsmode.private_dir(path.parent)
    path.touch(exist_ok=False)

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise NetworkError(f"cannot create a network namespace: {os.strerror(e)}")
        _loopback_up()
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(src, str(path).encode(), None, MS_BIND, None) != 0:
            e = ctypes.get_errno()
            raise NetworkError(f"cannot keep the network namespace at {path}: {os.strerror(e)}")
    try:
        _in_thread(make)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove_netns(path: Path) -> None:
    if path.exists():
        _libc.umount2(str(path).encode(), MNT_DETACH)
        with contextlib.suppress(OSError):
            path.unlink()


def in_netns(path: Path, fn: Any, *args: Any) -> Any:
    """Call fn inside the network namespace at path (in a thread of its own)."""
    def run() -> Any:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(e)}")
        finally:
            os.close(fd)
        return fn(*args)
    return _in_thread(run)


def _make_tap(name: str) -> int:
    """A tap in the calling thread's network namespace (vnet headers: QEMU's virtio-net offloads)."""
    TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {e.strerror}") from None
    return fd


def open_tap(path: Path, name: str = "tap0") -> int:
    """Create the tap ``name`` in the namespace at path; returns its fd (for QEMU's -netdev tap,fd=).
    The tap lives as long as that fd is open anywhere: it goes with QEMU."""
    return int(in_netns(path, _make_tap, name))


def open_tap_detached() -> int:
    """A tap in a namespace of its own that nothing else holds (a snapshot's build VM): it and
    the namespace go when the fd's last holder, QEMU, exits."""
    def make() -> int:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise NetworkError(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
        return _make_tap("tap0")
    return int(_in_thread(make))


def link_exists(name: str) -> bool:
    """Whether the host has an interface of this name (sysfs: no netlink round trip)."""
    return Path("/sys/class/net", name).exists()
