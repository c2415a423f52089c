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

The window (closed-loop, AIMD like TCP's congestion window): it starts at 8
(``initial_window``; TCP's initial window is 10 segments since RFC 6928: a
handful of nodes is no load for any boot server, and a node spends seconds in
POST before its first block, so a smaller start leaves the link idle) and
doubles every ``adapt_every`` seconds while the window is full, work is
queued, at least half the window is really downloading (woken nodes spend
seconds in POST and DHCP first) and the boot server shows no congestion (slow
start); after the first sign of trouble it grows by an eighth per interval
instead (congestion avoidance). Two congestion signals, both measured by the
file servers (:class:`Load`): *loss* -- server retransmits, or clients
re-sending (duplicate ACKs, repeated requests) above ``retransmit_threshold``
per second -- halves the window; *delay* -- more than ``queue_target`` blocks
waiting in the link's or the server's queues, estimated from the block round
trip against the unloaded one -- takes a quarter off, once per backlog (not
again while more nodes are in flight than the window). The delay signal is
what stops the window at "the link is full": lock-step TFTP keeps one block
per transfer in flight, so extra transfers only queue (see :meth:`_congestion`).
It never exceeds ``max_downloading``. With ``adaptive: false`` the window is
simply ``max_downloading``.

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

The ladder climbs only for nodes in an attempt bootorch started itself (a
wake, power-on or power cycle it sent: :attr:`NodeState.requested`). Evidence
is forgeable -- any host on the boot LAN can send a DHCPDISCOVER with a ready
node's MAC -- so evidence alone may move a node's stage but never causes a
power action: a node stuck in an attempt that evidence started (a reboot
nobody here asked for, or a forgery) is *looked at*, not touched: when its
readiness checks pass it is ``ready`` again, otherwise it is failed with the
reason, and an operator decides (``bootorch reboot``).

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

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from orchestrator.events import BootEvent
from orchestrator.plan import LoadedPlan, Node
from orchestrator.power import PowerResult, Target
from orchestrator.power.drivers import target as node_target
from orchestrator.store import Store
from orchestrator.tracker import TERMINAL, Stage, Tracker, Transition

log = logging.getLogger(__name__)

#: The wave name of nodes an on-call operation brought into a run.
ONCALL_WAVE = "on-call"
#: Stages that count against the admission window: woken and not yet past the downloads.
IN_FLIGHT = {Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD}
#: Stages whose entry or exit wakes the scheduler's waiters (see _record).
_WAKES = {Stage.READY, Stage.FAILED, Stage.PENDING}
#: From these on, the kernel runs: probe SSH.
PROBE_FROM = {Stage.INITRD, Stage.OS_DHCP, Stage.SSH}
#: Most events _consume feeds before it journals their transitions in one transaction.
CONSUME_BATCH = 512


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
    #: The on-call operation acting on this node now (None: the rollout's own plan).
    op: "Operation | None" = None
    #: index into ``actions`` where the current operation's actions start
    op_from: int = 0
    #: The scheduler's count of failed plan nodes; kept exact by __setattr__ (see Scheduler.failed_count).
    tally: _FailedTally | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("result", "wave", "tally"):
            object.__setattr__(self, name, value)
            return
        was = _failed_in(self)
        object.__setattr__(self, name, value)
        now = _failed_in(self)
        if was is not now:
            if was is not None:
                was.n -= 1
            if now is not None:
                now.n += 1


class _FailedTally:
    """How many runs of one scheduler are failed plan nodes (``result == "failed"``, not on-call)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _failed_in(run: NodeRun) -> _FailedTally | None:
    tally = getattr(run, "tally", None)  # unset while __init__ runs
    if tally is not None and getattr(run, "result", None) == "failed" and getattr(run, "wave", None) != ONCALL_WAVE:
        return tally
    return None


@dataclass(slots=True)
class Operation:
    """An on-call request (``wake``, ``reboot``, ``power_off``) over some nodes.

    While it runs, its nodes are *busy*: a second request for one of them is
    refused with who holds it, so two actors never cycle one node at once.
    """

    op: str
    names: list[str]
    reason: str
    actor: str
    hard: bool
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    #: node name -> {"result": "ready" | "failed" | "off", "reason": str, "path": [actions]}
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: transitions of this operation's nodes are copied here (progress for the requester).
    listeners: list[trio.MemorySendChannel] = field(default_factory=list)

    def holder(self) -> str:
        return f"{self.op} by {self.actor} since {time.strftime('%H:%M:%S', time.localtime(self.started))}"


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
        rollout: bool = True,
        ssh_power: Any | None = None,
        adapt_every: float = 1.0,
        retransmit_threshold: float = 5.0,
        queue_target: float = 64.0,
        initial_window: int = 8,
        probe_every: float = 1.0,
    ) -> None:
        self.lp, self.tracker, self.store = lp, tracker, store
        self.wake_driver, self.bmc, self.readiness = wake, bmc, readiness
        self.load, self.clock, self.log, self.on_change = load, clock, log, on_change
        plan = lp.model.rollout
        self.adm = plan.admission
        self.retries = plan.retries
        self.timeouts = plan.timeouts
        self.adapt_every, self.retx_threshold, self.probe_every = adapt_every, retransmit_threshold, probe_every
        #: Blocks allowed to wait in the boot server's queues (link, CPU) before the window shrinks.
        self.queue_target = queue_target
        #: How long the smallest round trip seen stays the reference (seconds).
        self.rtt_base_window = 600.0
        self._rtt_seen: deque[tuple[float, float]] = deque()
        self.max_window = self.adm.max_downloading
        self.window = min(initial_window, self.max_window) if self.adm.adaptive else self.max_window
        self.slow_start = True
        self.window_history: list[tuple[float, int]] = []
        self.runs: dict[str, NodeRun] = {}
        #: False: no plan waves, only on-call operations (``bootorch reboot`` without a running rollout, ``serve``).
        self.rollout = rollout
        if rollout:
            for wave, nodes in lp.waves():
                for n in nodes:
                    self.runs[n.mac] = NodeRun(n, node_target(n), wave)
        if ssh_power is None and readiness is not None:
            from orchestrator.power.drivers import SshPowerDriver

            ssh_power = SshPowerDriver(readiness)
        self.ssh_power = ssh_power
        #: mac -> the on-call operation holding the node
        self.ops: dict[str, Operation] = {}
        self._op_queue: list[NodeRun] = []
        self._node_locks: dict[str, trio.Lock] = {}
        budget = plan.failure_budget
        self.budget = budget if isinstance(budget, int) else math.floor(len(lp.nodes) * float(budget.rstrip("%")) / 100)
        self.changed = trio.Event()
        self.aborted = False
        self._next_power_on = 0.0
        self._rack_next: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._failed = _FailedTally()
        self._tallied = -1
        self._flight_key: tuple[int, int] = (-1, -1)
        self._flight_foreign: list[str] | None = None
        self._started = trio.Event()
        self._restored = False
        #: Evidence that raised in the tracker (contained, logged, dropped).
        self.evidence_errors = 0
        #: The deadline the timeout watcher sleeps until (None: until any change).
        self._watch_at: float | None = None
        #: True: run until cancelled (``serve``); False: return when the waves and every operation are done.
        self.standing = False

    # ------------------------------------------------------------------ journal + notify

    def _record(self, ts: list[Transition]) -> None:
        if not ts:
            return
        self.store.append(ts)
        self.on_change(ts)
        wake = False
        for t in ts:
            run = self.runs.get(t.mac)
            if run is None:
                continue
            # The waiters on `changed` care about a node entering or leaving the
            # admission window, an end (ready, failed, off) and a comeback; a step
            # inside the window (loader -> kernel) wakes nobody but the deadline check below.
            if ((t.from_stage in IN_FLIGHT) != (t.to_stage in IN_FLIGHT) or t.to_stage in _WAKES
                    or t.from_stage in _WAKES or run.op is not None):
                wake = True
            if run.op is not None:
                for ch in run.op.listeners:
                    try:
                        ch.send_nowait(t)
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            if t.to_stage == Stage.READY:
                run.result, run.reason = "ready", ""
                self._op_finished(run)
            elif t.to_stage == Stage.FAILED:
                run.result, run.reason = "failed", t.evidence
                self._op_finished(run)
            elif run.result == "failed" and t.to_stage == Stage.PXE_DHCP:
                run.result = None  # a human (or the node) brought it back
            if t.to_stage in PROBE_FROM:
                self._start_probe(run)
        if not wake:
            # The timeout watcher sleeps until the earliest deadline it knew; wake it
            # only if a stage entered now ends sooner than that.
            deadline = self.tracker.next_deadline()
            wake = deadline is not None and (self._watch_at is None or deadline < self._watch_at)
        if wake:
            self._kick()

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _action(self, run: NodeRun, action: str, reason: str, result: PowerResult, *, actor: str = "bootorch") -> None:
        entry = {"time": self.clock(), "action": action, "reason": reason, "ok": result.ok, "detail": result.detail}
        run.actions.append(entry)
        self.store.record_action(run.node.name, action, reason, "ok" if result.ok else f"failed: {result.detail}",
                                 actor=actor, detail={"detail": result.detail}, when=entry["time"])
        self.log(f"{run.node.name}: {action} ({reason}): {'ok' if result.ok else 'FAILED'} {result.detail}")

    # ------------------------------------------------------------------ counts

    # Both run after every transition (the admission loop wakes on each): at 10 000
    # nodes a pass over every node each time would cost more than the event itself.

    def in_flight(self) -> int:
        """Nodes of ours (in ``runs``) woken and not yet past initrd: the tracker's stage counts."""
        nodes, runs = self.tracker.nodes, self.runs
        key = (len(nodes), len(runs))  # both only grow: same sizes, same membership
        if key != self._flight_key:
            self._flight_key = key
            foreign = [mac for mac in nodes if mac not in runs]
            self._flight_foreign = foreign if len(foreign) <= len(runs) else None
        if self._flight_foreign is None:  # fewer runs than other nodes (on-call only): count the runs
            return sum(1 for mac in runs if (st := nodes.get(mac)) is not None and st.stage in IN_FLIGHT)
        return self.tracker.count(IN_FLIGHT) - sum(1 for mac in self._flight_foreign if nodes[mac].stage in IN_FLIGHT)

    def failed_count(self) -> int:
        """Failed nodes of the rollout's own plan (on-call operations report their own failures)."""
        if len(self.runs) != self._tallied:  # runs added since: count them in (runs are never removed or replaced)
            for r in self.runs.values():
                if r.tally is not self._failed:
                    r.tally = self._failed
            self._tallied = len(self.runs)
        return self._failed.n

    # ------------------------------------------------------------------ run

    def restore(self) -> None:
        """Rebuild the tracker from the journal (once; :meth:`run` calls it if nobody did)."""
        if self._restored:
            return
        self._restored = True
        self.tracker.restore(self.store.transitions())
        for mac, st in self.tracker.nodes.items():
            run = self.runs.get(mac)
            if run is None or run.op is not None:
                continue
            run.wakes = sum(1 for t in st.history if t.to_stage == Stage.WAKING and t.attempt == st.attempt)
            if st.stage == Stage.READY:
                run.result = "ready"
            elif st.stage == Stage.FAILED:
                run.result, run.reason = "failed", st.last_evidence

    async def run(self, events: trio.MemoryReceiveChannel[BootEvent] | None = None) -> Summary:
        self.restore()
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
                if run.op is not None:
                    continue
                if st.stage == Stage.READY:
                    nursery.start_soon(self._reverify, run)
                elif st.stage in PROBE_FROM:
                    self._start_probe(run)
            nursery.start_soon(self._operate)
            self._started.set()
            if self.rollout:
                for wave, nodes in self.lp.waves():
                    if self.aborted:
                        break
                    self.log(f"wave {wave}: {len(nodes)} node(s)")
                    await self._run_wave([self.runs[n.mac] for n in nodes])
            if self.standing:
                await trio.sleep_forever()
            await self.wait_idle()
            nursery.cancel_scope.cancel()
        ready = [r.node.name for r in self.runs.values() if r.result == "ready"]
        failed = [r.node.name for r in self.runs.values() if r.result == "failed"]
        ok = not self.aborted and len(ready) + len(failed) == len(self.runs) and len(failed) <= self.budget
        return Summary(ok, self.aborted, ready, failed, self.runs, self.window_history)

    async def _run_wave(self, runs: list[NodeRun]) -> None:
        queue = [r for r in runs if self.tracker.nodes[r.node.mac].stage == Stage.PENDING]
        first_open = 0  # runs before it had a result when last looked at: all() needs a full pass only at the end
        while True:
            if self.failed_count() > self.budget:
                if not self.aborted:
                    self.aborted = True
                    self.log(f"failure budget exceeded ({self.failed_count()} failed > {self.budget}): aborting; nothing more is woken")
                return
            while first_open < len(runs) and runs[first_open].result is not None:
                first_open += 1
            if first_open == len(runs):
                if all(r.result is not None for r in runs):
                    return
                first_open = 0
            if queue:
                if await self._may_power_on(queue[0]):
                    run = queue.pop(0)
                    if run.op is None and self.tracker.nodes[run.node.mac].stage == Stage.PENDING:  # else on-call took it over
                        async with self._lock(run.node.mac):
                            await self._wake(run, "admitted")
                continue
            await self.changed.wait()

    async def _may_power_on(self, run: NodeRun) -> bool:
        """True when ``run`` may be powered on now (room in the window, power-on rates allow).

        Otherwise False: after waiting for a change when the window is full (or
        for the power-on rate's delay, or a change, whichever comes first).
        """
        if self.in_flight() >= self.window:
            await self.changed.wait()
            return False
        delay = self._power_on_delay(run)
        if delay > 0:
            with trio.move_on_after(delay):
                await self.changed.wait()
            return False
        return True

    def _power_on_delay(self, run: NodeRun) -> float:
        now = self.clock()
        at = self._next_power_on
        rack = run.node.rack
        if rack and self.adm.rack_power_on_rate:
            at = max(at, self._rack_next.get(rack, 0.0))
        return max(0.0, at - now)

    def _note_power_on(self, run: NodeRun, now: float) -> None:
        """A node is being powered on now: the next power-on waits (globally, and in its rack)."""
        self._next_power_on = now + 1.0 / self.adm.power_on_rate
        if run.node.rack and self.adm.rack_power_on_rate:
            self._rack_next[run.node.rack] = now + 1.0 / self.adm.rack_power_on_rate

    async def _wake(self, run: NodeRun, reason: str, *, again: bool = False, actor: str = "bootorch") -> None:
        now = self.clock()
        self._note_power_on(run, now)
        run.wakes += 1
        if again:
            self._record(self.tracker.restart_stage(run.node.mac, now, f"re-wake {run.wakes - 1}: {reason}"))
        else:
            run.wakes = 1
            self._record(self.tracker.wake(run.node.mac, now, f"woken: {reason}"))
        result = await self.wake_driver.on(run.target)
        self._action(run, "wake", reason, result, actor=actor)

    # ------------------------------------------------------------------ evidence

    def _feed(self, ev: BootEvent) -> list[Transition]:
        """The tracker's transitions for one event; an event the tracker chokes on costs only itself."""
        try:
            return self.tracker.feed(ev)
        except Exception:
            self.evidence_errors += 1
            log.exception("evidence from %s could not be applied; dropped", ev.source)
            return []

    async def _consume(self, events: trio.MemoryReceiveChannel[BootEvent]) -> None:
        feed = self._feed
        async for ev in events:
            # Whatever else is already waiting goes in the same batch: one journal
            # transaction and one wake-up of the waiters for all of it.
            ts = list(feed(ev))
            for _ in range(CONSUME_BATCH - 1):
                try:
                    ev = events.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                ts.extend(feed(ev))
            self._record(ts)

    # ------------------------------------------------------------------ timeouts and escalation

    async def _watch_timeouts(self) -> None:
        while True:
            deadline = self.tracker.next_deadline()
            changed = self.changed
            self._watch_at = deadline
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
                if run is None:
                    continue
                if not self.tracker.nodes[stuck.mac].requested:
                    self._nursery.start_soon(self._look_at_unrequested, run, stuck.stage, stuck.attempt)  # type: ignore[union-attr]
                elif run.result is None:
                    await self._escalate(run, stuck.stage, stuck.timeout)

    async def _escalate(self, run: NodeRun, stage: Stage, timeout: float) -> None:
        async with self._lock(run.node.mac):  # never while an on-call action works on the node
            if run.result is None and self.tracker.nodes[run.node.mac].stage == stage:
                await self._escalate_locked(run, stage, timeout)

    async def _escalate_locked(self, run: NodeRun, stage: Stage, timeout: float) -> None:
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

    async def _look_at_unrequested(self, run: NodeRun, stage: Stage, attempt: int) -> None:
        """A node stuck in an attempt bootorch did not start: check it, never power it.

        Evidence started that attempt (see the module docstring): maybe the node
        rebooted by itself, maybe a host on the LAN forged its DHCP. Readiness
        answers which: passing checks make it ``ready`` again; otherwise it is
        failed with the reason and left for an operator.
        """
        mac = run.node.mac
        async with self._lock(mac):
            st = self.tracker.nodes[mac]
            if st.attempt != attempt or st.stage != stage or st.requested:
                return  # it moved on, or bootorch has acted on it since
            why = (f"stuck in {stage.value} in attempt {attempt}, which bootorch did not start "
                   f"(evidence from {st.attempt_source}: {st.last_evidence})")
            failing = "no readiness checks configured"
            if self.readiness is not None:
                verdict = await self.readiness.check(run.target.ip)
                st = self.tracker.nodes[mac]
                if st.attempt != attempt or st.stage != stage or st.requested:
                    return
                if verdict.ok:
                    self.log(f"{run.node.name}: {why}; readiness checks pass: still up")
                    self._record(self.tracker.ready(mac, self.clock(), f"checks passed after unrequested boot evidence ({why})"))
                    return
                failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failed_checks) or verdict.error
            self._fail(run, f"{why}; readiness: {failing}; no power action on evidence bootorch did not ask for")

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
            why = self._congestion(load, self.clock())
            flying = self.in_flight()
            if why.startswith("loss"):
                self.window = max(1, self.window // 2)
                self.slow_start = False
            elif why:
                # Only while the window is what admits nodes: with more in flight than
                # the window (admitted before the queue showed), shrinking again changes
                # nothing now and collapses the window while that backlog drains.
                if flying <= self.window:
                    self.window = max(1, self.window - max(1, self.window // 4))
                self.slow_start = False
            elif queued and flying >= self.window:
                if not self.slow_start:
                    self.window = min(self.max_window, self.window + max(1, self.window // 8))
                elif self.tracker.downloading() * 2 >= self.window:
                    # Slow start doubles only once half the window is really downloading:
                    # woken nodes spend seconds in POST and DHCP before their first block,
                    # and doubling on nodes that load nothing yet overshoots blind.
                    self.window = min(self.max_window, self.window * 2)
            if self.window != old:
                self.window_history.append((self.clock(), self.window))
                self.log(f"admission window {old} -> {self.window} ({why or 'room'}: retransmits {load.retransmit_rate:.1f}/s, "
                         f"client retries {getattr(load, 'client_retry_rate', 0.0):.1f}/s"
                         + (f", rtt {load.rtt * 1000:.1f} ms" if getattr(load, "rtt", None) is not None else "") + ")")
                self._kick()

    def _congestion(self, load: Any, now: float) -> str:
        """Why the boot server is congested now ("loss: ...", "delay: ..."), or "" when it is not.

        *Loss*: the server retransmits, or clients re-send (duplicate ACKs and
        repeated requests: their timers fired before our data came), more than
        ``retransmit_threshold`` times a second. *Delay*: the packets queued
        ahead of the boot server's blocks -- in the link or in its CPU -- exceed
        ``queue_target``. TCP Vegas's estimate, on transfer counts: a lock-step
        transfer has one block in flight, so with ``active`` transfers, a round
        trip ``rtt`` and an unloaded round trip ``base`` (the smallest seen in
        the last ``rtt_base_window`` seconds), about ``active * (1 - base/rtt)``
        of those blocks are waiting in a queue rather than moving. A few dozen
        queued packets keep the link busy through every hiccup; more only add
        waiting (and, past the clients' timers, re-sends). Without the delay
        signal a shallow link queue never overflows and the window grows until
        clients time out.
        """
        if load.retransmit_rate > self.retx_threshold:
            return f"loss: {load.retransmit_rate:.1f} retransmits/s"
        retries = getattr(load, "client_retry_rate", 0.0)
        if retries > self.retx_threshold:
            return f"loss: {retries:.1f} client re-sends/s"
        rtt = getattr(load, "rtt", None)
        if rtt is None:
            return ""
        samples = self._rtt_seen
        samples.append((now, rtt))
        while samples and samples[0][0] < now - self.rtt_base_window:
            samples.popleft()
        base = min(v for _, v in samples)
        queued = load.active * (1.0 - base / rtt) if rtt > base else 0.0
        if queued > self.queue_target:
            return f"delay: ~{queued:.0f} blocks queued (rtt {rtt * 1000:.1f} ms vs {base * 1000:.1f} ms unloaded, {load.active} transfers)"
        return ""

    # ------------------------------------------------------------------ on-call operations

    def feed_event(self, ev: BootEvent) -> list[Transition]:
        """One piece of evidence from outside :meth:`run`'s own channel (``serve`` prints as it feeds)."""
        ts = self._feed(ev)
        self._record(ts)
        return ts

    def submit(self, op: str, names: list[str], *, reason: str, actor: str, hard: bool = False) -> tuple[Operation | None, dict[str, str]]:
        """Start an on-call operation; returns it (None when every node was busy) and the busy nodes with their holder.

        ``wake``: power the nodes on (the plan's wake driver, then the ladder);
        ``reboot``: the gentlest path that can work -- SSH ``reboot`` when the
        OS answers (not with ``hard``), else a BMC power cycle (power on when
        the BMC says off), else a magic packet; ``power_off``: SSH ``poweroff``
        when the OS answers (not with ``hard``), else BMC off. Wakes and
        reboots queue behind the admission window like a rollout's nodes.
        """
        if op not in ("wake", "reboot", "power_off"):
            raise ValueError(f"unknown operation {op!r}")
        names = list(dict.fromkeys(names))  # named twice is still one node, acted on once
        by_name = {n.name: n for n in self.lp.nodes}
        busy: dict[str, str] = {}
        acting: list[NodeRun] = []
        for name in names:
            node = by_name[name]
            held = self.ops.get(node.mac)
            lock = self._node_locks.get(node.mac)
            if held is not None:
                busy[name] = f"busy: {held.holder()}"
            elif lock is not None and lock.locked():
                busy[name] = "busy: a power action by the rollout is in progress"
            else:
                run = self.runs.get(node.mac)
                if run is None:
                    run = self.runs[node.mac] = NodeRun(node, node_target(node), ONCALL_WAVE)
                acting.append(run)
        for name, why in busy.items():
            self.store.record_action(name, f"{op} requested", reason, why, actor=actor, when=self.clock())
        if not acting:
            return None, busy
        operation = Operation(op, [r.node.name for r in acting], reason, actor, hard, self.clock())
        for run in acting:
            self._cancel_probe(run)
            run.op, run.result, run.reason, run.wakes, run.cycles = operation, None, "", 0, 0
            run.op_from = len(run.actions)
            self.ops[run.node.mac] = operation
            self.store.record_action(run.node.name, f"{op} requested", reason, "accepted", actor=actor, when=self.clock())
            self._op_queue.append(run)
        self.log(f"{op} {', '.join(operation.names)} ({reason}) for {actor}")
        self._kick()
        return operation, busy

    async def wait_idle(self) -> None:
        """Until no on-call operation is running."""
        while self.ops:
            await self.changed.wait()

    def _op_finished(self, run: NodeRun) -> None:
        op = run.op
        if op is None:
            return
        run.op = None
        self.ops.pop(run.node.mac, None)
        op.results[run.node.name] = {"result": run.result, "reason": run.reason,
                                     "path": [a["action"] for a in run.actions[run.op_from:]]}
        self.store.record_action(run.node.name, op.op, op.reason, run.result if run.result != "failed" else f"failed: {run.reason}",
                                 actor=op.actor, when=self.clock())
        if len(op.results) == len(op.names):
            for ch in op.listeners:
                ch.close()
            op.done.set()
        self._kick()

    def _lock(self, mac: str) -> trio.Lock:
        lock = self._node_locks.get(mac)
        if lock is None:
            lock = self._node_locks[mac] = trio.Lock()
        return lock

    async def _operate(self) -> None:
        """Admit queued on-call nodes under the same window and power-on rate as a rollout."""
        while True:
            queue = self._op_queue
            if queue and queue[0].op is not None and queue[0].op.op == "power_off":
                self._nursery.start_soon(self._do_op, queue.pop(0))  # type: ignore[union-attr]
                continue
            if queue and queue[0].op is None:
                queue.pop(0)
                continue
            if queue:
                if await self._may_power_on(queue[0]):
                    await self._do_op(queue.pop(0))
                continue
            await self.changed.wait()

    async def _do_op(self, run: NodeRun) -> None:
        op = run.op
        assert op is not None
        t, name, mac = run.target, run.node.name, run.node.mac
        why = f"{op.op} by {op.actor}: {op.reason}"
        async with self._lock(mac):
            st = self.tracker.nodes[mac]
            if op.op == "power_off":
                await self._power_off(run, op, why)
                return
            if op.op == "wake":
                if st.stage == Stage.READY and self.readiness is not None and await self.readiness.port_open(t.ip, timeout=3):
                    run.actions.append({"time": self.clock(), "action": "none", "reason": why, "ok": True, "detail": "already up"})
                    run.result, run.reason = "ready", "already up"
                    self._op_finished(run)
                    return
                await self._wake(run, why, actor=op.actor)
                return
            # reboot: the gentlest path that can work
            now_open = (not op.hard and self.ssh_power is not None and self.readiness is not None
                        and await self.readiness.port_open(t.ip, timeout=3))
            if now_open:
                result = await self.ssh_power.cycle(t)
                self._action(run, "reboot_ssh", why, result, actor=op.actor)
                if result.ok:
                    self._after_power(run, f"rebooted over SSH ({why})")
                    return
            if self.bmc is not None:
                state = await self.bmc.status(t)
                action, result = ("power_on", await self.bmc.on(t)) if state == "off" else ("power_cycle", await self.bmc.cycle(t))
                self._action(run, action, why, result, actor=op.actor)
                if result.ok:
                    run.cycles += 1
                    self._after_power(run, f"{action.replace('_', ' ')} ({why})")
                    return
            if now_open or self.bmc is not None:
                self.log(f"{name}: falling back to a magic packet")
            await self._wake(run, why, actor=op.actor)

    def _after_power(self, run: NodeRun, evidence: str) -> None:
        now = self.clock()
        self._note_power_on(run, now)
        run.wakes = 1
        self._record(self.tracker.wake(run.node.mac, now, evidence))

    async def _power_off(self, run: NodeRun, op: Operation, why: str) -> None:
        t = run.target
        result = None
        if not op.hard and self.ssh_power is not None and self.readiness is not None and await self.readiness.port_open(t.ip, timeout=3):
            result = await self.ssh_power.off(t)
            self._action(run, "poweroff_ssh", why, result, actor=op.actor)
        if (result is None or not result.ok) and self.bmc is not None:
            result = await self.bmc.off(t)
            self._action(run, "power_off", why, result, actor=op.actor)
        if result is None:
            result = PowerResult(False, "no way to power it off: the OS does not answer SSH and the plan has no BMC")
            self._action(run, "power_off", why, result, actor=op.actor)
        if result.ok:
            self._record(self.tracker.powered_off(run.node.mac, self.clock(), f"powered off ({why})"))
            run.result, run.reason = "off", ""
        else:
            run.result, run.reason = "failed", result.detail
        self._op_finished(run)
