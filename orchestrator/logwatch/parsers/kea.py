"""Kea's ``kea-dhcp4`` log, in its default layout (file, stdout) or through syslog.

The default file/stdout layout is ``YYYY-MM-DD HH:MM:SS.mmm SEVERITY
[kea-dhcp4.LOGGER/PID.TID] MSGID text``; through syslog the same message
follows the syslog envelope.

At the default INFO severity Kea logs only the outcome lines,
``DHCP4_LEASE_ADVERT`` (Kea 2.2; ``DHCP4_LEASE_OFFER`` in later versions)
and ``DHCP4_LEASE_ALLOC``, with MAC, xid (``tid=``) and address; the parser
infers the DISCOVER / REQUEST each one answers (``inferred``; ``pxe`` None).

With the ``kea-dhcp4`` logger at DEBUG (debuglevel 55, as captured),
``DHCP4_PACKET_RECEIVED`` gives each message in, and ``DHCP4_QUERY_DATA`` (a
multi-line dump of the options) and ``DHCP4_CLASS_ASSIGNED``
(``VENDOR_CLASS_...``) give the vendor class, arch and user class. Those come
after the RECEIVED line, so its event is held until the outcome (or the next
packet) is logged, then emitted with the RECEIVED line's time (:meth:`KeaParser.flush`
emits one still held at the end of a replayed file).

Kea writes client strings raw, newlines included: a host name of
``a\\n2026-... INFO [kea-dhcp4...] DHCP4_LEASE_ALLOC ...`` puts a forged
line in the log. The dump gives each option's byte length, so the parser
swallows the lines an option value spans, and drops those same texts when
Kea repeats the value later (``DHCP4_CLIENT_HOSTNAME_DATA``): :class:`_Poison`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from orchestrator.events import BootEvent
from orchestrator.logwatch.parsers.common import (
    IP_PATTERN,
    ISO_RE,
    LRU,
    MSG_DIRECTION,
    ClientInfo,
    LineParser,
    Record,
    journal_record,
    norm_mac,
    parse_envelope,
    valid_ip,
)

__all__ = ["KeaParser"]


_KEA_HEAD = re.compile(
    r"(?:(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d{1,6})?) +)?(DEBUG|INFO|WARN|ERROR|FATAL) +"
    # "[kea-dhcp4.LOGGER/PID.THREAD]" (file, stdout) or "[kea-dhcp4.LOGGER.THREAD]" (syslog layout)
    r"\[(kea-dhcp4)(?:\.([\w-]{1,64}))?(?:[/.](\d{1,24}))?(?:\.(\d{1,24}))?\] ([A-Z0-9_]{3,80})(?: (.*))?", re.S)
_KEA_CLIENT = re.compile(
    r"\[hwtype=(\d{1,3}) ([0-9a-fA-F:]{0,200})\], cid=\[([^\]]{0,600})\], tid=(0x[0-9a-fA-F]{1,8})[:,]? ?(.*)", re.S)
#: Lines after which a held DHCP4_PACKET_RECEIVED event has all it will get.
_KEA_RELEASE = frozenset({
    "DHCP4_PACKET_RECEIVED", "DHCP4_LEASE_ADVERT", "DHCP4_LEASE_OFFER", "DHCP4_LEASE_ALLOC",
    "DHCP4_PACKET_SEND", "DHCP4_RESPONSE_DATA", "DHCP4_PACKET_PACK",
})


class _Poison:
    """Continuation texts of multi-line client strings, matched as line prefixes.

    Bounded: at most ``limit`` texts (oldest forgotten first), each kept to its
    first 256 characters (a line starting with those is dropped), indexed by
    its first 24 (shorter texts cannot hold a parsable Kea line: not kept).
    """

    KEY, KEEP = 24, 256

    def __init__(self, limit: int = 2048) -> None:
        self.limit = limit
        self._fifo: deque[str] = deque()
        self._index: dict[str, set[str]] = {}

    def add(self, text: str) -> None:
        if len(text) < self.KEY:
            return
        prefix = text[: self.KEEP]
        bucket = self._index.setdefault(prefix[: self.KEY], set())
        if prefix in bucket:
            return
        bucket.add(prefix)
        self._fifo.append(prefix)
        while len(self._fifo) > self.limit:
            old = self._fifo.popleft()
            b = self._index.get(old[: self.KEY])
            if b is not None:
                b.discard(old)
                if not b:
                    del self._index[old[: self.KEY]]

    def match(self, line: str) -> bool:
        return any(line.startswith(p) for p in self._index.get(line[: self.KEY], ()))


_KEA_OPT = re.compile(r"  type=(\d{3}), len=(\d{3}): (.*)", re.S)
_KEA_STR = re.compile(r'"(.*)" \(string\)', re.S)


@dataclass(slots=True)
class _KeaTxn:
    mac: str
    xid: int
    info: ClientInfo = field(default_factory=ClientInfo)
    rec: Record | None = None  # the PACKET_RECEIVED line, event not yet emitted
    msg: str | None = None
    ip: str | None = None
    seen_in: set[str] = field(default_factory=set)


class KeaParser(LineParser):
    """kea-dhcp4's log in its default layout (file, stdout or syslog)."""

    source = "log:kea"
    idents = ("kea-dhcp4",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._txns: LRU = LRU()  # xid -> _KeaTxn
        self._held: _KeaTxn | None = None  # txn whose RECEIVED event waits for its details
        self._record_txn: _KeaTxn | None = None  # txn whose option dump continues on the next lines
        self._swallow = 0  # bytes of a multi-line option value still to skip
        self._opt_code: int | None = None
        self._opt_parts: list[str] = []
        self._poison = _Poison()  # continuation texts of multi-line client strings

    # -- lines ----------------------------------------------------------------
    def _feed(self, line: str) -> list[BootEvent]:
        if self._swallow > 0:
            # Still inside a client string that spans lines: never a log line.
            self._opt_parts.append(line)
            self._swallow -= _byte_len(line) + 1
            if self._swallow <= 0:
                self._end_option()
            return []
        if self._poisoned(line):
            return []  # Kea repeating a multi-line client string elsewhere
        if line.startswith("  type="):
            # An option of a DHCP4_QUERY_DATA / RESPONSE_DATA dump: never a record.
            self._option(line)
            return []
        if line.startswith("{"):
            rec = journal_record(line)
            if rec is None or (rec.ident is not None and rec.ident not in self.idents):
                return []
            return self._kea_message(rec.time, rec.message, line)
        m = ISO_RE.match(line)
        if m and m.group(2).split(" ", 1)[0] in ("DEBUG", "INFO", "WARN", "ERROR", "FATAL"):
            # Kea's own layout: "2026-11-25 15:41:46.098 DEBUG [kea-dhcp4...] MSGID ..."
            t = self.clock.naive(m.group(1).replace(" ", "T"))
            if t is None:
                return []
            return self._kea_message(t, m.group(2), line)
        rec = parse_envelope(line, self.clock)  # Kea through syslog
        if rec is None:
            return []
        return self._kea_message(rec.time, rec.message, line)

    def record(self, rec: Record) -> list[BootEvent]:
        """One kea-dhcp4 message whose envelope is already off (a shared syslog: ``syslog.py``)."""
        return self._kea_message(rec.time, rec.message, rec.line)

    def _kea_message(self, t: float, text: str, line: str) -> list[BootEvent]:
        self._record_txn = None
        m = _KEA_HEAD.match(text.lstrip())
        if not m:
            return []
        stamp, _sev, _prog, _logger, _pid, _tid, msgid, rest = m.groups()
        if stamp:
            t2 = self.clock.naive(stamp.replace(" ", "T"))
            if t2 is not None:
                t = t2
        rec = Record(t, "kea-dhcp4", int(_pid) if _pid else None, rest or "", line)
        rest = rest or ""
        cm = _KEA_CLIENT.match(rest) or _KEA_CLIENT.search(rest[:400])
        if not cm:
            return []
        hwtype, mac_s, _cid, tid, body = cm.groups()
        mac = norm_mac(mac_s) if hwtype == "1" else None
        if mac is None:
            return []
        xid = int(tid, 16)
        out: list[BootEvent] = []
        txn = self._txns.get(xid)
        if txn is None or txn.mac != mac:
            txn = _KeaTxn(mac, xid)
            self._txns.put(xid, txn)
        if self._held is not None and (self._held is not txn or msgid in _KEA_RELEASE
                                       or msgid.startswith(("DHCP4_PACKET_DROP", "DHCP4_PACKET_NAK"))):
            out.extend(self._release())
        if msgid == "DHCP4_PACKET_RECEIVED":
            pm = re.match(r"DHCP([A-Z]+) \(type \d+\) received from (\S+) to (\S+) on interface (\S+)", body)
            if pm and pm.group(1) in MSG_DIRECTION:
                txn.rec = rec
                txn.msg = pm.group(1)
                txn.ip = None
                # Unknown until a dump or a class line says what the client sent.
                txn.info = ClientInfo(known=False)
                txn.seen_in.add(pm.group(1))
                self._held = txn
            return out
        if msgid == "DHCP4_QUERY_DATA":
            self._record_txn = txn
            txn.info.known = True
            return out
        if msgid == "DHCP4_CLASS_ASSIGNED":
            txn.info.known = True
            vm = re.search(r"VENDOR_CLASS_(.*)", body, re.S)
            if vm and txn.info.vendor_class is None:
                vc = re.sub(r", (?:KNOWN|UNKNOWN)(?:, .*)?$", "", vm.group(1), flags=re.S)
                txn.info.vendor_class = vc
            return out
        if msgid in ("DHCP4_LEASE_ADVERT", "DHCP4_LEASE_OFFER", "DHCP4_LEASE_ALLOC"):
            lm = re.search(rf"lease ({IP_PATTERN}) ", body)
            ip = valid_ip(lm.group(1)) if lm else None
            reply = "ACK" if msgid == "DHCP4_LEASE_ALLOC" else "OFFER"
            question = "REQUEST" if reply == "ACK" else "DISCOVER"
            if question not in txn.seen_in:
                # INFO-level log: no RECEIVED line. The answer proves the question.
                txn.seen_in.add(question)
                txn.info = ClientInfo(known=False)
                out.append(self.dhcp_event(rec, question, mac, None, txn.info, xid=xid, inferred=True))
            out.append(self.dhcp_event(rec, reply, mac, ip, txn.info, xid=xid))
            txn.seen_in.discard(question)
            return out
        if msgid == "DHCP4_PACKET_SEND":
            sm = re.match(r"trying to send packet DHCPNAK ", body)
            if sm:
                out.append(self.dhcp_event(rec, "NAK", mac, None, txn.info, xid=xid))
            return out
        return out

    def _poisoned(self, line: str) -> bool:
        return self._poison.match(line)

    def _release(self) -> list[BootEvent]:
        txn, self._held = self._held, None
        if txn is None or txn.rec is None or txn.msg is None:
            return []
        rec, txn.rec = txn.rec, None
        return [self.dhcp_event(rec, txn.msg, txn.mac, txn.ip, txn.info, xid=txn.xid)]

    def _flush(self) -> list[BootEvent]:
        return self._release()

    # -- the option dump of DHCP4_QUERY_DATA ---------------------------------
    def _option(self, line: str) -> None:
        m = _KEA_OPT.fullmatch(line)
        if not m:
            return
        code, length, value = int(m.group(1)), int(m.group(2)), m.group(3)
        if value.startswith('"') and not (value.endswith('" (string)') and _byte_len(value) - 11 >= length):
            # A string value holding newlines: the next lines are part of it.
            self._opt_code = code
            self._opt_parts = [value[1:]]
            self._swallow = length - _byte_len(value[1:])
            if self._swallow <= 0:
                self._end_option()
            return
        self._set_option(code, value)

    def _end_option(self) -> None:
        parts = self._opt_parts
        code, self._opt_code, self._opt_parts, self._swallow = self._opt_code, None, [], 0
        text = "\n".join(parts)
        # Kea repeats the raw value elsewhere (DHCP4_CLIENT_HOSTNAME_DATA): its
        # continuation lines, without the dump's closing '" (string)', are poison.
        # Kea may append to it (", KNOWN" after a VENDOR_CLASS_...), so a line
        # that starts with such a text is dropped. Texts shorter than _Poison.KEY
        # cannot hold a parsable Kea line and are not kept.
        for part in parts[1:]:
            if part.endswith('" (string)'):
                part = part[: -len('" (string)')]
            self._poison.add(part)
        if code is not None:
            self._set_option(code, '"' + text)

    def _set_option(self, code: int, value: str) -> None:
        txn = self._record_txn
        if txn is None or txn.rec is None:
            return
        sm = _KEA_STR.fullmatch(value)
        s = sm.group(1) if sm else None
        if code == 60 and s is not None:
            txn.info.vendor_class = s
        elif code == 77:
            txn.info.user_class = _kea_user_class(value)
        elif code == 12 and s is not None:
            txn.info.hostname = s
        elif code == 93:
            am = re.match(r"(\d{1,5})\s*\(uint16\)", value)
            if am:
                txn.info.arch = int(am.group(1))
            else:
                hm = re.match(r"([0-9A-Fa-f]{4})", value.replace(":", ""))
                if hm:
                    txn.info.arch = int(hm.group(1), 16)
        elif code == 50:
            im = re.match(rf"({IP_PATTERN})", value)
            if im:
                txn.ip = valid_ip(im.group(1))


def _byte_len(text: str) -> int:
    # A U+FFFD stands for one undecodable byte (decode errors='replace'): count it
    # as one, so hostile bytes cannot make a value look longer than it is.
    return len(text.encode("utf-8", "replace")) - 2 * text.count("\ufffd")


def _kea_user_class(value: str) -> str | None:
    sm = _KEA_STR.fullmatch(value)
    if sm:
        return sm.group(1)
    hm = re.match(r"([0-9A-Fa-f:]+)", value)
    if hm:
        try:
            raw = bytes.fromhex(hm.group(1).replace(":", ""))
        except ValueError:
            return None
        return raw.decode("ascii", "replace")
    return None

