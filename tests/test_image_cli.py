"""``bootorch image`` / ``python -m orchestrator.image`` arguments and errors (orchestrator.image.cli)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import image
from tests.conftest import REPO


def test_arguments_plug_into_a_parent_parser() -> None:
    """How cli.py wires it: ``bootorch image build PLAN``."""
    import argparse

    top = argparse.ArgumentParser(prog="bootorch")
    sub = top.add_subparsers(dest="command")
    image.add_arguments(sub.add_parser("image"))
    args = top.parse_args(["image", "build", "plans/full.yaml", "--json", "--cache", "/tmp/c"])
    assert (args.image_cmd, args.plan, args.json, args.cache, args.refresh) == (
        "build", "plans/full.yaml", True, Path("/tmp/c"), False)
    with pytest.raises(SystemExit) as e:
        top.parse_args(["image"])
    assert e.value.code == 2


def test_cli_reports_plan_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnetwork: {subnet: 10.0.0.0/24}\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator.image", "build", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert "bad.yaml:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "orchestrator.image"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
