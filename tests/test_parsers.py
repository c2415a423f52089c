"""The log parsers' shared part (orchestrator/logwatch/parsers/__init__.py, common.py) on REAL captured logs.

What every parser must do whatever its daemon: the envelopes and their clock
(year-less syslog stamps, RFC 3339, journald JSON), the shape of the events
(the embedded server's), and the error boundary: hostile, truncated, huge and
binary input never raises. Each daemon's own tests are in
tests/test_parsers_<module>.py; the captures and the helpers that read them
are in tests/log_captures.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.events import EventKind
from orchestrator.logwatch.parsers import MAX_LINE, SOURCES, SyslogClock, parser_for
from tests.conftest import require_root, require_tool
from tests.log_captures import (
    ACCEPTANCE,
    HOSTILE_MAC,
    LOGS,
    MAC,
    PXE_VC,
    UTC,
    YEAR,
    lines_of,
    ours,
    parse_file,
    stages,
    summary,
)


# =========================================================================== real captures: every daemon


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


# =========================================================================== HAND-WRITTEN: timestamps and envelopes


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


# =========================================================================== real daemons, fresh capture


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
