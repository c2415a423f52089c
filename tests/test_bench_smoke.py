"""``bench/tftp.py --quick`` runs end to end: every server answers every case.

A smoke run, not a measurement: small files, five concurrent clients. It proves
the harness still starts each peer (tftpd-hpa, dnsmasq, atftpd) and ours, that
every download is byte-identical, that ratios come out for every server, and
that the namespaces it made are gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, require_tool

pytestmark = pytest.mark.slow


def test_bench_quick_produces_ratios_for_every_server() -> None:
    for tool in ("curl", "atftp", "/usr/sbin/in.tftpd"):
        require_tool(tool)
    root = os.geteuid() == 0
    servers = ["tftpd-hpa", "dnsmasq", "atftpd", "ours"] if root else ["tftpd-hpa", "atftpd", "ours"]
    if root:
        require_tool("dnsmasq")
        require_tool("ip")
    cp = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tftp.py"), "--quick", "--json", "--servers", ",".join(servers),
         "--deadline-min", "4"],
        capture_output=True, text=True, timeout=420, cwd=REPO,
    )
    assert cp.returncode == 0, f"exit {cp.returncode}\n{cp.stderr[-3000:]}"
    report = json.loads(cp.stdout)
    assert report["unavailable"] == {}, report["unavailable"]
    results = report["results"]
    labels = list(dict.fromkeys(r["label"] for r in results))
    expected_scenarios = {"lockstep", "window", "concurrent"} | ({"rtt"} if root else set())
    assert {r["scenario"] for r in results} == expected_scenarios
    for r in results:
        assert r["failures"] == 0 and not r["errors"], (r["label"], r["server"], r["errors"])
        assert r["mb_s"] and r["mb_s"] > 0, (r["label"], r["server"])
    for label in labels:
        assert {r["server"] for r in results if r["label"] == label} == set(servers), label
        for peer in servers:
            if peer != "ours":
                ratio = report["ratios"][label][f"ours/{peer}"]
                assert ratio is not None and ratio > 0, (label, peer)
    if root:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for ns in report["config"]["namespaces"]:
            assert ns not in left, f"namespace {ns} was not removed"
