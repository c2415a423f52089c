"""The command line: exit codes, --json shapes, --help that explains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.cli.run import dry_run_schedule
from orchestrator.plan import load_plan
from tests.conftest import REPO

FULL = str(REPO / "plans" / "full.yaml")
BEOWULF = str(REPO / "plans" / "examples" / "beowulf-64.yaml")


@pytest.mark.parametrize("plan", [FULL, BEOWULF])
def test_shipped_plans_validate(plan, capsys):
    assert main(["validate", plan]) == 0
    assert "OK:" in capsys.readouterr().out


def test_validate_json_summary(capsys):
    assert main(["validate", "--json", BEOWULF]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["nodes"] == 64 and out["dhcp_mode"] == "full"
    assert out["waves"][0]["nodes"][:2] == ["node1", "node2"]


def test_rollout_dry_run_schedule_respects_rates(capsys):
    assert main(["rollout", FULL, "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["schedule"]
    assert [r["node"] for r in rows] == ["node01", "node02", "node03", "node04"]  # waves in order
    assert [r["power_on_at"] for r in rows] == [0.0, 1.0, 2.0, 3.0]  # power_on_rate: 1


def test_dry_run_rack_rate():
    plan = load_plan(BEOWULF)  # 4/s overall, 2/s per rack, racks of 32
    rows = dry_run_schedule(plan)
    rack1 = [r["power_on_at"] for r in rows[:32]]
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(rack1, rack1[1:]))


def test_rollout_with_unset_credential_fails_cleanly(tmp_path, capsys, monkeypatch):
    text = (REPO / "plans" / "full.yaml").read_text()
    text = text.replace("  namespace: bootorch-lab     # bootorch runs its servers inside the lab's namespace\n", "")
    text = text.replace("manage: true", "manage: false")
    text = text.replace("password: {file: ../var/lab/bmc.password}", "password: {env: BOOTORCH_TEST_UNSET_PW}")
    (tmp_path / "plan.yaml").write_text(text)
    monkeypatch.delenv("BOOTORCH_TEST_UNSET_PW", raising=False)
    assert main(["rollout", str(tmp_path / "plan.yaml")]) == 1
    err = capsys.readouterr().err
    assert "environment variable BOOTORCH_TEST_UNSET_PW is not set" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["validate", "render", "rollout", "serve", "tftpd"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as ei:
        main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bootorch " + cmd in out and len(out.splitlines()) > 4


def test_help_lists_exit_codes():
    assert "Exit codes" in build_parser().format_help()


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "orchestrator", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("bootorch ")


def test_console_script_installed():
    exe = REPO / ".venv" / "bin" / "bootorch"
    if not exe.exists():
        pytest.skip("not installed in .venv")
    r = subprocess.run([str(exe), "validate", FULL], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
