"""Kea's log parser (orchestrator/logwatch/parsers/kea.py) on the REAL capture, and a hand-written forged multi-line string."""

from __future__ import annotations

from orchestrator.logwatch.parsers import KeaParser, parser_for
from tests.log_captures import HOSTILE_MAC, IP, MAC, PXE_VC, UTC, check_times_and_lines, lines_of, ours, parse_file, summary


# =========================================================================== real capture


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


def test_kea_info_level_only_infers_the_questions():
    # The same capture with only the INFO lines (Kea's default severity).
    info = [line for line in lines_of("kea.log") if " INFO  [" in line and "[kea-dhcp4.leases/1.1]" not in line]
    p = parser_for("kea", tz=UTC)
    events = [e for e in p.feed_all(info) if e.mac == MAC]
    assert [(e.detail["msg"], e.detail.get("inferred", False), e.detail["pxe"]) for e in events] == [
        ("DISCOVER", True, None), ("OFFER", False, None), ("REQUEST", True, None), ("ACK", False, None)] * 2


# =========================================================================== HAND-WRITTEN: edge cases


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
