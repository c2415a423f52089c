"""What crossed the lab's veth: a raw capture of DHCP frames, decoded by scapy.

:class:`Capture` runs ``python -m tests.dhcp_capture`` (:func:`_capture_main`)
inside the client namespace of a :class:`~tests.dhcp_lab.DhcpPair`: a raw
``AF_PACKET`` socket writing every UDP 67/68 frame to a pcap file.
:func:`decode_pcap` decodes it with **scapy**, an independent decoder (never
with ``orchestrator.protocols.dhcp``), into :class:`DhcpPacket` values;
:func:`replies` and :func:`requests` pick them out.

Every process has a timeout; every wait loop is bounded in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tests.dhcp_lab import DHCP_CLIENT_PORT, DHCP_SERVER_PORT, REPO, DhcpPair, HarnessError


class Capture:
    """Capture UDP 67/68 frames on the client interface into ``path`` (pcap).

    Runs ``python -m tests.dhcp_capture`` inside the client namespace
    (a process cannot change namespace per thread in Python 3.11). Use as a
    context manager; it stops by itself after ``max_seconds`` or ``max_packets``.
    """

    def __init__(self, pair: DhcpPair, path: Path | None = None, *, max_seconds: float = 120,
                 max_packets: int = 10_000) -> None:
        self.pair = pair
        self.path = path or pair.workdir / f"capture-{time.monotonic_ns()}.pcap"
        self.max_seconds = max_seconds
        self.max_packets = max_packets
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Capture":
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        argv = [sys.executable, "-m", "tests.dhcp_capture", self.pair.client_if, str(self.path),
                "--seconds", str(self.max_seconds), "--count", str(self.max_packets)]
        self.proc = self.pair.lab.popen(self.pair.client_ns, argv, stdout=subprocess.PIPE, env=env, cwd=str(REPO))
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)  # bounded wait for "ready"
        line = self.proc.stdout.readline() if ready else b"(nothing within 15 s)"
        if line.strip() != b"ready":
            self.pair.lab.kill(self.proc)
            raise HarnessError(f"capture did not start (said {line!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            time.sleep(0.1)  # let the last reply in flight land
            self.pair.lab.kill(self.proc)
            self.proc = None

    def decode(self) -> list["DhcpPacket"]:
        return decode_pcap(self.path)


def _capture_main(ifname: str, path: str, seconds: float, count: int) -> int:
    """Write every IPv4/UDP frame to or from port 67/68 seen on ``ifname`` to a pcap file."""
    import select
    import socket
    import struct

    ETH_P_ALL = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    deadline = time.monotonic() + seconds
    n = 0
    with open(path, "wb") as f:
        # pcap global header: magic, v2.4, tz 0, sigfigs 0, snaplen, LINKTYPE_ETHERNET
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        f.flush()
        print("ready", flush=True)
        while not stop and n < count and time.monotonic() < deadline:
            try:
                r, _, _ = select.select([s], [], [], 0.1)
            except InterruptedError:
                continue
            if not r:
                continue
            frame = s.recv(65535)
            # Ethernet type IPv4, IP proto UDP, either port 67/68.
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            if not ({sport, dport} & {DHCP_SERVER_PORT, DHCP_CLIENT_PORT}):
                continue
            now = time.time()
            f.write(struct.pack("<IIII", int(now), int((now % 1) * 1e6), len(frame), len(frame)) + frame)
            f.flush()
            n += 1
    return 0


@dataclass(frozen=True)
class DhcpPacket:
    """One captured BOOTP/DHCP packet as scapy decoded it.

    ``options`` maps option *code* to the value scapy gives (bytes, str, int,
    list); ``file``/``sname`` have their NUL padding stripped.
    """

    time: float
    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: str
    sname: str
    file: str
    options: dict[int, object]

    @property
    def message_type(self) -> str | None:
        from scapy.layers.dhcp import DHCPTypes

        v = self.options.get(53)
        return DHCPTypes.get(v, str(v)) if isinstance(v, int) else None

    @property
    def boot_file(self) -> str:
        """The ``file`` field, else option 67 (RFC 2132 9.5): dnsmasq moves it there when asked for 67."""
        return self.file or (self.opt_bytes(67) or b"").rstrip(b"\0").decode("latin-1")

    @property
    def is_reply(self) -> bool:
        return self.op == 2

    def opt_bytes(self, code: int) -> bytes | None:
        v = self.options.get(code)
        if v is None:
            return None
        if isinstance(v, bytes):
            return v
        if isinstance(v, str):
            return v.encode()
        return None

    @property
    def vendor_class(self) -> bytes | None:
        return self.opt_bytes(60)

    @property
    def pxe_suboptions(self) -> dict[int, bytes] | None:
        """Option 43 split into PXE sub-options (None when absent; raises ValueError when malformed)."""
        raw = self.opt_bytes(43)
        return None if raw is None else parse_suboptions(raw)


def parse_suboptions(raw: bytes) -> dict[int, bytes]:
    """TLV sub-options of option 43 (PXE spec 2.1, section 2.2.5): code, len, value; 0 pad, 255 end."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        code = raw[i]
        if code == 255:
            return out
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(raw) or i + 2 + raw[i + 1] > len(raw):
            raise ValueError(f"option 43 sub-option {code} runs past the end: {raw.hex()}")
        out[code] = raw[i + 2:i + 2 + raw[i + 1]]
        i += 2 + raw[i + 1]
    return out


