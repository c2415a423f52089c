"""Node sets in ClusterShell syntax (``node[001-128]``, ``rack[1-2]n[01-16]``, ``@gpu``).

ClusterShell's ``NodeSet`` is the HPC standard for this syntax, so we use it rather
than write a range parser. It is wrapped here, in one module, for one reason:
ClusterShell resolves ``@group`` through a global resolver configured from
files (and ``pip install`` drops an example ``groups.conf`` into the venv, so
``@gpu`` could silently expand to example nodes). bootorch resolves groups only
from the plan: every call passes an explicit resolver built from the plan's own
groups, and with no groups given, ``@name`` is an error.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ClusterShell.NodeSet import NodeSet, NodeSetException
from ClusterShell.NodeUtils import GroupResolver, GroupSource

__all__ = ["NodeSetError", "expand", "fold", "plan_resolver"]


class NodeSetError(ValueError):
    """A node-set expression that cannot be expanded (bad syntax or unknown group)."""


class _PlanGroups(GroupSource):
    """A ClusterShell group source backed by a plain mapping."""

    def __init__(self, groups: Mapping[str, Iterable[str]]) -> None:
        super().__init__("plan")
        self._groups = {k: list(v) for k, v in groups.items()}

    def resolv_map(self, group: str) -> list[str]:
        if group not in self._groups:
            raise NodeSetError(f"unknown group @{group}")
        return self._groups[group]

    def resolv_list(self) -> list[str]:
        return sorted(self._groups)

    def resolv_all(self) -> list[str]:
        return [n for members in self._groups.values() for n in members]

    def resolv_reverse(self, node: str) -> list[str]:
        return [g for g, members in self._groups.items() if node in members]


def plan_resolver(groups: Mapping[str, Iterable[str]] | None = None) -> GroupResolver:
    """A resolver that knows only the given groups (never ClusterShell's config files)."""
    return GroupResolver(_PlanGroups(groups or {}))


def expand(expr: str, groups: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Expand ``expr`` to node names in ClusterShell's sorted order.

    >>> expand("node[01-03],login1")
    ['login1', 'node01', 'node02', 'node03']
    """
    if not isinstance(expr, str) or not expr.strip():
        raise NodeSetError("empty node set")
    try:
        ns = NodeSet(expr, resolver=plan_resolver(groups))
        return list(ns)
    except NodeSetError:
        raise
    except NodeSetException as e:
        raise NodeSetError(f"bad node set {expr!r}: {e}") from None
    except Exception as e:  # ClusterShell raises a few odd types on group errors
        raise NodeSetError(f"bad node set {expr!r}: {e}") from None


def fold(names: Iterable[str]) -> str:
    """Fold node names back to the compact syntax: ``['n1','n2','n3'] -> 'n[1-3]'``."""
    ns = NodeSet(resolver=plan_resolver())
    for n in names:
        ns.update(NodeSet(n, resolver=plan_resolver()))
    return str(ns)
