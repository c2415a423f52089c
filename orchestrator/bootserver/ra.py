"""Null Router Advertisements on the boot interface (``bootserver.router_advertisements``).

Answers every valid IPv6 Router Solicitation on ``network.interface`` with the
Router Advertisement of :func:`orchestrator.protocols.ndp.null_router_advertisement`,
which configures nothing and ends the wait of firmware that will not boot
before its IPv6 autoconfiguration is over (iPXE). Off by default: a site with
IPv6 routers, or RA guard on its switches, does not need it.

The socket is a raw ICMPv6 socket pinned to the interface (``SO_BINDTODEVICE``),
filtered to Router Solicitations (``ICMP6_FILTER``), in the all-routers group.
A solicitation counts only with IP hop limit 255 (RFC 4861 §6.1.1: it was sent
on this link). The answer goes to the solicitor's address, or to all-nodes
when the solicitor has none yet (source ``::``), with hop limit 255. Answers are
capped by a token bucket (:data:`RATE` per second, :data:`BURST` at once): a
flood of solicitations costs at most that many small packets. Needs root or
CAP_NET_RAW; without it, or without IPv6 on the interface, the task logs why
and ends, and the other servers go on.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from orchestrator.protocols.ndp import ALL_NODES, ALL_ROUTERS, ROUTER_SOLICITATION, is_router_solicitation, null_router_advertisement

log = logging.getLogger(__name__)

#: Answers per second, and at once.
RATE = 20.0
BURST = 40
ICMP6_FILTER = 1
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)


@dataclass(slots=True)
class RaStats:
    solicitations: int = 0
    answered: int = 0
    dropped: int = 0  # malformed, not from this link, or over the rate


def _mac(interface: str) -> bytes | None:
    try:
        text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
        mac = bytes.fromhex(text.replace(":", ""))
        return mac if len(mac) == 6 else None
    except (OSError, ValueError):
        return None


def _only_solicitations() -> bytes:
    """struct icmp6_filter passing type 133 only (a set bit blocks a type)."""
    words = [0xFFFFFFFF] * 8
    words[ROUTER_SOLICITATION >> 5] &= ~(1 << (ROUTER_SOLICITATION & 31))
    return struct.pack("8I", *words)


def open_socket(interface: str) -> socket.socket:
    index = socket.if_nametoindex(interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _only_solicitations())
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        mreq = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _hop_limit(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT and len(data) >= 4:
            return struct.unpack("@i", data[:4])[0]
    return None


async def serve_ra(interface: str, *, stats: RaStats | None = None,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer Router Solicitations on ``interface`` until cancelled (see the module docstring)."""
    stats = stats if stats is not None else RaStats()
    try:
        sock = open_socket(interface)
    except OSError as e:
        log.warning("router advertisements: not answering on %s: %s", interface, e)
        task_status.started()
        return
    ra = null_router_advertisement(_mac(interface))
    index = socket.if_nametoindex(interface)
    tokens, last = float(BURST), trio.current_time()
    task_status.started()
    with sock:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, anc, _flags, src = sock.recvmsg(1500, socket.CMSG_SPACE(4))
                except BlockingIOError:
                    break
                except OSError:
                    continue
                stats.solicitations += 1
                now = trio.current_time()
                tokens, last = min(float(BURST), tokens + (now - last) * RATE), now
                if _hop_limit(anc) != 255 or not is_router_solicitation(data) or tokens < 1:
                    stats.dropped += 1
                    continue
                tokens -= 1
                host = src[0].split("%")[0]
                dest = (ALL_NODES, 0, 0, index) if host == "::" else (host, 0, 0, index)
                try:
                    sock.sendto(ra, dest)
                    stats.answered += 1
                except OSError:
                    stats.dropped += 1
            await trio.lowlevel.checkpoint()
