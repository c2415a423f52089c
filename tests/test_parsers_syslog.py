"""The shared-syslog router (orchestrator/logwatch/parsers/syslog.py) on the REAL ISC dhcpd + tftp-hpa capture."""

from __future__ import annotations

from tests.log_captures import ACCEPTANCE, CONFIG_WALK, check_times_and_lines, ours, parse_file, stages, summary


# =========================================================================== real capture: ISC dhcpd + tftp-hpa in one syslog


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
