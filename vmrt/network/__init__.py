"""Container networking: networks, addresses, plumbing, published ports and names.

A container joins ``none`` (its own network namespace, loopback only), ``host``
(the host's namespace; process mode only), the default ``bridge`` network or a
user network (``vmrt network create``). Every non-host container has its own
network namespace, bind-mounted at ``<run_root>/netns/<id>``:

* process mode: a veth pair, one end on the network's bridge, the other as
  ``eth0`` (``eth1``... for more networks) in the namespace, with the address;
* VM mode: the veth end ``eth0`` in the namespace carries no address; a tap
  ``tap0`` beside it backs the VM's virtio-net NIC and tc redirects every frame
  between the two (as Kata Containers does); the guest agent sets the address,
  route and MAC inside the VM (RUN's NET record).

Addresses come from the network's subnet (the gateway is the bridge's own); on an
``--ipv6`` network also from its IPv6 subnet (VM mode: RUN's NET6 record), and on any
other the container's eth0 has IPv6 off, as Docker's.
Outbound NAT, published ports (DNAT, also from 127.0.0.1 through
``route_localnet``, guarded), forwarding (drop but for what vmrt publishes, what
a container started and its own network) are nftables rules in a table of
vmrt's own (``inet vmrt``); anti-spoofing per host-side veth (a container sends
from its own MAC and address only) in another (``bridge vmrt``). Both are
rewritten whole and atomically from the state database when a bridge is made
or ports are published, so a crash leaves nothing another start trips on; a
container's anti-spoofing chain comes and goes with it. Names: each container gets managed ``/etc/hosts`` and
``/etc/resolv.conf`` files (bind-mounted, as Docker does); on a user network
the hosts file lists every other container of the network by name, alias and
short id, and is rewritten when one comes or goes.

Netlink work (bridge, veth, addresses, routes, tc) is done with pyroute2; it is
imported only when a container needs a bridge.

The modules, each importing only those above it in this list:

* ``parse``: the ``run`` flags about networking (ports, exposed ports, DNS, hosts), parsed and checked;
* ``netns``: namespaces and taps by plain syscalls;
* ``store``: networks and endpoints in the state database, and the host-wide lock;
* ``nft``: the nftables tables, written from typed, checked values;
* ``netlink``: bridges, veths, addresses, routes and tc with pyroute2 (imported on first use);
* ``names``: the managed /etc files;
* ``attach``: a container's network at its start and stop, live connect/disconnect, inspect and port;
* ``foreign``: an OCI engine's namespace (the spec names it: podman, CNI, Kubernetes) whose interface a VM
  container takes (vmrt-runtime).

Callers use this package's names (``from vmrt import network; network.attach(...)``).
"""

from __future__ import annotations

from ..errors import NetworkError
from .attach import (
    Attached,
    attach,
    connect_live,
    detach,
    disconnect_live,
    plumb,
    port_lines,
    remove_network,
    settings,
)
from .foreign import Foreign, join_engine, open_netns
from .names import files_dir, hosts_file, refresh_hosts, resolv_conf
from .netlink import adopt_tap, delete_link, ensure_bridge, mac_for, plumb_veth, preload
from .netns import create_netns, in_netns, netns_path, open_tap, open_tap_detached, remove_netns
from .nft import drop_endpoint_rules, endpoint_rules, port_group, ruleset, sync_rules, table_name
from .parse import (
    ANNOTATION,
    DEFAULT,
    EXPOSE_PROTOS,
    MAX_PORTS,
    PROTOS,
    NetRequest,
    PortMapping,
    image_exposed,
    parse_add_host,
    parse_dns,
    parse_expose,
    parse_exposed,
    parse_publish,
    request_of,
    split_exposed,
    valid_alias,
)
from .store import BUILTIN, Endpoint, Network, Store, locked

__all__ = [
    # what a container asks for (parse)
    "ANNOTATION", "DEFAULT", "EXPOSE_PROTOS", "MAX_PORTS", "PROTOS", "NetRequest", "PortMapping", "image_exposed",
    "parse_add_host", "parse_dns", "parse_expose", "parse_exposed", "parse_publish", "request_of",
    "split_exposed", "valid_alias",
    # state (store)
    "BUILTIN", "Endpoint", "Network", "NetworkError", "Store", "locked",
    # namespaces and taps (netns), netlink
    "adopt_tap", "create_netns", "delete_link", "ensure_bridge", "in_netns", "mac_for", "netns_path", "open_tap",
    "open_tap_detached", "plumb_veth", "preload", "remove_netns",
    # rules (nft)
    "drop_endpoint_rules", "endpoint_rules", "port_group", "ruleset", "sync_rules", "table_name",
    # names
    "files_dir", "hosts_file", "refresh_hosts", "resolv_conf",
    # a container's network (attach)
    "Attached", "attach", "connect_live", "detach", "disconnect_live", "plumb", "port_lines", "remove_network",
    "settings",
    # an OCI engine's namespace (foreign)
    "Foreign", "join_engine", "open_netns",
]
