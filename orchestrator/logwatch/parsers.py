"""Log-line parsers: the boot evidence in dnsmasq, ISC dhcpd, tftp-hpa and Kea logs.

Each parser is a small stateful object fed one line at a time (``feed(line)``)
that hands back :class:`~orchestrator.events.BootEvent` values shaped like the
embedded servers' (``orchestrator/protocols/dhcp_server.py`` ``_event``,
``orchestrator/bootserver/tftp.py`` ``_emit``), so the tracker cannot tell a
log-derived event from a wire-derived one, except by ``source``
(``log:dnsmasq``, ``log:iscdhcpd``, ``log:tftp-hpa``, ``log:kea``) and two
extra detail keys: ``line`` (the raw log line, the "last evidence") and, on
events the parser had to infer, ``inferred`` (see below).

Both ``time`` and ``wall`` are the log line's timestamp as Unix time: a log
has no monotonic clock, and replay needs the log's own times.

Log content is attacker-controlled (a DHCP client picks its host name, vendor
class and user class; a TFTP client picks file names). The rules that follow:

* ``feed`` never raises and never emits for a line it does not recognise;
  the public entry point catches anything the parsing code might still throw
  (counted in :attr:`LineParser.errors`), lines are cut at :data:`MAX_LINE`
  characters and every piece of per-client state is a bounded LRU.
* Every pattern is anchored on the part of the line the daemon wrote, never
  on client text: ISC dhcpd's ``from MAC (HOSTNAME) via IF`` is read with the
  MAC from the front and ``via IF`` from the END of the line, so a host name
  of ``x) via eth9`` stays inside the host name.
* Host names go through the same :func:`sanitize_hostname` as the embedded
  server's; the raw text is only in ``detail["line"]``.

What each daemon logs, and what it does not (and what that means for the
tracker's stages):

* **dnsmasq** ``--log-dhcp``: every DHCP message in and out, with the
  transaction id (decimal) leading each line; ``vendor class:``, ``user
  class:`` and ``client provides name:`` lines come BEFORE the
  ``DHCPDISCOVER(...)`` / ``DHCPREQUEST(...)`` line of the same xid, so the
  parser keeps them and attaches them to that message and to its replies
  (only to the packet they were logged with: an xid is client-chosen). dnsmasq does not log option 93 (client arch); the arch is read from
  the PXE vendor class instead (``PXEClient:Arch:00007:...``, PXE spec 2.1
  §2.2.5, whose Arch field carries the same value). TFTP: dnsmasq logs a
  transfer only when it ends (``sent FILE to IP``, ``file FILE not found for
  IP``, ``failed sending FILE to IP``), with the file's full path. The
  parser strips the TFTP root (learnt from dnsmasq's ``TFTP root is`` start
  line, or passed as ``tftp_root``) so file names match what the client asked
  for, and emits FILE_REQUEST (``inferred``: a transfer that ended was
  requested, at or before that time) followed by FILE_DONE / FILE_FAILED,
  both with the end line's time: a stage entered from a dnsmasq log starts
  when the file's transfer ended, not when it was asked for.
* **ISC dhcpd** (syslog): every DHCP message in and out, with MAC, IP, host
  name and interface, but no xid and, by default, neither the vendor class
  nor options 93/77: from its default log alone a PXE ROM's DHCP cannot be
  told from the OS's. The parser then says so (``pxe`` and ``kind`` are None,
  not False): the tracker must fall back on order (the first DHCP of an
  attempt is the PXE one, one after kernel/initrd is the OS's). A site makes
  dhcpd log the evidence with one statement in ``dhcpd.conf`` (global scope;
  dhcpd runs it for each DISCOVER/REQUEST and logs it before the
  ``DHCPDISCOVER``/``DHCPREQUEST`` line, as the captures show)::

      log(info, concat("bootorch-pxe mac ", binary-to-ascii(16, 8, ":", substring(hardware, 1, 6)),
                       " arch ", pick-first-value(binary-to-ascii(10, 16, "", option pxe-system-type), "-"),
                       " user-class ", pick-first-value(binary-to-ascii(16, 8, ":", option user-class), "-"),
                       " vendor-class ", pick-first-value(option vendor-class-identifier, "-")));

  The vendor class (client text) is last on that line; the parser ties the
  line to the next DHCPDISCOVER/DHCPREQUEST from the same MAC.
* **tftp-hpa** ``in.tftpd -v``: ``RRQ from IP filename NAME`` when a request
  arrives, logged BEFORE the name is validated: a FILE_REQUEST, never a
  completion. ``-vv`` adds ``sending NAK (CODE, TEXT) to IP``: a FILE_FAILED,
  tied to its request by the forked child's PID. tftp-hpa never logs a
  completion (nor a timeout or a client abort): from tftp-hpa alone there
  is no FILE_DONE. The tracker has to read the next step's evidence as the
  completion of the previous one (a FILE_REQUEST for the next file, or the
  OS DHCP, means the previous transfer ended; that it succeeded is only
  known because the client moved on to what needs it).
* **Kea** ``kea-dhcp4`` (its default file/stdout layout,
  ``YYYY-MM-DD HH:MM:SS.mmm SEVERITY [kea-dhcp4.LOGGER/PID.TID] MSGID text``):
  at the default INFO severity only the outcome lines, ``DHCP4_LEASE_ADVERT``
  (Kea 2.2; ``DHCP4_LEASE_OFFER`` in later versions) and
  ``DHCP4_LEASE_ALLOC``, with MAC, xid (``tid=``) and address; the parser
  infers the DISCOVER / REQUEST each one answers (``inferred``; ``pxe`` None).
  With the ``kea-dhcp4`` logger at DEBUG (debuglevel 55, as captured),
  ``DHCP4_PACKET_RECEIVED`` gives each message in, and ``DHCP4_QUERY_DATA``
  (a multi-line dump of the options) and ``DHCP4_CLASS_ASSIGNED``
  (``VENDOR_CLASS_...``) give the vendor class, arch and user class. Those
  come after the RECEIVED line, so its event is held until the outcome (or
  the next packet) is logged, then emitted with the RECEIVED line's time.
  Kea writes client strings raw, newlines included: a host name of
  ``a\\n2026-... INFO [kea-dhcp4...] DHCP4_LEASE_ALLOC ...`` puts a forged
  line in the log. The dump gives each option's byte length, so the parser
  swallows the lines an option value spans, and drops those same texts when
  Kea repeats the value later (``DHCP4_CLIENT_HOSTNAME_DATA``).

Timestamps: syslog's ``Nov 25 15:40:01`` (no year, see :class:`SyslogClock`
for the reference date and the Dec->Jan wrap), RFC 3339 (rsyslog's
high-precision format), Kea's ``2026-11-25 15:40:01.123``, and journald's
``journalctl -o json`` records (``__REALTIME_TIMESTAMP``, ``MESSAGE``,
``SYSLOG_IDENTIFIER``, ``_PID``). Times without a zone are local time unless
``tz`` is given.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols.dhcp import sanitize_hostname

__all__ = [
    "MAX_LINE",
    "SOURCES",
    "DnsmasqParser",
    "IscDhcpdParser",
    "KeaParser",
    "LineParser",
    "SyslogClock",
    "SyslogMuxParser",
    "TftpHpaParser",
    "parser_for",
]

#: Longer lines are cut before parsing (nothing a daemon writes for a boot is this long).
MAX_LINE = 16 * 1024
#: Per-client state kept at most (xids, MACs, TFTP PIDs): an LRU, so a flood of
#: fake clients costs memory bounded by this, not by the log's length.
MAX_STATE = 4096

_IP = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
_MAC = r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}"
_MSG_DIRECTION = {
    "DISCOVER": "in", "REQUEST": "in", "DECLINE": "in", "RELEASE": "in", "INFORM": "in",
    "OFFER": "out", "ACK": "out", "NAK": "out",
}
_UEFI_ARCHES = (6, 7, 9, 16)  # RFC 4578 §2.1 / IANA, as in dhcp_server.client_kind
_TFTP_ERRORS = {0: "error", 1: "not_found", 2: "access_violation", 3: "error", 4: "error",
                5: "error", 6: "error", 7: "error", 8: "refused"}  # RFC 1350 §5, RFC 2347 (8)


def _norm_mac(text: str) -> str | None:
    """``52:54:0:88:0:5`` (ISC's binary-to-ascii) or ``52-54-00-...`` -> ``52:54:00:88:00:05``."""
    parts = re.split(r"[:-]", text.strip())
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        return None
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        return None


def _valid_ip(text: str) -> str | None:
    parts = text.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return text
    return None


class _LRU(OrderedDict):
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
        m = re.match(r"PXEClient:Arch:(\d{5})", vc)
        return int(m.group(1)) if m else None

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        arch = self.arch_or_vendor()
        if not self.known:
            d["pxe"] = None
            d["ipxe"] = None
            d["kind"] = None
        else:
            pxe = (self.vendor_class or "").startswith("PXEClient") or self.arch is not None
            ipxe = self.user_class == "iPXE"
            d["pxe"] = pxe or ipxe
            d["ipxe"] = ipxe
            # Same order as dhcp_server.client_kind: iPXE first, then PXE arch.
            if ipxe:
                d["kind"] = "ipxe"
            elif not pxe:
                d["kind"] = "other"
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
_ISO_RE = re.compile(
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
        return _journal_record(line)
    m = _BSD_RE.match(line)
    if m:
        mon, day, hh, mm, ss, frac, rest = m.groups()
        t = clock.bsd(mon, int(day), int(hh), int(mm), int(ss), _fraction(frac))
        if t is None:
            return None
        tag, pid, msg = _split_tag(rest)
        return Record(t, tag, pid, msg, line)
    m = _ISO_RE.match(line)
    if m:
        t = clock.naive(m.group(1).replace(" ", "T"))
        if t is None:
            return None
        rest = m.group(2)
        tag, pid, msg = _split_tag(rest)
        return Record(t, tag, pid, msg, line)
    return None


def _journal_record(line: str) -> Record | None:
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
    """Feed lines, get :class:`BootEvent` values. Never raises on content."""

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
        detail: dict[str, Any] = {"msg": msg, "direction": _MSG_DIRECTION.get(msg, "in")}
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


# --------------------------------------------------------------------------- dnsmasq


_DNSMASQ_XID = re.compile(r"(\d{1,10}) (.*)", re.S)
_DNSMASQ_PKT = re.compile(
    rf"(DHCP[A-Z]+|PXE|BOOTP)\(([^()\s]{{1,64}})\) (?:({_IP}) )?({_MAC})(?: (.*))?$", re.S)


class DnsmasqParser(LineParser):
    """dnsmasq ``--log-dhcp`` and TFTP lines (``dnsmasq-dhcp``, ``dnsmasq-tftp``)."""

    source = "log:dnsmasq"
    idents = ("dnsmasq", "dnsmasq-dhcp", "dnsmasq-tftp")

    def __init__(self, *, tftp_root: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.tftp_root = self._norm_root(tftp_root) if tftp_root else None
        self._root_given = tftp_root is not None
        # dnsmasq handles one packet at a time and logs its lines together, so the
        # info lines of the packet being logged are those since the last line
        # with another xid: (xid, info). An xid is client-chosen: info gathered
        # for one packet never outlives it, so a client reusing another's xid
        # cannot lend it its vendor class.
        self._cur: tuple[int, ClientInfo] | None = None
        self._asked: _LRU = _LRU()  # (xid, mac) -> ClientInfo of the message a reply answers

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
            if root and not self._root_given:
                self.tftp_root = self._norm_root(root)
            return []
        # The client's address is last; the file name (client text) sits between
        # fixed words, so match the end of the line, not the first " to ".
        m = re.fullmatch(rf"sent (.+) to ({_IP})", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = _valid_ip(m.group(2))
            return [
                self.file_event(rec, EventKind.FILE_REQUEST, ip, name, inferred=True, path=path),
                self.file_event(rec, EventKind.FILE_DONE, ip, name, result="ok", path=path),
            ]
        m = re.fullmatch(rf"file (.+) not found(?: for ({_IP}))?", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = _valid_ip(m.group(2)) if m.group(2) else None
            return [
                self.file_event(rec, EventKind.FILE_REQUEST, ip, name, inferred=True, path=path),
                self.file_event(rec, EventKind.FILE_FAILED, ip, name, result="not_found", path=path),
            ]
        m = re.fullmatch(rf"failed sending (.+) to ({_IP})", msg, re.S)
        if m:
            name, path = self._filename(m.group(1))
            ip = _valid_ip(m.group(2))
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
        mac = _norm_mac(mac_s)
        if mac is None:
            return []
        mtype = kind[4:] if kind.startswith("DHCP") else kind
        if self._cur is None:
            # Without --log-dhcp dnsmasq logs no xid and no vendor class at all.
            info = ClientInfo(known=False)
        elif _MSG_DIRECTION.get(mtype) == "in":
            # With --log-dhcp, a message with no "vendor class:" line had none.
            info = self._cur[1]
            self._cur = (xid, ClientInfo())  # consumed: the next packet starts afresh
            self._asked.put((xid, mac), info)
        else:
            info = self._asked.get((xid, mac))
            if info is None:  # a reply with its question not in this log (or a proxy answer)
                info = self._cur[1] if kind == "PXE" else ClientInfo(known=False)
        ip = _valid_ip(ip) if ip else None
        extra: dict[str, Any] = {"interface": iface}
        if kind == "PXE":
            # Proxy-DHCP / PXE boot-server answer ("PXE(eth0) [IP] MAC proxy|FILE").
            extra["proxy"] = True
            if trailer and trailer != "proxy":
                extra["boot_file"] = trailer.strip()
            ev = self.dhcp_event(rec, "OFFER" if (trailer or "").strip() == "proxy" else "ACK", mac, ip,
                                 info, xid=xid, **extra)
            return [ev]
        if mtype not in _MSG_DIRECTION:
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


# --------------------------------------------------------------------------- ISC dhcpd

# The structure ISC dhcpd writes, client host name in parentheses. The host
# name is matched greedily up to the LAST ") via ", and "via IF" with an
# optional ": reason" is anchored at the end of the line: nothing a client puts
# in its name can move the MAC (fixed position, fixed format) or the interface.
_ISC_TAIL = r"(?: \((?P<host>.*)\))? via (?P<via>\S+?)(?:: (?P<reason>.*))?"
_ISC_PATTERNS = [
    ("DISCOVER", re.compile(rf"DHCPDISCOVER from (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("OFFER", re.compile(rf"DHCPOFFER on (?P<ip>{_IP}) to (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("REQUEST", re.compile(
        rf"DHCPREQUEST for (?P<ip>{_IP})(?: \((?P<server>{_IP})\))? from (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("ACK", re.compile(rf"DHCPACK on (?P<ip>{_IP}) to (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("NAK", re.compile(rf"DHCPNAK on (?P<ip>{_IP}) to (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("RELEASE", re.compile(rf"DHCPRELEASE of (?P<ip>{_IP}) from (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    ("DECLINE", re.compile(rf"DHCPDECLINE of (?P<ip>{_IP}) from (?P<mac>{_MAC}){_ISC_TAIL}", re.S)),
    # DHCPINFORM from IP via IF (no MAC) is of no use to the tracker: not parsed.
]
_ISC_PXE = re.compile(
    rf"bootorch-pxe mac (?P<mac>{_MAC}) arch (?P<arch>\d{{1,5}}|-) user-class (?P<uc>[0-9a-fA-F:]{{1,1024}}|-)"
    r" vendor-class (?P<vc>.*)", re.S)
#: How long a "bootorch-pxe" line waits for its DHCPDISCOVER/DHCPREQUEST line.
_ISC_PXE_TTL = 5.0


class IscDhcpdParser(LineParser):
    """ISC dhcpd's syslog lines (``dhcpd[PID]: DHCPDISCOVER from ...``)."""

    source = "log:iscdhcpd"
    idents = ("dhcpd",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._pending: _LRU = _LRU()  # mac -> (time, ClientInfo) from a bootorch-pxe line
        self._last_in: _LRU = _LRU()  # mac -> ClientInfo of its last message in (for replies)

    def record(self, rec: Record) -> list[BootEvent]:
        msg = rec.message
        m = _ISC_PXE.fullmatch(msg)
        if m:
            mac = _norm_mac(m.group("mac"))
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
        mac = _norm_mac(m.group("mac"))
        if mac is None:
            return []
        gd = m.groupdict()
        direction = _MSG_DIRECTION[mtype]
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
        if via and _valid_ip(via):
            extra["relay"] = via  # ISC prints the relay (giaddr) instead of the interface
        else:
            extra["interface"] = via
        if gd.get("reason"):
            extra["reason"] = gd["reason"]
        if gd.get("server"):
            extra["server_id"] = gd["server"]
        ip = _valid_ip(gd["ip"]) if gd.get("ip") else None
        return [self.dhcp_event(rec, mtype, mac, ip, info, **extra)]


# --------------------------------------------------------------------------- tftp-hpa


_HPA_RRQ = re.compile(rf"RRQ from ({_IP}) filename (.*)", re.S)
_HPA_NAK = re.compile(rf"sending NAK \((\d{{1,5}}), (.*)\) to ({_IP})", re.S)


class TftpHpaParser(LineParser):
    """tftp-hpa ``in.tftpd -v`` / ``-vv`` lines."""

    source = "log:tftp-hpa"
    idents = ("in.tftpd", "tftpd", "tftp")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._by_pid: _LRU = _LRU()  # forked child's pid -> (ip, filename)
        self._by_ip: _LRU = _LRU()  # ip -> last filename asked (when there is no pid)

    def record(self, rec: Record) -> list[BootEvent]:
        msg = rec.message.rstrip("\n")
        m = _HPA_RRQ.fullmatch(msg)
        if m:
            ip = _valid_ip(m.group(1))
            name = m.group(2)
            detail: dict[str, Any] = {"op": "rrq"}
            # "... filename A remapped to B" (with -m rules). A name holding
            # " remapped to " is ambiguous; the first split keeps what the
            # client asked for, as the embedded server reports it.
            if " remapped to " in name:
                name, _, remapped = name.partition(" remapped to ")
                detail["remapped_to"] = remapped
            if rec.pid is not None:
                self._by_pid.put(rec.pid, (ip, name))
            if ip:
                self._by_ip.put(ip, name)
            return [self.file_event(rec, EventKind.FILE_REQUEST, ip, name, **detail)]
        m = _HPA_NAK.fullmatch(msg)
        if m:
            code = int(m.group(1))
            ip = _valid_ip(m.group(3))
            name = None
            if rec.pid is not None and rec.pid in self._by_pid:
                pip, pname = self._by_pid.pop(rec.pid)
                if pip == ip:
                    name = pname
            if name is None and ip is not None:
                name = self._by_ip.get(ip)
            return [self.file_event(rec, EventKind.FILE_FAILED, ip, name, result=_TFTP_ERRORS.get(code, "error"),
                                    error_code=code, error_message=m.group(2))]
        return []


# --------------------------------------------------------------------------- Kea


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
        self._txns: _LRU = _LRU()  # xid -> _KeaTxn
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
            rec = _journal_record(line)
            if rec is None or (rec.ident is not None and rec.ident not in self.idents):
                return []
            return self._kea_message(rec.time, rec.message, line)
        m = _ISO_RE.match(line)
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
        mac = _norm_mac(mac_s) if hwtype == "1" else None
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
            if pm and pm.group(1) in _MSG_DIRECTION:
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
            lm = re.search(rf"lease ({_IP}) ", body)
            ip = _valid_ip(lm.group(1)) if lm else None
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
        # that starts with such a text is dropped. Texts shorter than _POISON_KEY
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
            im = re.match(rf"({_IP})", value)
            if im:
                txn.ip = _valid_ip(im.group(1))


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


# --------------------------------------------------------------------------- syslog mux


class SyslogMuxParser(LineParser):
    """One shared syslog file (``/var/log/syslog``): each line to its daemon's parser by tag."""

    source = "log:syslog"

    def __init__(self, *, tftp_root: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        shared = self.clock
        self.parsers: list[LineParser] = [
            DnsmasqParser(clock=shared, tftp_root=tftp_root),
            IscDhcpdParser(clock=shared),
            TftpHpaParser(clock=shared),
            KeaParser(clock=shared),
        ]

    def _feed(self, line: str) -> list[BootEvent]:
        rec = parse_envelope(line, self.clock)
        if rec is None or rec.ident is None:
            return []
        for p in self.parsers:
            if rec.ident in p.idents:
                if isinstance(p, KeaParser):
                    return p._kea_message(rec.time, rec.message, line)
                return p.record(rec)
        return []

    def _flush(self) -> list[BootEvent]:
        out: list[BootEvent] = []
        for p in self.parsers:
            out.extend(p.flush())
        return out


# --------------------------------------------------------------------------- factory


SOURCES: dict[str, Callable[..., LineParser]] = {
    "dnsmasq": DnsmasqParser,
    "iscdhcpd": IscDhcpdParser,
    "tftp-hpa": TftpHpaParser,
    "kea": KeaParser,
    "syslog": SyslogMuxParser,
}


def parser_for(source: str, *, year_hint: Any = None, tz: dt.tzinfo | None = None, **options: Any) -> LineParser:
    """A fresh parser for one log of ``source``.

    ``source``: ``dnsmasq``, ``iscdhcpd``, ``tftp-hpa``, ``kea``, or ``syslog``
    (a shared syslog file: ISC dhcpd + tftp-hpa lines, or any mix, routed by
    tag). ``year_hint``: see :class:`SyslogClock`. ``tz``: zone of timestamps
    that carry none (default: this machine's local time). ``options``:
    ``tftp_root=`` for dnsmasq and syslog, when the log lacks the start line.
    """
    try:
        factory = SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown log source {source!r}; one of {', '.join(SOURCES)}") from None
    return factory(year_hint=year_hint, tz=tz, **options)
