"""What every log parser shares: a line's envelope and clock, per-client state, the base class.

A log line is an *envelope* (timestamp, syslog tag, PID) around the message a
daemon wrote. :func:`parse_envelope` takes it off and returns a
:class:`Record`; the daemon parsers (``dnsmasq.py``, ``iscdhcpd.py``,
``tftp_hpa.py``, ``kea.py``) only read ``Record.message``. Envelopes read:

* syslog's ``Nov 25 15:40:01 host tag[pid]: message`` (BSD, no year: see
  :class:`SyslogClock` for the reference date and the Dec->Jan wrap), with an
  optional ``<PRI>`` and busybox syslogd's ``facility.priority`` token;
* RFC 3339 ``2026-11-25T15:40:01.123456+00:00 host tag[pid]: message``
  (rsyslog's high-precision format) and ``2026-11-25 15:40:01.123`` (Kea's
  own layout, read in ``kea.py`` with the same clock);
* journald's ``journalctl -o json`` records (``__REALTIME_TIMESTAMP``,
  ``MESSAGE``, ``SYSLOG_IDENTIFIER``, ``_PID``), ``MESSAGE`` as a string or as
  journald's byte array for non-UTF-8 text.

Times without a zone are local time unless ``tz`` is given.

:class:`LineParser` is the base every parser derives from: :meth:`LineParser.feed`
is the error boundary (it cuts lines at :data:`MAX_LINE`, decodes bytes, and
counts, never raises, whatever the parsing code throws), and
:meth:`LineParser.dhcp_event` / :meth:`LineParser.file_event` build events
shaped like the embedded servers'. A parser overrides :meth:`LineParser.record`
(one message, envelope off) or, when its daemon has a layout of its own,
``_feed`` (one raw line). :class:`ClientInfo` is what a DHCP client said about
itself; :class:`LRU` is the bounded dict every piece of per-client state lives in.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols.dhcp import sanitize_hostname

__all__ = [
    "IP_PATTERN",
    "ISO_RE",
    "LRU",
    "MAC_PATTERN",
    "MAX_LINE",
    "MAX_STATE",
    "MSG_DIRECTION",
    "ClientInfo",
    "LineParser",
    "Record",
    "SyslogClock",
    "journal_record",
    "norm_mac",
    "parse_envelope",
    "valid_ip",
]

#: Longer lines are cut before parsing (nothing a daemon writes for a boot is this long).
MAX_LINE = 16 * 1024
#: Per-client state kept at most (xids, MACs, TFTP PIDs): an LRU, so a flood of
#: fake clients costs memory bounded by this, not by the log's length.
MAX_STATE = 4096

#: Regex sources (not compiled) for an IPv4 address and a MAC as daemons print them.
IP_PATTERN = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
MAC_PATTERN = r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}"
#: DHCP message type -> direction, as the embedded server's events carry it.
MSG_DIRECTION = {
    "DISCOVER": "in", "REQUEST": "in", "DECLINE": "in", "RELEASE": "in", "INFORM": "in",
    "OFFER": "out", "ACK": "out", "NAK": "out",
}
_UEFI_ARCHES = (6, 7, 9, 16)  # RFC 4578 §2.1 / IANA, as in dhcp_server.client_kind


def norm_mac(text: str) -> str | None:
    """``52:54:0:88:0:5`` (ISC's binary-to-ascii) or ``52-54-00-...`` -> ``52:54:00:88:00:05``."""
    parts = re.split(r"[:-]", text.strip())
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        return None
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        return None


def valid_ip(text: str) -> str | None:
    parts = text.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return text
    return None


class LRU(OrderedDict):
    """A dict that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int = MAX_STATE) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


# --------------------------------------------------------------------------- client info


@dataclass(slots=True)
class ClientInfo:
    """What a DHCP client said about itself, as far as the log tells.

    ``known`` is False when the log cannot say (ISC dhcpd without the log
    statement, Kea at INFO): then ``pxe`` and ``kind`` are reported as None.
    """

    vendor_class: str | None = None
    arch: int | None = None
    user_class: str | None = None
    hostname: str | None = None
    known: bool = True

    def arch_or_vendor(self) -> int | None:
        if self.arch is not None:
            return self.arch
        vc = self.vendor_class or ""
        m = re.match(r"(?:PXEClient|HTTPClient):Arch:(\d{5})", vc)
        return int(m.group(1)) if m else None

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        arch = self.arch_or_vendor()
        if not self.known:
            d["pxe"] = None
            d["ipxe"] = None
            d["kind"] = None
        else:
            pxe = (self.vendor_class or "").startswith(("PXEClient", "HTTPClient")) or self.arch is not None
            ipxe = self.user_class == "iPXE"
            d["pxe"] = pxe or ipxe
            d["ipxe"] = ipxe
            # Same order as dhcp_server.client_kind: iPXE first, then PXE arch.
            if ipxe:
                d["kind"] = "ipxe"
            elif not pxe:
                d["kind"] = "other"
            elif (self.vendor_class or "").startswith("HTTPClient") or arch in (15, 16):
                d["kind"] = "uefi_http"
            elif arch in _UEFI_ARCHES:
                d["kind"] = "uefi"
            else:
                d["kind"] = "bios"
        if self.vendor_class is not None:
            d["vendor_class"] = self.vendor_class
        if arch is not None:
            d["arch"] = arch
        if self.user_class is not None:
            d["user_class"] = self.user_class
        hn = sanitize_hostname(self.hostname.encode("utf-8", "replace")) if self.hostname else None
        if hn:
            d["hostname"] = hn
        return d


# --------------------------------------------------------------------------- time


class SyslogClock:
    """Turns timestamps into Unix time, including syslog's year-less ones.

    ``Nov 25 15:40:01`` has no year. The first such stamp takes its year from
    ``year_hint``: an ``int`` is that year; a ``datetime``/``date``/Unix time
    (or None: now) is a reference date, the stamp is put in the latest year
    that does not make it later than the reference plus a day (a log is not
    from the future; the day allows for zones). Later stamps take whichever of
    the current year, the next or the previous puts them nearest the previous
    stamp, so Dec 31 -> Jan 1 moves to the next year and a line a few seconds
    out of order across the wrap does not jump a year.
    """

    _MONTHS = {m: i for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}

    def __init__(self, year_hint: Any = None, tz: dt.tzinfo | None = None) -> None:
        self.tz = tz
        self._year: int | None = None
        self._ref: float | None = None
        self._last: float | None = None
        if isinstance(year_hint, bool):
            year_hint = None
        if isinstance(year_hint, int):
            self._year = year_hint
        elif isinstance(year_hint, dt.datetime):
            self._ref = year_hint.timestamp()
        elif isinstance(year_hint, dt.date):
            self._ref = dt.datetime(year_hint.year, year_hint.month, year_hint.day, tzinfo=tz).timestamp()
        elif isinstance(year_hint, float):
            self._ref = year_hint
        else:
            self._ref = dt.datetime.now(tz=dt.timezone.utc).timestamp()

    def _ts(self, year: int, mon: int, day: int, hh: int, mm: int, ss: int, us: int) -> float | None:
        try:
            return dt.datetime(year, mon, day, hh, mm, ss, us, tzinfo=self.tz).timestamp()
        except (ValueError, OverflowError):
            return None

    def bsd(self, mon_name: str, day: int, hh: int, mm: int, ss: int, us: int = 0) -> float | None:
        mon = self._MONTHS.get(mon_name.lower())
        if mon is None:
            return None
        if self._year is None:  # first stamp, against a reference date
            assert self._ref is not None
            ref_year = dt.datetime.fromtimestamp(self._ref, tz=dt.timezone.utc).year
            best = None
            for y in (ref_year + 1, ref_year, ref_year - 1):
                t = self._ts(y, mon, day, hh, mm, ss, us)
                if t is not None and t <= self._ref + 86400:
                    best = (y, t)
                    break
            if best is None:
                return None
            self._year, t = best
            self._last = t
            return t
        if self._last is None:  # first stamp, year given
            t = self._ts(self._year, mon, day, hh, mm, ss, us)
            if t is not None:
                self._last = t
            return t
        cands = []
        for y in (self._year, self._year + 1, self._year - 1):
            t = self._ts(y, mon, day, hh, mm, ss, us)
            if t is not None:
                cands.append((abs(t - self._last) if self._last is not None else 0.0, y, t))
        if not cands:
            return None
        _, y, t = min(cands)
        if self._last is None or t >= self._last:
            self._year, self._last = y, t
        return t

    def naive(self, text: str) -> float | None:
        """``2026-11-25 15:40:01.123`` or RFC 3339 ``2026-11-25T15:40:01.123456+00:00``."""
        try:
            d = dt.datetime.fromisoformat(text.replace(",", "."))
        except ValueError:
            return None
        if d.tzinfo is None:
            d = d.replace(tzinfo=self.tz)
        try:
            t = d.timestamp()
        except (OverflowError, OSError, ValueError):
            return None
        if self._last is None or t >= self._last:
            self._last = t
        return t


# --------------------------------------------------------------------------- envelope


@dataclass(slots=True)
class Record:
    """One log message with its envelope taken off."""

    time: float
    ident: str | None  # syslog tag (dnsmasq-dhcp, dhcpd, in.tftpd, kea-dhcp4) or None
    pid: int | None
    message: str
    line: str


_BSD_RE = re.compile(r"(?:<\d{1,3}>)?([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))? (.*)", re.S)
ISO_RE = re.compile(
    r"(?:<\d{1,3}>(?:1 )?)?(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?) (.*)", re.S)
_TAG_RE = re.compile(r"([A-Za-z0-9_.\-/]{1,64}?)(?:\[(\d{1,10})\])?:$")


def _split_tag(rest: str) -> tuple[str | None, int | None, str]:
    """``[host] [facility.prio] tag[pid]: message`` -> (tag, pid, message).

    The tag is looked for in the first three tokens only: the message
    (client text) can hold anything, but it comes after the tag.
    """
    tokens = rest.split(" ", 3)
    for i, tok in enumerate(tokens[:3]):
        m = _TAG_RE.match(tok)
        if m:
            msg = " ".join(tokens[i + 1:])
            return m.group(1), int(m.group(2)) if m.group(2) else None, msg
    return None, None, rest


def _fraction(frac: str | None) -> int:
    return int((frac or "0").ljust(6, "0")[:6])


def parse_envelope(line: str, clock: SyslogClock) -> Record | None:
    """The timestamp, tag and message of a syslog/journald/daemon-file line, or None."""
    if line.startswith("{"):
        return journal_record(line)
    m = _BSD_RE.match(line)
    if m:
        mon, day, hh, mm, ss, frac, rest = m.groups()
        t = clock.bsd(mon, int(day), int(hh), int(mm), int(ss), _fraction(frac))
        if t is None:
            return None
        tag, pid, msg = _split_tag(rest)
        return Record(t, tag, pid, msg, line)
    m = ISO_RE.match(line)
    if m:
        t = clock.naive(m.group(1).replace(" ", "T"))
        if t is None:
            return None
        rest = m.group(2)
        tag, pid, msg = _split_tag(rest)
        return Record(t, tag, pid, msg, line)
    return None


def journal_record(line: str) -> Record | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    try:
        t = int(str(obj.get("__REALTIME_TIMESTAMP"))) / 1e6
    except (TypeError, ValueError):
        return None
    msg = obj.get("MESSAGE")
    if isinstance(msg, list):  # journald's form for non-UTF-8 messages: a byte array
        try:
            msg = bytes(int(b) & 0xFF for b in msg[:MAX_LINE]).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return None
    if not isinstance(msg, str):
        return None
    ident = obj.get("SYSLOG_IDENTIFIER")
    pid_s = obj.get("SYSLOG_PID") or obj.get("_PID")
    try:
        pid = int(pid_s) if pid_s is not None else None
    except (TypeError, ValueError):
        pid = None
    return Record(t, ident if isinstance(ident, str) else None, pid, msg[:MAX_LINE], line)


# --------------------------------------------------------------------------- base


class LineParser:
    """Feed lines, get :class:`BootEvent` values. Never raises on content.

    A daemon's parser sets ``source`` and ``idents`` and overrides :meth:`record`
    (one message, envelope off); it overrides ``_feed`` instead when its daemon
    writes a layout of its own, and ``_flush`` when it holds events back.
    """

    source = "log"
    #: Syslog tags (``SYSLOG_IDENTIFIER``) this daemon logs under.
    idents: tuple[str, ...] = ()

    def __init__(self, *, year_hint: Any = None, tz: dt.tzinfo | None = None, clock: SyslogClock | None = None) -> None:
        self.clock = clock or SyslogClock(year_hint, tz)
        #: Lines whose parsing raised (a bug, never the input's fault): counted, not raised.
        self.errors = 0
        self.lines = 0

    def feed(self, line: str | bytes) -> list[BootEvent]:
        self.lines += 1
        try:
            if isinstance(line, (bytes, bytearray)):
                line = bytes(line[: MAX_LINE * 4]).decode("utf-8", "replace")
            line = line[:MAX_LINE].rstrip("\r\n")
            if "\x00" in line:
                line = line.replace("\x00", "\ufffd")
            return self._feed(line)
        except Exception:  # noqa: BLE001 -- content is hostile; a parser bug must not stop a watcher
            self.errors += 1
            return []

    def feed_all(self, lines: Iterable[str | bytes]) -> list[BootEvent]:
        out: list[BootEvent] = []
        for line in lines:
            out.extend(self.feed(line))
        out.extend(self.flush())
        return out

    def flush(self) -> list[BootEvent]:
        """Events held back waiting for a later line (end of a replayed file)."""
        try:
            return self._flush()
        except Exception:  # noqa: BLE001
            self.errors += 1
            return []

    def _flush(self) -> list[BootEvent]:
        return []

    def _feed(self, line: str) -> list[BootEvent]:
        rec = parse_envelope(line, self.clock)
        if rec is None:
            return []
        if rec.ident is not None and self.idents and rec.ident not in self.idents:
            return []
        return self.record(rec)

    def record(self, rec: Record) -> list[BootEvent]:
        raise NotImplementedError

    # -- event builders -------------------------------------------------------
    def dhcp_event(self, rec: Record, msg: str, mac: str, ip: str | None, info: ClientInfo, *,
                   xid: int | None = None, inferred: bool = False, **extra: Any) -> BootEvent:
        detail: dict[str, Any] = {"msg": msg, "direction": MSG_DIRECTION.get(msg, "in")}
        if xid is not None:
            detail["xid"] = xid
        detail.update(info.detail())
        detail["port"] = 67
        detail.update({k: v for k, v in extra.items() if v is not None})
        if inferred:
            detail["inferred"] = True
        detail["line"] = rec.line
        return BootEvent(
            time=rec.time, source=self.source, kind=EventKind.DHCP, client_ip=ip, mac=mac,
            wall=rec.time, result=msg.lower(), detail=detail,
        )

    def file_event(self, rec: Record, kind: EventKind, ip: str | None, filename: str | None, *,
                   result: str | None = None, inferred: bool = False, **detail: Any) -> BootEvent:
        d = {k: v for k, v in detail.items() if v is not None}
        if inferred:
            d["inferred"] = True
        d["line"] = rec.line
        return BootEvent(
            time=rec.time, source=self.source, kind=kind, client_ip=ip, filename=filename,
            wall=rec.time, result=result, detail=d,
        )
