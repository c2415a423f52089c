"""Plans: the YAML file a user writes, validated and expanded.

``load_plan(path)`` returns a :class:`LoadedPlan` or raises :class:`PlanError`
whose ``problems`` are ``file:line: message`` entries.
"""

from orchestrator.plan.model import PLAN_VERSION, Plan
from orchestrator.plan.resolve import LoadedPlan, Node, load_plan
from orchestrator.plan.source import PlanError, Problem

__all__ = ["PLAN_VERSION", "LoadedPlan", "Node", "Plan", "PlanError", "Problem", "load_plan"]
