"""A shared syslog file (``/var/log/syslog``, or ``journalctl -o json``): each line to its daemon's parser.

Where several daemons log to one file -- typically ISC dhcpd and tftp-hpa,
but any mix of dnsmasq, dhcpd, in.tftpd and kea-dhcp4 -- :class:`SyslogMuxParser`
takes the envelope off once, picks the daemon parser by the line's syslog tag
(each parser's ``idents``) and hands it the :class:`~orchestrator.logwatch.parsers.common.Record`.
Lines with no tag, or another daemon's tag, give nothing.

The daemon parsers share the mux's :class:`~orchestrator.logwatch.parsers.common.SyslogClock`,
so a year-less stamp is read against the previous line of the file, whatever
daemon wrote it. Events keep their daemon's ``source`` (``log:iscdhcpd``,
``log:tftp-hpa``, ...), not ``log:syslog``.
"""

from __future__ import annotations

from typing import Any

from orchestrator.events import BootEvent
from orchestrator.logwatch.parsers.common import LineParser, parse_envelope
from orchestrator.logwatch.parsers.dnsmasq import DnsmasqParser
from orchestrator.logwatch.parsers.iscdhcpd import IscDhcpdParser
from orchestrator.logwatch.parsers.kea import KeaParser
from orchestrator.logwatch.parsers.nginx import NginxParser
from orchestrator.logwatch.parsers.tftp_hpa import TftpHpaParser

__all__ = ["SyslogMuxParser"]


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
            NginxParser(clock=shared),
        ]

    def _feed(self, line: str) -> list[BootEvent]:
        rec = parse_envelope(line, self.clock)
        if rec is None or rec.ident is None:
            return []
        for p in self.parsers:
            if rec.ident in p.idents:
                return p.record(rec)
        return []

    def _flush(self) -> list[BootEvent]:
        out: list[BootEvent] = []
        for p in self.parsers:
            out.extend(p.flush())
        return out

