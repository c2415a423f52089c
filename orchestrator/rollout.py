"""``bootorch rollout PLAN``: the boot server, the scheduler and readiness in one trio nursery.

Output: stage changes and actions as plain lines on stderr (prefixed with the
seconds since the start), or a live table on a terminal; the final result on
stdout, as text or, with ``--json``, as one object (schema in docs/rollout.md).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from orchestrator.bootserver.serve import Ports, serve_plan
from orchestrator.metrics import Metrics, serve_metrics, split_listen
from orchestrator.plan import LoadedPlan
from orchestrator.power import resolve_secret
from orchestrator.power.drivers import plan_drivers
from orchestrator.readiness import Readiness
from orchestrator.scheduler import Scheduler, Summary
from orchestrator.store import Store
from orchestrator.tracker import ORDERED, Stage, Tracker, Transition, plan_nodes, plan_timeouts

SCHEMA_VERSION = 1


class Progress:
    """Plain progress lines: one per stage change or action, with seconds since start."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.t0 = time.time()

    def line(self, text: str) -> None:
        print(f"{time.time() - self.t0:8.1f}s  {text}", file=self.out, flush=True)

    def transitions(self, ts: list[Transition]) -> None:
        for t in ts:
            if t.from_stage == t.to_stage:
                self.line(f"{t.node:<12} {t.to_stage.value} again: {t.evidence}")
            else:
                flags = f" [{', '.join(t.flags)}]" if t.flags else ""
                self.line(f"{t.node:<12} {t.from_stage.value} -> {t.to_stage.value}{flags}  {t.evidence[:120]}")


