"""Log-line parsers: the boot evidence in dnsmasq, ISC dhcpd, tftp-hpa, Kea and nginx logs.

``parser_for(source)`` gives a fresh parser for one log; feed it one line at a
time (``feed(line)``, str or bytes) and it hands back
:class:`~orchestrator.events.BootEvent` values shaped like the embedded
servers' (``orchestrator/protocols/dhcp_server.py`` ``_event``,
``orchestrator/bootserver/tftp.py`` ``_emit``), so the tracker cannot tell a
log-derived event from a wire-derived one, except by ``source``
(``log:dnsmasq``, ``log:iscdhcpd``, ``log:tftp-hpa``, ``log:kea``, ``log:nginx``) and two
extra detail keys: ``line`` (the raw log line, the "last evidence") and, on
events the parser had to infer, ``inferred``. ``flush()`` hands out what a
parser still holds back at the end of a replayed file.

Both ``time`` and ``wall`` are the log line's timestamp as Unix time: a log
has no monotonic clock, and replay needs the log's own times.

One module per daemon; each one's docstring says what that daemon logs, what it
does not, and what that means for the tracker's stages:

* ``common.py``: the envelope (syslog, RFC 3339, journald JSON) and its
  clock, :class:`LineParser` (the base class and its error boundary),
  :class:`~orchestrator.logwatch.parsers.common.ClientInfo`, the bounded LRU;
* ``dnsmasq.py``: :class:`DnsmasqParser` (DHCP with ``--log-dhcp``, TFTP);
* ``iscdhcpd.py``: :class:`IscDhcpdParser` (and the ``dhcpd.conf`` log
  statement that makes dhcpd log PXE evidence);
* ``tftp_hpa.py``: :class:`TftpHpaParser` (requests and NAKs, never a completion);
* ``kea.py``: :class:`KeaParser` (INFO outcome lines, DEBUG packet dumps);
* ``nginx.py``: :class:`NginxParser` (the ``combined`` access log: HTTP GETs as
  they end, for sites that serve iPXE scripts, kernels and initrds with nginx);
* ``syslog.py``: :class:`SyslogMuxParser`, one shared syslog file routed to
  the daemon parsers by tag.

A new daemon: a module with a :class:`LineParser` subclass (``source``,
``idents``, ``record()``), an entry in :data:`SOURCES`, an instance in
:class:`SyslogMuxParser`'s list.

Log content is attacker-controlled (a DHCP client picks its host name, vendor
class and user class; a TFTP client picks file names). The rules every parser
follows:

* ``feed`` never raises and never emits for a line it does not recognise;
  the public entry point catches anything the parsing code might still throw
  (counted in :attr:`LineParser.errors`), lines are cut at :data:`MAX_LINE`
  characters and every piece of per-client state is a bounded LRU.
* Every pattern is anchored on the part of the line the daemon wrote, never
  on client text: ISC dhcpd's ``from MAC (HOSTNAME) via IF`` is read with the
  MAC from the front and ``via IF`` from the END of the line, so a host name
  of ``x) via eth9`` stays inside the host name.
* Host names go through the same :func:`~orchestrator.protocols.dhcp.sanitize_hostname`
  as the embedded server's; the raw text is only in ``detail["line"]``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from orchestrator.logwatch.parsers.common import MAX_LINE, LineParser, SyslogClock
from orchestrator.logwatch.parsers.dnsmasq import DnsmasqParser
from orchestrator.logwatch.parsers.iscdhcpd import IscDhcpdParser
from orchestrator.logwatch.parsers.kea import KeaParser
from orchestrator.logwatch.parsers.nginx import NginxParser
from orchestrator.logwatch.parsers.syslog import SyslogMuxParser
from orchestrator.logwatch.parsers.tftp_hpa import TftpHpaParser

__all__ = [
    "MAX_LINE",
    "SOURCES",
    "DnsmasqParser",
    "IscDhcpdParser",
    "KeaParser",
    "LineParser",
    "NginxParser",
    "SyslogClock",
    "SyslogMuxParser",
    "TftpHpaParser",
    "parser_for",
]

SOURCES: dict[str, Callable[..., LineParser]] = {
    "dnsmasq": DnsmasqParser,
    "iscdhcpd": IscDhcpdParser,
    "tftp-hpa": TftpHpaParser,
    "kea": KeaParser,
    "nginx": NginxParser,
    "syslog": SyslogMuxParser,
}


def parser_for(source: str, *, year_hint: Any = None, tz: dt.tzinfo | None = None, **options: Any) -> LineParser:
    """A fresh parser for one log of ``source``.

    ``source``: ``dnsmasq``, ``iscdhcpd``, ``tftp-hpa``, ``kea``, ``nginx``, or ``syslog``
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
