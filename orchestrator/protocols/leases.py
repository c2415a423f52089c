"""One DHCP lease as a value: :class:`Lease`, validated on construction, and :class:`LeaseConflict`.

The server core (:mod:`orchestrator.protocols.dhcp_server`) makes leases and
hands them to its lease table; the journal (:mod:`orchestrator.bootserver.leases`)
writes them to disk and builds them again, through this same constructor, when
it loads the file. Both sides depend on this module; it depends on neither.

A :class:`Lease` only exists with valid fields, so every lease the core makes
can be written as a journal record and read back as the same value: the MAC and
the client id are lower-cased, ``expires`` becomes a float, and anything that
would not survive (a malformed MAC or address, a non-finite time, an unknown
state, an over-long or unencodable hostname) raises ``ValueError`` or
``TypeError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["MAX_TEXT", "STATES", "Lease", "LeaseConflict", "check_mac"]

STATES = frozenset({"offered", "bound", "released", "declined"})
#: Longest hostname, and longest client id in hex digits, a lease may carry.
#: DHCP options hold at most 255 bytes, so this leaves room. The limit keeps a
#: journal record within the journal's line limit (``bootserver.leases.MAX_LINE``).
MAX_TEXT = 1024

# Hardware address: 1-20 octets (Ethernet is 6; IPoIB 20), lower-case hex.
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){0,19}")
# Canonical dotted quad, as str(ipaddress.IPv4Address(x)) writes it (no leading zeros).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")


class LeaseConflict(ValueError):
    """``put`` of an IP that another MAC holds."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease. Validated and normalised on construction (MAC and client id
    to lower case, ``expires`` to float); invalid fields raise ``ValueError`` or
    ``TypeError``.
    """

    mac: str  # "52:54:00:aa:bb:cc", lower-case
    ip: str  # dotted quad
    expires: float  # Unix time (wall clock)
    state: str  # "offered" | "bound" | "released" | "declined"
    hostname: str | None = None
    client_id: str | None = None  # hex, even length

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))
        ip = self.ip
        if not isinstance(ip, str) or not _IPV4_RE.fullmatch(ip):
            raise ValueError(f"lease IP must be a dotted quad, got {ip!r}")
        exp = self.expires
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
            raise ValueError(f"lease expiry must be a finite number, got {exp!r}")
        object.__setattr__(self, "expires", float(exp))
        if self.state not in STATES:
            raise ValueError(f"lease state must be one of {sorted(STATES)}, got {self.state!r}")
        host = self.hostname
        if host is not None:
            if not isinstance(host, str) or len(host) > MAX_TEXT:
                raise ValueError(f"hostname must be a str of at most {MAX_TEXT} characters")
            if _SURROGATE_PAIR_RE.search(host):
                # JSON would read the two escapes back as one astral character: a
                # different str. Lone surrogates (surrogateescape) are fine.
                raise ValueError(f"hostname holds a surrogate pair, which cannot round-trip: {host!r}")
        cid = self.client_id
        if cid is not None:
            if not isinstance(cid, str) or len(cid) > MAX_TEXT:
                raise ValueError(f"client id must be a hex str of at most {MAX_TEXT} digits")
            cid = cid.lower()
            if not _HEX_RE.fullmatch(cid):
                raise ValueError(f"client id must be hex with an even number of digits, got {cid!r}")
            object.__setattr__(self, "client_id", cid)


def check_mac(mac: object) -> str:
    """``mac`` lower-cased, if it is 1-20 colon-separated hex octets; else ``TypeError``/``ValueError``."""
    if not isinstance(mac, str):
        raise TypeError(f"MAC must be a str, got {type(mac).__name__}")
    low = mac.lower()
    if not _MAC_RE.fullmatch(low):
        raise ValueError(f"MAC must be colon-separated hex octets, got {mac!r}")
    return low
