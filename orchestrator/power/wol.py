"""Wake-on-LAN: the magic packet, etherwake's raw frame, the UDP form, and sending them.

The top half is sans-IO (bytes in, bytes out; no sockets), the bottom half the
two ways a packet leaves the machine.

The magic packet (AMD's "Magic Packet Technology" white paper, 1995) is six
``0xFF`` bytes followed by the target MAC repeated 16 times, 102 bytes. A NIC
that supports SecureOn expects a 4- or 6-byte password right after it. The NIC
scans any frame for that pattern, so the envelope is free:

* **raw**: an Ethernet frame of EtherType ``0x0842``, as ``etherwake`` sends it
  (net-tools' ``ether-wake.c``): destination the target MAC itself (``-b``:
  broadcast), source the sending interface's address, then the magic packet and
  the optional password; no padding (116 bytes is above the 60-byte minimum).
  Needs ``CAP_NET_RAW``; reaches only the local segment.
* **udp**: the magic packet as the payload of a UDP datagram to port 9
  (discard) or 7 (echo), broadcast on the boot subnet. Any user may send it;
  routers may forward a directed broadcast.

Routed racks (``network.relayed``): a raw frame never crosses a router, so
:class:`SegmentWake` (built by :func:`plan_wake` around the plan's wake driver)
wakes a node on a relayed subnet by that subnet's ``wake:``: ``directed-broadcast``
sends the UDP magic packet to the subnet's broadcast address (e.g. 10.83.0.255),
an ordinary routed datagram until the last router, which turns it into a
link-layer broadcast on the rack only when it forwards directed broadcasts
(Cisco ``ip directed-broadcast``; Linux ``net.ipv4.conf.all.bc_forwarding=1``
and the same on the interface it arrives on); ``bmc`` powers the node on with
the BMC driver. Nodes on the boot subnet keep the plan's method.
:func:`parse_udp_frame` finds such a datagram in a whole Ethernet frame: what the
lab's rack-side "NIC" (:mod:`orchestrator.lab.wol_listener`) looks at.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Sequence

from orchestrator.power import PowerResult, Target

#: EtherType of etherwake's frames ("Wake-on-LAN", IEEE registered to AMD).
ETH_P_WOL = 0x0842
#: UDP ports magic packets are conventionally sent to: discard and echo.
UDP_PORTS = (9, 7)
BROADCAST_MAC = b"\xff" * 6
SYNC = b"\xff" * 6
MAGIC_LEN = 6 + 16 * 6  # 102
#: SecureOn passwords are 4 bytes (written like an IPv4 address) or 6 (like a MAC).
SECUREON_LENGTHS = (4, 6)

# linux/if_ether.h, linux/socket.h
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class WolError(ValueError):
    """A MAC, password or magic packet that is not well formed."""


def mac_bytes(mac: str | bytes) -> bytes:
    """``52:54:00:77:00:01`` (or ``-`` separated, or 12 hex digits, or 6 raw bytes) -> 6 bytes."""
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise WolError(f"a MAC is 6 bytes, got {len(mac)}")
        return bytes(mac)
    digits = mac.replace(":", "").replace("-", "").replace(".", "")
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise WolError(f"{mac!r} is not a MAC address (write 52:54:00:00:00:01)")
    return raw


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def secureon_bytes(password: str | bytes | None) -> bytes:
    """A SecureOn password: 6 bytes written like a MAC, 4 written like an IPv4 address, or raw bytes."""
    if password is None or password == b"" or password == "":
        return b""
    if isinstance(password, (bytes, bytearray)):
        raw = bytes(password)
    elif password.count(".") == 3:
        try:
            raw = socket.inet_aton(password)
        except OSError:
            raise WolError(f"SecureOn password {password!r}: not a.b.c.d") from None
    else:
        try:
            raw = mac_bytes(password)
        except WolError:
            raise WolError(f"SecureOn password {password!r}: write 6 bytes like a MAC or 4 like an IPv4 address") from None
    if len(raw) not in SECUREON_LENGTHS:
        raise WolError(f"a SecureOn password is 4 or 6 bytes, got {len(raw)}")
    return raw


def magic_packet(mac: str | bytes, password: str | bytes | None = None) -> bytes:
    """6 x 0xFF, the MAC 16 times, then the SecureOn password if any (102, 106 or 108 bytes)."""
    return SYNC + mac_bytes(mac) * 16 + secureon_bytes(password)


def ether_frame(mac: str | bytes, src: str | bytes, *, password: str | bytes | None = None,
                broadcast: bool = False) -> bytes:
    """The whole Ethernet frame etherwake sends: dst, src, 0x0842, magic packet [, password].

    ``dst`` is the target's own MAC (a switch that still knows the port delivers
    it there; one that does not floods it), or ff:ff:ff:ff:ff:ff with ``broadcast``
    (etherwake ``-b``).
    """
    target = mac_bytes(mac)
    dst = BROADCAST_MAC if broadcast else target
    return dst + mac_bytes(src) + struct.pack("!H", ETH_P_WOL) + magic_packet(target, password)


def parse_magic(payload: bytes) -> tuple[str, bytes]:
    """Find a magic packet at the start of ``payload``: ``(mac, secureon_password)``.

    Raises :class:`WolError` unless it begins with six 0xFF and then one MAC
    exactly 16 times. Trailing bytes are returned as the password when they have
    a SecureOn length, and ignored otherwise (Ethernet padding, a longer UDP body).
    """
    if len(payload) < MAGIC_LEN:
        raise WolError(f"{len(payload)} bytes: a magic packet is at least {MAGIC_LEN}")
    if payload[:6] != SYNC:
        raise WolError("no synchronisation stream (6 x 0xFF)")
    mac = payload[6:12]
    if payload[6:MAGIC_LEN] != mac * 16:
        raise WolError("the MAC is not repeated 16 times")
    if mac == BROADCAST_MAC:
        raise WolError("the target MAC is the broadcast address")
    rest = payload[MAGIC_LEN:]
    return mac_str(mac), rest if len(rest) in SECUREON_LENGTHS else b""


def parse_ether_frame(frame: bytes) -> tuple[str, bytes] | None:
    """``(mac, password)`` of an EtherType 0x0842 frame carrying a magic packet, else ``None``."""
    if len(frame) < 14 + MAGIC_LEN or struct.unpack_from("!H", frame, 12)[0] != ETH_P_WOL:
        return None
    try:
        return parse_magic(frame[14:])
    except WolError:
        return None


def parse_udp_frame(frame: bytes, ports: Sequence[int] = UDP_PORTS) -> tuple[str, bytes, str, int] | None:
    """``(mac, password, destination IP, port)`` of an Ethernet frame carrying an IPv4 UDP magic packet, else ``None``.

    Only unfragmented IPv4 (no VLAN tag) to one of ``ports``; every length is
    checked against the frame, so a truncated or lying header gives ``None``.
    """
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != 0x0800:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ihl < 20 or ip[9] != 17 or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
        return None  # not IPv4, not UDP, or a fragment (MF set or an offset)
    total = struct.unpack_from("!H", ip, 2)[0]
    if total > len(ip) or total < ihl + 8:
        return None
    dport, ulen = struct.unpack_from("!2xHH", ip, ihl)
    if dport not in ports or ulen < 8 or ihl + ulen > total:
        return None
    try:
        mac, password = parse_magic(ip[ihl + 8 : ihl + ulen])
    except WolError:
        return None
    return mac, password, socket.inet_ntoa(ip[16:20]), dport


# ------------------------------------------------------------------------------ I/O


def interface_mac(interface: str) -> bytes:
    """The hardware address of ``interface`` (from sysfs)."""
    try:
        with open(f"/sys/class/net/{interface}/address") as f:
            return mac_bytes(f.read().strip())
    except FileNotFoundError:
        raise OSError(f"no network interface {interface!r}") from None


def send_raw(interface: str, macs: Sequence[str], *, password: str | bytes | None = None,
             broadcast: bool = False, src: str | bytes | None = None) -> int:
    """Send etherwake's frame for each MAC out of ``interface`` (AF_PACKET; needs CAP_NET_RAW).

    Returns the number of frames sent. ``src`` defaults to the interface's address.
    """
    source = mac_bytes(src) if src is not None else interface_mac(interface)
    frames = [ether_frame(m, source, password=password, broadcast=broadcast) for m in macs]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_WOL)) as s:
        s.bind((interface, ETH_P_WOL))
        for fr in frames:
            s.send(fr)
    return len(frames)


def send_udp(macs: Sequence[str], *, broadcast: str = "255.255.255.255", port: int = 9,
             interface: str | None = None, password: str | bytes | None = None) -> int:
    """Send the magic packet for each MAC as a UDP broadcast to ``broadcast:port``.

    With ``interface`` the socket is bound to that device (SO_BINDTODEVICE, needs
    CAP_NET_RAW) so a limited broadcast (255.255.255.255) leaves there and not by
    the default route.
    """
    if port not in UDP_PORTS:
        raise WolError(f"UDP port {port}: magic packets go to port 9 (discard) or 7 (echo)")
    payloads = [magic_packet(m, password) for m in macs]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            s.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode() + b"\0")
        for p in payloads:
            s.sendto(p, (broadcast, port))
    return len(payloads)


# ------------------------------------------------------------------------------ routed racks


class SegmentWake:
    """The plan's wake driver for the boot subnet, and the ``network.relayed`` rule for every routed subnet.

    ``segments`` is ``[(subnet, how)]`` with ``how`` ``"directed-broadcast"`` or
    ``"bmc"`` (:func:`plan_wake` builds it from the plan). A node whose address
    lies in no segment is woken by ``local`` exactly as before.
    """

    name = "wol"

    def __init__(self, local: Any, segments: Sequence[tuple[IPv4Network, str]], *, bmc: Any = None,
                 interface: str | None, repeat: int = 3, interval: float = 0.1, port: int = 9,
                 password: str | None = None) -> None:
        self.local, self.segments, self.bmc = local, list(segments), bmc
        self.interface, self.repeat, self.interval, self.port, self.password = interface, repeat, interval, port, password
        self.directed = 0

    @property
    def sent(self) -> int:
        """Magic packets sent (the metrics read it): the local driver's and the directed broadcasts."""
        return getattr(self.local, "sent", 0) + self.directed

    def segment(self, ip: str) -> tuple[IPv4Network, str] | None:
        addr = IPv4Address(ip)
        return next((seg for seg in self.segments if addr in seg[0]), None)

    async def on(self, t: Target) -> PowerResult:
        seg = self.segment(t.ip)
        if seg is None:
            return await self.local.on(t)
        net, how = seg
        if how == "bmc":
            if self.bmc is None:
                return PowerResult(False, f"{t.ip} is on relayed subnet {net} (wake: bmc) but the plan has no BMC driver")
            return await self.bmc.on(t)
        import trio

        broadcast = str(net.broadcast_address)
        if not self.interface:
            return PowerResult(False, "refusing to send magic packets without an interface to pin them to")
        try:
            for i in range(self.repeat):
                # Routed like any datagram (pinned to the boot interface, never the default route);
                # the subnet's last router makes it a broadcast on the rack.
                send_udp([t.mac], broadcast=broadcast, port=self.port, interface=self.interface, password=self.password)
                self.directed += 1
                if i + 1 < self.repeat:
                    await trio.sleep(self.interval)
        except (OSError, ValueError) as e:
            return PowerResult(False, f"magic packet not sent: {e}")
        return PowerResult(True, f"{self.repeat} magic packet(s) (udp directed broadcast) to {t.mac} at "
                                 f"{broadcast}:{self.port} via {self.interface}")

    async def off(self, t: Target) -> PowerResult:
        return await self.local.off(t)

    async def cycle(self, t: Target) -> PowerResult:
        return await self.local.cycle(t)

    async def status(self, t: Target) -> str | None:
        return await self.local.status(t)


def plan_wake(plan: Any, local: Any, bmc: Any = None) -> Any:
    """The wake driver for a LoadedPlan: ``local`` itself, or a :class:`SegmentWake` around it when the plan has relayed subnets."""
    relayed = plan.model.network.relayed
    if not relayed:
        return local
    w = plan.model.power.wol
    return SegmentWake(local, [(r.subnet, r.wake) for r in relayed], bmc=bmc,
                       interface=w.interface or plan.model.network.interface, repeat=w.repeat, interval=w.interval,
                       port=w.udp_port, password=getattr(local, "password", None))
