"""The application root: one place that builds and runs an orchestrator for a plan.

``bootorch rollout``, ``bootorch serve`` and an on-call command that finds no
orchestrator running (``wake``, ``reboot``, ``slurm``) are one program with three
jobs. Each holds the plan's orchestrator lock and runs the same parts -- the
journal, the tracker, the power drivers, the scheduler, the control API, the
metrics endpoint and, unless the site serves the boot itself, the boot servers.
This module builds those parts (:meth:`Orchestrator.assemble`) and runs them
(:meth:`Orchestrator.run`); a command only chooses the :class:`Mode` (what the
scheduler's job is) and how it prints (the ``show`` and ``log`` callbacks,
:mod:`orchestrator.present`). pixiecore's ``Server.Serve()`` against its
``cli/*cmd.go`` is the model.

====================  =========================================  ====================================
mode                  the scheduler's job                        returns
====================  =========================================  ====================================
``rollout``           the plan's waves, under admission          when every node is ready or failed
``serve``             on-call requests only, until cancelled     never (SIGINT/SIGTERM end it)
``oncall``            the one :class:`OncallRequest` it started  when that operation is done
====================  =========================================  ====================================

A ``serve`` orchestrator takes a new version of its plan while it runs
(:meth:`Orchestrator.reload`, on SIGHUP): the plan is loaded and validated in a
worker thread; a plan with errors, or one that changes what only a restart can
(:data:`orchestrator.service.RESTART_SECTIONS`), is refused and nothing changes;
otherwise the boot servers' rendered files and DHCP policy are swapped
(:func:`orchestrator.bootserver.serve.apply_reload`), the tracker learns the new
and changed nodes, and the scheduler and control API answer for the new node
list. Transfers in flight and leases are untouched (a removed node's lease is
dropped); a changed profile applies to each node's next boot.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from orchestrator.bootserver.admission import Load
from orchestrator.bootserver.serve import BootServers, Ports, serve_plan
from orchestrator.control import ControlServer, OrchestratorLock, lock_path
from orchestrator.events import BootEvent
from orchestrator.hostkeys import pin_plan_host_keys
from orchestrator.metrics import Metrics, serve_metrics, split_listen
from orchestrator.plan import LoadedPlan
from orchestrator.power import PowerDriver, SecretError, Unavailable, resolve_secret
from orchestrator.power.drivers import plan_drivers
from orchestrator.power.wol import plan_wake
from orchestrator.readiness import Readiness
from orchestrator.scheduler import Operation, Scheduler, Summary
from orchestrator.store import Store
from orchestrator.tracker import Stage, Tracker, Transition, plan_nodes, plan_timeouts

__all__ = ["Mode", "NetbootGate", "OncallRequest", "Orchestrator", "ReloadResult"]

#: Events the boot servers may queue for the scheduler before they drop (and count) one.
EVENT_BUFFER = 65536
#: Seconds between two compactions of the journal in ``serve`` (what is kept: :mod:`orchestrator.store`).
JOURNAL_COMPACT_EVERY = 86400.0


class Mode(str, enum.Enum):
    ROLLOUT = "rollout"
    SERVE = "serve"
    ONCALL = "oncall"


@dataclass
class OncallRequest:
    """The one operation an ``oncall`` orchestrator starts (``bootorch wake|reboot|slurm`` with nobody running)."""

    op: str  # wake | reboot | power_off
    nodes: list[str]
    reason: str
    actor: str
    hard: bool = False
    #: False: stop once every node got its power action (``--no-wait``).
    wait: bool = True
    #: Set by :meth:`Orchestrator.run`: the operation started, and the nodes that were busy.
    operation: Operation | None = None
    busy: dict[str, str] = field(default_factory=dict)


class NetbootGate:
    """``boot.gate_after_ready``: ready nodes get no boot file; bootorch's own wake reopens the gate."""

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
class ReloadResult:
    """What :meth:`Orchestrator.reload` did: ``ok`` and the diff applied, or the problems that refused it."""

    ok: bool
    #: ``file:line: message`` lines (plan errors), or why the plan needs a restart.
    problems: list[str] = field(default_factory=list)
    diff: Any = None
    leases_dropped: int = 0

    def summary(self) -> str:
        if not self.ok:
            return "reload refused; still serving the previous plan"
        return "reloaded: " + "; ".join(self.diff.lines(limit=8))


