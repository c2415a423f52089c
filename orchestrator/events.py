"""BootEvent: the one currency between evidence sources and the tracker.

Every source of evidence about a node's boot -- the embedded DHCP, TFTP and HTTP
servers, and the log watchers that follow dnsmasq / ISC dhcpd / tftp-hpa / Kea --
turns what it saw into :class:`BootEvent` values and sends them down a trio memory
channel. Data flows one way: wire or log line -> BootEvent -> tracker. Nothing
downstream reaches back into a server.

Events are small frozen dataclasses (h11's style): cheap to create on the hot
path, safe to hand between tasks.

A BootEvent is where text from the boot LAN becomes evidence, so it is where
that text is made safe: every string field and everything in ``detail`` goes
through :mod:`orchestrator.safetext` when the event is created. The tracker,
the journal, metrics, JSON output and terminals downstream get printable,
valid, bounded text whatever a client sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from orchestrator.safetext import safe_mapping, safe_text


class EventKind(str, enum.Enum):
    """What happened. The values are stable: they appear in the journal and JSON."""

    #: A DHCP message from a client (detail: msg_type, vendor_class, pxe, arch, ...).
    DHCP = "dhcp"
    #: A client asked for a file (TFTP RRQ or HTTP GET), before any data moved.
    FILE_REQUEST = "file_request"
    #: A file transfer finished: every byte acknowledged (TFTP) or written (HTTP). A TFTP
    #: transfer whose every block went out but whose final ACK never came is also
    #: FILE_DONE, with ``result="unconfirmed"`` (the client most likely has the file).
    FILE_DONE = "file_done"
    #: A file request or transfer failed (not found, access violation, timeout, abort).
    FILE_FAILED = "file_failed"


@dataclass(frozen=True, slots=True)
class BootEvent:
    """One piece of evidence about one client.

    ``time`` is on the trio clock (monotonic; MockClock in tests), ``wall`` is the
    Unix time for humans and the journal. ``mac`` is set when the source knows it
    (DHCP always; TFTP/HTTP only see an IP, the tracker joins it via DHCP).
    """

    time: float
    source: str  # "dhcp", "proxydhcp", "tftp", "http", "log:dnsmasq", ...
    kind: EventKind
    client_ip: str | None = None
    client_port: int | None = None
    mac: str | None = None
    filename: str | None = None
    #: Bytes of payload delivered so far (FILE_DONE: the whole file).
    bytes: int = 0
    #: Size of the file when known (tsize / Content-Length).
    size: int | None = None
    #: Seconds from request to completion or failure.
    duration: float | None = None
    #: "ok", "not_found", "access_violation", "timeout", "aborted", "too_slow", "error", ...
    result: str | None = None
    retransmits: int = 0
    wall: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The one place untrusted text becomes evidence (module docstring).
        if not (_plain(self.source) and _plain(self.client_ip) and _plain(self.mac) and _plain(self.filename)
                and _plain(self.result)):
            for name in ("source", "client_ip", "mac", "filename", "result"):
                v = getattr(self, name)
                if not _plain(v):
                    object.__setattr__(self, name, safe_text(v, _FIELD_MAX))
        if self.detail:
            object.__setattr__(self, "detail", safe_mapping(self.detail))


def _plain(v: Any) -> bool:
    return v is None or (type(v) is str and len(v) <= _FIELD_MAX and v.isprintable())


#: Bound of each string field of a BootEvent (a file name, a MAC, ...); ``detail`` values get safetext's default.
_FIELD_MAX = 512
