"""dnsmasq's log: DHCP with ``--log-dhcp`` (tag ``dnsmasq-dhcp``) and TFTP (``dnsmasq-tftp``).

DHCP: with ``--log-dhcp`` dnsmasq logs every DHCP message in and out, with
the transaction id (decimal) leading each line. The ``vendor class:``,
``user class:`` and ``client provides name:`` lines come BEFORE the
``DHCPDISCOVER(...)`` / ``DHCPREQUEST(...)`` line of the same xid, so the
parser keeps them and attaches them to that message and to its replies --
only to the packet they were logged with: an xid is client-chosen. dnsmasq
does not log option 93 (client arch); the arch is read from the PXE vendor
class instead (``PXEClient:Arch:00007:...``, PXE spec 2.1 §2.2.5, whose Arch
field carries the same value). Without ``--log-dhcp`` there is no xid and no
vendor class: ``pxe`` and ``kind`` are None. Proxy-DHCP answers
(``PXE(IF) [IP] MAC proxy|FILE``) carry ``proxy``: ``proxy`` is an OFFER, a
FILE an ACK with ``boot_file``.

TFTP: dnsmasq logs a transfer only when it ends (``sent FILE to IP``,
``file FILE not found for IP``, ``failed sending FILE to IP``), with the
file's full path. The parser strips the TFTP root (learnt from dnsmasq's
``TFTP root is`` start line, or passed as ``tftp_root`` for a log read from
its middle; the start line wins) so file names match
what the client asked for, and emits FILE_REQUEST (``inferred``: a transfer
that ended was requested, at or before that time) followed by FILE_DONE /
FILE_FAILED, both with the end line's time: a stage entered from a dnsmasq
log starts when the file's transfer ended, not when it was asked for.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.events import BootEvent, EventKind
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

__all__ = ["DnsmasqParser"]


_DNSMASQ_XID = re.compile(r"(\d{1,10}) (.*)", re.S)
_DNSMASQ_PKT = re.compile(
    rf"(DHCP[A-Z]+|PXE|BOOTP)\(([^()\s]{{1,64}})\) (?:({IP_PATTERN}) )?({MAC_PATTERN})(?: (.*))?$", re.S)


class DnsmasqParser(LineParser):
    """dnsmasq ``--log-dhcp`` and TFTP lines (``dnsmasq-dhcp``, ``dnsmasq-tftp``)."""

    source = "log:dnsmasq"
    idents = ("dnsmasq", "dnsmasq-dhcp", "dnsmasq-tftp")

    def __init__(self, *, tftp_root: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        #: Stripped from logged paths: ``tftp_root`` until the log's ``TFTP root is`` line says otherwise.
        self.tftp_root = self._norm_root(tftp_root) if tftp_root else None
        # dnsmasq handles one packet at a time and logs its lines together, so the
        # info lines of the packet being logged are those since the last line
        # with another xid: (xid, info). An xid is client-chosen: info gathered
        # for one packet never outlives it, so a client reusing another's xid
        # cannot lend it its vendor class.
        self._cur: tuple[int, ClientInfo] | None = None
        self._asked: LRU = LRU()  # (xid, mac) -> ClientInfo of the message a reply answers

    @staticmethod
    def _norm_root(root: str) -> str:
        root = root.strip()
        return root if root.endswith("/") else root + "/"

    def _filename(self, path: str) -> tuple[str, str]:
        """(name as the client asked, full path)."""
        if self.tftp_root and path.startswith(self.tftp_root):
            return path[len(self.tftp_root):], path
        return path, path

    def record(self, rec: Record) -> list[BootEvent]:
        msg = rec.message
        if rec.ident == "dnsmasq-tftp":
            return self._tftp(rec, msg)
        if rec.ident == "dnsmasq-dhcp":
            return self._dhcp(rec, msg)
        return self._tftp(rec, msg) or self._dhcp(rec, msg)

    def _tftp(self, rec: Record, msg: str) -> list[BootEvent]:
        if msg.startswith("TFTP root is "):
            # "TFTP root is %s %s": the second word is "secure mode" or empty.
            root = msg[len("TFTP root is "):].rstrip()
            if root.endswith(" secure mode"):
                root = root[: -len(" secure mode")].rstrip()
            if root:
                self.tftp_root = self._norm_root(root)
            return []
        # The client's address is last; the file name (client text) sits between
        # fixed words, so match the end of the line, not the first " to ".
        m = re.fullmatch(rf"sent (.+) to ({IP_PATTERN})", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = valid_ip(m.group(2))
            return [
                self.file_event(rec, EventKind.FILE_REQUEST, ip, name, inferred=True, path=path),
                self.file_event(rec, EventKind.FILE_DONE, ip, name, result="ok", path=path),
            ]
        m = re.fullmatch(rf"file (.+) not found(?: for ({IP_PATTERN}))?", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = valid_ip(m.group(2)) if m.group(2) else None
            return [
                self.file_event(rec, EventKind.FILE_REQUEST, ip, name, inferred=True, path=path),
                self.file_event(rec, EventKind.FILE_FAILED, ip, name, result="not_found", path=path),
            ]
        m = re.fullmatch(rf"failed sending (.+) to ({IP_PATTERN})", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = valid_ip(m.group(2))
            return [
                self.file_event(rec, EventKind.FILE_REQUEST, ip, name, inferred=True, path=path),
                self.file_event(rec, EventKind.FILE_FAILED, ip, name, result="error", path=path),
            ]
        # "error %d %s received from %s": the client sent a TFTP ERROR (often the
        # PXE ROM's tsize probe, "TFTP Aborted"). No file name on the line: the
        # "failed sending" line that follows carries it. No event here.
        return []

    def _dhcp(self, rec: Record, msg: str) -> list[BootEvent]:
        xid: int | None = None
        m = _DNSMASQ_XID.fullmatch(msg)
        if m:
            xid = int(m.group(1))
            msg = m.group(2)
        if xid is None:
            self._cur = None
        elif self._cur is None or self._cur[0] != xid:
            self._cur = (xid, ClientInfo())
        if self._cur is not None:
            for prefix, attr in (("vendor class: ", "vendor_class"), ("user class: ", "user_class"),
                                 ("client provides name: ", "hostname")):
                if msg.startswith(prefix):
                    setattr(self._cur[1], attr, msg[len(prefix):])
                    return []
        m = _DNSMASQ_PKT.match(msg)
        if not m:
            return []
        kind, iface, ip, mac_s, trailer = m.groups()
        mac = norm_mac(mac_s)
        if mac is None:
            return []
        mtype = kind[4:] if kind.startswith("DHCP") else kind
        if self._cur is None:
            # Without --log-dhcp dnsmasq logs no xid and no vendor class at all.
            info = ClientInfo(known=False)
        elif MSG_DIRECTION.get(mtype) == "in":
            # With --log-dhcp, a message with no "vendor class:" line had none.
            info = self._cur[1]
            self._cur = (xid, ClientInfo())  # consumed: the next packet starts afresh
            self._asked.put((xid, mac), info)
        else:
            info = self._asked.get((xid, mac))
            if info is None:  # a reply with its question not in this log (or a proxy answer)
                info = self._cur[1] if kind == "PXE" else ClientInfo(known=False)
        ip = valid_ip(ip) if ip else None
        extra: dict[str, Any] = {"interface": iface}
        if kind == "PXE":
            # Proxy-DHCP / PXE boot-server answer ("PXE(eth0) [IP] MAC proxy|FILE").
            extra["proxy"] = True
            if trailer and trailer != "proxy":
                extra["boot_file"] = trailer.strip()
            ev = self.dhcp_event(rec, "OFFER" if (trailer or "").strip() == "proxy" else "ACK", mac, ip,
                                 info, xid=xid, **extra)
            return [ev]
        if mtype not in MSG_DIRECTION:
            return []
        if trailer:
            trailer = trailer.strip()
            if mtype == "ACK":
                # dnsmasq puts the name it will use here (already sanitised by dnsmasq).
                if trailer and not info.hostname:
                    info = ClientInfo(info.vendor_class, info.arch, info.user_class, trailer, info.known)
            elif trailer:
                extra["reason"] = trailer
        return [self.dhcp_event(rec, mtype, mac, ip, info, xid=xid, **extra)]
