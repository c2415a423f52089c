"""dnsmasq's log parser (orchestrator/logwatch/parsers/dnsmasq.py) on the REAL capture, and hand-written edge cases."""

from __future__ import annotations

from orchestrator.events import EventKind
from orchestrator.logwatch.parsers import DnsmasqParser
from tests.log_captures import (
    ACCEPTANCE,
    CONFIG_WALK,
    HOSTILE_MAC,
    IP,
    PXE_VC,
    UTC,
    YEAR,
    check_times_and_lines,
    ours,
    parse_file,
    stages,
    summary,
)


# =========================================================================== real capture


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


# =========================================================================== HAND-WRITTEN: edge cases


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