class BootServerLoad:
    """The scheduler's view of the boot servers' load: idle until they run (:mod:`~orchestrator.bootserver.admission`)."""

    def __init__(self) -> None:
        self.servers: BootServers | None = None

    def __call__(self) -> Any:
        if self.servers is None or self.servers.admission is None:
            return Load(active=0, queued=0, bytes_per_s=0.0, retransmit_rate=0.0)
        return self.servers.admission.load(trio.current_time())


@dataclass
class Orchestrator:
    """Every part of one orchestrator for a plan, wired; :meth:`run` runs them."""

    plan: LoadedPlan
    mode: Mode
    store: Store
    tracker: Tracker
    metrics: Metrics
    wake: PowerDriver
    bmc: PowerDriver | None
    readiness: Readiness
    scheduler: Scheduler
    control: ControlServer
    gate: NetbootGate
    load: BootServerLoad
    log: Callable[[str], None]
    events_send: trio.MemorySendChannel[BootEvent]
    events_recv: trio.MemoryReceiveChannel[BootEvent]
    #: Satellite boot servers this orchestrator follows (plan ``servers[].satellite``).
    satellites: list[Any] = field(default_factory=list)
    #: This orchestrator's own evidence for a follower (kept with ``control.listen``: it may be a satellite).
    tap: Any = None

    @classmethod
    def assemble(cls, plan: LoadedPlan, mode: Mode, *, log: Callable[[str], None] = lambda s: None,
                 show: Callable[[list[Transition]], None] = lambda ts: None,
                 on_event: Callable[[BootEvent], None] | None = None,
                 clock: Callable[[], float] = time.time) -> "Orchestrator":
        """Build the parts for ``plan`` (opens the journal; starts nothing).

        ``log`` gets the orchestrator's diagnostic lines, ``show`` every batch of
        stage changes after the journal, the metrics and the netboot gate saw it,
        ``on_event`` every piece of evidence before the tracker does (``serve --events``).
        Power drivers need their credentials, except in ``serve``, where power
        acts only for on-call requests: a missing credential makes those fail with
        the reason instead of stopping the boot server (:class:`~orchestrator.power.Unavailable`).
        """
        plan.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            wake, bmc = plan_drivers(plan)
            wake = plan_wake(plan, wake, bmc)  # network.relayed: directed broadcasts or the BMC for routed racks
        except SecretError as e:
            if mode is not Mode.SERVE:
                raise
            log(f"on-call power actions are unavailable: {e}")
            wake = bmc = Unavailable(str(e))
        token = resolve_secret(plan.model.control.token, plan.base)
        # Nodes with their own host keys (bootorch image build) are pinned before any SSH reaches them.
        readiness = Readiness.from_plan(plan, pinned=pin_plan_host_keys(plan))
        store = Store(plan.state_dir / "state.db")
        tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
        metrics = Metrics().attach(tracker=tracker, wake=wake, timeouts=plan_timeouts(plan))
        gate = NetbootGate()

        def on_change(ts: list[Transition]) -> None:
            metrics.observe_transitions(ts)
            gate(ts)
            show(ts)

        load = BootServerLoad()
        boot_servers = plan.model.dhcp.mode != "external"
        satellites = satellite_links(plan) if mode is not Mode.ONCALL else []
        tap = None
        if plan.model.control.listen and mode is not Mode.ONCALL:
            from orchestrator.satellite import EventTap

            # Anyone following this orchestrator as a satellite gets every piece of its evidence, in order.
            tap = EventTap(load=load)
            on_event = _both(tap.record, on_event)
        scheduler = Scheduler(plan, tracker, store, wake=wake, bmc=bmc,
                              readiness=readiness if plan.model.readiness.enabled else None,
                              load=load if boot_servers else None, clock=clock, log=log, on_change=on_change, on_event=on_event,
                              rollout=mode is Mode.ROLLOUT, standing=mode is Mode.SERVE,
                              server_loads={link.name: link.load_reader for link in satellites},
                              server_blind={link.name: link.blind for link in satellites})
        metrics.attach(scheduler=scheduler)
        control = ControlServer(plan, scheduler, mode=mode.value, token=token, log=log, events=tap, satellites=satellites)
        send, recv = trio.open_memory_channel[BootEvent](EVENT_BUFFER)
        return cls(plan, mode, store, tracker, metrics, wake, bmc, readiness, scheduler, control, gate, load, log, send, recv,
                   satellites, tap)

    async def run(self, *, ports: Ports | None = None, boot_servers: bool = True, dhcp: bool = True,
                  control: bool = True, metrics_port: int | None | bool = None,
                  oncall: OncallRequest | None = None, follow_logs: bool = False,
                  started: Callable[[], None] = lambda: None) -> Summary:
        """Hold the lock and run every part until the scheduler's job is done (``serve``: until cancelled).

        ``boot_servers``: run DHCP/TFTP/HTTP (not in ``dhcp.mode: external``),
        ``dhcp``: DHCP among them; ``control``: answer the control API;
        ``metrics_port``: None for the plan's, a port to override it, False for
        none; ``follow_logs``: follow the plan's ``logs:``; ``started`` is
        called once everything listens. Raises :class:`~orchestrator.control.Busy`
        when another orchestrator holds the plan's lock. Closes the journal.
        """
        plan, sched = self.plan, self.scheduler
        try:
            with OrchestratorLock(lock_path(plan)):
                async with trio.open_nursery() as nursery:
                    if oncall is not None:
                        # Our own request first: a request arriving on the control API as soon
                        # as it listens (a second `reboot` of the same node) must find ours.
                        sched.restore()
                        oncall.operation, oncall.busy = sched.submit(oncall.op, oncall.nodes, reason=oncall.reason,
                                                                     actor=oncall.actor, hard=oncall.hard)
                    if control:
                        sock_path, tcp = await nursery.start(self.control.serve)
                        self.log(f"control API on {sock_path}" + "".join(f", tcp {a[0]}:{a[1]}" for a in tcp))
                    if plan.model.metrics.listen and metrics_port is not False:
                        host, port = split_listen(plan.model.metrics.listen)
                        mhost, mport = await nursery.start(serve_metrics, self.metrics, host,
                                                           port if metrics_port is None else metrics_port)
                        self.log(f"metrics on http://{mhost}:{mport}/metrics")
                    if boot_servers and plan.model.dhcp.mode != "external":
                        servers: BootServers = await nursery.start(
                            lambda task_status: serve_plan(plan, ports or Ports(), events=self.events_send, dhcp=dhcp,
                                                           task_status=task_status))
                        self._boot_servers_up(servers)
                    if follow_logs and plan.model.logs:
                        from orchestrator.logwatch.watch import track_logs

                        # The tracker holds the journal before log evidence lands on it, and
                        # following has started (every log positioned at its end, or at the
                        # journal's offset) before anything is woken: no line after a wake is missed.
                        sched.restore()
                        await nursery.start(lambda task_status: track_logs(plan, self.store, self.tracker, on_change=sched.journaled,
                                                                           task_status=task_status))
                        self.log(f"following {len(plan.model.logs)} log(s): "
                                 + ", ".join(f"{e.source} {e.path}" for e in plan.model.logs))
                    if self.satellites:
                        from orchestrator.satellite import follow

                        sched.restore()  # the journal first, then the satellites' evidence (as for logs)
                        for link in self.satellites:
                            await nursery.start(lambda task_status, link=link: follow(
                                link, self.tracker, self.store, on_change=sched.journaled, task_status=task_status))
                            self.log(f"following satellite {link.name} at {link.host}:{link.port}"
                                     + (" (TLS)" if link.ssl_context is not None else ""))
                    if oncall is not None and not oncall.wait and oncall.operation is not None:
                        nursery.start_soon(_return_once_acted, sched, oncall.operation, nursery.cancel_scope)
                    if self.mode is Mode.SERVE:
                        nursery.start_soon(self._compact_daily)
                    started()
                    summary = await sched.run(self.events_recv)
                    nursery.cancel_scope.cancel()
        finally:
            self.store.close()
        return summary

    async def reload(self, path: Any = None) -> ReloadResult:
        """Load the plan at ``path`` (default: the running plan's file) and apply it (module docstring).

        Never raises for a bad plan: the result says why it was refused, in the
        located ``file:line: message`` form ``bootorch validate`` prints.
        """
        from orchestrator.bootserver.serve import apply_reload, prepare_reload
        from orchestrator.plan import PlanError, load_plan
        from orchestrator.service import diff, fingerprint

        old = self.plan
        path = old.path if path is None else path
        try:
            new = await trio.to_thread.run_sync(load_plan, path)
        except PlanError as e:
            n = len(e.errors)
            return ReloadResult(False, [str(p) for p in e.problems] + [f"{path}: {n} error{'s' if n != 1 else ''}; nothing was changed"])
        except OSError as e:
            return ReloadResult(False, [f"{path}: cannot read the plan: {e.strerror or e}"])
        d = diff(fingerprint(old), fingerprint(new))
        if d.needs_restart:
            return ReloadResult(False, [f"{path}: {', '.join(d.needs_restart)} changed: only a restart applies that "
                                        "(`systemctl restart`; leases and node stages are kept); nothing was changed"], d)
        servers = self.load.servers
        prepared = await trio.to_thread.run_sync(
            lambda: (prepare_reload(new, dhcp=servers is not None and servers.dhcp_core is not None), pin_plan_host_keys(new)))
        reload, pinned = prepared
        old_macs = {n.mac for n in old.nodes}
        removed_macs = sorted(old_macs - {n.mac for n in new.nodes})
        # From here to apply_reload's lease commit: no checkpoint, every part switches at once.
        self.plan = new
        self.scheduler.set_plan(new)
        self.control.plan = new
        self.readiness.pinned = dict(pinned)
        _retrack(self.tracker, plan_nodes(new), removed_macs)
        dropped = 0
        if servers is not None:
            if reload.policy is not None:
                self.gate.policy = reload.policy if self.gate.policy is not None else None
            try:
                dropped = await apply_reload(servers, reload, removed_macs)
            except Exception as e:  # the lease journal failed: the DHCP committer reports it too
                self.log(f"reload: dropping the leases of removed nodes failed: {e}")
        return ReloadResult(True, [], d, dropped)

    async def _compact_daily(self) -> None:
        """``serve`` runs for months: keep the journal bounded (:meth:`~orchestrator.store.Store.compact`)."""
        while True:
            await trio.sleep(JOURNAL_COMPACT_EVERY)
            try:
                t, a = self.store.compact()
            except Exception as e:  # sqlite3.Error, OSError: the journal stays as it is, serving goes on
                self.log(f"journal compaction failed: {e}")
                continue
            if t or a:
                self.log(f"journal compacted: {t} old transitions, {a} old actions removed")

    def _boot_servers_up(self, servers: BootServers) -> None:
        self.metrics.attach(running=servers)
        self.load.servers = servers
        if self.plan.model.boot.gate_after_ready and servers.dhcp_core is not None:
            self.gate.attach(servers.dhcp_core.policy, self.store.current().values())
        parts = [f"tftp {servers.host}:{servers.tftp}" if servers.tftp else None,
                 f"http {servers.host}:{servers.http}" if servers.http else None,
                 f"dhcp :{servers.dhcp}" if servers.dhcp else None, f"pxe :{servers.pxe}" if servers.pxe else None]
        self.log("serving " + ", ".join(p for p in parts if p))


