"""Option negotiation for a read request: RFC 2347 (options), 2348 (blksize), 2349 (timeout, tsize), 7440 (windowsize).

:func:`negotiate` applies the RFCs to a request's options and says what goes
into the OACK (:class:`Negotiated`). Every out-of-range rule is written next to
the RFC sentence it follows. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from orchestrator.protocols.tftp.constants import (
    BLKSIZE_MAX, BLKSIZE_MIN, DEFAULT_BLKSIZE, PATH_MTU_BLKSIZE, TIMEOUT_MAX, TIMEOUT_MIN, WINDOWSIZE_MAX, WINDOWSIZE_MIN,
)
from orchestrator.protocols.tftp.errors import LocalProtocolError

__all__ = ["Negotiated", "negotiate", "parse_uint", "CLIENT_RCVBUF", "datagram_cost"]

_UINT = re.compile(r"[0-9]{1,10}\Z")


def parse_uint(value: str) -> int | None:
    """A decimal option value, or None.

    Strict ASCII digits only: Python's ``int()`` also takes ``" 8"``, ``"+8"``,
    ``"1_0"`` and non-ASCII digits, none of which a TFTP peer should send (fbtftp
    passed option values through ``int()`` unchecked).
    """
    if _UINT.match(value) is None:
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of option negotiation for one read request."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    #: Seconds, when the client negotiated RFC 2349 timeout; else None (server default).
    timeout: int | None = None
    #: What the OACK carries, in the client's order; empty means "no OACK" (RFC 2347).
    oack: Mapping[str, str] = field(default_factory=dict)


#: The client receive buffer a window must fit in, by default. A window is sent
#: back to back, so it sits in the client's socket buffer until the client reads
#: it; what does not fit is dropped, the client waits for the rest, and every
#: window costs a retransmit timeout (seen with atftp asking windowsize 64 at
#: blksize 8192 on loopback). Linux's default receive buffer (rmem_default) is
#: 208 KiB counted in skb *truesize*, so we assume 160 KiB and cost each
#: datagram with :func:`datagram_cost`.
CLIENT_RCVBUF = 160 * 1024


def datagram_cost(blksize: int) -> int:
    """Estimated receive-buffer charge (Linux skb truesize) of one DATA datagram.

    The kernel allocates the packet data in power-of-two slabs (headers
    included) plus a few hundred bytes of skb bookkeeping: a 1468-byte block
    costs about 2.5 KiB, an 8192-byte one about 16.5 KiB.
    """
    return (1 << (blksize + 64 - 1).bit_length()) + 512


def negotiate(
    options: Mapping[str, str], *, tsize: int | None, blksize_max: int = PATH_MTU_BLKSIZE, windowsize_max: int = 64,
    client_rcvbuf: int | None = CLIENT_RCVBUF, timeout_max: int = TIMEOUT_MAX,
) -> Negotiated:
    """Apply RFC 2347/2348/2349/7440 to a read request's options.

    RFC 2347: "Options which the server does not support should be omitted from
    the OACK; they must not cause an error to be generated." -- unknown options
    (including tftp-hpa's ``utimeout`` and ``rollover``) are ignored.

    The rule for values out of range, applied uniformly: a value *above* the range
    is clamped, because each RFC lets the server answer a smaller value than asked
    (RFC 2348: "The specified value must be less than or equal to the value
    specified by the client"; RFC 7440 says the same of windowsize). A value
    *below* the range, or not a decimal number, cannot be answered with any valid
    value that is not larger than the request, so the option is ignored and RFC
    1350's defaults apply (the client sees no OACK entry and knows it). RFC 2349's
    timeout is never clamped: "the server ... sends an OACK with the same value"
    -- out of range means ignored, and so does a value above ``timeout_max``: a
    server need not honour a retransmit interval that would let one silent
    client hold a transfer slot for many minutes (255 s x the retry budget).

    RFC 7440 lets the server answer a smaller windowsize, and we also cap the
    window so it fits ``client_rcvbuf`` (see :data:`CLIENT_RCVBUF`), whatever
    order blksize and windowsize arrive in; None disables that cap.
    """
    if not (BLKSIZE_MIN <= blksize_max <= BLKSIZE_MAX):
        raise LocalProtocolError(f"blksize_max {blksize_max} outside RFC 2348's {BLKSIZE_MIN}..{BLKSIZE_MAX}")
    if not (WINDOWSIZE_MIN <= windowsize_max <= WINDOWSIZE_MAX):
        raise LocalProtocolError(f"windowsize_max {windowsize_max} outside RFC 7440's range")
    if not (TIMEOUT_MIN <= timeout_max <= TIMEOUT_MAX):
        raise LocalProtocolError(f"timeout_max {timeout_max} outside RFC 2349's {TIMEOUT_MIN}..{TIMEOUT_MAX}")
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    oack: dict[str, str] = {}
    for name, raw in options.items():
        value = parse_uint(raw)
        if name == "blksize":
            # RFC 2348: "Valid values range between 8 and 65464 octets, inclusive."
            if value is None or value < BLKSIZE_MIN:
                continue
            blksize = min(value, BLKSIZE_MAX, blksize_max)
            oack[name] = str(blksize)
        elif name == "tsize":
            # RFC 2349: "In Read Request packets, a size of "0" is specified in the
            # request and the size of the file, in octets, is returned in the OACK."
            # We answer the size whatever number was sent; a non-number is ignored.
            if value is None or tsize is None:
                continue
            if tsize == 0:
                # Client quirk, curl (7.88 and earlier at least): an OACK with
                # "tsize 0" makes it fail with "invalid tsize -:0:- value in OACK
                # packet" (tftpd-hpa trips it too). Omitting the option is allowed
                # (the server may ignore any option), and an empty file is still
                # delivered as one empty DATA block.
                continue
            oack[name] = str(tsize)
        elif name == "timeout":
            # RFC 2349: "Valid values range between 1 and 255 seconds, inclusive."
            # Above timeout_max: not honoured, so not acknowledged (RFC 2347).
            if value is None or not (TIMEOUT_MIN <= value <= timeout_max):
                continue
            timeout = value
            oack[name] = str(value)
        elif name == "windowsize":
            # RFC 7440: "Valid values range between 1 and 65535 blocks, inclusive."
            if value is None or value < WINDOWSIZE_MIN:
                continue
            windowsize = min(value, WINDOWSIZE_MAX, windowsize_max)
            oack[name] = ""  # filled in below, once blksize is known whatever the order
    if "windowsize" in oack:
        if client_rcvbuf is not None:
            windowsize = max(1, min(windowsize, client_rcvbuf // datagram_cost(blksize)))
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack)
