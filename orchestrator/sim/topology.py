"""The simulator's network: two namespaces, one veth, a tbf qdisc on the boot server's end.

::

    [server ns: plan's network.namespace]            [client ns: bt-simc-<pid>]
      <network.interface>  10.x.0.1/NN  ==== veth ====  <client dev> 10.x.255.254/NN
       egress: tbf rate R burst B limit L                + one /32 per leased node address
       (the boot server's link: the bottleneck)

Everything is made with ``ip``/``tc`` argv lists (no shell) and torn down by
:meth:`Topology.down`, which deletes only what :meth:`Topology.up` created
(a namespace that already existed, the lab's say, is left alone; our veth in it
is deleted). :func:`enter_netns` moves the calling thread into a namespace with
``setns(2)`` (Python 3.11 has no ``os.setns``): threads started afterwards
inherit it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from orchestrator.lab.netns import NetnsError, run_checked

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


@dataclass
class Topology:
    server_ns: str
    client_ns: str
    server_dev: str
    client_dev: str
    subnet: IPv4Network
    server_ip: IPv4Address
    client_ip: IPv4Address
    rate: str | None = "100mbit"
    burst: str = "64kb"
    #: tbf queue: ``limit`` bytes if given, else ``latency``.
    limit: str | None = None
    latency: str = "50ms"
    created: list[str] = field(default_factory=list)
    _up: bool = False

    def _ip(self, ns: str, *args: str) -> None:
        run_checked(["ip", "-n", ns, *args])

    def up(self) -> None:
        for dev in (self.server_dev, self.client_dev):
            if len(dev) > 15:
                raise NetnsError(f"interface name {dev!r} is longer than 15 characters")
        try:
            for ns in (self.server_ns, self.client_ns):
                if not netns_exists(ns):
                    run_checked(["ip", "netns", "add", ns])
                    self.created.append(ns)
                    self._ip(ns, "link", "set", "lo", "up")
            self._up = True
            self._ip(self.server_ns, "link", "add", self.server_dev, "type", "veth", "peer", "name", self.client_dev,
                     "netns", self.client_ns)
            plen = str(self.subnet.prefixlen)
            self._ip(self.server_ns, "addr", "add", f"{self.server_ip}/{plen}", "dev", self.server_dev)
            self._ip(self.client_ns, "addr", "add", f"{self.client_ip}/{plen}", "dev", self.client_dev)
            self._ip(self.server_ns, "link", "set", self.server_dev, "up")
            self._ip(self.client_ns, "link", "set", self.client_dev, "up")
            if self.rate:
                queue = ["limit", self.limit] if self.limit else ["latency", self.latency]
                run_checked(["tc", "-n", self.server_ns, "qdisc", "replace", "dev", self.server_dev, "root", "tbf",
                             "rate", self.rate, "burst", self.burst, *queue])
        except BaseException:
            self.down()
            raise

    def qdisc_stats(self) -> str:
        cp = run_checked(["tc", "-n", self.server_ns, "-s", "qdisc", "show", "dev", self.server_dev], check=False)
        return cp.stdout

    def down(self) -> None:
        if not self._up and not self.created:
            return
        self._up = False
        # Deleting one end of a veth deletes both (and the qdisc on it).
        run_checked(["ip", "-n", self.server_ns, "link", "del", self.server_dev], check=False)
        for ns in reversed(self.created):
            run_checked(["ip", "netns", "del", ns], check=False)
        self.created.clear()


def client_address(subnet: IPv4Network, taken: set[IPv4Address]) -> IPv4Address:
    """The simulator's own address: the highest host address of the subnet nobody else uses."""
    top = int(subnet.broadcast_address) - 1
    for i in range(top, int(subnet.network_address), -1):
        a = IPv4Address(i)
        if a not in taken:
            return a
    raise NetnsError(f"no free address in {subnet} for the simulator")
