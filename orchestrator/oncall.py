"""On-call views of the journal: ``bootorch status`` and ``bootorch history``.

Both read the state store directly (SQLite WAL readers never block the running
orchestrator), so they work during a rollout and between rollouts alike.
The worst nodes come first: failed, then stuck (over their stage's timeout),
then the rest by how long they have been in their stage.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
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
    entered = stage_entered(store)
    rows = []
    for n in lp.nodes:
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


def stage_entered(store: Store) -> dict[str, float]:
    """Per MAC, when the node entered its current stage (same-stage restarts within an attempt do not count)."""
    q = """SELECT mac, MAX(time) FROM (
             SELECT mac, time, from_stage, to_stage, attempt,
                    LAG(attempt) OVER (PARTITION BY mac ORDER BY id) AS prev
             FROM transitions)
           WHERE from_stage != to_stage OR prev IS NULL OR prev != attempt
           GROUP BY mac"""
    return {mac: t for mac, t in store.db.execute(q)}


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


# --------------------------------------------------------------------------- wake, reboot, slurm


def actor_name() -> str:
    """Who asks: the human behind sudo when there is one, and where."""
    import getpass
    import socket

    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


class _Out:
    """Progress to stderr, results to stdout, and both to a log file when asked (Slurm discards our output)."""

    def __init__(self, log_path: Path | None, as_json: bool) -> None:
        self.log = open(log_path, "a") if log_path else None
        self.as_json = as_json

    def progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self._log(text)

    def result(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)
        self._log(text)

    def _log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"{datetime.now().isoformat(timespec='seconds')} [{os.getpid()}] {text}\n")
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _via_control(lp: LoadedPlan, req: dict[str, Any], out: _Out) -> dict[str, Any] | None:
    """The request through a running orchestrator; None when none answers."""
    from orchestrator import control

    answer: dict[str, Any] = {"acting": [], "busy": {}, "results": {}, "via": "control"}
    try:
        for msg in control.request(control.socket_path(lp), req):
            ev = msg.get("event")
            if ev == "error":
                answer["error"] = msg["error"]
                out.progress(f"bootorch {req['op']}: {msg['error']}")
            elif ev == "accepted":
                answer["acting"], answer["busy"] = msg["acting"], msg["busy"]
                if msg["acting"]:
                    out.progress(f"the running orchestrator acts on {', '.join(msg['acting'])}")
            elif ev == "transition":
                out.progress(f"{msg['node']:<12} {msg['from']} -> {msg['to']}  {msg['evidence'][:100]}")
            elif ev == "done":
                answer["results"] = msg["results"]
    except control.NoOrchestrator:
        return None
    if not req.get("wait", True):
        answer["results"] = {n: {"result": "acted", "reason": "--no-wait", "path": []} for n in answer["acting"]}
    return answer


def _direct(lp: LoadedPlan, op: str, names: list[str], *, reason: str, actor: str, hard: bool, wait: bool,
            out: _Out) -> dict[str, Any]:
    """No orchestrator runs: become one (boot server, scheduler, control API) for this request."""
    import trio

    from orchestrator.rollout import OncallRequest, Progress, run_rollout

    class Lines(Progress):
        def line(self, text: str) -> None:
            out.progress(f"{time.time() - self.t0:8.1f}s  {text}")

    req = OncallRequest(op, names, reason, actor, hard=hard, wait=wait)
    trio.run(lambda: run_rollout(lp, oncall=req, progress=Lines()))
    results = dict(req.operation.results) if req.operation is not None else {}
    if req.operation is not None and not wait:
        for name in req.operation.names:
            results.setdefault(name, {"result": "acted", "reason": "--no-wait", "path": []})
    return {"acting": req.operation.names if req.operation else [], "busy": req.busy, "results": results, "via": "direct"}


def perform(lp: LoadedPlan, op: str, names: list[str], *, reason: str, actor: str, hard: bool = False, wait: bool = True,
            argv: list[str] | None = None, out: _Out) -> dict[str, Any] | int:
    """Run one operation: through the running orchestrator, else as one. Returns the answer, or an exit code
    when this process re-executed itself inside the plan's namespace."""
    from orchestrator import control, netns_exec

    req = {"op": op, "nodes": names, "reason": reason, "actor": actor, "hard": hard, "wait": wait}
    answer = _via_control(lp, req, out)
    if answer is not None:
        return answer
    if netns_exec.needs_reexec(lp):
        problem = netns_exec.lab_down_problem(lp)
        if problem:
            out.progress(f"bootorch {op}: {problem}")
            return 1
        return netns_exec.reexec_in_namespace(lp, argv or [])
    for _ in range(2):  # once as the orchestrator; once more through one that was starting
        try:
            return _direct(lp, op, names, reason=reason, actor=actor, hard=hard, wait=wait, out=out)
        except control.Busy as e:
            # Another bootorch is starting up: its control socket appears in a moment.
            out.progress(f"bootorch {op}: {e}; sending the request to it")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and control.ping(control.socket_path(lp)) is None:
                time.sleep(0.2)
            answer = _via_control(lp, req, out)
            if answer is not None:
                return answer
    out.progress(f"bootorch {op}: another bootorch holds this plan's state directory and does not answer on "
                 f"{control.socket_path(lp)}")
    return 1


