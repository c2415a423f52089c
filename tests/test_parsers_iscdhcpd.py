"""ISC dhcpd's log parser (orchestrator/logwatch/parsers/iscdhcpd.py) on the REAL capture, and hostile hand-written lines."""

from __future__ import annotations

import pytest

from orchestrator.logwatch.parsers import parser_for
from tests.log_captures import HOSTILE_MAC, IP, PXE_VC, UTC, YEAR, ours, parse_file


# =========================================================================== real capture


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
