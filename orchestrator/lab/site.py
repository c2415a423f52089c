"""The site's own DHCP/TFTP servers in the lab namespace (``lab.site``).

A lab service (:data:`orchestrator.lab.lab.SERVICES`): ``up(lab)`` starts what the plan
asks for, ``down(lab)`` stops it and says what it stopped, ``status(lab)`` reports it.
"""

from __future__ import annotations

from typing import Any


def up(lab: Any) -> None:
    """Start what the plan asks for (nothing yet)."""


def down(lab: Any) -> list[str]:
    """Stop what :func:`up` started; returns what was stopped."""
    return []


def status(lab: Any) -> dict[str, Any]:
    return {}
