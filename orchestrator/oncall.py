"""On-call operations and views of the journal, as data: what ``status``, ``history``, ``wake``, ``reboot`` and ``slurm`` show.

The views read the state store directly (SQLite WAL readers never block the
running orchestrator), so they work during a rollout and between rollouts
alike: :func:`node_rows` (the worst nodes first: failed, then stuck -- over
their stage's timeout -- then the rest by how long they have been in their
stage) and :func:`history_rows` (every stage change and action, in time order).

:func:`perform` carries out one operation (``wake``, ``reboot``,
``power_off``) the way every command does: through the running orchestrator's
control API when there is one, else by becoming one for the request
(:class:`~orchestrator.app.Orchestrator` in ``oncall`` mode). It reports
progress through a callback and returns the answer as a dict; printing is the
command line's (:mod:`orchestrator.cli.oncall`).
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from typing import Any, Callable

from orchestrator.plan import LoadedPlan
from orchestrator.store import Store
from orchestrator.tracker import TERMINAL, Stage, plan_timeouts

__all__ = ["NEEDS_REEXEC", "actor_name", "history_rows", "node_rows", "perform"]


def node_rows(plan: LoadedPlan, store: Store, now: float, nodes: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per node (or per node of ``nodes``): stage, time in it, stuck, attempts, evidence, last action."""
    current = store.current()
    actions: dict[str, Any] = {}
    for a in store.actions():
        actions[a.node] = a
    timeouts = plan_timeouts(plan)
    entered = store.stage_entered()
    rows = []
    for n in plan.nodes:
        if nodes is not None and n.name not in nodes:
            continue
        c = current.get(n.mac)
        stage = c.stage if c else Stage.PENDING
        # Time in stage counts from entering it: a re-sent magic packet restarts the
        # scheduler's clock, not the on-call engineer's.
        since = entered.get(n.mac, c.since) if c else None
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


def history_rows(plan: LoadedPlan, store: Store, nodes: list[str] | None) -> list[dict[str, Any]]:
    """Every stage change and action of the journal (of ``nodes``), in time order."""
    names = {n.mac: n.name for n in plan.nodes}
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


def actor_name() -> str:
    """Who asks: the human behind sudo when there is one, and where."""
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


#: :func:`perform`'s answer when the plan's network lives in a namespace and nobody answers its control
#: socket: the caller re-executes itself inside it (:mod:`orchestrator.netns_exec`).
NEEDS_REEXEC = "needs-reexec"


def _via_control(plan: LoadedPlan, req: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any] | None:
    """The request through a running orchestrator; None when none answers."""
    from orchestrator import control
    from orchestrator.present import transition_line
    from orchestrator.tracker import Transition

    answer: dict[str, Any] = {"acting": [], "busy": {}, "results": {}, "via": "control"}
    try:
        for msg in control.request(control.socket_path(plan), req):
            ev = msg.get("event")
            if ev == "error":
                answer["error"] = msg["error"]
                progress(f"bootorch {req['op']}: {msg['error']}")
            elif ev == "accepted":
                answer["acting"], answer["busy"] = msg["acting"], msg["busy"]
                if msg["acting"]:
                    progress(f"the running orchestrator acts on {', '.join(msg['acting'])}")
            elif ev == "transition":
                t = Transition(msg.get("mac", ""), msg["node"], Stage(msg["from"]), Stage(msg["to"]), msg["time"],
                               msg["attempt"], msg["evidence"], msg.get("source", ""), tuple(msg.get("flags", ())))
                progress(transition_line(t, width=12, evidence=100))
            elif ev == "done":
                answer["results"] = msg["results"]
    except control.NoOrchestrator:
        return None
    if not req.get("wait", True):
        answer["results"] = {n: {"result": "acted", "reason": "--no-wait", "path": []} for n in answer["acting"]}
    return answer


def _direct(plan: LoadedPlan, op: str, names: list[str], *, reason: str, actor: str, hard: bool, wait: bool,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """No orchestrator runs: become one (boot server, scheduler, control API) for this request."""
    import trio

    from orchestrator.app import Mode, OncallRequest, Orchestrator
    from orchestrator.present import Progress

    lines = Progress(sink=progress)
    req = OncallRequest(op, names, reason, actor, hard=hard, wait=wait)
    orch = Orchestrator.assemble(plan, Mode.ONCALL, log=lines.line, show=lines.transitions)
    trio.run(lambda: orch.run(oncall=req))
    results = dict(req.operation.results) if req.operation is not None else {}
    if req.operation is not None and not wait:
        for name in req.operation.names:
            results.setdefault(name, {"result": "acted", "reason": "--no-wait", "path": []})
    return {"acting": req.operation.names if req.operation else [], "busy": req.busy, "results": results, "via": "direct"}


def perform(plan: LoadedPlan, op: str, names: list[str], *, reason: str, actor: str, hard: bool = False,
            wait: bool = True, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any] | str:
    """Run one operation: through the running orchestrator, else as one.

    Returns the answer (``acting``, ``busy``, ``results``, ``via``, maybe
    ``error``), or :data:`NEEDS_REEXEC` when nobody answers and the plan's
    network is in a namespace this process is not in. Raises
    :class:`~orchestrator.power.SecretError` when it would act itself and a
    credential is missing.
    """
    from orchestrator import control, netns_exec

    req = {"op": op, "nodes": names, "reason": reason, "actor": actor, "hard": hard, "wait": wait}
    answer = _via_control(plan, req, progress)
    if answer is not None:
        return answer
    if netns_exec.needs_reexec(plan):
        return NEEDS_REEXEC
    for _ in range(2):  # once as the orchestrator; once more through one that was starting
        try:
            return _direct(plan, op, names, reason=reason, actor=actor, hard=hard, wait=wait, progress=progress)
        except control.Busy as e:
            # Another bootorch is starting up: its control socket appears in a moment.
            progress(f"bootorch {op}: {e}; sending the request to it")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and control.ping(control.socket_path(plan)) is None:
                time.sleep(0.2)
            answer = _via_control(plan, req, progress)
            if answer is not None:
                return answer
    return {"acting": [], "busy": {}, "results": {}, "via": "none",
            "error": f"another bootorch holds this plan's state directory and does not answer on {control.socket_path(plan)}"}
