"""What a reload changes: a plan's fingerprint (JSON-able, no secrets) and the diff of two.

``bootorch serve`` answers the control API's ``plan`` request with :func:`fingerprint`;
``bootorch validate --against-running`` and a reload (:meth:`orchestrator.app.Orchestrator.reload`)
compare fingerprints with :func:`diff`: nodes added, removed or changed, profiles and boot settings
(applied from each node's next boot), and the restart-only sections a reload refuses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: Plan sections a reload cannot apply: they shape sockets, the DHCP server's subnets and
#: pools, the journal's place, the power drivers or the tracker's timeouts. A plan that
#: changes one is refused by a reload (``systemctl restart`` applies it; leases and stages
#: survive a restart). ``boot`` is reloadable except for its ``root`` and ``gate_after_ready``.
RESTART_SECTIONS = ("name", "state_dir", "network", "dhcp", "boot.root", "boot.gate_after_ready", "bootserver",
                    "power", "rollout", "readiness", "metrics", "lab", "control", "logs", "servers")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(plan) -> dict[str, Any]:
    """What a reload compares, as JSON-able data: every node's identity, a digest per profile,
    of the reloadable boot settings and of each restart-only section (:data:`RESTART_SECTIONS`).
    Secrets are never included, only digests of where they come from."""
    model = plan.model
    dump = model.model_dump(mode="json")
    boot = dict(dump.get("boot", {}))
    restart = {}
    for key in RESTART_SECTIONS:
        section, _, sub = key.partition(".")
        value = dump.get(section)
        if sub:
            value = (value or {}).get(sub)
            boot.pop(sub, None)
        restart[key] = _digest(value)
    return {
        "plan": str(plan.path),
        "nodes": {n.name: {"mac": n.mac, "ip": str(n.ip), "profile": n.profile, "group": n.group, "rack": n.rack,
                           "bmc": n.bmc} for n in plan.nodes},
        "profiles": {name: _digest(p) for name, p in dump.get("profiles", {}).items()},
        "boot": _digest(boot),
        "restart": restart,
    }


@dataclass
class PlanDiff:
    """What changes between two fingerprints (:func:`diff`)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: node -> what changed, e.g. {"node07": ["mac", "profile"]}
    changed: dict[str, list[str]] = field(default_factory=dict)
    profiles_changed: list[str] = field(default_factory=list)
    profiles_added: list[str] = field(default_factory=list)
    profiles_removed: list[str] = field(default_factory=list)
    boot_changed: bool = False
    #: Restart-only sections that differ: a reload refuses the plan.
    needs_restart: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.profiles_changed or self.profiles_added
                    or self.profiles_removed or self.boot_changed or self.needs_restart)

    def as_json(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed,
                "profiles": {"changed": self.profiles_changed, "added": self.profiles_added, "removed": self.profiles_removed},
                "boot_changed": self.boot_changed, "needs_restart": self.needs_restart, "reloadable": not self.needs_restart}

    def lines(self, *, limit: int = 20) -> list[str]:
        """The diff for a person: one line per kind of change, long node lists cut at ``limit`` names."""
        def names(xs: Iterable[str]) -> str:
            xs = list(xs)
            return ", ".join(xs[:limit]) + (f" and {len(xs) - limit} more" if len(xs) > limit else "")

        out = []
        if self.added:
            out.append(f"nodes added ({len(self.added)}): {names(self.added)}")
        if self.removed:
            out.append(f"nodes removed ({len(self.removed)}): {names(self.removed)}")
        if self.changed:
            out.append(f"nodes changed ({len(self.changed)}): "
                       + names(f"{n} ({', '.join(w)})" for n, w in self.changed.items()))
        for label, xs in (("changed", self.profiles_changed), ("added", self.profiles_added), ("removed", self.profiles_removed)):
            if xs:
                out.append(f"profiles {label}: {', '.join(xs)} (applies to each node's next boot)")
        if self.boot_changed:
            out.append("boot settings changed (loaders, config names, default profile or ipxe): next boot")
        if self.needs_restart:
            out.append(f"needs a restart, a reload refuses it: {', '.join(self.needs_restart)} changed")
        return out or ["no change"]


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> PlanDiff:
    """What applying the plan of fingerprint ``new`` over the running ``old`` changes."""
    d = PlanDiff()
    on, nn = old["nodes"], new["nodes"]
    d.added = [n for n in nn if n not in on]
    d.removed = [n for n in on if n not in nn]
    oprof, nprof = old["profiles"], new["profiles"]
    d.profiles_added = [p for p in nprof if p not in oprof]
    d.profiles_removed = [p for p in oprof if p not in nprof]
    d.profiles_changed = [p for p in nprof if p in oprof and oprof[p] != nprof[p]]
    for name, n in nn.items():
        o = on.get(name)
        if o is None:
            continue
        what = [k for k in ("mac", "ip", "profile", "group", "rack", "bmc") if o.get(k) != n.get(k)]
        if n["profile"] in d.profiles_changed and "profile" not in what:
            what.append("profile contents")
        if what:
            d.changed[name] = what
    d.boot_changed = old["boot"] != new["boot"]
    d.needs_restart = [k for k in new["restart"] if old["restart"].get(k) != new["restart"][k]]
    return d


