"""Log parsers (orchestrator/logwatch/parsers.py) on REAL captured logs.

The captures in tests/fixtures/logs/ were made by tests/fixtures/capture.sh:
real dnsmasq 2.90, ISC dhcpd 4.4.3-P1 + tftp-hpa 5.2 (through busybox
syslogd) and Kea 2.2.0, driven by busybox udhcpc and curl walking the PXE path
(see tests/fixtures/logs/capture-info.txt). The tests below assert, for the
PXE client's MAC/IP, the exact event sequence and that each event's time is
its log line's own timestamp.

Hand-written lines appear only in the sections marked HAND-WRITTEN, for edge
cases a capture cannot produce on demand (year wrap, journald, RFC 3339,
tftp-hpa remaps, truncated/huge/binary input, attacker-built lines).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.events import EventKind
from orchestrator.logwatch.parsers import (
    MAX_LINE,
    SOURCES,
    DnsmasqParser,
    KeaParser,
    SyslogClock,
    TftpHpaParser,
    parser_for,
)
from tests.conftest import require_root, require_tool

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


# =========================================================================== real captures: dnsmasq


def test_dnsmasq_capture_exact_sequence():
    events = parse_file("dnsmasq", "dnsmasq.log")
    seq = [summary(e) for e in ours(events)]
    dora = lambda pxe: [("dhcp", m, pxe) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")]  # noqa: E731
    files = []
    for name in ("pxelinux.0", "ldlinux.c32"):
        files += [("file_request", name, None), ("file_done", name, "ok")]
    for name, found in CONFIG_WALK:
        files += [("file_request", name, None), ("file_done", name, "ok") if found else ("file_failed", name, "not_found")]
    for name in ("vmlinuz", "rootfs.gz"):
        files += [("file_request", name, None), ("file_done", name, "ok")]
    assert seq == dora(True) + files + dora(False)
    assert stages(ours(events)) == ACCEPTANCE
    check_times_and_lines(events, "dnsmasq.log")


def test_dnsmasq_capture_dhcp_detail_like_the_embedded_server():
    events = ours(parse_file("dnsmasq", "dnsmasq.log"))
    pxe_discover, os_discover = [e for e in events if e.kind is EventKind.DHCP and e.detail["msg"] == "DISCOVER"]
    d = pxe_discover.detail
    assert (d["direction"], d["pxe"], d["ipxe"], d["kind"], d["vendor_class"], d["arch"], d["port"]) == (
        "in", True, False, "bios", PXE_VC, 0, 67)
    assert isinstance(d["xid"], int)
    assert pxe_discover.source == "log:dnsmasq" and pxe_discover.result == "discover"
    # The ACK that follows carries the same xid and the request's PXE-ness, and the IP.
    ack = next(e for e in events if e.kind is EventKind.DHCP and e.detail["msg"] == "ACK")
    assert ack.detail["xid"] == d["xid"] and ack.detail["pxe"] and ack.client_ip == IP
    o = os_discover.detail
    assert (o["pxe"], o["kind"], o["hostname"]) == (False, "other", "node05")
    assert "vendor_class" not in o


def test_dnsmasq_capture_file_names_are_relative_to_the_learnt_tftp_root():
    events = ours(parse_file("dnsmasq", "dnsmasq.log"))
    files = [e for e in events if e.kind is not EventKind.DHCP]
    assert all(e.detail["path"].endswith("/tftp/" + e.filename) for e in files)
    # Inferred requests say so; the completions do not.
    assert all(e.detail.get("inferred") for e in files if e.kind is EventKind.FILE_REQUEST)
    assert not any(e.detail.get("inferred") for e in files if e.kind is not EventKind.FILE_REQUEST)


def test_dnsmasq_capture_hostile_hostnames_never_reach_events():
    # dnsmasq itself refuses names like "x) via eth9": no "client provides name" line.
    events = [e for e in parse_file("dnsmasq", "dnsmasq.log") if e.mac == HOSTILE_MAC]
    assert events and all("hostname" not in e.detail for e in events)
    assert {e.detail["interface"] for e in events} == {"vs0"}


# =========================================================================== real captures: ISC dhcpd + tftp-hpa


def test_iscdhcpd_tftphpa_capture_exact_sequence():
    events = parse_file("syslog", "iscdhcpd+tftp-hpa.log")
    seq = [summary(e) for e in ours(events)]
    dora = lambda pxe: [("dhcp", m, pxe) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")]  # noqa: E731
    files = [("file_request", "pxelinux.0", None), ("file_request", "ldlinux.c32", None)]
    for name, found in CONFIG_WALK:
        files.append(("file_request", name, None))
        if not found:
            files.append(("file_failed", name, "not_found"))
    files += [("file_request", "vmlinuz", None), ("file_request", "rootfs.gz", None)]
    # tftp-hpa logs no completion: no file_done at all.
    assert seq == dora(True) + files + dora(False)
    assert stages(ours(events)) == ACCEPTANCE
    check_times_and_lines(events, "iscdhcpd+tftp-hpa.log")
    assert {e.source for e in events} == {"log:iscdhcpd", "log:tftp-hpa"}


def test_iscdhcpd_and_tftphpa_parsers_each_take_their_own_lines():
    mux = parse_file("syslog", "iscdhcpd+tftp-hpa.log")
    dhcpd = parse_file("iscdhcpd", "iscdhcpd+tftp-hpa.log")
    tftp = parse_file("tftp-hpa", "iscdhcpd+tftp-hpa.log")
    assert {e.source for e in dhcpd} == {"log:iscdhcpd"} and {e.source for e in tftp} == {"log:tftp-hpa"}
    assert sorted(dhcpd + tftp, key=lambda e: (e.time, e.detail["line"])) == sorted(
        mux, key=lambda e: (e.time, e.detail["line"]))


def test_iscdhcpd_capture_pxe_evidence_from_the_log_statement():
    events = ours(parse_file("iscdhcpd", "iscdhcpd+tftp-hpa.log"))
    first = events[0]
    assert first.detail["msg"] == "DISCOVER" and first.client_ip is None
    assert (first.detail["pxe"], first.detail["kind"], first.detail["vendor_class"], first.detail["arch"]) == (
        True, "bios", PXE_VC, 0)
    req = events[2]
    assert (req.detail["msg"], req.client_ip, req.detail["server_id"], req.detail["interface"]) == (
        "REQUEST", IP, "10.88.0.1", "vs0")
    assert "xid" not in req.detail  # ISC logs none


def test_tftphpa_capture_nak_is_tied_to_its_request_by_pid():
    events = ours(parse_file("tftp-hpa", "iscdhcpd+tftp-hpa.log"))
    for e in events:
        if e.kind is EventKind.FILE_FAILED:
            assert e.detail["error_code"] == 1 and e.detail["error_message"] == "File not found"
            pid = re.search(r"in\.tftpd\[(\d+)\]", e.detail["line"]).group(1)
            rrq = next(r for r in events if r.kind is EventKind.FILE_REQUEST and r.filename == e.filename)
            assert f"in.tftpd[{pid}]" in rrq.detail["line"]


def test_iscdhcpd_capture_hostile_hostnames():
    events = [e for e in parse_file("iscdhcpd", "iscdhcpd+tftp-hpa.log") if e.mac == HOSTILE_MAC]
    by_line = {e.detail["line"]: e for e in events}
    evil = [line for line in by_line if "(x) via eth9) via vs0" in line]
    reboot = [line for line in by_line if "($(reboot)) via vs0" in line]
    unprintable = [line for line in by_line if "(Hostname Unsuitable for Printing)" in line]
    assert evil and reboot and unprintable  # the real dhcpd wrote all three
    for line in evil:
        assert by_line[line].detail["interface"] == "vs0"  # not "eth9)"
        assert by_line[line].detail["hostname"] == "xviaeth9"  # sanitize_hostname, as on the wire
        assert "reason" not in by_line[line].detail
    for line in reboot:
        assert by_line[line].detail["hostname"] == "reboot"
    for line in unprintable:
        assert "hostname" not in by_line[line].detail
    assert {e.detail["interface"] for e in events} == {"vs0"}


# =========================================================================== real captures: Kea


def test_kea_capture_exact_sequence():
    events = parse_file("kea", "kea.log")
    seq = [summary(e) for e in ours(events)]
    assert seq == [("dhcp", m, True) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")] + [
        ("dhcp", m, False) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")]
    check_times_and_lines(events, "kea.log")
    d = ours(events)[0].detail
    # Option 93 is in Kea's packet dump: arch comes from it, not from the vendor class.
    assert (d["vendor_class"], d["arch"], d["kind"]) == (PXE_VC, 0, "bios")
    assert d["line"].split(" ")[4] == "DHCP4_PACKET_RECEIVED"
    assert [e.client_ip for e in ours(events)][:4] == [None, IP, IP, IP]
    assert not any(e.detail.get("inferred") for e in events)


def test_kea_capture_forged_line_in_a_hostname_is_not_evidence():
    # The capture's third hostile client sent a host name holding a newline and a
    # whole Kea DHCP4_LEASE_ALLOC line; Kea wrote it raw, five times.
    raw = lines_of("kea.log")
    forged = [line for line in raw if "52:54:00:66:66:66" in line and line[:4].isdigit()]
    assert len(forged) >= 3
    events = parse_file("kea", "kea.log")
    assert not [e for e in events if e.mac == "52:54:00:66:66:66" or e.client_ip == "10.88.0.99"]
    assert {e.mac for e in events} == {MAC, HOSTILE_MAC}


def test_forged_vendor_class_lines_are_not_evidence_in_any_capture():
    # A fourth hostile client sent option 60 = "PXEClient\n<Kea line>\n<dhcpd line>" for MAC
    # 52:54:00:77:77:77. dnsmasq strips the newlines, dhcpd's log line keeps the text on one
    # line (the vendor class is last on the bootorch-pxe line), Kea writes it raw.
    assert any("77:77:77" in line for line in lines_of("kea.log"))
    for source, name in (("dnsmasq", "dnsmasq.log"), ("syslog", "iscdhcpd+tftp-hpa.log"), ("kea", "kea.log")):
        events = parse_file(source, name)
        assert not [e for e in events if e.mac == "52:54:00:77:77:77" or e.client_ip in ("10.88.0.97", "10.88.0.99")]
    isc_pxe = [e for e in parse_file("iscdhcpd", "iscdhcpd+tftp-hpa.log")
               if e.mac == HOSTILE_MAC and e.detail["pxe"]]
    assert isc_pxe and all(e.detail["vendor_class"].startswith("PXEClient 20") for e in isc_pxe)


def test_kea_info_level_only_infers_the_questions():
    # The same capture with only the INFO lines (Kea's default severity).
    info = [line for line in lines_of("kea.log") if " INFO  [" in line and "[kea-dhcp4.leases/1.1]" not in line]
    p = parser_for("kea", tz=UTC)
    events = [e for e in p.feed_all(info) if e.mac == MAC]
    assert [(e.detail["msg"], e.detail.get("inferred", False), e.detail["pxe"]) for e in events] == [
        ("DISCOVER", True, None), ("OFFER", False, None), ("REQUEST", True, None), ("ACK", False, None)] * 2


# =========================================================================== shape: same as the embedded server


def test_dhcp_detail_keys_match_the_embedded_server():
    from tests.test_dhcp_server import make_core, pxe, req  # the embedded server's own test helpers

    core, _ = make_core()
    out = core.receive(req("discover", "52:54:00:00:00:0a", *pxe()), ("0.0.0.0", 68), now=1.0, wall=time.time())
    wire = {e.detail["direction"]: e for e in out.events}
    logs = {}
    for source, name in (("dnsmasq", "dnsmasq.log"), ("iscdhcpd", "iscdhcpd+tftp-hpa.log"), ("kea", "kea.log")):
        for e in ours(parse_file(source, name)):
            if e.kind is EventKind.DHCP and e.detail["pxe"]:
                logs.setdefault((source, e.detail["direction"]), e)
    assert len(logs) == 6
    for (source, direction), e in logs.items():
        w = wire[direction]
        missing = set(w.detail) - set(e.detail) - {"xid", "boot_file", "user_class", "relay", "hostname"}
        assert not missing, (source, direction, missing)
        for key in ("msg", "direction", "pxe", "ipxe", "kind", "vendor_class", "arch", "port"):
            assert type(e.detail[key]) is type(w.detail[key]), (source, key)
        assert e.result == e.detail["msg"].lower() and w.result == w.detail["msg"].lower()
        assert e.kind is w.kind is EventKind.DHCP


# =========================================================================== HAND-WRITTEN: hostile ISC lines


def isc(msg: str, stamp: str = "Nov 25 15:40:01") -> str:
    return f"{stamp} bootsrv dhcpd[7]: {msg}"  # HAND-WRITTEN


@pytest.mark.parametrize(
    "msg, host, via, reason",
    [
        ("DHCPDISCOVER from 52:54:00:00:00:01 (x) via eth9) via eth0", "xviaeth9", "eth0", None),
        ("DHCPDISCOVER from 52:54:00:00:00:01 (x) via eth9: oops) via eth0: network eth0: no free leases",
         "xviaeth9oops", "eth0", "network eth0: no free leases"),
        ("DHCPDISCOVER from 52:54:00:00:00:01 ($(reboot)) via eth0", "reboot", "eth0", None),
        ("DHCPDISCOVER from 52:54:00:00:00:01 via eth0:1", None, "eth0:1", None),
        ("DHCPDISCOVER from 52:54:00:00:00:01 (a) via b) via 10.9.0.1", "aviab", "10.9.0.1", None),
    ],
)
def test_hand_written_isc_hostile_hostnames(msg, host, via, reason):
    [e] = parser_for("iscdhcpd", year_hint=YEAR, tz=UTC).feed(isc(msg))
    assert e.mac == "52:54:00:00:00:01"
    assert e.detail.get("hostname") == host
    assert e.detail.get("interface", e.detail.get("relay")) == via
    assert e.detail.get("reason") == reason
    assert e.detail["pxe"] is None and e.detail["kind"] is None  # no log statement: unknown, not False


def test_hand_written_isc_mac_cannot_be_spoofed_through_the_hostname():
    p = parser_for("iscdhcpd", year_hint=YEAR, tz=UTC)
    # A name that contains another "from MAC" must not change the MAC read from the front.
    [e] = p.feed(isc("DHCPREQUEST for 10.0.0.9 (10.0.0.1) from 52:54:00:00:00:02 (y from 52:54:00:00:00:99) via eth0"))
    assert e.mac == "52:54:00:00:00:02" and e.client_ip == "10.0.0.9"
    assert p.feed(isc("DHCPDISCOVER from (52:54:00:00:00:02) via eth0")) == []


def test_hand_written_isc_log_statement_with_user_class_and_uefi():
    p = parser_for("iscdhcpd", year_hint=YEAR, tz=UTC)
    assert p.feed(isc("bootorch-pxe mac 52:54:0:0:0:3 arch 7 user-class 69:50:58:45 "
                      "vendor-class PXEClient:Arch:00007:UNDI:003016")) == []
    [e] = p.feed(isc("DHCPDISCOVER from 52:54:00:00:00:03 via eth0"))
    assert (e.detail["pxe"], e.detail["ipxe"], e.detail["kind"], e.detail["user_class"], e.detail["arch"]) == (
        True, True, "ipxe", "iPXE", 7)
    [o] = p.feed(isc("DHCPOFFER on 10.0.0.3 to 52:54:00:00:00:03 via eth0"))
    assert o.detail["kind"] == "ipxe" and o.client_ip == "10.0.0.3"
    # A log statement line for another MAC, or one too old, is not attached.
    p.feed(isc("bootorch-pxe mac 52:54:0:0:0:4 arch 0 user-class - vendor-class PXEClient", "Nov 25 15:40:01"))
    [late] = p.feed(isc("DHCPDISCOVER from 52:54:00:00:00:04 via eth0", "Nov 25 15:41:01"))
    assert late.detail["pxe"] is None


# =========================================================================== HAND-WRITTEN: timestamps


def test_hand_written_year_wrap_december_to_january():
    p = parser_for("tftp-hpa", year_hint=2026, tz=UTC)
    a = p.feed("Dec 31 23:59:59 h in.tftpd[1]: RRQ from 10.0.0.5 filename a")  # HAND-WRITTEN
    b = p.feed("Jan  1 00:00:01 h in.tftpd[2]: RRQ from 10.0.0.5 filename b")
    c = p.feed("Dec 31 23:59:58 h in.tftpd[3]: RRQ from 10.0.0.5 filename c")  # late line across the wrap
    d = p.feed("Jan  1 00:00:02 h in.tftpd[4]: RRQ from 10.0.0.5 filename d")
    utc = lambda *x: dt.datetime(*x, tzinfo=UTC).timestamp()  # noqa: E731
    assert [e.time for e in a + b + c + d] == [
        utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1, 0, 0, 1), utc(2026, 12, 31, 23, 59, 58), utc(2027, 1, 1, 0, 0, 2)]


def test_hand_written_reference_date_puts_december_in_the_previous_year():
    ref = dt.datetime(2027, 1, 2, 12, 0, tzinfo=UTC)
    p = parser_for("tftp-hpa", year_hint=ref, tz=UTC)
    [e] = p.feed("Dec 31 23:00:00 h in.tftpd[1]: RRQ from 10.0.0.5 filename a")  # HAND-WRITTEN
    assert e.time == dt.datetime(2026, 12, 31, 23, tzinfo=UTC).timestamp()
    p = parser_for("tftp-hpa", year_hint=ref, tz=UTC)
    [e] = p.feed("Jan  2 11:00:00 h in.tftpd[1]: RRQ from 10.0.0.5 filename a")
    assert e.time == dt.datetime(2027, 1, 2, 11, tzinfo=UTC).timestamp()


def test_hand_written_feb_29_and_bad_dates():
    c = SyslogClock(2024, UTC)
    assert c.bsd("Feb", 29, 1, 2, 3) == dt.datetime(2024, 2, 29, 1, 2, 3, tzinfo=UTC).timestamp()
    assert SyslogClock(2025, UTC).bsd("Feb", 30, 0, 0, 0) is None
    assert SyslogClock(2025, UTC).bsd("Foo", 1, 0, 0, 0) is None


def test_hand_written_rfc3339_rsyslog_format():
    p = parser_for("syslog", tz=UTC)
    lines = [  # HAND-WRITTEN, rsyslog RSYSLOG_FileFormat
        "2026-11-25T15:40:01.123456+00:00 bootsrv dhcpd[7]: DHCPDISCOVER from 52:54:00:00:00:05 via eth0",
        "2026-11-25T16:40:02.5+01:00 bootsrv in.tftpd[9]: RRQ from 10.0.0.5 filename pxelinux.0",
    ]
    a, b = p.feed_all(lines)
    assert a.time == dt.datetime(2026, 11, 25, 15, 40, 1, 123456, tzinfo=UTC).timestamp()
    assert b.time == dt.datetime(2026, 11, 25, 15, 40, 2, 500000, tzinfo=UTC).timestamp()
    assert (a.source, b.source, b.filename) == ("log:iscdhcpd", "log:tftp-hpa", "pxelinux.0")


def test_hand_written_journald_json():
    us = 1_795_621_306_123_456
    recs = [  # HAND-WRITTEN, journalctl -o json shape
        {"__REALTIME_TIMESTAMP": str(us), "SYSLOG_IDENTIFIER": "dnsmasq-dhcp", "_PID": "5",
         "MESSAGE": "42 vendor class: " + PXE_VC},
        {"__REALTIME_TIMESTAMP": str(us + 1), "SYSLOG_IDENTIFIER": "dnsmasq-dhcp", "_PID": "5",
         "MESSAGE": "42 DHCPDISCOVER(eth0) 52:54:00:00:00:05 "},
        {"__REALTIME_TIMESTAMP": str(us + 2), "SYSLOG_IDENTIFIER": "dnsmasq-tftp", "_PID": "5",
         "MESSAGE": list(b"sent /srv/tftp/pxelinux.0 to 10.0.0.5")},  # journald's byte-array form
        {"__REALTIME_TIMESTAMP": str(us + 3), "SYSLOG_IDENTIFIER": "sshd", "MESSAGE": "DHCPDISCOVER(eth0) 52:54:00:00:00:05"},
    ]
    p = parser_for("dnsmasq", tftp_root="/srv/tftp")
    evs = p.feed_all(json.dumps(r) for r in recs)
    assert [(e.kind.value, e.time) for e in evs] == [
        ("dhcp", (us + 1) / 1e6), ("file_request", (us + 2) / 1e6), ("file_done", (us + 2) / 1e6)]
    assert evs[0].detail["pxe"] and evs[0].detail["xid"] == 42 and evs[2].filename == "pxelinux.0"


# =========================================================================== HAND-WRITTEN: per-daemon edge cases


def test_hand_written_dnsmasq_without_log_dhcp_and_older_formats():
    p = DnsmasqParser(year_hint=YEAR, tz=UTC)
    lines = [  # HAND-WRITTEN
        "Nov 25 15:40:01 dnsmasq-dhcp[5]: DHCPDISCOVER(eth0) 52:54:00:00:00:05 ",
        "Nov 25 15:40:01 dnsmasq-dhcp[5]: DHCPNAK(eth0) 10.0.0.5 52:54:00:00:00:05 wrong address",
        "Nov 25 15:40:02 dnsmasq-tftp[5]: file /srv/tftp/x not found",  # dnsmasq < 2.86: no client
        "Nov 25 15:40:03 dnsmasq-tftp[5]: failed sending /srv/tftp/vmlinuz to 10.0.0.5",
        "Nov 25 15:40:03 dnsmasq-tftp[5]: error 0 TFTP Aborted received from 10.0.0.5",
        "Nov 25 15:40:04 dnsmasq-tftp[5]: sent /srv/tftp/a to 1.2.3.4 to 10.0.0.5",  # client-chosen name
    ]
    evs = p.feed_all(lines)
    assert evs[0].detail["pxe"] is None  # no --log-dhcp: vendor class never logged
    assert evs[1].detail["reason"] == "wrong address" and evs[1].detail["direction"] == "out"
    assert [(e.kind.value, e.filename, e.client_ip, e.result) for e in evs[2:]] == [
        ("file_request", "/srv/tftp/x", None, None), ("file_failed", "/srv/tftp/x", None, "not_found"),
        ("file_request", "/srv/tftp/vmlinuz", "10.0.0.5", None), ("file_failed", "/srv/tftp/vmlinuz", "10.0.0.5", "error"),
        ("file_request", "/srv/tftp/a to 1.2.3.4", "10.0.0.5", None), ("file_done", "/srv/tftp/a to 1.2.3.4", "10.0.0.5", "ok"),
    ]
    assert DnsmasqParser(tftp_root="/srv/tftp", year_hint=YEAR).feed(lines[3])[0].filename == "vmlinuz"


def test_hand_written_dnsmasq_uefi_and_ipxe_from_vendor_and_user_class():
    p = DnsmasqParser(year_hint=YEAR, tz=UTC)
    p.feed("Nov 25 15:40:01 dnsmasq-dhcp[5]: 7 vendor class: PXEClient:Arch:00007:UNDI:003016")  # HAND-WRITTEN
    [e] = p.feed("Nov 25 15:40:01 dnsmasq-dhcp[5]: 7 DHCPDISCOVER(eth0) 52:54:00:00:00:07 ")
    assert (e.detail["kind"], e.detail["arch"]) == ("uefi", 7)
    p.feed("Nov 25 15:40:02 dnsmasq-dhcp[5]: 8 vendor class: PXEClient:Arch:00000:UNDI:002001")
    p.feed("Nov 25 15:40:02 dnsmasq-dhcp[5]: 8 user class: iPXE")
    [e] = p.feed("Nov 25 15:40:02 dnsmasq-dhcp[5]: 8 DHCPREQUEST(eth0) 10.0.0.7 52:54:00:00:00:07 ")
    assert (e.detail["kind"], e.detail["ipxe"], e.detail["user_class"], e.client_ip) == ("ipxe", True, "iPXE", "10.0.0.7")
    [e] = p.feed("Nov 25 15:40:02 dnsmasq-dhcp[5]: 9 PXE(eth0) 52:54:00:00:00:07 proxy")
    assert e.detail["proxy"] and e.detail["msg"] == "OFFER"


def test_hand_written_dnsmasq_reused_xid_does_not_lend_a_vendor_class():
    p = DnsmasqParser(year_hint=YEAR, tz=UTC)
    lines = [  # HAND-WRITTEN: an attacker's packet, then a victim's with the same (client-chosen) xid
        "Nov 25 15:40:01 dnsmasq-dhcp[5]: 77 vendor class: PXEClient:Arch:00000:UNDI:002001",
        "Nov 25 15:40:01 dnsmasq-dhcp[5]: 77 DHCPDISCOVER(eth0) 52:54:00:00:00:66 ",
        "Nov 25 15:40:01 dnsmasq-dhcp[5]: 77 DHCPOFFER(eth0) 10.0.0.66 52:54:00:00:00:66 ",
        "Nov 25 15:40:02 dnsmasq-dhcp[5]: 77 DHCPDISCOVER(eth0) 52:54:00:00:00:05 ",
        "Nov 25 15:40:02 dnsmasq-dhcp[5]: 77 DHCPOFFER(eth0) 10.0.0.5 52:54:00:00:00:05 ",
        "Nov 25 15:40:03 dnsmasq-dhcp[5]: 78 DHCPACK(eth0) 10.0.0.7 52:54:00:00:00:07 ",  # its question not logged
    ]
    evs = p.feed_all(lines)
    assert [(e.mac[-2:], e.detail["msg"], e.detail["pxe"]) for e in evs] == [
        ("66", "DISCOVER", True), ("66", "OFFER", True), ("05", "DISCOVER", False), ("05", "OFFER", False),
        ("07", "ACK", None)]


def test_hand_written_tftphpa_remap_and_nak_codes():
    p = TftpHpaParser(year_hint=YEAR, tz=UTC)
    lines = [  # HAND-WRITTEN
        "Nov 25 15:40:01 h in.tftpd[10]: RRQ from 10.0.0.5 filename /pxelinux.0 remapped to pxelinux.0",
        "Nov 25 15:40:01 h in.tftpd[11]: RRQ from 10.0.0.6 filename ../etc/shadow",
        "Nov 25 15:40:01 h in.tftpd[11]: sending NAK (2, Access violation) to 10.0.0.6",
        "Nov 25 15:40:02 h in.tftpd[12]: sending NAK (1, File not found) to 10.0.0.9",  # no RRQ seen
        "Nov 25 15:40:02 h in.tftpd[13]: WRQ from 10.0.0.6 filename x",
        "Nov 25 15:40:02 h in.tftpd[13]: tftpd: read(ack): Connection refused",
    ]
    evs = p.feed_all(lines)
    assert [(e.kind.value, e.filename, e.result) for e in evs] == [
        ("file_request", "/pxelinux.0", None), ("file_request", "../etc/shadow", None),
        ("file_failed", "../etc/shadow", "access_violation"), ("file_failed", None, "not_found")]
    assert evs[0].detail["remapped_to"] == "pxelinux.0"


def test_hand_written_kea_multiline_string_cannot_forge_a_line():
    forged = ("2026-11-25 15:46:11.000 INFO  [kea-dhcp4.leases/1.1] DHCP4_LEASE_ALLOC [hwtype=1 52:54:00:66:66:66], "
              "cid=[no info], tid=0x1: lease 10.88.0.99 has been allocated for 3600 seconds")
    forged2 = forged.replace("66:66:66", "77:77:77")
    hdr = "2026-11-25 15:46:10.000 DEBUG [kea-dhcp4.packets/9.9] "
    tag = "[hwtype=1 52:54:00:00:00:0b], cid=[no info], tid=0x0000000b"
    value = "\ufffd\ufffd\n" + forged  # undecodable bytes must not shorten the count
    n = len(value.encode()) - 4  # two replacement chars stand for one byte each
    lines = [  # HAND-WRITTEN, Kea debug layout
        hdr + f"DHCP4_PACKET_RECEIVED {tag}: DHCPDISCOVER (type 1) received from 0.0.0.0 to 255.255.255.255 on interface eth0",
        hdr + f"DHCP4_QUERY_DATA {tag}, packet details: local_address=255.255.255.255:67,",
        "options:",
        f'  type=012, len={n:03d}: "' + value.split("\n")[0],
        value.split("\n")[1] + '" (string)',
        f'  type=060, len={10 + len(forged2):03d}: "PXEClient',
        forged2 + '" (string)',
        hdr.replace("packets", "ddns") + f"DHCP4_CLIENT_HOSTNAME_DATA {tag}: client sent Hostname option: \ufffd\ufffd",
        forged,
        hdr.replace("packets", "dhcp4") + f"DHCP4_CLASS_ASSIGNED {tag}: client packet has been assigned to the "
        "following class(es): ALL, VENDOR_CLASS_PXEClient",
        forged2 + ", KNOWN",  # Kea appends the next class names to the forged text
        hdr.replace("DEBUG", "INFO ").replace("packets", "leases")
        + f"DHCP4_LEASE_ADVERT {tag}: lease 10.0.0.11 will be advertised",
    ]
    evs = KeaParser(tz=UTC).feed_all(lines)
    assert [(e.mac, e.detail["msg"], e.detail["pxe"]) for e in evs] == [
        ("52:54:00:00:00:0b", "DISCOVER", True), ("52:54:00:00:00:0b", "OFFER", True)]
    assert evs[0].detail["vendor_class"] == "PXEClient\\x0a" + forged2  # kept inside, the newline made visible (BootEvent)


# =========================================================================== HAND-WRITTEN: hostile input in general

ALL_CAPTURED = [line for name in ("dnsmasq.log", "iscdhcpd+tftp-hpa.log", "kea.log") for line in lines_of(name)]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_truncated_captured_lines_never_raise(source):
    p = parser_for(source, year_hint=YEAR, tz=UTC)
    for line in ALL_CAPTURED[::3]:
        for cut in range(0, len(line), max(1, len(line) // 12)):
            p.feed(line[:cut])
    p.flush()
    assert p.errors == 0


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_garbage_huge_and_binary_lines(source):
    p = parser_for(source, year_hint=YEAR, tz=UTC)
    junk = [
        "", "\n", "{", "{}", "[1,2]", '{"__REALTIME_TIMESTAMP": "x"}', '{"__REALTIME_TIMESTAMP": "1", "MESSAGE": [999, -1]}',
        "Nov 25 99:99:99 h dhcpd[1]: DHCPDISCOVER from 52:54:00:00:00:01 via eth0",
        "Nov 25 15:40:01 h dhcpd[x]: DHCPDISCOVER from 52:54:00:00:00:01 via eth0",
        "Nov 25 15:40:01 h dhcpd[1]: DHCPDISCOVER from 52:54:00:00:00:01 (" + "(" * 50_000 + " via eth0",
        "Nov 25 15:40:01 h in.tftpd[1]: RRQ from 10.0.0.5 filename " + "A" * 1_000_000,
        "Nov 25 15:40:01 h in.tftpd[1]: RRQ from 999.0.0.5 filename x",
        "2026-11-25 15:41:46.098 DEBUG [kea-dhcp4.packets/1.1] DHCP4_PACKET_RECEIVED [hwtype=1 zz], cid=[], tid=0xzz: x",
        "  type=012, len=999: \"" + "x" * 10,
    ]
    for j in junk:
        p.feed(j)
    p.feed(b"Nov 25 15:40:01 h in.tftpd[1]: RRQ from 10.0.0.5 filename \xff\xfe\x00bad")
    p.feed(bytes(range(256)) * 100)
    p.flush()
    assert p.errors == 0
    huge = p.feed("Nov 25 15:40:01 h in.tftpd[1]: RRQ from 10.0.0.5 filename " + "A" * 1_000_000)
    for e in huge:
        assert len(e.detail["line"]) <= MAX_LINE


def test_non_utf8_bytes_are_replaced_not_fatal():
    p = parser_for("tftp-hpa", year_hint=YEAR, tz=UTC)
    [e] = p.feed(b"Nov 25 15:40:01 h in.tftpd[1]: RRQ from 10.0.0.5 filename caf\xe9\xff.cfg")  # HAND-WRITTEN
    assert e.filename == "caf\ufffd\ufffd.cfg"


def test_unknown_source_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown log source"):
        parser_for("syslogd")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(sorted(SOURCES)), lines=st.lists(st.text(max_size=300), max_size=20))
def test_property_arbitrary_text_never_raises(source, lines):
    p = parser_for(source, year_hint=YEAR, tz=UTC)
    for line in lines:
        assert isinstance(p.feed(line), list)
    p.flush()
    assert p.errors == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(sorted(SOURCES)),
    picks=st.lists(st.tuples(st.integers(0, len(ALL_CAPTURED) - 1), st.integers(0, 400), st.text(max_size=40)),
                   min_size=1, max_size=15),
)
def test_property_mutated_real_lines_never_raise(source, picks):
    """Real lines with client-like text spliced in anywhere: the parsers' real attack surface."""
    p = parser_for(source, year_hint=YEAR, tz=UTC)
    for i, pos, insert in picks:
        line = ALL_CAPTURED[i]
        for e in p.feed(line[:pos] + insert + line[pos:]):
            assert e.detail["line"]
            assert e.mac is None or re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", e.mac)
    p.flush()
    assert p.errors == 0