def decode_pcap(path: Path) -> list[DhcpPacket]:
    """Decode a capture with scapy (``scapy.layers.dhcp``): our codec is never involved."""
    from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    out: list[DhcpPacket] = []
    for pkt in rdpcap(str(path)):
        if BOOTP not in pkt:
            continue
        b = pkt[BOOTP]
        opts: dict[int, object] = {}
        if DHCP in pkt:
            for item in pkt[DHCP].options:
                if not isinstance(item, tuple) or not item:
                    continue  # "end" / "pad"
                name, *vals = item
                value = vals[0] if len(vals) == 1 else vals
                if isinstance(name, int):
                    code = name
                elif name in DHCPRevOptions:
                    code = DHCPRevOptions[name][0]
                else:
                    continue
                if code is not None:
                    opts[code] = value
        out.append(DhcpPacket(
            time=float(pkt.time), src_mac=pkt[Ether].src, dst_mac=pkt[Ether].dst,
            src_ip=pkt[IP].src, dst_ip=pkt[IP].dst, sport=pkt[UDP].sport, dport=pkt[UDP].dport,
            op=b.op, xid=b.xid, flags=int(b.flags), ciaddr=b.ciaddr, yiaddr=b.yiaddr, siaddr=b.siaddr,
            giaddr=b.giaddr, chaddr=":".join(f"{x:02x}" for x in bytes(b.chaddr)[:6]),
            sname=bytes(b.sname).rstrip(b"\0").decode("latin-1"),
            file=bytes(b.file).rstrip(b"\0").decode("latin-1"),
            options=opts,
        ))
    return out


def replies(packets: Iterable[DhcpPacket], message_type: str | None = None, *,
            chaddr: str | None = None) -> list[DhcpPacket]:
    """Server replies (op 2), optionally of one message type (``offer``, ``ack``, ``nak``) and for one MAC."""
    return [p for p in packets if p.is_reply and (message_type is None or p.message_type == message_type)
            and (chaddr is None or p.chaddr == chaddr.lower())]


def requests(packets: Iterable[DhcpPacket], message_type: str | None = None) -> list[DhcpPacket]:
    return [p for p in packets if p.op == 1 and (message_type is None or p.message_type == message_type)]


# ---------------------------------------------------------------------------------
# pytest glue (import lazily: bench/ uses this module without pytest's fixtures)
# ---------------------------------------------------------------------------------

def require_decoder() -> None:
    import pytest

    from tests.conftest import IN_CI

    try:
        import scapy.layers.dhcp  # noqa: F401
    except ImportError:
        msg = "scapy (the independent DHCP decoder) is not installed: pip install scapy"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.dhcp_capture",
                                 description="raw capture of UDP 67/68 on IFNAME into a pcap file")
    ap.add_argument("ifname")
    ap.add_argument("path")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--count", type=int, default=10_000)
    args = ap.parse_args(argv)
    return _capture_main(args.ifname, args.path, args.seconds, args.count)


if __name__ == "__main__":
    raise SystemExit(_main())
