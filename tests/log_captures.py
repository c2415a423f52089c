"""The captured daemon logs in tests/fixtures/logs/ and the helpers the parser tests read them with.

The captures were made by tests/fixtures/capture.sh: real dnsmasq 2.90, ISC
dhcpd 4.4.3-P1 + tftp-hpa 5.2 (through busybox syslogd) and Kea 2.2.0, driven
by busybox udhcpc and curl walking the PXE path (see
tests/fixtures/logs/capture-info.txt). The parser tests (tests/test_parsers*.py)
assert, for the PXE client's MAC/IP, the exact event sequence and that each
event's time is its log line's own timestamp.

Hand-written lines appear in the parser tests only in the sections marked
HAND-WRITTEN, for edge cases a capture cannot produce on demand (year wrap,
journald, RFC 3339, tftp-hpa remaps, truncated/huge/binary input,
attacker-built lines).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from orchestrator.events import EventKind
from orchestrator.logwatch.parsers import parser_for

LOGS = Path(__file__).resolve().parent / "fixtures" / "logs"
UTC = dt.timezone.utc
YEAR = 2026  # the captures' year (capture-info.txt); syslog stamps carry none
MAC = "52:54:00:88:00:05"  # the PXE client of every capture
IP = "10.88.0.5"
HOSTILE_MAC = "52:54:00:88:00:66"
PXE_VC = "PXEClient:Arch:00000:UNDI:002001"
UUID = "a3c5e9f0-1b2d-4e6f-8a9b-0c1d2e3f4a5b"

CONFIG_WALK = [  # pxelinux's search order as captured: (name, found?)
    (f"pxelinux.cfg/{UUID}", False),
    ("pxelinux.cfg/01-52-54-00-88-00-05", False),
    ("pxelinux.cfg/0A580005", False),
    ("pxelinux.cfg/0A58000", False),
    ("pxelinux.cfg/0A5800", True),
]


def lines_of(name: str) -> list[str]:
    return (LOGS / name).read_bytes().decode("utf-8", "replace").splitlines()


def parse_file(source: str, name: str, **kw):
    p = parser_for(source, year_hint=YEAR, tz=UTC, **kw)
    events = p.feed_all(lines_of(name))
    assert p.errors == 0
    return events


def line_time(line: str) -> float:
    """The timestamp written on a captured line, read independently of the parser."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ", line)
    if m:
        return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
    stamp = dt.datetime.strptime(f"{YEAR} {line[:15]}", "%Y %b %d %H:%M:%S")
    return stamp.replace(tzinfo=UTC).timestamp()


def ours(events, mac=MAC, ip=IP):
    return [e for e in events if e.mac == mac or (e.mac is None and e.client_ip == ip)]


def summary(e) -> tuple:
    if e.kind is EventKind.DHCP:
        return ("dhcp", e.detail["msg"], e.detail["pxe"])
    return (e.kind.value, e.filename, e.result)


def stages(events) -> list[str]:
    """A minimal stage reading (the tracker's job; here only to check the acceptance order)."""
    out: list[str] = []
    for e in events:
        if e.kind is EventKind.DHCP and e.detail["direction"] == "in":
            s = "pxe_dhcp" if e.detail["pxe"] else "os_dhcp"
        elif e.kind is EventKind.FILE_REQUEST:
            f = e.filename or ""
            s = ("config" if f.startswith("pxelinux.cfg/") else "loader" if f in ("pxelinux.0", "ldlinux.c32")
                 else "kernel" if f == "vmlinuz" else "initrd" if f == "rootfs.gz" else "?")
        else:
            continue
        if not out or out[-1] != s:
            out.append(s)
    return out


ACCEPTANCE = ["pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp"]


def check_times_and_lines(events, name: str) -> None:
    raw = set(lines_of(name))
    for e in events:
        assert e.detail["line"] in raw
        assert e.time == e.wall == line_time(e.detail["line"])
