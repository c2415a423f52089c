"""docs/plan.md documents every key the plan model accepts."""

from __future__ import annotations

import re

from pydantic import BaseModel

from orchestrator.plan.model import Plan
from tests.conftest import REPO


def all_fields(model: type[BaseModel], seen: set[type] | None = None):
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    for name, f in model.model_fields.items():
        yield model.__name__, name
        stack = [f.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from all_fields(ann, seen)
            stack.extend(getattr(ann, "__args__", ()) or ())


def test_every_plan_key_is_documented():
    doc = re.sub(r"```.*?```", "", (REPO / "docs" / "plan.md").read_text(), flags=re.S)
    # Identifiers inside any `code span`: `power.wol`, `{env: VAR}`, `{start: A, end: B}`.
    documented = {w for span in re.findall(r"`([^`]+)`", doc) for w in re.findall(r"[a-z_]+", span)}
    missing = sorted({f"{m}.{k}" for m, k in all_fields(Plan) if k not in documented})
    assert not missing, f"document these keys in docs/plan.md: {missing}"


def test_minimal_plan_in_docs_is_valid(tmp_path):
    from orchestrator.plan import load_plan

    doc = (REPO / "docs" / "plan.md").read_text()
    block = re.search(r"## A minimal plan\n\n```yaml\n(.*?)```", doc, re.S).group(1)
    p = tmp_path / "minimal.yaml"
    p.write_text(block)
    plan = load_plan(p)
    assert len(plan.nodes) == 64 and plan.nodes[1].mac == "52:54:00:00:01:02"
