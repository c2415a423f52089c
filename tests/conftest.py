"""Shared test helpers.

Tiers: plain tests are the fast tier (``pytest -m 'not slow'``); tests marked
``slow`` start real daemons, network namespaces or QEMU. The README's test
command runs every tier.

Tools we did not write (curl, tftp-hpa, dhcpd, dnsmasq, ...) are installed by
``scripts/setup``. When one is missing a developer's run skips the test, but
under CI (``CI=true``) a missing tool is a failure: CI must never go green by
skipping the real-peer tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, *candidates: str) -> str:
    """Return the path of an external tool, or skip (fail under CI) when absent."""
    for cand in (name, *candidates):
        path = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else None)
        if path:
            return path
    msg = f"external tool {name!r} not installed (scripts/setup installs it)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_root() -> None:
    """Network namespaces, tc and privileged ports need root."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root (CI runs as root)")
        pytest.skip("needs root")
