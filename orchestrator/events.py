"""BootEvent: the one currency between evidence sources and the tracker.

Every source of evidence about a node's boot -- the embedded DHCP, TFTP and HTTP
servers, and the log watchers that follow dnsmasq / ISC dhcpd / tftp-hpa / Kea --
turns what it saw into :class:`BootEvent` values and sends them down a trio memory
channel. Data flows one way: wire or log line -> BootEvent -> tracker. Nothing
downstream reaches back into a server.

Events are small frozen dataclasses (h11's style): cheap to create on the hot
path, hashable, safe to hand between tasks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping


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
    #: "ok", "not_found", "access_violation", "timeout", "aborted", "error", ...
    result: str | None = None
    retransmits: int = 0
    wall: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