def satellite_links(plan: LoadedPlan) -> list[Any]:
    """A :class:`~orchestrator.satellite.SatelliteLink` per ``servers[].satellite`` (tokens read, TLS contexts built)."""
    from orchestrator.satellite import SatelliteLink

    links = []
    for srv in plan.model.servers:
        sat = srv.satellite
        if sat is None:
            continue
        token = resolve_secret(sat.token, plan.base)
        if not token:
            raise SecretError(f"servers: {srv.name}: satellite.token is empty")
        host, _, port = sat.control.rpartition(":")
        ctx = None
        if sat.tls_ca is not None:
            import ssl

            ctx = ssl.create_default_context(cafile=str(plan.resolve_path(sat.tls_ca)))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        links.append(SatelliteLink(srv.name, host.strip("[]"), int(port), token, ssl_context=ctx,
                                   server_hostname=sat.server_name))
    return links


def _both(first: Callable[[BootEvent], None], second: Callable[[BootEvent], None] | None) -> Callable[[BootEvent], None]:
    if second is None:
        return first

    def both(ev: BootEvent) -> None:
        first(ev)
        second(ev)

    return both


def _retrack(tracker: Tracker, infos: dict[str, Any], removed_macs: list[str]) -> None:
    """Tell ``tracker`` the reloaded plan's nodes (:meth:`~orchestrator.tracker.Tracker.set_nodes`)."""
    tracker.set_nodes(infos, removed_macs)


async def _return_once_acted(sched: Scheduler, op: Operation, scope: trio.CancelScope) -> None:
    """``--no-wait``: stop once every node of ``op`` got its power action."""
    jobs = [j for j in sched.jobs.values() if j.node.name in op.names]
    while not all(j.op is not op or len(j.actions) > j.op_from for j in jobs):
        await sched.changed.wait()
    scope.cancel()
