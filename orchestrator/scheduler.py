"""The rollout scheduler: wake nodes as fast as the boot server can carry them, and no faster.

One trio nursery runs the whole rollout:

* **admission** (the main task): waves in plan order; within a wave nodes are
  queued (never rejected) and woken while the number of nodes *in flight* --
  woken but not yet past ``initrd``, i.e. about to download or downloading from
  the boot server -- is below the window, and while the power-on rate (global,
  and per rack: inrush current trips breakers) allows;
* **evidence**: BootEvents from the boot server (or log watchers) go through the
  tracker; every transition is journaled before anything acts on it;
* **timeouts**: a node that overstays its stage climbs the escalation ladder;
* **readiness**: once a node is past ``initrd`` its SSH port is probed; when it
  answers, the plan's checks run (``ssh`` -> ``ready``, or ``failed`` with the
  failing check);
* **adaptation**: the window follows the boot server's health.

The window (closed-loop, AIMD like TCP's congestion window): it starts at 2
and doubles every ``adapt_every`` seconds while the window is full, work is
queued and the boot server's retransmit rate stays below
``retransmit_threshold`` (slow start); after the first sign of trouble it grows
by one per interval instead (congestion avoidance). A retransmit rate above the
threshold halves it (at least 1). It never exceeds ``max_downloading``. With
``adaptive: false`` the window is simply ``max_downloading``.

The escalation ladder, per plan:

=====================  ========================================================
stuck in               action, in order
=====================  ========================================================
``waking``             re-send the magic packet (``retries.wake`` times), then
                       BMC power cycle (``retries.power_cycle`` times), then fail
pxe_dhcp .. os_dhcp    BMC power cycle (``retries.power_cycle`` times), then fail
``ssh`` / ``ready``    the readiness task fails the node with its reason when
                       the ``ssh`` timeout passes (a failing check is named)
=====================  ========================================================

Every action and its reason goes to the journal. More failed nodes than
``failure_budget`` aborts the rollout cleanly (nothing more is woken; nodes in
flight are left as they are and reported).

Resume: on start the tracker is rebuilt from the journal. Ready nodes are
re-verified over SSH (not woken), nodes in flight continue from their stage
with their stage clocks as journaled, nodes never woken are queued. No node is
woken twice without a journaled reason.

Time: ``clock`` is wall-clock seconds in production (the journal outlives the
process, so stage clocks must too) and ``trio.current_time`` in tests, where
trio's MockClock makes the whole rollout run instantly and exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from orchestrator.events import BootEvent
from orchestrator.plan import LoadedPlan, Node
from orchestrator.power import PowerResult, Target
from orchestrator.power.drivers import target as node_target
from orchestrator.store import Store
from orchestrator.tracker import TERMINAL, Stage, Tracker, Transition

#: Stages that count against the admission window: woken and not yet past the downloads.
IN_FLIGHT = {Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD}
#: From these on, the kernel runs: probe SSH.
PROBE_FROM = {Stage.INITRD, Stage.OS_DHCP, Stage.SSH}


@dataclass(slots=True)
class NodeRun:
    node: Node
    target: Target
    wave: str
    wakes: int = 0
    cycles: int = 0
    result: str | None = None  # "ready" | "failed"
    reason: str = ""
    probe_attempt: int = 0
    probe_scope: trio.CancelScope | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Summary:
    ok: bool
    aborted: bool
    ready: list[str]
    failed: list[str]
    nodes: dict[str, NodeRun]
    window_history: list[tuple[float, int]]


class Scheduler:
    def __init__(
        self,
        lp: LoadedPlan,
        tracker: Tracker,
        store: Store,
        *,
        wake: Any,
        bmc: Any | None,
        readiness: Any | None,
        load: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = lambda s: None,
        on_change: Callable[[list[Transition]], None] = lambda ts: None,
        adapt_every: float = 2.0,
        retransmit_threshold: float = 5.0,
        probe_every: float = 2.0,
    ) -> None:
        self.lp, self.tracker, self.store = lp, tracker, store
        self.wake_driver, self.bmc, self.readiness = wake, bmc, readiness
        self.load, self.clock, self.log, self.on_change = load, clock, log, on_change
        plan = lp.model.rollout
        self.adm = plan.admission
        self.retries = plan.retries
        self.timeouts = plan.timeouts
        self.adapt_every, self.retx_threshold, self.probe_every = adapt_every, retransmit_threshold, probe_every
        self.max_window = self.adm.max_downloading
        self.window = min(2, self.max_window) if self.adm.adaptive else self.max_window
        self.slow_start = True
        self.window_history: list[tuple[float, int]] = []
        self.runs: dict[str, NodeRun] = {}
        for wave, nodes in lp.waves():
            for n in nodes:
                self.runs[n.mac] = NodeRun(n, node_target(n), wave)
        budget = plan.failure_budget
        self.budget = budget if isinstance(budget, int) else math.floor(len(lp.nodes) * float(budget.rstrip("%")) / 100)
        self.changed = trio.Event()
        self.aborted = False
        self._next_power_on = 0.0
        self._rack_next: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ journal + notify

    def _record(self, ts: list[Transition]) -> None:
        if not ts:
            return
        self.store.append(ts)
        self.on_change(ts)
        for t in ts:
            run = self.runs.get(t.mac)
            if run is None:
                continue
            if t.to_stage == Stage.READY:
                run.result, run.reason = "ready", ""
            elif t.to_stage == Stage.FAILED:
                run.result, run.reason = "failed", t.evidence
            elif run.result == "failed" and t.to_stage == Stage.PXE_DHCP:
                run.result = None  # a human (or the node) brought it back
            if t.to_stage in PROBE_FROM:
                self._start_probe(run)
        self._kick()

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _action(self, run: NodeRun, action: str, reason: str, result: PowerResult) -> None:
        entry = {"time": self.clock(), "action": action, "reason": reason, "ok": result.ok, "detail": result.detail}
        run.actions.append(entry)
        self.store.record_action(run.node.name, action, reason, "ok" if result.ok else f"failed: {result.detail}",
                                 detail={"detail": result.detail}, when=entry["time"])
        self.log(f"{run.node.name}: {action} ({reason}): {'ok' if result.ok else 'FAILED'} {result.detail}")

    # ------------------------------------------------------------------ counts

    def in_flight(self) -> int:
        return sum(1 for st in self.tracker.nodes.values() if st.stage in IN_FLIGHT and st.mac in self.runs)

    def failed_count(self) -> int:
        return sum(1 for r in self.runs.values() if r.result == "failed")

    # ------------------------------------------------------------------ run

    async def run(self, events: trio.MemoryReceiveChannel[BootEvent] | None = None) -> Summary:
        self.tracker.restore(self.store.transitions())
        for mac, st in self.tracker.nodes.items():
            run = self.runs.get(mac)
            if run is None:
                continue
            run.wakes = sum(1 for t in st.history if t.to_stage == Stage.WAKING and t.attempt == st.attempt)
            if st.stage == Stage.READY:
                run.result = "ready"
            elif st.stage == Stage.FAILED:
                run.result, run.reason = "failed", st.last_evidence
        self.window_history.append((self.clock(), self.window))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if events is not None:
                nursery.start_soon(self._consume, events)
            nursery.start_soon(self._watch_timeouts)
            if self.adm.adaptive and self.load is not None:
                nursery.start_soon(self._adapt)
            for run in self.runs.values():
                st = self.tracker.nodes[run.node.mac]
                if st.stage == Stage.READY:
                    nursery.start_soon(self._reverify, run)
                elif st.stage in PROBE_FROM:
                    self._start_probe(run)
            for wave, nodes in self.lp.waves():
                if self.aborted:
                    break
                self.log(f"wave {wave}: {len(nodes)} node(s)")
                await self._run_wave([self.runs[n.mac] for n in nodes])
            nursery.cancel_scope.cancel()
        ready = [r.node.name for r in self.runs.values() if r.result == "ready"]
        failed = [r.node.name for r in self.runs.values() if r.result == "failed"]
        ok = not self.aborted and len(ready) + len(failed) == len(self.runs) and len(failed) <= self.budget
        return Summary(ok, self.aborted, ready, failed, self.runs, self.window_history)

    async def _run_wave(self, runs: list[NodeRun]) -> None:
        queue = [r for r in runs if self.tracker.nodes[r.node.mac].stage == Stage.PENDING]
        while True:
            if self.failed_count() > self.budget:
                if not self.aborted:
                    self.aborted = True
                    self.log(f"failure budget exceeded ({self.failed_count()} failed > {self.budget}): aborting; nothing more is woken")
                return
            if all(r.result is not None for r in runs):
                return
            if queue and self.in_flight() < self.window:
                delay = self._power_on_delay(queue[0])
                if delay > 0:
                    with trio.move_on_after(delay):
                        await self.changed.wait()
                    continue
                await self._wake(queue.pop(0), "admitted")
                continue
            await self.changed.wait()

    def _power_on_delay(self, run: NodeRun) -> float:
        now = self.clock()
        at = self._next_power_on
        rack = run.node.rack
        if rack and self.adm.rack_power_on_rate:
            at = max(at, self._rack_next.get(rack, 0.0))
        return max(0.0, at - now)

    async def _wake(self, run: NodeRun, reason: str, *, again: bool = False) -> None:
        now = self.clock()
        self._next_power_on = now + 1.0 / self.adm.power_on_rate
        if run.node.rack and self.adm.rack_power_on_rate:
            self._rack_next[run.node.rack] = now + 1.0 / self.adm.rack_power_on_rate
        run.wakes += 1
        if again:
            self._record(self.tracker.restart_stage(run.node.mac, now, f"re-wake {run.wakes - 1}: {reason}"))
        else:
            run.wakes = 1
            self._record(self.tracker.wake(run.node.mac, now, f"woken: {reason}"))
        result = await self.wake_driver.on(run.target)
        self._action(run, "wake", reason, result)

    # ------------------------------------------------------------------ evidence

    async def _consume(self, events: trio.MemoryReceiveChannel[BootEvent]) -> None:
        async for ev in events:
            self._record(self.tracker.feed(ev))

    # ------------------------------------------------------------------ timeouts and escalation

    async def _watch_timeouts(self) -> None:
        while True:
            deadline = self.tracker.next_deadline()
            changed = self.changed
            if deadline is None:
                await changed.wait()
                continue
            delay = deadline - self.clock()
            if delay > 0:
                with trio.move_on_after(delay):
                    await changed.wait()
                    continue
            for stuck in self.tracker.check_timeouts(self.clock()):
                run = self.runs.get(stuck.mac)
                if run is not None and run.result is None:
                    await self._escalate(run, stuck.stage, stuck.timeout)

    async def _escalate(self, run: NodeRun, stage: Stage, timeout: float) -> None:
        name = run.node.name
        if stage in (Stage.SSH, Stage.READY):
            return  # the readiness task owns these, with the failing check as the reason
        why = f"stuck in {stage.value} for {timeout:g}s"
        if stage == Stage.WAKING and run.wakes <= self.retries.wake:
            await self._wake(run, why, again=True)
            return
        if self.bmc is not None and run.cycles < self.retries.power_cycle:
            run.cycles += 1
            self._cancel_probe(run)
            result = await self.bmc.cycle(run.target)
            self._action(run, "power_cycle", why, result)
            if result.ok:
                self._record(self.tracker.wake(run.node.mac, self.clock(), f"power cycle {run.cycles}: {why}"))
                run.wakes = 1
                return
        last = self.tracker.nodes[run.node.mac].last_evidence
        reason = f"{why} after {run.wakes} wake(s) and {run.cycles} power cycle(s); last evidence: {last}"
        self._fail(run, reason)

    def _fail(self, run: NodeRun, reason: str) -> None:
        self._cancel_probe(run)
        self._record(self.tracker.fail(run.node.mac, self.clock(), reason))
        self.log(f"{run.node.name}: FAILED: {reason}")

    # ------------------------------------------------------------------ readiness

    def _start_probe(self, run: NodeRun) -> None:
        st = self.tracker.nodes[run.node.mac]
        if self.readiness is None or self._nursery is None or run.probe_attempt == st.attempt or run.result is not None:
            return
        run.probe_attempt = st.attempt
        self._nursery.start_soon(self._probe, run, st.attempt)

    def _cancel_probe(self, run: NodeRun) -> None:
        if run.probe_scope is not None:
            run.probe_scope.cancel()
            run.probe_scope = None
        run.probe_attempt = 0

    async def _probe(self, run: NodeRun, attempt: int) -> None:
        mac, host = run.node.mac, run.target.ip
        with trio.CancelScope() as scope:
            run.probe_scope = scope
            while not await self.readiness.port_open(host, timeout=min(5.0, self.probe_every * 2)):
                await trio.sleep(self.probe_every)
            if self.tracker.nodes[mac].attempt != attempt:
                return
            self._record(self.tracker.ssh_up(mac, self.clock()))
            deadline = trio.current_time() + self.timeouts.ssh
            verdict = await self.readiness.until_ready(host, deadline)
            if self.tracker.nodes[mac].attempt != attempt:
                return
            if verdict.ok:
                self._record(self.tracker.ready(mac, self.clock(), "checks passed: " + ", ".join(c.name for c in verdict.checks)))
            else:
                failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failed_checks) or verdict.error
                self._fail(run, f"readiness failed: {failing}")

    async def _reverify(self, run: NodeRun) -> None:
        """A node the journal says is ready: check it again, never wake it."""
        if self.readiness is None:
            return
        verdict = await self.readiness.check(run.target.ip)
        if verdict.ok:
            self.log(f"{run.node.name}: still ready (re-verified after restart)")
            return
        failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failed_checks) or verdict.error
        self._fail(run, f"was ready before the restart, re-verification failed: {failing}")

    # ------------------------------------------------------------------ adaptation

    async def _adapt(self) -> None:
        while True:
            await trio.sleep(self.adapt_every)
            load = self.load()
            queued = any(r.result is None and self.tracker.nodes[r.node.mac].stage == Stage.PENDING for r in self.runs.values())
            old = self.window
            if load.retransmit_rate > self.retx_threshold:
                self.window = max(1, self.window // 2)
                self.slow_start = False
            elif queued and self.in_flight() >= self.window:
                self.window = min(self.max_window, self.window * 2 if self.slow_start else self.window + 1)
            if self.window != old:
                self.window_history.append((self.clock(), self.window))
                self.log(f"admission window {old} -> {self.window} (retransmits {load.retransmit_rate:.1f}/s)")
                self._kick()
