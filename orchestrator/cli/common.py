"""What every command shares: exit codes, loading a plan with located errors, unwrapping trio's errors."""

from __future__ import annotations

import json
import sys
from typing import Any

from orchestrator import EXIT_FAILED, EXIT_OK, EXIT_USAGE  # noqa: F401 - the commands take them from here
from orchestrator.plan import LoadedPlan, PlanError, Problem, load_plan


def problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "line": p.line, "severity": p.severity, "message": p.message}


def load(path: str, as_json: bool) -> LoadedPlan | None:
    """Load a plan, printing its problems (``file:line: what to fix``, or one JSON object); None when it has errors."""
    try:
        plan = load_plan(path)
    except PlanError as e:
        if as_json:
            print(json.dumps({"ok": False, "plan": path, "problems": [problem_json(p) for p in e.problems]}, indent=2))
        else:
            for p in e.problems:
                print(p, file=sys.stderr)
            n = len(e.errors)
            print(f"{path}: {n} error{'s' if n != 1 else ''}; nothing was changed", file=sys.stderr)
        return None
    if not as_json:
        for w in plan.warnings:
            print(w, file=sys.stderr)
    return plan


def plan_summary(plan: LoadedPlan) -> dict[str, Any]:
    return {
        "plan": str(plan.path),
        "name": plan.model.name,
        "nodes": len(plan.nodes),
        "profiles": sorted(plan.model.profiles),
        "dhcp_mode": plan.model.dhcp.mode,
        "boot_root": str(plan.boot_root),
        "waves": [{"name": w, "nodes": [n.name for n in ns]} for w, ns in plan.waves()],
    }


def single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups of one (trio wraps start-up failures)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
