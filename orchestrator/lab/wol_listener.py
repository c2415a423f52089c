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

Payloads are checked with :func:`orchestrator.power.wol.parse_magic`: six
0xFF, then one MAC exactly 16 times; anything else is counted and dropped.
A SecureOn password after the packet is handed on; the lab daemon insists on
it only when the plan sets ``power.wol.secureon`` (like a NIC with SecureOn
enabled).
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import threading
from typing import Callable

from orchestrator.power.wol import ETH_P_WOL, UDP_PORTS, WolError, parse_ether_frame, parse_magic

log = logging.getLogger("bootorch.lab.wol")

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
PACKET_OUTGOING = 4

#: on_magic(mac, how, peer, secureon_password)
OnMagic = Callable[[str, str, str, bytes], None]


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


class WolListener:
    """Threads listening on ``bridge``; :meth:`stop` ends them within ``poll`` seconds."""

    def __init__(self, bridge: str, on_magic: OnMagic, *, udp_ports: tuple[int, ...] = UDP_PORTS,
                 poll: float = 0.5) -> None:
        self.bridge = bridge
        self.on_magic = on_magic
        self.poll = poll
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.counts = {"raw": 0, "udp": 0, "invalid": 0}
        self._open(udp_ports)

    def _open(self, udp_ports: tuple[int, ...]) -> None:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        fprog, _keep = _ethertype_filter(ETH_P_WOL)
        raw.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        raw.bind((self.bridge, ETH_P_ALL))
        raw.settimeout(self.poll)
        self.socks.append(raw)
        self.threads.append(threading.Thread(target=self._raw_loop, args=(raw,), name="wol-raw", daemon=True))
        for port in udp_ports:
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
            if got is None:
                if len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == ETH_P_WOL:
                    self.counts["invalid"] += 1
                continue
            self.counts["raw"] += 1
            src = ":".join(f"{b:02x}" for b in frame[6:12])
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