class LiveProgress(Progress):
    """A live view on a terminal (rich): nodes per stage, then the nodes in trouble or slowest.

    rich's own refresh thread would fight trio, so ``Live(auto_refresh=False)``
    is refreshed from a trio task (:meth:`refresher`). Log lines print above it.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, auto_refresh=False, transient=True)
        self.tracker: Tracker | None = None

    def line(self, text: str) -> None:
        self.console.print(f"{time.time() - self.t0:8.1f}s  {text}", markup=False, highlight=False)

    def transitions(self, ts: list[Transition]) -> None:
        for t in ts:
            if t.to_stage in (Stage.READY, Stage.FAILED) or t.from_stage == t.to_stage:
                super().transitions([t])

    def render(self):
        """The live table. Node names and evidence go in as ``rich.text.Text``: never parsed as markup."""
        from rich.table import Table
        from rich.text import Text

        tr = self.tracker
        table = Table(box=None, pad_edge=False)
        if tr is None:
            return table
        counts = tr.counts()
        table.add_column("stage")
        table.add_column("nodes", justify="right")
        for s in [*ORDERED, Stage.FAILED]:
            if counts[s]:
                table.add_row(s.value, str(counts[s]))
        now = time.time()
        busy = [st for st in tr.nodes.values() if st.stage not in (Stage.PENDING, Stage.READY, Stage.FAILED)]
        busy.sort(key=lambda st: st.since)
        nodes = Table(box=None, pad_edge=False, title="slowest nodes in flight")
        for col in ("node", "stage", "in stage", "last evidence"):
            nodes.add_column(col)
        for st in busy[:8]:
            limit = tr.timeouts.get(st.stage)
            age = now - st.since
            style = "red" if limit is not None and age >= limit else None
            nodes.add_row(Text(st.node), st.stage.value, f"{age:.0f}s", Text(st.last_evidence[:70]), style=style)
        outer = Table.grid()
        outer.add_row(table)
        if busy:
            outer.add_row(nodes)
        return outer

    async def refresher(self) -> None:
        with self.live:
            while True:
                self.live.update(self.render(), refresh=True)
                await trio.sleep(0.5)


class NetbootGate:
    """``boot.gate_after_ready``: ready nodes get no boot file; our own wake reopens the gate."""

    def __init__(self) -> None:
        self.policy = None

    def attach(self, policy, current=()) -> None:
        self.policy = policy
        for c in current:  # ready before a restart: still gated
            if c.stage == Stage.READY:
                policy.close_gate(c.mac)

    def __call__(self, ts: list[Transition]) -> None:
        if self.policy is None:
            return
        for t in ts:
            if t.to_stage == Stage.READY:
                self.policy.close_gate(t.mac)
            elif t.to_stage == Stage.WAKING:
                self.policy.open_gate(t.mac)


@dataclass
class OncallRequest:
    """``bootorch wake|reboot|slurm`` when no orchestrator runs: this process becomes one for the request."""

    op: str  # wake | reboot | power_off
    nodes: list[str]
    reason: str
    actor: str
    hard: bool = False
    wait: bool = True
    operation: Any = None
    busy: dict[str, str] = field(default_factory=dict)


async def run_rollout(lp: LoadedPlan, *, ports: Ports | None = None, serve: bool = True, progress: Progress | None = None,
                      oncall: OncallRequest | None = None, control: bool = True) -> tuple[Summary, Tracker]:
    """The whole rollout (or, with ``oncall``, one on-call operation) in one nursery.

    Holds the orchestrator lock for the plan's state directory and answers the
    control API (:mod:`orchestrator.control`) while it runs.
    """
    from orchestrator.control import OrchestratorLock, lock_path

    progress = progress or (LiveProgress() if sys.stderr.isatty() and oncall is None else Progress())
    lock = OrchestratorLock(lock_path(lp))
    lock.acquire()  # raises control.Busy
    try:
        return await _orchestrate(lp, ports=ports, serve=serve, progress=progress, oncall=oncall, control=control)
    finally:
        lock.release()


async def _orchestrate(lp: LoadedPlan, *, ports: Ports | None, serve: bool, progress: Progress,
                       oncall: OncallRequest | None, control: bool) -> tuple[Summary, Tracker]:
    from orchestrator.control import ControlServer

    store = Store(lp.state_dir / "state.db")
    tracker = Tracker(plan_nodes(lp), timeouts=plan_timeouts(lp))
    wake, bmc = plan_drivers(lp)
    readiness = Readiness.from_plan(lp)
    send, recv = trio.open_memory_channel(65536)
    metrics = Metrics().attach(tracker=tracker, wake=wake, timeouts=plan_timeouts(lp))

    gate = NetbootGate()

    def on_change(ts: list[Transition]) -> None:
        progress.transitions(ts)
        metrics.observe_transitions(ts)
        gate(ts)

    try:
        async with trio.open_nursery() as nursery:
            if lp.model.metrics.listen:
                host, port = split_listen(lp.model.metrics.listen)
                mhost, mport = await nursery.start(serve_metrics, metrics, host, port)
                progress.line(f"metrics on http://{mhost}:{mport}/metrics")
            load = None
            if serve and lp.model.dhcp.mode != "external":
                running = await nursery.start(lambda task_status: serve_plan(lp, ports or Ports(), events=send, task_status=task_status))
                metrics.attach(running=running)
                if lp.model.boot.gate_after_ready and running.dhcp_core is not None:
                    gate.attach(running.dhcp_core.policy, store.current().values())
                progress.line(f"boot server up: tftp :{running.tftp}, http :{running.http}, dhcp :{running.dhcp}")
                load = lambda: running.admission.load(trio.current_time())  # noqa: E731
            sched = Scheduler(lp, tracker, store, wake=wake, bmc=bmc, readiness=readiness, load=load,
                              clock=time.time, log=progress.line, on_change=on_change, rollout=oncall is None)
            metrics.attach(scheduler=sched)
            if control:
                token = resolve_secret(lp.model.control.token, lp.base)
                server = ControlServer(lp, sched, mode="rollout" if oncall is None else "oncall", token=token, log=progress.line)
                await nursery.start(server.serve)
            if isinstance(progress, LiveProgress):
                progress.tracker = tracker
                nursery.start_soon(progress.refresher)
            if oncall is not None:
                sched.restore()
                oncall.operation, oncall.busy = sched.submit(oncall.op, oncall.nodes, reason=oncall.reason,
                                                            actor=oncall.actor, hard=oncall.hard)
                if not oncall.wait and oncall.operation is not None:
                    nursery.start_soon(_return_once_acted, sched, oncall.operation, nursery.cancel_scope)
            summary = await sched.run(recv)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return summary, tracker


async def _return_once_acted(sched: Scheduler, op, scope: trio.CancelScope) -> None:
    """``--no-wait``: stop once every node of ``op`` got its power action."""
    runs = [r for r in sched.runs.values() if r.node.name in op.names]
    while not all(r.op is not op or len(r.actions) > r.op_from for r in runs):
        await sched.changed.wait()
    scope.cancel()


def summary_json(lp: LoadedPlan, summary: Summary, tracker: Tracker) -> dict[str, Any]:
    nodes = []
    for run in summary.nodes.values():
        st = tracker.nodes[run.node.mac]
        nodes.append({
            "name": run.node.name, "mac": run.node.mac, "ip": str(run.node.ip), "wave": run.wave,
            "result": run.result or "unfinished", "reason": run.reason, "stage": st.stage.value,
            "attempts": st.attempt, "flags": sorted(st.flags),
            "timeline": [{"from": t.from_stage.value, "to": t.to_stage.value, "time": t.time, "attempt": t.attempt,
                          "source": t.source, "evidence": t.evidence} for t in st.history],
            "actions": run.actions,
        })
    counts = {s.value: 0 for s in [*ORDERED, Stage.FAILED]}
    for n in nodes:
        counts[n["stage"]] += 1
    return {
        "schema": SCHEMA_VERSION, "ok": summary.ok, "aborted": summary.aborted, "plan": str(lp.path),
        "ready": len(summary.ready), "failed": len(summary.failed), "total": len(nodes), "counts": counts,
        "window_history": [{"time": t, "window": w} for t, w in summary.window_history], "nodes": nodes,
    }


def print_summary(lp: LoadedPlan, summary: Summary, tracker: Tracker, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print(f"rollout {'OK' if summary.ok else 'FAILED'}{' (aborted: failure budget exceeded)' if summary.aborted else ''}: "
          f"{len(summary.ready)}/{len(summary.nodes)} ready, {len(summary.failed)} failed", file=out)
    for run in summary.nodes.values():
        st = tracker.nodes[run.node.mac]
        took = ""
        if st.history:
            took = f" in {st.history[-1].time - st.history[0].time:.1f}s"
        line = f"  {run.node.name:<12} {st.stage.value:<9} attempts {st.attempt}{took}"
        if run.result == "failed":
            line += f"  {run.reason}"
        print(line, file=out)


def main_rollout(lp: LoadedPlan, *, as_json: bool) -> int:
    summary, tracker = trio.run(run_rollout, lp)
    if as_json:
        print(json.dumps(summary_json(lp, summary, tracker), indent=2))
    else:
        print_summary(lp, summary, tracker)
    return 0 if summary.ok else 1
