"""The lab's Wake-on-LAN "NIC": hears magic packets on the lab bridge.

Real NICs in soft-off watch the wire for a magic packet; paused QEMU guests
cannot, so one listener on the bridge does it for all of them and calls
``on_magic(mac, how, peer)`` (the lab daemon resumes that VM through QMP).

What it hears, inside the lab namespace:

* **raw frames of EtherType 0x0842** (etherwake, ``wol.method: raw``). The
  socket is ``ETH_P_ALL``, not ``ETH_P_WOL``, with a classic BPF filter for
  the EtherType: the orchestrator sends its frames *from this same host* on
  the bridge, and Linux shows locally sent frames only to ``ETH_P_ALL`` packet
  sockets (``dev_queue_xmit_nit`` walks ``ptype_all`` only). Frames coming in
  from a tap (a VM waking another) arrive the ordinary way.
* **UDP datagrams to ports 9 and 7** (``wol.method: udp``), on sockets bound to
  the bridge (``SO_BINDTODEVICE``); a broadcast sent on this host is looped
  back to them.

Routed racks (``network.relayed``): the rack's bridge lives in the lab's router
namespace for that subnet (:mod:`orchestrator.lab.router`), so the daemon opens
one more listener there (``netns=``: its sockets are made by a thread switched
into that namespace with ``setns``). A magic packet reaches the rack as a
directed broadcast the router forwarded, which no local UDP socket ever
receives (it is forwarded, not delivered), so that listener (``routed=True``)
reads whole frames on the rack bridge, as a NIC does: its filter takes EtherType
0x0842 and unfragmented IPv4 UDP to ports 9/7, and
:func:`orchestrator.power.wol.parse_udp_frame` finds the magic packet. Each
listener wakes only the MACs of its own segment (``macs=``): a raw frame sent on
the boot bridge must not wake a node behind a router, as on real wires.

Payloads are checked with :func:`orchestrator.power.wol.parse_magic`: six
0xFF, then one MAC exactly 16 times; anything else is counted and dropped.
A SecureOn password after the packet is handed on; the lab daemon insists on
it only when the plan sets ``power.wol.secureon`` (like a NIC with SecureOn
enabled).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Collection

from orchestrator.power.wol import ETH_P_WOL, UDP_PORTS, WolError, parse_ether_frame, parse_magic, parse_udp_frame

log = logging.getLogger("bootorch.lab.wol")

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
PACKET_OUTGOING = 4

#: on_magic(mac, how, peer, secureon_password)
OnMagic = Callable[[str, str, str, bytes], None]
CLONE_NEWNET = 0x40000000


def _ethertype_filter(ethertype: int) -> tuple[bytes, ctypes.Array]:
    """A classic BPF program: accept frames whose EtherType is ``ethertype``."""
    prog = [
        (0x28, 0, 0, 12),          # ldh [12]            (EtherType)
        (0x15, 0, 1, ethertype),   # jeq #ethertype, accept, drop
        (0x06, 0, 0, 0x40000),     # ret #262144          (accept, whole frame)
        (0x06, 0, 0, 0),           # ret #0               (drop)
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    return fprog, buf  # keep buf alive until setsockopt returns


def _wol_or_udp_filter(ports: tuple[int, ...]) -> tuple[bytes, ctypes.Array]:
    """A classic BPF program: EtherType 0x0842, or unfragmented IPv4 UDP to one of ``ports`` (at most 2)."""
    assert 1 <= len(ports) <= 2, ports
    p1, p2 = ports[0], ports[-1]
    prog = [
        (0x28, 0, 0, 12),          # 0  ldh [12]             EtherType
        (0x15, 9, 0, ETH_P_WOL),   # 1  jeq #0x0842 -> accept
        (0x15, 0, 9, 0x0800),      # 2  jeq #IPv4, else drop
        (0x30, 0, 0, 23),          # 3  ldb [23]             IP protocol
        (0x15, 0, 7, 17),          # 4  jeq #UDP, else drop
        (0x28, 0, 0, 20),          # 5  ldh [20]             flags + fragment offset
        (0x45, 5, 0, 0x3FFF),      # 6  jset MF|offset -> drop (a fragment)
        (0xB1, 0, 0, 14),          # 7  ldxb 4*([14]&0xf)    IP header length
        (0x48, 0, 0, 16),          # 8  ldh [x+16]           UDP destination port
        (0x15, 1, 0, p1),          # 9  jeq #p1 -> accept
        (0x15, 0, 1, p2),          # 10 jeq #p2 -> accept, else drop
        (0x06, 0, 0, 0x40000),     # 11 accept (whole frame)
        (0x06, 0, 0, 0),           # 12 drop
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    return struct.pack("HL", len(prog), ctypes.addressof(buf)), buf


def in_netns(netns: str | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` run in the network namespace ``netns`` (``ip netns`` name), on a thread of its own; sockets it
    makes stay in that namespace. ``None``: here. Needs CAP_SYS_ADMIN (the lab runs as root)."""
    if netns is None:
        return fn()
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # setns(2) moves only the calling thread; this thread ends right after.
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into network namespace {netns}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def mac_of(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class WolListener:
    """Threads listening on ``bridge``; :meth:`stop` ends them within ``poll`` seconds.

    ``netns``: the bridge is in that network namespace; ``macs``: wake only these
    (the segment's nodes; None: any); ``routed``: the rack side of a lab router
    (whole frames, UDP included; no UDP sockets). See the module docstring.
    """

    def __init__(self, bridge: str, on_magic: OnMagic, *, udp_ports: tuple[int, ...] = UDP_PORTS,
                 poll: float = 0.5, netns: str | None = None, macs: Collection[str] | None = None,
                 routed: bool = False) -> None:
        self.bridge = bridge
        self.on_magic = on_magic
        self.poll = poll
        self.netns = netns
        self.macs = None if macs is None else {m.lower() for m in macs}
        self.routed = routed
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.counts = {"raw": 0, "udp": 0, "invalid": 0, "elsewhere": 0}
        in_netns(netns, lambda: self._open(udp_ports))

    def _open(self, udp_ports: tuple[int, ...]) -> None:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        fprog, _keep = _wol_or_udp_filter(udp_ports) if self.routed else _ethertype_filter(ETH_P_WOL)
        raw.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        raw.bind((self.bridge, ETH_P_ALL))
        raw.settimeout(self.poll)
        self.socks.append(raw)
        self.threads.append(threading.Thread(target=self._raw_loop, args=(raw,), name=f"wol-raw-{self.bridge}", daemon=True))
        for port in () if self.routed else udp_ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.bridge.encode() + b"\0")
            s.bind(("0.0.0.0", port))
            s.settimeout(self.poll)
            self.socks.append(s)
            self.threads.append(threading.Thread(target=self._udp_loop, args=(s, port), name=f"wol-udp{port}",
                                                 daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=self.poll * 4)
        for s in self.socks:
            s.close()

    def _deliver(self, mac: str, how: str, peer: str, password: bytes) -> None:
        if self.macs is not None and mac not in self.macs:
            self.counts["elsewhere"] += 1  # a node on another segment: this wire never carries it there
            return
        try:
            self.on_magic(mac, how, peer, password)
        except Exception:  # noqa: BLE001 -- one bad wake must not kill the listener
            log.exception("wake %s (%s) failed", mac, how)

    def _raw_loop(self, s: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                frame, addr = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            got = parse_ether_frame(frame)
            if got is None and self.routed:
                udp = parse_udp_frame(frame)
                if udp is not None:
                    self.counts["udp"] += 1
                    way = "forwarded here" if addr[2] == PACKET_OUTGOING else "received"
                    self._deliver(udp[0], f"udp/{udp[3]} to {udp[2]}", f"{mac_of(frame[6:12])} ({way})", udp[1])
                    continue
                self.counts["invalid"] += 1
                continue
            if got is None:
                if len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == ETH_P_WOL:
                    self.counts["invalid"] += 1
                continue
            self.counts["raw"] += 1
            src = mac_of(frame[6:12])
            way = "sent here" if addr[2] == PACKET_OUTGOING else "received"
            self._deliver(got[0], "raw 0x0842", f"{src} ({way})", got[1])

    def _udp_loop(self, s: socket.socket, port: int) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            try:
                mac, pw = parse_magic(data)
            except WolError:
                self.counts["invalid"] += 1
                continue
            self.counts["udp"] += 1
            self._deliver(mac, f"udp/{port}", f"{peer[0]}:{peer[1]}", pw)