def _report(op: str, answer: dict[str, Any], out: _Out, as_json: bool) -> int:
    ok_results = {"ready", "off", "acted"}
    results, busy = answer["results"], answer["busy"]
    ok = not busy and "error" not in answer and bool(results) and all(r["result"] in ok_results for r in results.values())
    if as_json:
        print(json.dumps({"ok": ok, "op": op, **answer}, indent=2))
    for name, why in busy.items():
        out.result(f"{name}: {why}")
    for name, r in results.items():
        path = " -> ".join(r.get("path") or []) or "-"
        out.result(f"{name}: {r['result']}{': ' + r['reason'] if r.get('reason') else ''}  (via {path})")
    return 0 if ok else 1


def run_action(lp: LoadedPlan, args, op: str) -> int:
    """``bootorch wake|reboot NODES``."""
    try:
        names = [n.name for n in lp.select(args.nodes)]
    except NodeSetError as e:
        print(f"bootorch {args.command}: {e}", file=sys.stderr)
        return 2
    if not names:
        print(f"bootorch {args.command}: {args.nodes!r} names no node of the plan", file=sys.stderr)
        return 2
    out = _Out(None, args.json)
    try:
        answer = perform(lp, op, names, reason=args.reason or f"bootorch {args.command} by hand", actor=actor_name(),
                         hard=getattr(args, "hard", False), wait=not args.no_wait, argv=getattr(args, "argv", None), out=out)
        if isinstance(answer, int):
            return answer
        return _report(op, answer, out, args.json)
    finally:
        out.close()


SLURM_OPS = {"resume": "wake", "fail": "power_off", "suspend": "power_off"}


def run_slurm(args) -> int:
    """``bootorch slurm resume|suspend|fail HOSTLIST``: Slurm's ResumeProgram / SuspendProgram / ResumeFailProgram.

    Slurm calls the program with one argument, the hostlist; the plan comes from
    ``--plan`` or ``$BOOTORCH_PLAN``. Exit 0 when every node reached the wanted
    state (ready, or off), 1 otherwise; everything is appended to the log file
    (Slurm keeps no output of these programs).
    """
    from orchestrator.cli import _load

    plan = args.plan or os.environ.get("BOOTORCH_PLAN")
    if not plan:
        print("bootorch slurm: which plan? pass --plan PLAN or set BOOTORCH_PLAN (Slurm passes only the hostlist)",
              file=sys.stderr)
        return 2
    lp = _load(plan, False)
    if lp is None:
        return 1
    log_path = Path(args.log) if args.log else lp.state_dir / "slurm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = _Out(log_path, args.json)
    try:
        try:
            names = [n.name for n in lp.select(args.hostlist)]
        except NodeSetError as e:
            out.progress(f"bootorch slurm {args.action}: {e}")
            return 1
        if not names:
            out.progress(f"bootorch slurm {args.action}: {args.hostlist!r} names no node of plan {plan}")
            return 1
        out.progress(f"slurm {args.action} {args.hostlist}")
        op = SLURM_OPS[args.action]
        answer = perform(lp, op, names, reason=f"slurm {args.action}", actor=f"slurm@{actor_name().split('@', 1)[1]}",
                         hard=args.action == "fail", wait=True, argv=getattr(args, "argv", None), out=out)
        if isinstance(answer, int):
            out.progress(f"slurm {args.action} {args.hostlist}: exit {answer}")
            return answer
        return _report(op, answer, out, args.json)
    finally:
        out.close()
