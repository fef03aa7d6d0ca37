"""What a container asks for: the ``run`` flags about networking, parsed and checked.

Ports are data: whatever they come from (-p, --expose, the image's EXPOSE/ExposedPorts,
vmrt's own state read back), they are parsed into ints, a protocol of PROTOS and an
IPv4 address before anything is done with them, and checked again where they reach nft.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re

from ..errors import NetworkError, UsageError
from ..ocispec import Spec

DEFAULT = "bridge"
ANNOTATION = "org.vmrt.network"


PROTOS = ("tcp", "udp")          # what vmrt publishes
EXPOSE_PROTOS = (*PROTOS, "sctp")  # what an image may expose (Docker's); sctp is never published
MAX_PORTS = 4096                 # exposed or published ports of one container (a range is many)
_DIGITS = re.compile(r"[0-9]{1,5}")


def _port(text: str, what: str, where: str = "-p") -> int:
    if not _DIGITS.fullmatch(text) or not 0 < int(text) < 65536:
        raise UsageError(f"invalid {what} port {text[:32]!r} in {where}")
    return int(text)


def _range(text: str, what: str, where: str = "-p") -> list[int]:
    """``PORT`` or ``FIRST-LAST``, each end checked (Docker's ranges)."""
    lo, sep, hi = text.partition("-")
    a = _port(lo, what, where)
    b = _port(hi, what, where) if sep else a
    if b < a:
        raise UsageError(f"invalid {what} port range {text[:32]!r} in {where}")
    if b - a >= MAX_PORTS:
        raise UsageError(f"{where}: port range {text} is larger than {MAX_PORTS} ports")
    return list(range(a, b + 1))


def _proto(text: str, where: str, allowed: tuple[str, ...] = PROTOS) -> str:
    proto = (text or "tcp").lower()
    if proto == "sctp" and "sctp" not in allowed:
        raise UsageError(f"invalid protocol 'sctp' in {where}: vmrt publishes tcp and udp ports only")
    if proto not in allowed:
        raise UsageError(f"invalid protocol {text[:16]!r} in {where} (use tcp or udp)")
    return proto


def _host_ip(text: str) -> str:
    """A canonical IPv4 address ("" for every address)."""
    if not text:
        return ""
    ip = ipaddress.IPv4Address(text)  # ValueError for anything else
    return "" if ip == ipaddress.IPv4Address(0) else str(ip)


@dataclasses.dataclass
class PortMapping:
    host_ip: str          # "" = every host address
    host_port: int        # 0 = pick a free one (-P, or -p CTR)
    container_port: int
    proto: str = "tcp"

    def __post_init__(self) -> None:
        """Checked whenever one is made (from a flag, or read back from state): the values reach nft."""
        ok = (type(self.host_port) is int and 0 <= self.host_port < 65536
              and type(self.container_port) is int and 0 < self.container_port < 65536
              and self.proto in PROTOS and isinstance(self.host_ip, str))
        if ok and self.host_ip:
            try:
                ok = _host_ip(self.host_ip) == self.host_ip
            except ValueError:
                ok = False
        if not ok:
            raise NetworkError(f"invalid published port {self.host_ip!r}:{self.host_port!r}:"
                               f"{self.container_port!r}/{self.proto!r}"[:160])

    def key(self) -> str:
        return f"{self.container_port}/{self.proto}"


@dataclasses.dataclass
class NetRequest:
    """The ``run`` flags about networking; kept in the container's config (annotation)."""

    network: str = DEFAULT
    aliases: list[str] = dataclasses.field(default_factory=list)
    ports: list[PortMapping] = dataclasses.field(default_factory=list)
    publish_all: bool = False
    exposed: list[str] = dataclasses.field(default_factory=list)   # "8080/tcp" (image EXPOSE + --expose)
    dns: list[str] = dataclasses.field(default_factory=list)
    dns_search: list[str] = dataclasses.field(default_factory=list)
    dns_options: list[str] = dataclasses.field(default_factory=list)
    extra_hosts: list[str] = dataclasses.field(default_factory=list)   # "name:ip"
    extra_networks: list[str] = dataclasses.field(default_factory=list)  # `network connect` on a stopped one

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NetRequest:
        """Read back from state; ports and exposed ports are parsed again (never trusted as text)."""
        try:
            d = json.loads(text)
            d["ports"] = [PortMapping(**p) for p in d.get("ports", [])]
            d["exposed"] = [k for e in d.get("exposed", []) for k in parse_exposed(e, "the container's configuration")]
            return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
        except (ValueError, TypeError, AttributeError, UsageError) as e:
            raise NetworkError(f"the container's network configuration is damaged: {e}"[:200]) from None

    @property
    def networks(self) -> list[str]:
        return [self.network, *[n for n in self.extra_networks if n != self.network]]


def request_of(config: Spec) -> NetRequest:
    text = config.get("annotations", {}).get(ANNOTATION)
    return NetRequest.from_json(text) if text else NetRequest()


def parse_publish(spec: str) -> list[PortMapping]:
    """Docker's ``-p [IP:][HOST[-END]:]CTR[-END][/tcp|udp]``."""
    where = f"-p {spec[:64]}"
    body, _, proto = spec.partition("/")
    proto = _proto(proto, where)
    ip = ""
    if body.startswith("["):
        raise UsageError(f"{where}: IPv6 addresses are not supported")
    parts = body.split(":")
    if len(parts) == 3:
        ip, host, ctr = parts
        try:
            ip = _host_ip(ip)
        except ValueError:
            raise UsageError(f"invalid IP address {parts[0][:40]!r} in {where}") from None
    elif len(parts) == 2:
        host, ctr = parts
    elif len(parts) == 1:
        host, ctr = "", parts[0]
    else:
        raise UsageError(f"invalid {where!r}: use [IP:][HOST:]CONTAINER[/tcp|udp]")
    ctr_ports = _range(ctr, "container", where)
    if not host:
        return [PortMapping(ip, 0, c, proto) for c in ctr_ports]
    host_ports = _range(host, "host", where)
    if len(host_ports) != len(ctr_ports):
        if len(ctr_ports) == 1 and len(host_ports) > 1:
            raise UsageError(f"{where}: a host port range needs a container range of the same size")
        raise UsageError(f"{where}: the host and container port ranges differ in size")
    return [PortMapping(ip, h, c, proto) for h, c in zip(host_ports, ctr_ports, strict=True)]


def parse_exposed(spec: str, where: str, protos: tuple[str, ...] = EXPOSE_PROTOS) -> list[str]:
    """``PORT[-END][/PROTO]`` as exposed ports, one ``"PORT/proto"`` each (the only form kept)."""
    if not isinstance(spec, str):
        raise UsageError(f"invalid port {str(spec)[:32]!r} in {where}")
    body, _, proto = spec.partition("/")
    proto = _proto(proto, where, protos)
    return [f"{p}/{proto}" for p in _range(body, "exposed", where)]


def parse_expose(spec: str) -> list[str]:
    """``--expose PORT[-END][/tcp|udp]``."""
    return parse_exposed(spec, f"--expose {spec[:64]}", PROTOS)


def image_exposed(value: object) -> list[str]:
    """The image config's ExposedPorts keys, each parsed; a key that is not a port refuses the
    run (as Docker does), named in the one-line error, and is never passed on."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise UsageError("the image's ExposedPorts is not a map of ports: refusing to run it")
    out: list[str] = []
    for key in value:
        try:
            out += parse_exposed(key, "the image's ExposedPorts")
        except UsageError:
            raise UsageError(f"the image's ExposedPorts key {str(key)[:64]!r} is not a port "
                             f"(PORT[-END][/tcp|udp|sctp], at most {MAX_PORTS}): refusing to run it") from None
        if len(out) > MAX_PORTS:
            raise UsageError(f"the image exposes more than {MAX_PORTS} ports: refusing to run it")
    return out


def split_exposed(key: str) -> tuple[int, str]:
    """An exposed port kept as ``"PORT/proto"``, parsed again: (port, proto)."""
    ports = parse_exposed(key, "the container's exposed ports")
    if len(ports) != 1:
        raise NetworkError(f"exposed port {key[:32]!r} is not one port")
    port, _, proto = ports[0].partition("/")
    return int(port), proto


def parse_add_host(spec: str) -> str:
    name, sep, ip = spec.partition(":")
    if not sep or not name or not _valid_hostname(name):
        raise UsageError(f"invalid --add-host {spec!r}: use NAME:IP")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise UsageError(f"invalid IP address in --add-host {spec!r}") from None
    return f"{name}:{ip}"


def parse_dns(spec: str) -> str:
    try:
        return str(ipaddress.ip_address(spec))
    except ValueError:
        raise UsageError(f"invalid --dns {spec!r}: not an IP address") from None


def _valid_hostname(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})", name))


def valid_alias(name: str) -> str:
    if not _valid_hostname(name):
        raise UsageError(f"invalid network alias {name!r}")
    return name
