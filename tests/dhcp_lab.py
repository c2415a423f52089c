"""DHCP lab: two network namespaces joined by one veth, for real DHCP servers and clients.

The base of the DHCP peer harness: :mod:`tests.dhcp_servers` starts the servers
(dnsmasq, Kea, ISC dhcpd, ours) in the server namespace, :mod:`tests.dhcp_clients`
runs real clients (udhcpc, dhclient) in the client namespace, and
:mod:`tests.dhcp_capture` records and decodes what crossed the veth.
``tests/test_dhcp_peers.py`` and ``bench/dhcp_bench.py`` build on them.

:func:`dhcp_pair` creates the pair::

    [server ns]  ds<tok> 10.66.0.1/24  <==veth==>  dc<tok> (no address, fixed MAC)  [client ns]

DHCP is broadcast, so nothing here ever touches an interface of the root
namespace: the veth is created with both ends already inside our namespaces,
and ``NetLab`` (``orchestrator/lab/netns.py``) deletes the namespaces -- and with
them the veth -- and kills every process it started, by PID, on exit.
``NetLab.veth`` addresses both ends from a /30, which leaves no room for a pool
and gives the *client* an address, so the pair is built by a small helper here
(:func:`_veth_pair`) on top of ``NetLab.namespace``.

Every process has a timeout; every wait loop is bounded in time.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.lab.netns import Namespace, NetLab, NetnsError

REPO = Path(__file__).resolve().parent.parent

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68


class HarnessError(RuntimeError):
    """A server or client could not be run; the message says what and shows its log."""


def tool(name: str, *candidates: str) -> str | None:
    """Path of an external program (PATH, then absolute candidates), or None."""
    for cand in (name, *candidates):
        path = shutil.which(cand)
        if path:
            return path
        if os.path.isabs(cand) and os.access(cand, os.X_OK):
            return cand
    return None


# ---------------------------------------------------------------------------------
# The namespace pair
# ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DhcpPair:
    """Server and client namespaces joined by one veth, and where files go."""

    lab: NetLab
    server_ns: Namespace
    client_ns: Namespace
    server_if: str
    client_if: str
    server_ip: str
    client_mac: str
    subnet: ipaddress.IPv4Network
    workdir: Path
    client_ip: str | None = None  # set only for relay-style clients (perfdhcp)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


def _ip(ns: Namespace, *args: str, timeout: float = 15) -> None:
    argv = ["ip", "-n", ns.name, *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")


def _veth_pair(a: Namespace, b: Namespace, a_dev: str, b_dev: str, *, b_mac: str | None) -> None:
    """A veth with both ends created directly inside our namespaces, no addresses.

    Local stand-in for ``NetLab.veth``, which always addresses both ends from a
    /30. Never touches the root namespace; deleting either namespace removes it.
    """
    argv = ["ip", "link", "add", a_dev, "netns", a.name, "type", "veth", "peer", "name", b_dev, "netns", b.name]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
    if b_mac:
        _ip(b, "link", "set", b_dev, "address", b_mac)


def _quiet_ipv6(ns: Namespace) -> None:
    """No IPv6 in our namespaces: keeps router solicitations and MLD out of captures."""
    for key in ("all", "default"):
        path = f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6"
        subprocess.run(ns.exec_argv(["sh", "-c", f"[ -w {path} ] && echo 1 > {path} || true"]),
                       capture_output=True, timeout=15)


def random_mac(token: str = "") -> str:
    """A locally administered unicast MAC (02:...)."""
    raw = bytes.fromhex((token or os.urandom(5).hex())[:10].ljust(10, "0"))
    return "02:" + ":".join(f"{b:02x}" for b in raw)


def dhcp_pair(lab: NetLab, workdir: Path, *, subnet: str = "10.66.0.0/24", client_mac: str | None = None,
              client_ip: str | None = None) -> DhcpPair:
    """Create the server/client namespace pair.

    The server end gets the subnet's first host address. The client end gets
    ``client_mac`` (random locally administered by default) and no address,
    unless ``client_ip`` is given (perfdhcp speaks as a relay from an address).
    """
    net = ipaddress.IPv4Network(subnet)
    server_ip = str(next(net.hosts()))
    sns, cns = lab.namespace("ds"), lab.namespace("dc")
    s_if, c_if = f"ds{lab.token}", f"dc{lab.token}"
    mac = client_mac or random_mac()
    _veth_pair(sns, cns, s_if, c_if, b_mac=mac)
    for ns in (sns, cns):
        _quiet_ipv6(ns)
    _ip(sns, "addr", "add", f"{server_ip}/{net.prefixlen}", "dev", s_if)
    if client_ip:
        _ip(cns, "addr", "add", f"{client_ip}/{net.prefixlen}", "dev", c_if)
    _ip(sns, "link", "set", s_if, "up")
    _ip(cns, "link", "set", c_if, "up")
    workdir.mkdir(parents=True, exist_ok=True)
    return DhcpPair(lab, sns, cns, s_if, c_if, server_ip, mac, net, workdir, client_ip)
