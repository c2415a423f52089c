"""`bootorch replay` on real captures (tests/fixtures/capture.sh): one PXE boot's stages, in order, at the log's times."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest

from orchestrator.cli import main
from tests.conftest import REPO

LOGS = REPO / "tests" / "fixtures" / "logs"
MAC = "52:54:00:88:00:05"
PATH = ["pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp"]


def replay_json(capsys, source, *files):
    assert main(["replay", "--source", source, "--year", "2026", "--json", *map(str, files)]) == 0
    return {n["mac"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}


def log_time(line: str) -> float:
    m = re.match(r"(\w{3} [ \d]\d \d\d:\d\d:\d\d)", line)
    return datetime.strptime("2026 " + m.group(1), "%Y %b %d %H:%M:%S").timestamp()


@pytest.mark.parametrize("source,log", [("dnsmasq", "dnsmasq.log"), ("syslog", "iscdhcpd+tftp-hpa.log")])
def test_replay_prints_the_pxe_path_in_order_at_log_times(capsys, source, log):
    nodes = replay_json(capsys, source, LOGS / log)
    node = nodes[MAC]
    assert [r["stage"] for r in node["timeline"]] == PATH
    for row in node["timeline"]:
        assert row["time"] == log_time(row["evidence"])  # the time of the line that proved it
    assert node["ip"] == "10.88.0.5"


def test_replay_with_plan_names_nodes(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text(
        "version: 1\nnetwork: {subnet: 10.88.0.0/24, server: 10.88.0.1}\n"
        "profiles: {p: {kernel: vmlinuz, initrd: rootfs.gz}}\n"
        f"nodes: [{{name: node05, mac: '{MAC}', ip: 10.88.0.5}}]\n")
    assert main(["replay", "--source", "dnsmasq", "--year", "2026", "--plan", str(plan), str(LOGS / "dnsmasq.log")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"node05 {MAC}") and "kernel" in out
    assert "52:54:00:88:00:66" not in out  # not in the plan


def test_replay_unknown_source_is_a_usage_error(capsys):
    assert main(["replay", "--source", "bind9", str(LOGS / "kea.log")]) == 2