@pytest.mark.slow
@pytest.mark.root
def test_fresh_capture_walks_the_acceptance_stages(tmp_path):
    """Run capture.sh (real daemons in namespaces it creates and removes) and parse what it wrote."""
    require_root()
    for tool in ("dnsmasq", "dhcpd", "in.tftpd", "kea-dhcp4", "busybox", "curl", "unshare"):
        require_tool(tool)
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    script = LOGS.parent / "capture.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("bcap")}  # every namespace removed
    ref = time.time()
    for source, name in (("dnsmasq", "dnsmasq.log"), ("syslog", "iscdhcpd+tftp-hpa.log")):
        p = parser_for(source, year_hint=ref)
        events = p.feed_all((tmp_path / name).read_bytes().decode("utf-8", "replace").splitlines())
        assert p.errors == 0
        assert stages(ours(events)) == ACCEPTANCE, (source, [summary(e) for e in ours(events)])
        assert all(abs(e.time - ref) < 600 for e in events)
        assert not [e for e in events if e.mac == "52:54:00:77:77:77"]
    p = parser_for("kea", year_hint=ref)
    events = ours(p.feed_all((tmp_path / "kea.log").read_text(errors="replace").splitlines()))
    assert [summary(e) for e in events] == [("dhcp", m, True) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")] + [
        ("dhcp", m, False) for m in ("DISCOVER", "OFFER", "REQUEST", "ACK")]


def test_capture_info_records_the_mac_and_versions():
    info = (LOGS / "capture-info.txt").read_text()
    for needle in (MAC, "dnsmasq", "dhcpd", "tftp-hpa", "kea-dhcp4", "syslogd"):
        assert needle in info
