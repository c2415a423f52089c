"""IPv6 Neighbor Discovery, the two messages a boot LAN without an IPv6 router needs (RFC 4861).

Firmware that configures IPv6 before it boots sends Router Solicitations and
waits for an answer: iPXE's ``ifconf`` (Debian's 2019 build, QEMU's NIC ROMs)
waits until its IPv6 autoconfiguration ends, about 16 s when no router
answers, before it uses the DHCPv4 lease it already has. A Router
Advertisement that configures nothing ends that wait: router lifetime 0 (not a
default router, §6.2.3), no prefix information, M and O flags off (no DHCPv6),
hop limit, reachable time and retransmit timer 0 ("unspecified"). Hosts that
process it change nothing; iPXE's autoconfiguration completes at once.

Pure: bytes in, bytes out. The ICMPv6 checksum is left 0: the kernel fills it
in on a raw ICMPv6 socket (RFC 3542 §3.1).
"""

from __future__ import annotations

import struct

ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
#: Option type: source link-layer address (RFC 4861 §4.6.1).
OPT_SOURCE_LINK_ADDR = 1
#: All-nodes and all-routers link-local multicast groups.
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"


def is_router_solicitation(data: bytes) -> bool:
    """An ICMPv6 payload (as a raw ICMPv6 socket returns it) that is a well-formed Router Solicitation.

    RFC 4861 §6.1.1: type 133, code 0, at least 8 bytes, options (if any) of
    non-zero length that fit. The IP hop limit of 255 is checked by the caller
    (it is not in the payload).
    """
    if len(data) < 8 or data[0] != ROUTER_SOLICITATION or data[1] != 0:
        return False
    i = 8
    while i < len(data):
        if i + 2 > len(data) or data[i + 1] == 0 or i + 8 * data[i + 1] > len(data):
            return False
        i += 8 * data[i + 1]
    return True


def null_router_advertisement(mac: bytes | None = None) -> bytes:
    """A Router Advertisement that configures nothing (see the module docstring).

    ``mac``: the sender's link-layer address, sent as the source link-layer
    address option so hosts need no neighbour solicitation to answer.
    """
    # type, code, checksum (kernel), cur hop limit, flags (M=O=0), router lifetime, reachable, retrans
    ra = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0)
    if mac is not None:
        if len(mac) != 6:
            raise ValueError("a link-layer address is 6 bytes")
        ra += struct.pack("!BB", OPT_SOURCE_LINK_ADDR, 1) + mac
    return ra
