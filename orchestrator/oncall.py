"""On-call views of the journal: ``bootorch status`` and ``bootorch history``.

Both read the state store directly (SQLite WAL readers never block the running
orchestrator), so they work during a rollout and between rollouts alike.
The worst nodes come first: failed, then stuck (over their stage's timeout),
then the rest by how long they have been in their stage.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

from orchestrator.nodeset import NodeSetError
from orchestrator.plan import LoadedPlan
from orchestrator.store import Store
from orchestrator.tracker import ORDERED, TERMINAL, Stage, plan_timeouts


def node_rows(lp: LoadedPlan, store: Store, now: float, nodes: list[str] | None = None) -> list[dict[str, Any]]:
    current = store.current()
    actions: dict[str, Any] = {}
    for a in store.actions():
        actions[a.node] = a
    timeouts = plan_timeouts(lp)
    rows = []
    for n in lp.nodes:
        if nodes is not None and n.name not in nodes:
            continue
        c = current.get(n.mac)
        stage = c.stage if c else Stage.PENDING
        since = c.since if c else None
        in_stage = now - since if since is not None else None
        limit = timeouts.get(stage)
        stuck = bool(limit is not None and in_stage is not None and stage not in TERMINAL and in_stage >= limit)
        last = actions.get(n.name)
        rows.append({
            "node": n.name, "mac": n.mac, "ip": str(n.ip), "stage": stage.value, "since": since,
            "in_stage_seconds": None if in_stage is None else round(in_stage, 1), "timeout_seconds": limit,
            "stuck": stuck, "attempts": c.attempt if c else 0, "evidence": c.evidence if c else "",
            "flags": list(c.flags) if c else [],
            "last_action": None if last is None else {"time": last.time, "action": last.action, "reason": last.reason,
                                                      "result": last.result, "actor": last.actor},
        })

    def badness(r: dict[str, Any]) -> tuple:
        return (r["stage"] != "failed", not r["stuck"], r["stage"] == "ready", -(r["in_stage_seconds"] or 0))

    rows.sort(key=badness)
    return rows


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def print_status(rows: list[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    tty = out.isatty()
    red, yellow, green, reset = ("\033[31m", "\033[33m", "\033[32m", "\033[0m") if tty else ("", "", "", "")
    counts = {s.value: 0 for s in [*ORDERED, Stage.FAILED]}
    for r in rows:
        counts[r["stage"]] += 1
    stuck = sum(1 for r in rows if r["stuck"])
    print("  ".join(f"{k} {v}" for k, v in counts.items() if v) + (f"  (stuck {stuck})" if stuck else ""), file=out)
    print(f"{'node':<14} {'stage':<9} {'in stage':>9} {'att':>3}  last evidence / action", file=out)
    for r in rows:
        colour = red if r["stage"] == "failed" else yellow if r["stuck"] else green if r["stage"] == "ready" else ""
        mark = "!" if r["stuck"] else " "
        line = f"{r['node']:<14} {colour}{r['stage']:<9}{reset} {_age(r['in_stage_seconds']):>8}{mark} {r['attempts']:>3}  {r['evidence'][:90]}"
        if r["last_action"]:
            a = r["last_action"]
            line += f"  [{a['action']}: {a['result']}]"
        print(line, file=out)


def history_rows(lp: LoadedPlan, store: Store, nodes: list[str] | None) -> list[dict[str, Any]]:
    names = {n.mac: n.name for n in lp.nodes}
    rows = []
    for t in store.transitions():
        name = names.get(t.mac, t.node)
        if nodes is None or name in nodes:
            rows.append({"time": t.time, "node": name, "kind": "stage", "what": f"{t.from_stage.value} -> {t.to_stage.value}",
                         "detail": t.evidence, "actor": t.source})
    for a in store.actions():
        if nodes is None or a.node in nodes:
            rows.append({"time": a.time, "node": a.node, "kind": "action", "what": a.action,
                         "detail": f"{a.reason} -> {a.result}", "actor": a.actor})
    rows.sort(key=lambda r: r["time"])
    return rows


def _select(lp: LoadedPlan, expr: str | None) -> list[str] | None:
    if not expr:
        return None
    return [n.name for n in lp.select(expr)]


def run_status(lp: LoadedPlan, args) -> int:
    try:
        nodes = _select(lp, args.nodes)
    except NodeSetError as e:
        print(f"bootorch status: {e}", file=sys.stderr)
        return 2
    db = lp.state_dir / "state.db"
    if not db.exists():
        print(f"bootorch status: no journal at {db} yet (no rollout or serve has run for this plan): "
              "every node is pending", file=sys.stderr)
    store = Store(db)
    try:
        rows = node_rows(lp, store, time.time(), nodes)
    finally:
        store.close()
    if args.stuck:
        rows = [r for r in rows if r["stuck"] or r["stage"] == "failed"]
    if args.json:
        print(json.dumps({"time": time.time(), "nodes": rows}, indent=2))
    else:
        print_status(rows)
    return 0


def run_history(lp: LoadedPlan, args) -> int:
    try:
        nodes = _select(lp, args.nodes)
    except NodeSetError as e:
        print(f"bootorch history: {e}", file=sys.stderr)
        return 2
    store = Store(lp.state_dir / "state.db")
    try:
        rows = history_rows(lp, store, nodes)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        ts = datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{ts}  {r['node']:<12} {r['kind']:<6} {r['what']:<22} {r['detail'][:100]}  ({r['actor']})")
    return 0
