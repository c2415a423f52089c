"""The rollout scheduler: wake nodes as fast as the boot server can carry them, and no faster.

One trio nursery runs the whole rollout:

* **admission** (the main task): waves in plan order; within a wave nodes are
  queued (never rejected) and woken while the number of nodes *in flight* --
  woken but not yet past ``initrd``, i.e. about to download or downloading from
  the boot server -- is below the window, and while the power-on rate (global,
  and per rack: inrush current trips breakers) allows;
* **evidence**: BootEvents from the boot server (or log watchers) go through the
  tracker; every transition is journaled before anything acts on it;
* **timeouts**: a node that overstays its stage climbs the escalation ladder,
  each escalation in a task of its own (one node's slow BMC delays no other
  node's);
* **readiness**: once a node is past ``initrd`` its SSH port is probed; when it
  answers, the plan's checks run (``ssh`` -> ``ready``, or ``failed`` with the
  failing check);
* **adaptation**: every ``adapt_every`` seconds the boot server's load goes to
  the admission window, which may change its size (below).

The admission window is :class:`orchestrator.window.AdmissionWindow`, pure;
its rules and their reasons are in ``window.py``. In short: it starts at 8
nodes, doubles while nodes are queued, the window is full and half of it is
downloading (slow start), and after the first sign of congestion grows by an
eighth instead; *loss* (server retransmits or client re-sends) halves it,
*delay* (blocks queued behind the boot server's link) takes a quarter off. It
never exceeds ``max_downloading``; with ``adaptive: false`` it is simply
``max_downloading``. Its knobs are a :class:`~orchestrator.window.WindowTuning`;
each change is logged (``admission window 8 -> 4 (loss: ...)``) and kept in
``window_history``.

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

Each node's work is a :class:`NodeJob` (wakes, power cycles, actions, result).
A job's result is set only through :meth:`Scheduler.set_result`, which keeps
the count of failed plan nodes that the failure budget reads.

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
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import trio

from orchestrator.events import BootEvent
from orchestrator.plan import LoadedPlan, Node
from orchestrator.power import PowerDriver, PowerResult, Target
from orchestrator.power.drivers import target as node_target
from orchestrator.store import Store
from orchestrator.plan.resolve import MAIN_SERVER
from orchestrator.tracker import DOWNLOADING, Stage, Tracker, Transition
from orchestrator.window import AdmissionWindow, ServerLoad, WindowTuning

if TYPE_CHECKING:
    from orchestrator.readiness import Verdict

log = logging.getLogger(__name__)

#: The wave name of nodes that only an on-call operation brought in (not in the plan's rollout).
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
class NodeJob:
    """The scheduler's work on one node: its wakes and power cycles, actions and result.

    Set ``result`` through :meth:`Scheduler.set_result` (it keeps the failed count).
    """

    node: Node
    target: Target
    wave: str
    wakes: int = 0
    cycles: int = 0
    result: str | None = None  # "ready" | "failed" | "off" (on-call power_off)
    reason: str = ""
    probe_attempt: int = 0
    probe_scope: trio.CancelScope | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    #: The on-call operation acting on this node now (None: the rollout's own plan).
    op: "Operation | None" = None
    #: index into ``actions`` where the current operation's actions start
    op_from: int = 0


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
    nodes: dict[str, NodeJob]
    window_history: list[tuple[float, int]]


class ReadinessProbe(Protocol):
    """What the scheduler asks of readiness (:class:`orchestrator.readiness.Readiness`; tests pass a simulated one)."""

    async def port_open(self, host: str, timeout: float | None = None) -> bool: ...

    async def check(self, host: str, timeout: float | None = None) -> Verdict: ...

    async def until_ready(self, host: str, deadline: float) -> Verdict: ...


class Scheduler:
    """Runs a plan's rollout (:meth:`run`) and on-call operations (:meth:`submit`).

    ``wake`` powers nodes on (the plan's wake driver); ``bmc`` power-cycles them
    on the ladder (None: no BMC); ``ssh_power`` reboots and powers off through
    the OS (default: over ``readiness``'s SSH settings); ``readiness`` probes
    SSH and runs the plan's checks (None: nodes stop at ``ssh``); ``load``
    returns the file servers' load (None: the window does not adapt);
    ``window_tuning`` sets the admission window's knobs; ``probe_every`` is the
    SSH probe period. ``log`` gets human lines, ``on_change`` every batch of
    transitions after it is journaled, ``on_event`` every piece of evidence
    before the tracker sees it (``serve --events``). ``rollout=False``: no plan waves, only
    on-call operations; ``standing=True``: :meth:`run` goes on until cancelled
    (``serve``) instead of returning when the waves and operations are done.
    """

    def __init__(
        self,
        plan: LoadedPlan,
        tracker: Tracker,
        store: Store,
        *,
        wake: PowerDriver,
        bmc: PowerDriver | None,
        readiness: ReadinessProbe | None,
        load: Callable[[], ServerLoad] | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = lambda s: None,
        on_change: Callable[[list[Transition]], None] = lambda ts: None,
        on_event: Callable[[BootEvent], None] | None = None,
        rollout: bool = True,
        standing: bool = False,
        ssh_power: PowerDriver | None = None,
        window_tuning: WindowTuning = WindowTuning(),
        probe_every: float = 1.0,
        server_loads: dict[str, Callable[[], ServerLoad | None]] | None = None,
        server_blind: dict[str, Callable[[], bool]] | None = None,
        blind_grace: float = 10.0,
    ) -> None:
        self.plan, self.tracker, self.store = plan, tracker, store
        self.wake_driver, self.bmc, self.readiness = wake, bmc, readiness
        self.load, self.clock, self.log, self.on_change, self.on_event = load, clock, log, on_change, on_event
        settings = plan.model.rollout
        self.adm = settings.admission
        self.retries = settings.retries
        self.timeouts = settings.timeouts
        self.probe_every = probe_every
        #: Load readers per server: ``main`` reads ``load``; others what ``server_loads`` gives.
        self.server_loads: dict[str, Callable[[], ServerLoad | None]] = dict(server_loads or {})
        #: server -> True while its evidence cannot reach us (a satellite's stream is down); see _escalate.
        self.server_blind: dict[str, Callable[[], bool]] = dict(server_blind or {})
        self.blind_grace = blind_grace
        if load is not None:
            self.server_loads.setdefault(MAIN_SERVER, load)
        # A window adapts only to a load it can read; without one it is the server's max_downloading.
        self.admission_window = AdmissionWindow(self.adm.max_downloading, tuning=window_tuning,
                                                adaptive=self.adm.adaptive and MAIN_SERVER in self.server_loads)
        #: One admission window per boot server (``servers:``), ``main`` first: the plan's own server's.
        self.windows: dict[str, AdmissionWindow] = {MAIN_SERVER: self.admission_window}
        for srv in plan.model.servers:
            self.windows[srv.name] = AdmissionWindow(srv.admission.max_downloading, tuning=window_tuning,
                                                     adaptive=srv.admission.adaptive and srv.name in self.server_loads)
        #: mac -> the server carrying the node's downloads (:meth:`set_plan` renews it on a reload)
        self.server_of: dict[str, str] = {n.mac: plan.server_of(n) for n in plan.nodes}
        #: Servers that carry some node's downloads: only their windows count in :attr:`window`.
        self.serving: set[str] = set(self.server_of.values())
        #: server -> MACs of its nodes in flight (kept only with more than one server; see in_flight_on).
        self._flying: dict[str, set[str]] = {name: set() for name in self.windows}
        #: (time, size) at the start of :meth:`run` and at every change of an admission window (sizes summed over servers).
        self.window_history: list[tuple[float, int]] = []
        #: server -> (time, size) at every change of that server's window (kept with more than one server).
        self.server_window_history: dict[str, list[tuple[float, int]]] = {}
        self.jobs: dict[str, NodeJob] = {}
        #: False: no plan waves, only on-call operations (``bootorch reboot`` without a running rollout, ``serve``).
        self.rollout = rollout
        if rollout:
            for wave, nodes in plan.waves():
                for n in nodes:
                    self.jobs[n.mac] = NodeJob(n, node_target(n), wave)
        if ssh_power is None and readiness is not None:
            from orchestrator.power.drivers import SshPowerDriver

            ssh_power = SshPowerDriver(readiness)
        self.ssh_power = ssh_power
        #: mac -> the on-call operation holding the node
        self.ops: dict[str, Operation] = {}
        self._op_queue: list[NodeJob] = []
        self._node_locks: dict[str, trio.Lock] = {}
        budget = settings.failure_budget
        self.budget = budget if isinstance(budget, int) else math.floor(len(plan.nodes) * float(budget.rstrip("%")) / 100)
        self.changed = trio.Event()
        self.aborted = False
        self._next_power_on = 0.0
        self._rack_next: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        #: MACs of the failed plan nodes (not on-call), kept by set_result: the budget's count.
        self._failed: set[str] = set()
        self._flight_key: tuple[int, int] = (-1, -1)
        self._flight_foreign: list[str] | None = None
        self._started = trio.Event()
        self._restored = False
        #: Evidence that raised in the tracker (contained, logged, dropped).
        self.evidence_errors = 0
        #: The deadline the timeout watcher sleeps until (None: until any change).
        self._watch_at: float | None = None
        #: True: run until cancelled (``serve``); False: return when the waves and every operation are done.
        self.standing = standing

    # ------------------------------------------------------------------ journal + notify

    def _record(self, ts: list[Transition]) -> None:
        if not ts:
            return
        self.store.append(ts)
        self.journaled(ts)

    def journaled(self, ts: list[Transition]) -> None:
        """Act on tracker transitions that are already in the journal: notify, set results, start probes, wake waiters.

        The log watchers (:func:`orchestrator.logwatch.watch.track_logs`) feed the
        tracker and journal each line's transitions with the line's offset
        themselves; they hand the transitions here, as ``on_change``.
        """
        if not ts:
            return
        self.on_change(ts)
        wake = False
        many = len(self.windows) > 1
        for t in ts:
            job = self.jobs.get(t.mac)
            if job is None:
                continue
            if many:
                self._sync_flying(t.mac)
            # The waiters on `changed` care about a node entering or leaving the
            # admission window, an end (ready, failed, off) and a comeback; a step
            # inside the window (loader -> kernel) wakes nobody but the deadline check below.
            if ((t.from_stage in IN_FLIGHT) != (t.to_stage in IN_FLIGHT) or t.to_stage in _WAKES
                    or t.from_stage in _WAKES or job.op is not None):
                wake = True
            if job.op is not None:
                for ch in job.op.listeners:
                    try:
                        ch.send_nowait(t)
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            if t.to_stage == Stage.READY:
                self.set_result(job, "ready", "")
                self._op_finished(job)
            elif t.to_stage == Stage.FAILED:
                self.set_result(job, "failed", t.evidence)
                self._op_finished(job)
            elif job.result == "failed" and t.to_stage == Stage.PXE_DHCP:
                self.set_result(job, None)  # a human (or the node) brought it back
            if t.to_stage in PROBE_FROM:
                self._start_probe(job)
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

    def _action(self, job: NodeJob, action: str, reason: str, result: PowerResult, *, actor: str = "bootorch") -> None:
        entry = {"time": self.clock(), "action": action, "reason": reason, "ok": result.ok, "detail": result.detail}
        job.actions.append(entry)
        self.store.record_action(job.node.name, action, reason, "ok" if result.ok else f"failed: {result.detail}",
                                 actor=actor, detail={"detail": result.detail}, when=entry["time"])
        self.log(f"{job.node.name}: {action} ({reason}): {'ok' if result.ok else 'FAILED'} {result.detail}")

    # ------------------------------------------------------------------ counts

    def _counted(self) -> list[AdmissionWindow]:
        """The windows of the servers that carry some node (every window when none does)."""
        counted = [w for name, w in self.windows.items() if name in self.serving]
        return counted or list(self.windows.values())

    @property
    def window(self) -> int:
        """Nodes allowed in flight now: the admission windows' sizes, summed over the servers carrying nodes
        (``main`` with every rack on another server admits nobody and is left out)."""
        return sum(w.size for w in self._counted())

    @property
    def max_window(self) -> int:
        """The admission windows' ceilings (each server's ``max_downloading``), summed as :attr:`window` is."""
        return sum(w.max_window for w in self._counted())

    def set_plan(self, plan: LoadedPlan) -> None:
        """Take a reloaded plan: nodes added, removed or moved to another rack get their server anew
        (the ``servers:`` section itself is restart-only, so the windows stay)."""
        self.plan = plan
        old = self.server_of
        self.server_of = {n.mac: plan.server_of(n) for n in plan.nodes}
        self.serving = set(self.server_of.values())
        if len(self.windows) > 1:
            for mac in old.keys() | self.server_of.keys():
                if old.get(mac) != self.server_of.get(mac):
                    self._flying[old.get(mac, MAIN_SERVER)].discard(mac)
                    if mac in self.server_of:
                        self._sync_flying(mac)

    def _sync_flying(self, mac: str) -> None:
        st = self.tracker.nodes.get(mac)
        flying = self._flying[self.server_of.get(mac, MAIN_SERVER)]
        if st is not None and st.stage in IN_FLIGHT and mac in self.jobs:
            flying.add(mac)
        else:
            flying.discard(mac)

    def in_flight_on(self, server: str) -> int:
        """Nodes of ours in flight whose downloads ``server`` carries."""
        if len(self.windows) == 1:
            return self.in_flight()
        return len(self._flying[server])

    def downloading_on(self, server: str) -> int:
        """Nodes of ours downloading (loader .. initrd) from ``server``."""
        if len(self.windows) == 1:
            return self.tracker.downloading()
        nodes = self.tracker.nodes
        return sum(1 for mac in self._flying[server] if nodes[mac].stage in DOWNLOADING)

    def waiting(self) -> Counter[str]:
        """Per server, the nodes queued to be woken: on-call wakes and reboots behind its window, and the
        rollout's nodes still pending (a node in both counts once). One pass over the jobs."""
        waiting: Counter[str] = Counter()
        queued: set[str] = set()
        for job in self._op_queue:
            mac = job.node.mac
            if job.op is not None and job.op.op != "power_off" and mac not in queued:
                queued.add(mac)
                waiting[self.server_of.get(mac, MAIN_SERVER)] += 1
        nodes = self.tracker.nodes
        for mac, job in self.jobs.items():
            if job.result is None and job.op is None and mac not in queued:
                st = nodes.get(mac)
                if st is not None and st.stage is Stage.PENDING:
                    waiting[self.server_of.get(mac, MAIN_SERVER)] += 1
        return waiting

    # Both run after every transition (the admission loop wakes on each): at 10 000
    # nodes a pass over every node each time would cost more than the event itself.

    def in_flight(self) -> int:
        """Nodes of ours (in ``jobs``) woken and not yet past initrd: the tracker's stage counts."""
        nodes, jobs = self.tracker.nodes, self.jobs
        key = (len(nodes), len(jobs))  # both only grow: same sizes, same membership
        if key != self._flight_key:
            self._flight_key = key
            foreign = [mac for mac in nodes if mac not in jobs]
            self._flight_foreign = foreign if len(foreign) <= len(jobs) else None
        if self._flight_foreign is None:  # fewer jobs than other nodes (on-call only): count the jobs
            return sum(1 for mac in jobs if (st := nodes.get(mac)) is not None and st.stage in IN_FLIGHT)
        return self.tracker.count(IN_FLIGHT) - sum(1 for mac in self._flight_foreign if nodes[mac].stage in IN_FLIGHT)

    def failed_count(self) -> int:
        """Failed nodes of the rollout's own plan (on-call operations report their own failures)."""
        return len(self._failed)

    def set_result(self, job: NodeJob, result: str | None, reason: str | None = None) -> None:
        """Set ``job``'s result (and reason, unless None): the one place results change, so the failed count stays exact."""
        job.result = result
        if reason is not None:
            job.reason = reason
        if result == "failed" and job.wave != ONCALL_WAVE:
            self._failed.add(job.node.mac)
        else:
            self._failed.discard(job.node.mac)

    # ------------------------------------------------------------------ run

    def restore(self) -> None:
        """Rebuild the tracker from the journal (once; :meth:`run` calls it if nobody did)."""
        if self._restored:
            return
        self._restored = True
        self.tracker.restore(self.store.transitions())
        for mac, st in self.tracker.nodes.items():
            job = self.jobs.get(mac)
            if job is None or job.op is not None:
                continue
            job.wakes = sum(1 for t in st.history if t.to_stage == Stage.WAKING and t.attempt == st.attempt)
            if st.stage == Stage.READY:
                self.set_result(job, "ready")
            elif st.stage == Stage.FAILED:
                self.set_result(job, "failed", st.last_evidence)

    async def run(self, events: trio.MemoryReceiveChannel[BootEvent] | None = None) -> Summary:
        self.restore()
        if len(self.windows) > 1:
            for mac in self.jobs:
                self._sync_flying(mac)
        self.window_history.append((self.clock(), self.window))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if events is not None:
                nursery.start_soon(self._consume, events)
            nursery.start_soon(self._watch_timeouts)
            for name, window in self.windows.items():
                reader = self.server_loads.get(name)
                if window.adaptive and reader is not None:
                    nursery.start_soon(self._adapt, name, reader)
            for job in self.jobs.values():
                st = self.tracker.nodes[job.node.mac]
                if job.op is not None:
                    continue
                if st.stage == Stage.READY:
                    nursery.start_soon(self._reverify, job)
                elif st.stage in PROBE_FROM:
                    self._start_probe(job)
            nursery.start_soon(self._operate)
            self._started.set()
            if self.rollout:
                for wave, nodes in self.plan.waves():
                    if self.aborted:
                        break
                    self.log(f"wave {wave}: {len(nodes)} node(s)")
                    await self._run_wave([self.jobs[n.mac] for n in nodes])
            if self.standing:
                await trio.sleep_forever()
            await self.wait_idle()
            nursery.cancel_scope.cancel()
        ready = [r.node.name for r in self.jobs.values() if r.result == "ready"]
        failed = [r.node.name for r in self.jobs.values() if r.result == "failed"]
        ok = not self.aborted and len(ready) + len(failed) == len(self.jobs) and len(failed) <= self.budget
        return Summary(ok, self.aborted, ready, failed, self.jobs, self.window_history)

    async def _run_wave(self, jobs: list[NodeJob]) -> None:
        lanes = self._lanes([r for r in jobs if self.tracker.nodes[r.node.mac].stage == Stage.PENDING])
        first_open = 0  # jobs before it had a result when last looked at: all() needs a full pass only at the end
        while True:
            if self.failed_count() > self.budget:
                if not self.aborted:
                    self.aborted = True
                    self.log(f"failure budget exceeded ({self.failed_count()} failed > {self.budget}): aborting; nothing more is woken")
                return
            while first_open < len(jobs) and jobs[first_open].result is not None:
                first_open += 1
            if first_open == len(jobs):
                if all(r.result is not None for r in jobs):
                    return
                first_open = 0
            if lanes:
                lane = await self._admissible(lanes)
                if lane is not None:
                    _, job = lanes[lane].popleft()
                    if not lanes[lane]:
                        del lanes[lane]
                    if job.op is None and self.tracker.nodes[job.node.mac].stage == Stage.PENDING:  # else on-call took it over
                        async with self._lock(job.node.mac):
                            await self._wake(job, "admitted")
                continue
            await self.changed.wait()

    def _lanes(self, queue: list[NodeJob]) -> dict[tuple[str, str | None], deque[tuple[int, NodeJob]]]:
        """The wave's queue split by (server, rack): a full server or a rack at its power-on rate holds back only its lane.

        Racks get lanes of their own only under ``rack_power_on_rate``; each lane keeps plan order.
        """
        lanes: dict[tuple[str, str | None], deque[tuple[int, NodeJob]]] = {}
        by_rack = bool(self.adm.rack_power_on_rate)
        for i, job in enumerate(queue):
            key = (self.server_of.get(job.node.mac, MAIN_SERVER), job.node.rack if by_rack else None)
            lanes.setdefault(key, deque()).append((i, job))
        return lanes

    async def _admissible(self, lanes: dict[tuple[str, str | None], deque[tuple[int, NodeJob]]]) -> tuple[str, str | None] | None:
        """The lane whose first node may be powered on now (the earliest in plan order among those that may).

        None after waiting: for a change when every lane's server is full, else for
        the nearest power-on delay (global or per rack) or a change, whichever comes first.
        """
        best: tuple[str, str | None] | None = None
        best_at = -1
        wait = math.inf
        for key, lane in lanes.items():
            i, job = lane[0]
            if best is not None and i > best_at:
                continue
            if self.in_flight_on(key[0]) >= self.windows[key[0]].size:
                continue
            delay = self._power_on_delay(job)
            if delay > 0:
                wait = min(wait, delay)
                continue
            best, best_at = key, i
        if best is not None:
            return best
        if wait < math.inf:
            with trio.move_on_after(wait):
                await self.changed.wait()
        else:
            await self.changed.wait()
        return None

    async def _may_power_on(self, job: NodeJob) -> bool:
        """True when ``job`` may be powered on now (room in its server's window, power-on rates allow).

        Otherwise False: after waiting for a change when the window is full (or
        for the power-on rate's delay, or a change, whichever comes first).
        """
        server = self.server_of.get(job.node.mac, MAIN_SERVER)
        if self.in_flight_on(server) >= self.windows[server].size:
            await self.changed.wait()
            return False
        delay = self._power_on_delay(job)
        if delay > 0:
            with trio.move_on_after(delay):
                await self.changed.wait()
            return False
        return True

    def _power_on_delay(self, job: NodeJob) -> float:
        now = self.clock()
        at = self._next_power_on
        rack = job.node.rack
        if rack and self.adm.rack_power_on_rate:
            at = max(at, self._rack_next.get(rack, 0.0))
        return max(0.0, at - now)

    def _note_power_on(self, job: NodeJob, now: float) -> None:
        """A node is being powered on now: the next power-on waits (globally, and in its rack)."""
        self._next_power_on = now + 1.0 / self.adm.power_on_rate
        if job.node.rack and self.adm.rack_power_on_rate:
            self._rack_next[job.node.rack] = now + 1.0 / self.adm.rack_power_on_rate

    async def _wake(self, job: NodeJob, reason: str, *, again: bool = False, actor: str = "bootorch") -> None:
        now = self.clock()
        self._note_power_on(job, now)
        job.wakes += 1
        if again:
            self._record(self.tracker.restart_stage(job.node.mac, now, f"re-wake {job.wakes - 1}: {reason}"))
        else:
            job.wakes = 1
            self._record(self.tracker.wake(job.node.mac, now, f"woken: {reason}"))
        result = await self.wake_driver.on(job.target)
        self._action(job, "wake", reason, result, actor=actor)

    # ------------------------------------------------------------------ evidence

    def _feed(self, ev: BootEvent) -> list[Transition]:
        """The tracker's transitions for one event; an event the tracker chokes on costs only itself."""
        try:
            if self.on_event is not None:
                self.on_event(ev)
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
                job = self.jobs.get(stuck.mac)
                if job is None:
                    continue
                if not self.tracker.nodes[stuck.mac].requested:
                    self._nursery.start_soon(self._look_at_unrequested, job, stuck.stage, stuck.attempt)  # type: ignore[union-attr]
                elif job.result is None:
                    # A task per escalation: a BMC that takes its time (a cycle's settle, a slow
                    # Redfish) must not hold back the timeouts of every other node.
                    self._nursery.start_soon(self._escalate, job, stuck.stage, stuck.timeout)  # type: ignore[union-attr]

    async def _escalate(self, job: NodeJob, stage: Stage, timeout: float) -> None:
        attempt = self.tracker.nodes[job.node.mac].attempt
        if await self._wait_for_evidence(job, stage, timeout):
            st = self.tracker.nodes[job.node.mac]
            if st.stage != stage or st.attempt != attempt:
                return  # the evidence it missed came with the stream
        async with self._lock(job.node.mac):  # never while an on-call action works on the node
            if job.result is None and self.tracker.nodes[job.node.mac].stage == stage:
                await self._escalate_locked(job, stage, timeout)

    async def _wait_for_evidence(self, job: NodeJob, stage: Stage, timeout: float) -> bool:
        """While the node's server cannot send its evidence (a satellite's stream is down), wait; True if it waited.

        A timeout then says nothing about the node, only about the link: no power
        action follows from it. Once the stream is back, its replayed events get
        ``blind_grace`` seconds to move the node before the escalation goes on.
        """
        server = self.server_of.get(job.node.mac, MAIN_SERVER)
        blind = self.server_blind.get(server)
        if blind is None or not blind():
            return False
        self.log(f"{job.node.name}: stuck in {stage.value} for {timeout:g}s while {server}'s evidence stream is down: "
                 f"no action until it is back")
        while blind():
            await trio.sleep(1.0)
        await trio.sleep(self.blind_grace)
        return True

    async def _escalate_locked(self, job: NodeJob, stage: Stage, timeout: float) -> None:
        if stage in (Stage.SSH, Stage.READY):
            return  # the readiness task owns these, with the failing check as the reason
        why = f"stuck in {stage.value} for {timeout:g}s"
        if stage == Stage.WAKING and job.wakes <= self.retries.wake:
            await self._wake(job, why, again=True)
            return
        if self.bmc is not None and job.cycles < self.retries.power_cycle:
            job.cycles += 1
            self._cancel_probe(job)
            result = await self.bmc.cycle(job.target)
            self._action(job, "power_cycle", why, result)
            if result.ok:
                self._record(self.tracker.wake(job.node.mac, self.clock(), f"power cycle {job.cycles}: {why}"))
                job.wakes = 1
                return
        last = self.tracker.nodes[job.node.mac].last_evidence
        reason = f"{why} after {job.wakes} wake(s) and {job.cycles} power cycle(s); last evidence: {last}"
        self._fail(job, reason)

    async def _look_at_unrequested(self, job: NodeJob, stage: Stage, attempt: int) -> None:
        """A node stuck in an attempt bootorch did not start: check it, never power it.

        Evidence started that attempt (see the module docstring): maybe the node
        rebooted by itself, maybe a host on the LAN forged its DHCP. Readiness
        answers which: passing checks make it ``ready`` again; otherwise it is
        failed with the reason and left for an operator.
        """
        mac = job.node.mac
        async with self._lock(mac):
            st = self.tracker.nodes[mac]
            if st.attempt != attempt or st.stage != stage or st.requested:
                return  # it moved on, or bootorch has acted on it since
            why = (f"stuck in {stage.value} in attempt {attempt}, which bootorch did not start "
                   f"(evidence from {st.attempt_source}: {st.last_evidence})")
            failing = "no readiness checks configured"
            if self.readiness is not None:
                verdict = await self.readiness.check(job.target.ip)
                st = self.tracker.nodes[mac]
                if st.attempt != attempt or st.stage != stage or st.requested:
                    return
                if verdict.ok:
                    self.log(f"{job.node.name}: {why}; readiness checks pass: still up")
                    self._record(self.tracker.ready(mac, self.clock(), f"checks passed after unrequested boot evidence ({why})"))
                    return
                failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failed_checks) or verdict.error
            self._fail(job, f"{why}; readiness: {failing}; no power action on evidence bootorch did not ask for")

    def _fail(self, job: NodeJob, reason: str) -> None:
        self._cancel_probe(job)
        self._record(self.tracker.fail(job.node.mac, self.clock(), reason))
        self.log(f"{job.node.name}: FAILED: {reason}")

    # ------------------------------------------------------------------ readiness

    def _start_probe(self, job: NodeJob) -> None:
        st = self.tracker.nodes[job.node.mac]
        if self.readiness is None or self._nursery is None or job.probe_attempt == st.attempt or job.result is not None:
            return
        job.probe_attempt = st.attempt
        self._nursery.start_soon(self._probe, job, st.attempt)

    def _cancel_probe(self, job: NodeJob) -> None:
        if job.probe_scope is not None:
            job.probe_scope.cancel()
            job.probe_scope = None
        job.probe_attempt = 0

    async def _probe(self, job: NodeJob, attempt: int) -> None:
        mac, host = job.node.mac, job.target.ip
        with trio.CancelScope() as scope:
            job.probe_scope = scope
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
                self._fail(job, f"readiness failed: {failing}")

    async def _reverify(self, job: NodeJob) -> None:
        """A node the journal says is ready: check it again, never wake it."""
        if self.readiness is None:
            return
        verdict = await self.readiness.check(job.target.ip)
        if verdict.ok:
            self.log(f"{job.node.name}: still ready (re-verified after restart)")
            return
        failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failed_checks) or verdict.error
        self._fail(job, f"was ready before the restart, re-verification failed: {failing}")

    # ------------------------------------------------------------------ adaptation

    async def _adapt(self, server: str, read_load: Callable[[], ServerLoad | None]) -> None:
        """Feed ``server``'s admission window its load every ``adapt_every`` seconds; log and wake on a change.

        A reader that returns None has no load to give now (a satellite whose stream is down): the window holds.
        """
        window = self.windows[server]
        named = len(self.windows) > 1
        while True:
            await trio.sleep(window.tuning.adapt_every)
            load = read_load()
            if load is None:
                continue
            queued = any(j.result is None and self.tracker.nodes[j.node.mac].stage == Stage.PENDING
                         and self.server_of.get(mac, MAIN_SERVER) == server for mac, j in self.jobs.items())
            now = self.clock()
            decision = window.update(load, now, in_flight=self.in_flight_on(server), downloading=self.downloading_on(server),
                                     queued=queued)
            if decision.changed:
                self.window_history.append((now, self.window))
                if named:
                    self.server_window_history.setdefault(server, []).append((now, decision.size))
                self.log(f"{server}: {decision.log_line()}" if named else decision.log_line())
                self._kick()

    # ------------------------------------------------------------------ on-call operations

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
        by_name = {n.name: n for n in self.plan.nodes}
        busy: dict[str, str] = {}
        acting: list[NodeJob] = []
        for name in names:
            node = by_name[name]
            held = self.ops.get(node.mac)
            lock = self._node_locks.get(node.mac)
            if held is not None:
                busy[name] = f"busy: {held.holder()}"
            elif lock is not None and lock.locked():
                busy[name] = "busy: a power action by the rollout is in progress"
            else:
                job = self.jobs.get(node.mac)
                if job is None:
                    job = self.jobs[node.mac] = NodeJob(node, node_target(node), ONCALL_WAVE)
                    if len(self.windows) > 1:
                        self._sync_flying(node.mac)
                acting.append(job)
        for name, why in busy.items():
            self.store.record_action(name, f"{op} requested", reason, why, actor=actor, when=self.clock())
        if not acting:
            return None, busy
        operation = Operation(op, [r.node.name for r in acting], reason, actor, hard, self.clock())
        for job in acting:
            self._cancel_probe(job)
            self.set_result(job, None, "")
            job.op, job.wakes, job.cycles = operation, 0, 0
            job.op_from = len(job.actions)
            self.ops[job.node.mac] = operation
            self.store.record_action(job.node.name, f"{op} requested", reason, "accepted", actor=actor, when=self.clock())
            self._op_queue.append(job)
        self.log(f"{op} {', '.join(operation.names)} ({reason}) for {actor}")
        self._kick()
        return operation, busy

    async def wait_idle(self) -> None:
        """Until no on-call operation is running."""
        while self.ops:
            await self.changed.wait()

    def _op_finished(self, job: NodeJob) -> None:
        op = job.op
        if op is None:
            return
        job.op = None
        self.ops.pop(job.node.mac, None)
        op.results[job.node.name] = {"result": job.result, "reason": job.reason,
                                     "path": [a["action"] for a in job.actions[job.op_from:]]}
        self.store.record_action(job.node.name, op.op, op.reason, job.result if job.result != "failed" else f"failed: {job.reason}",
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

    async def _do_op(self, job: NodeJob) -> None:
        op = job.op
        assert op is not None
        t, name, mac = job.target, job.node.name, job.node.mac
        why = f"{op.op} by {op.actor}: {op.reason}"
        async with self._lock(mac):
            st = self.tracker.nodes[mac]
            if op.op == "power_off":
                await self._power_off(job, op, why)
                return
            if op.op == "wake":
                if st.stage == Stage.READY and self.readiness is not None and await self.readiness.port_open(t.ip, timeout=3):
                    job.actions.append({"time": self.clock(), "action": "none", "reason": why, "ok": True, "detail": "already up"})
                    self.set_result(job, "ready", "already up")
                    self._op_finished(job)
                    return
                await self._wake(job, why, actor=op.actor)
                return
            # reboot: the gentlest path that can work
            now_open = (not op.hard and self.ssh_power is not None and self.readiness is not None
                        and await self.readiness.port_open(t.ip, timeout=3))
            if now_open:
                result = await self.ssh_power.cycle(t)
                self._action(job, "reboot_ssh", why, result, actor=op.actor)
                if result.ok:
                    self._after_power(job, f"rebooted over SSH ({why})")
                    return
            if self.bmc is not None:
                state = await self.bmc.status(t)
                action, result = ("power_on", await self.bmc.on(t)) if state == "off" else ("power_cycle", await self.bmc.cycle(t))
                self._action(job, action, why, result, actor=op.actor)
                if result.ok:
                    job.cycles += 1
                    self._after_power(job, f"{action.replace('_', ' ')} ({why})")
                    return
            if now_open or self.bmc is not None:
                self.log(f"{name}: falling back to a magic packet")
            await self._wake(job, why, actor=op.actor)

    def _after_power(self, job: NodeJob, evidence: str) -> None:
        now = self.clock()
        self._note_power_on(job, now)
        job.wakes = 1
        self._record(self.tracker.wake(job.node.mac, now, evidence))

    async def _power_off(self, job: NodeJob, op: Operation, why: str) -> None:
        t = job.target
        result = None
        if not op.hard and self.ssh_power is not None and self.readiness is not None and await self.readiness.port_open(t.ip, timeout=3):
            result = await self.ssh_power.off(t)
            self._action(job, "poweroff_ssh", why, result, actor=op.actor)
        if (result is None or not result.ok) and self.bmc is not None:
            result = await self.bmc.off(t)
            self._action(job, "power_off", why, result, actor=op.actor)
        if result is None:
            result = PowerResult(False, "no way to power it off: the OS does not answer SSH and the plan has no BMC")
            self._action(job, "power_off", why, result, actor=op.actor)
        if result.ok:
            self._record(self.tracker.powered_off(job.node.mac, self.clock(), f"powered off ({why})"))
            self.set_result(job, "off", "")
        else:
            self.set_result(job, "failed", result.detail)
        self._op_finished(job)
