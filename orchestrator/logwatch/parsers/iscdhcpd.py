"""ISC dhcpd's syslog lines (tag ``dhcpd``): ``DHCPDISCOVER from MAC (HOSTNAME) via IF`` and the rest.

dhcpd logs every DHCP message in and out, with MAC, IP, host name and
interface (or relay address), but no xid and, by default, neither the vendor
class nor options 93/77: from its default log alone a PXE ROM's DHCP cannot
be told from the OS's. The parser then says so (``pxe`` and ``kind`` are
None, not False): the tracker must fall back on order (the first DHCP of an
attempt is the PXE one, one after kernel/initrd is the OS's). A site makes
dhcpd log the evidence with one statement in ``dhcpd.conf`` (global scope;
dhcpd runs it for each DISCOVER/REQUEST and logs it before the
``DHCPDISCOVER``/``DHCPREQUEST`` line, as the captures show)::

    log(info, concat("bootorch-pxe mac ", binary-to-ascii(16, 8, ":", substring(hardware, 1, 6)),
                     " arch ", pick-first-value(binary-to-ascii(10, 16, "", option pxe-system-type), "-"),
                     " user-class ", pick-first-value(binary-to-ascii(16, 8, ":", option user-class), "-"),
                     " vendor-class ", pick-first-value(option vendor-class-identifier, "-")));

The vendor class (client text) is last on that line; the parser ties the line
to the next DHCPDISCOVER/DHCPREQUEST from the same MAC (within
``_ISC_PXE_TTL`` seconds), and a reply to the last message in from its MAC.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.events import BootEvent
from orchestrator.logwatch.parsers.common import (
    IP_PATTERN,
    LRU,
    MAC_PATTERN,
    MSG_DIRECTION,
    ClientInfo,
    LineParser,
    Record,
    norm_mac,
    valid_ip,
)

__all__ = ["IscDhcpdParser"]

# The structure ISC dhcpd writes, client host name in parentheses. The host
# name is matched greedily up to the LAST ") via ", and "via IF" with an
# optional ": reason" is anchored at the end of the line: nothing a client puts
# in its name can move the MAC (fixed position, fixed format) or the interface.
_ISC_TAIL = r"(?: \((?P<host>.*)\))? via (?P<via>\S+?)(?:: (?P<reason>.*))?"
_ISC_PATTERNS = [
    ("DISCOVER", re.compile(rf"DHCPDISCOVER from (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    ("OFFER", re.compile(rf"DHCPOFFER on (?P<ip>{IP_PATTERN}) to (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    ("REQUEST", re.compile(
        rf"DHCPREQUEST for (?P<ip>{IP_PATTERN})(?: \((?P<server>{IP_PATTERN})\))? from (?P<mac>{MAC_PATTERN}){_ISC_TAIL}",
        re.S)),
    ("ACK", re.compile(rf"DHCPACK on (?P<ip>{IP_PATTERN}) to (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    ("NAK", re.compile(rf"DHCPNAK on (?P<ip>{IP_PATTERN}) to (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    ("RELEASE", re.compile(rf"DHCPRELEASE of (?P<ip>{IP_PATTERN}) from (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    ("DECLINE", re.compile(rf"DHCPDECLINE of (?P<ip>{IP_PATTERN}) from (?P<mac>{MAC_PATTERN}){_ISC_TAIL}", re.S)),
    # DHCPINFORM from IP via IF (no MAC) is of no use to the tracker: not parsed.
]
_ISC_PXE = re.compile(
    rf"bootorch-pxe mac (?P<mac>{MAC_PATTERN}) arch (?P<arch>\d{{1,5}}|-) user-class (?P<uc>[0-9a-fA-F:]{{1,1024}}|-)"
    r" vendor-class (?P<vc>.*)", re.S)
#: How long a "bootorch-pxe" line waits for its DHCPDISCOVER/DHCPREQUEST line.
_ISC_PXE_TTL = 5.0


class IscDhcpdParser(LineParser):
    """ISC dhcpd's syslog lines (``dhcpd[PID]: DHCPDISCOVER from ...``)."""

    source = "log:iscdhcpd"
    idents = ("dhcpd",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._pending: LRU = LRU()  # mac -> (time, ClientInfo) from a bootorch-pxe line
        self._last_in: LRU = LRU()  # mac -> ClientInfo of its last message in (for replies)

    def record(self, rec: Record) -> list[BootEvent]:
        msg = rec.message
        m = _ISC_PXE.fullmatch(msg)
        if m:
            mac = norm_mac(m.group("mac"))
            if mac:
                uc = None
                if m.group("uc") != "-":
                    try:
                        uc = bytes(int(b, 16) for b in m.group("uc").split(":")).decode("ascii", "replace")
                    except ValueError:
                        uc = None
                vc = m.group("vc")
                info = ClientInfo(
                    vendor_class=None if vc == "-" else vc,
                    arch=None if m.group("arch") == "-" else int(m.group("arch")),
                    user_class=uc,
                )
                self._pending.put(mac, (rec.time, info))
            return []
        if not msg.startswith(("DHCP",)):
            return []
        for mtype, pat in _ISC_PATTERNS:
            m = pat.fullmatch(msg)
            if m:
                break
        else:
            return []
        mac = norm_mac(m.group("mac"))
        if mac is None:
            return []
        gd = m.groupdict()
        direction = MSG_DIRECTION[mtype]
        if direction == "in":
            pending = self._pending.pop(mac, None)
            if pending is not None and rec.time - pending[0] <= _ISC_PXE_TTL:
                info = pending[1]
            else:
                info = ClientInfo(known=False)
            self._last_in.put(mac, info)
        else:
            info = self._last_in.get(mac) or ClientInfo(known=False)
        host = gd.get("host")
        if host is not None and host == "Hostname Unsuitable for Printing":
            host = None  # dhcpd's own placeholder for names with control characters
        info = ClientInfo(info.vendor_class, info.arch, info.user_class, host, info.known)
        via = gd.get("via")
        extra: dict[str, Any] = {}
        if via and valid_ip(via):
            extra["relay"] = via  # ISC prints the relay (giaddr) instead of the interface
        else:
            extra["interface"] = via
        if gd.get("reason"):
            extra["reason"] = gd["reason"]
        if gd.get("server"):
            extra["server_id"] = gd["server"]
        ip = valid_ip(gd["ip"]) if gd.get("ip") else None
        return [self.dhcp_event(rec, mtype, mac, ip, info, **extra)]
