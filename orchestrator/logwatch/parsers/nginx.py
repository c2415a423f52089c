"""nginx's access log in its default ``combined`` format (iPXE scripts, kernels and initrds over HTTP).

``combined`` is ``$remote_addr - $remote_user [$time_local] "$request" $status
$body_bytes_sent "$http_referer" "$http_user_agent"``; nginx writes the line
when a request ENDS, and ``$time_local`` (``25/Nov/2026:15:40:01 +0000``,
always English month names, always with its offset) is that moment. Events,
for ``GET`` only (``HEAD`` moves no file, as with the embedded HTTP server;
other methods are not boot evidence):

* ``200`` / ``206``: FILE_REQUEST (``inferred``) then FILE_DONE, ``result`` ok,
  ``bytes`` = ``$body_bytes_sent``, ``detail["range"]`` set for a 206;
* ``4xx`` / ``5xx``: FILE_REQUEST (``inferred``) then FILE_FAILED, ``result``
  ``not_found`` (404, 410), ``access_violation`` (401, 403),
  ``range_not_satisfiable`` (416), ``timeout`` (408), ``aborted`` (nginx's
  499: the client closed the connection before the response), else ``error``;
* anything else (``304``, redirects, ``1xx``): nothing.

Both events carry the end line's time, like dnsmasq's TFTP lines: a stage
entered from nginx's log starts when the file's transfer ended. The inferred
FILE_REQUEST keeps the stream shaped like the embedded server's, which emits
one before every outcome (a 404 on a config lookup then counts for the
``config`` stage as it would there).

File names are read by the embedded server's own :func:`~orchestrator.bootserver.http.request_name`:
the request target's path (origin or absolute form), query and fragment
dropped, percent-decoded, leading ``/`` removed. nginx writes bytes it escapes
(``"``, ``\\``, control and non-ASCII bytes) as ``\\xHH``; they are turned back
into the bytes the client sent first. A target that is not UTF-8 is no evidence
(the embedded server refuses it).

Limits of ``combined``: a client that hangs up in the middle of a body is
logged with status 200 and the bytes it got, so it reads as FILE_DONE (nginx's
``$request_completion`` would tell, but ``combined`` does not log it); and
there is no start time, so no duration.

Hostile input: everything but the status and the byte count is client text.
The line is matched as a whole (``fullmatch``): the three quoted fields are
``"[^"]*"`` -- nginx's default escaping leaves no raw ``"`` inside them -- and
the status and bytes sit between fixed separators, so text a client puts in
its user name, target, referer or user agent cannot move a field (with
``escape=none`` a raw quote makes the line not match: no event).
``$remote_addr`` must be an IPv4 address (an IPv4-mapped ``::ffff:`` form is
unwrapped); anything else gives events without a client address, which the
tracker cannot place. Lines may come wrapped in a syslog envelope (``access_log
syslog:...``, tag ``nginx``): the envelope is taken off and the message read
the same way.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from orchestrator.bootserver.http import BadTarget, request_name as http_request_name
from orchestrator.events import BootEvent, EventKind
from orchestrator.logwatch.parsers.common import LineParser, Record, SyslogClock, parse_envelope, valid_ip

__all__ = ["NginxParser"]

_COMBINED = re.compile(
    r'([0-9A-Fa-f:.]{1,45}) - ([^"]{0,512}?) '
    r"\[(\d{2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})\] "
    r'"([^"]*)" (\d{3}) (\d{1,20}|-) "([^"]*)" "([^"]*)"')
_REQUEST = re.compile(r"([A-Z]{1,16}) (\S+)(?: HTTP/\d\.\d)?")
_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")
_FAILED = {401: "access_violation", 403: "access_violation", 404: "not_found", 408: "timeout", 410: "not_found",
           416: "range_not_satisfiable", 499: "aborted"}
#: Client text kept in ``detail`` (as the embedded server keeps the user agent), in characters.
_UA_MAX = 200


def _unescape(text: str) -> bytes:
    """nginx's ``\\xHH`` escapes back to the bytes they stand for; other text as UTF-8."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8", "replace")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += text[pos:].encode("utf-8", "replace")
    return bytes(out)


def request_name(target: str) -> str | None:
    """The boot-file name a logged request target asks for (the embedded server's reading), or None."""
    try:
        return http_request_name(_unescape(target))
    except BadTarget:
        return None


class NginxParser(LineParser):
    """nginx access-log lines, ``combined`` format, bare or in a syslog envelope (tag ``nginx``)."""

    source = "log:nginx"
    idents = ("nginx",)

    def _feed(self, line: str) -> list[BootEvent]:
        m = _COMBINED.fullmatch(line)
        if m:
            return self._events(m, line)
        rec = parse_envelope(line, self.clock)
        if rec is None or (rec.ident is not None and rec.ident not in self.idents):
            return []
        return self.record(rec)

    def record(self, rec: Record) -> list[BootEvent]:
        m = _COMBINED.fullmatch(rec.message.rstrip("\n"))
        return self._events(m, rec.line) if m else []

    def _events(self, m: re.Match[str], line: str) -> list[BootEvent]:
        (addr, _user, day, mon, year, hh, mm, ss, sign, oh, om, request, status_s, bytes_s, _referer,
         agent) = m.groups()
        req = _REQUEST.fullmatch(request)
        if not req or req.group(1) != "GET":
            return []  # HEAD moves no file; "-" or garbage is no request
        status = int(status_s)
        if status in (200, 206):
            kind, result = EventKind.FILE_DONE, "ok"
        elif 400 <= status <= 599:
            kind, result = EventKind.FILE_FAILED, _FAILED.get(status, "error")
        else:
            return []
        when = _time(day, mon, year, hh, mm, ss, sign, oh, om)
        name = request_name(req.group(2))
        if when is None or name is None:
            return []
        ip = valid_ip(addr.removeprefix("::ffff:"))
        detail: dict[str, Any] = {"method": "GET", "status": status}
        if status == 206:
            detail["range"] = True
        if agent and agent != "-":
            detail["user_agent"] = _unescape(agent)[:_UA_MAX].decode("latin-1")
        detail["line"] = line
        sent = min(int(bytes_s), 2**63 - 1) if bytes_s != "-" else 0

        def event(k: EventKind, res: str | None, n: int, extra: dict[str, Any]) -> BootEvent:
            return BootEvent(time=when, source=self.source, kind=k, client_ip=ip, filename=name, bytes=n,
                             wall=when, result=res, detail={**detail, **extra})

        return [event(EventKind.FILE_REQUEST, None, 0, {"inferred": True}), event(kind, result, sent, {})]


def _time(day: str, mon: str, year: str, hh: str, mm: str, ss: str, sign: str, oh: str, om: str) -> float | None:
    month = SyslogClock._MONTHS.get(mon.lower())
    if month is None:
        return None
    offset = (int(oh) * 60 + int(om)) * (-1 if sign == "-" else 1)
    try:
        tz = dt.timezone(dt.timedelta(minutes=offset))
        return dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=tz).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
