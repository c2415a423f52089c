"""tftp-hpa's log parser (orchestrator/logwatch/parsers/tftp_hpa.py) on the REAL capture, and hand-written edge cases."""

from __future__ import annotations

import re

from orchestrator.events import EventKind
from orchestrator.logwatch.parsers import TftpHpaParser
from tests.log_captures import UTC, YEAR, ours, parse_file


# =========================================================================== real capture


def test_tftphpa_capture_nak_is_tied_to_its_request_by_pid():
    events = ours(parse_file("tftp-hpa", "iscdhcpd+tftp-hpa.log"))
    for e in events:
        if e.kind is EventKind.FILE_FAILED:
            assert e.detail["error_code"] == 1 and e.detail["error_message"] == "File not found"
            pid = re.search(r"in\.tftpd\[(\d+)\]", e.detail["line"]).group(1)
            rrq = next(r for r in events if r.kind is EventKind.FILE_REQUEST and r.filename == e.filename)
            assert f"in.tftpd[{pid}]" in rrq.detail["line"]


# =========================================================================== HAND-WRITTEN: edge cases


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
