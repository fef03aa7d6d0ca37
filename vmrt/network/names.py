"""Names: a container's managed ``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname``
(bind-mounted, as Docker does, from a small tmpfs of their own); on a user network the hosts
file lists every other container of the network and is rewritten when one comes or goes."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .. import fsmode
from ..config import Config
from ..errors import VmrtError
from .parse import NetRequest
from .store import Endpoint, Store

MANAGED_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode (it is bind-mounted into running containers).
    0644 whatever the umask: any uid in the container reads it (its dir stays 0700: the
    container sees the file through its bind mount)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, fsmode.SHARED_FILE)
    try:
        os.fchmod(fd, fsmode.SHARED_FILE)
        data = text.encode()
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def host_resolv() -> list[str]:
    try:
        return Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []


def resolv_conf(req: NetRequest, host_mode: bool) -> str:
    """Docker's rules: --dns/--dns-search/--dns-option, else the host's file without loopback
    nameservers (unreachable from the container), else public resolvers."""
    lines = host_resolv()
    if host_mode and not (req.dns or req.dns_search or req.dns_options):
        return "\n".join(lines) + "\n"
    servers = req.dns or [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1
                          and not ln.split()[1].startswith(("127.", "::1"))]
    if not servers:
        servers = ["8.8.8.8", "8.8.4.4"]
    search = req.dns_search or [w for ln in lines if ln.startswith("search") for w in ln.split()[1:]]
    options = req.dns_options or [w for ln in lines if ln.startswith("options") for w in ln.split()[1:]]
    out = [f"nameserver {s}" for s in servers]
    if search and search != ["."]:
        out.append("search " + " ".join(search))
    if options:
        out.append("options " + " ".join(options))
    return "\n".join(out) + "\n"


HOSTS_HEAD = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def hosts_file(hostname: str, own: list[Endpoint], peers: list[Endpoint], extra_hosts: list[str],
               host_mode: bool) -> str:
    out = [HOSTS_HEAD.rstrip("\n")]
    if host_mode:
        with contextlib.suppress(OSError):
            out = [Path("/etc/hosts").read_text().rstrip("\n")]
    for h in extra_hosts:
        name, _, ip = h.partition(":")
        out.append(f"{ip}\t{name}")
    if own:  # and its IPv6 address on an --ipv6 network, as Docker's
        out += [f"{ip}\t{hostname}" for ip in (own[0].ip, next((e.ip6 for e in own if e.ip6), "")) if ip]
    elif not host_mode:
        out.append(f"127.0.1.1\t{hostname}")
    seen = set()
    for p in peers:
        names = [n for n in dict.fromkeys([p.name, *p.aliases, p.container_id[:12]]) if n]
        for ip in (p.ip, p.ip6):
            line = f"{ip}\t{' '.join(names)}"
            if ip and line not in seen:
                seen.add(line)
                out.append(line)
    return "\n".join(out) + "\n"


def files_dir(run_dir: Path) -> Path:
    return run_dir / "net"


# the managed files stay writable inside the container (as under Docker), but on a tmpfs of their
# own: a container that writes without end fills these 256 KiB, never the host's /run
FILES_TMPFS = "size=256k,nr_inodes=16,mode=0700"
FILE_READ_MAX = 256 << 10  # vmrt reads them with this bound (the tmpfs's size)


def _read_managed(path: Path, limit: int = FILE_READ_MAX) -> str:
    """A managed file's text, read without following a link, from a regular file, at most
    ``limit`` bytes (the container may have written anything into it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode()


def refresh_hosts(cfg: Config, store: Store) -> None:
    """Rewrite the hosts file of every running container on a user network (names come and go)."""
    eps = store.live_endpoints()
    user_nets = {n.id for n in store.networks() if n.user}
    by_container: dict[str, list[Endpoint]] = {}
    for ep in eps:
        by_container.setdefault(ep.container_id, []).append(ep)
    for cid, own in by_container.items():
        fdir = files_dir(cfg.run_root / "containers" / cid)
        try:
            req = NetRequest.from_json(_read_managed(fdir / "request.json"))
            # the container can write its /etc/hostname: bounded, its first line only
            hostname = _read_managed(fdir / "hostname", 4096).partition("\n")[0].strip()
        except (OSError, ValueError, VmrtError):
            continue
        if not hostname:
            continue
        nets = {ep.network_id for ep in own if ep.network_id in user_nets}
        peers = [e for e in eps if e.network_id in nets and e.container_id != cid]
        with contextlib.suppress(OSError):
            write_in_place(fdir / "hosts", hosts_file(hostname, own, peers, req.extra_hosts, False))
