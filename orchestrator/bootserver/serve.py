"""``bootorch serve PLAN``: the embedded boot server for a plan, without power sequencing.

DHCP (full or proxy, per the plan), TFTP and HTTP, all answering from one
:class:`BootFiles`: the plan's boot root plus the rendered per-node files
(``pxelinux.cfg/...``, ``ipxe/...``) served from memory. The file servers share
one :class:`Admission` (transfer slots). Every request becomes a BootEvent on
the ``events`` channel; the rollout's tracker consumes them, ``bootorch serve``
prints them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.dhcp import DhcpStats, plan_config, plan_policy, serve_dhcp
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.http import HttpStats, serve_http
from orchestrator.bootserver.leases import LeaseStore
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.events import BootEvent
from orchestrator.plan import LoadedPlan
from orchestrator.protocols.dhcp_server import DhcpServerCore
from orchestrator.render import dynamic_source


@dataclass(slots=True)
class Ports:
    """Where the servers listen; None disables one. Defaults come from the plan."""

    host: str | None = None
    dhcp: int | None = None
    pxe: int | None = None
    tftp: int | None = None
    http: int | None = None
    interface: str | None = None


@dataclass(slots=True)
class Running:
    """What :func:`serve_plan` started: bound ports and live counters."""

    host: str
    tftp: int | None = None
    http: int | None = None
    dhcp: int | None = None
    pxe: int | None = None
    tftp_counters: TftpCounters = field(default_factory=TftpCounters)
    http_stats: HttpStats = field(default_factory=HttpStats)
    dhcp_stats: DhcpStats = field(default_factory=DhcpStats)
    dhcp_core: DhcpServerCore | None = None
    admission: Admission | None = None


def boot_files(lp: LoadedPlan) -> BootFiles:
    root = lp.boot_root
    return BootFiles(root if root.is_dir() else None, dynamic_source(lp))


async def serve_plan(
    lp: LoadedPlan,
    ports: Ports,
    *,
    events: trio.MemorySendChannel[BootEvent] | None = None,
    dhcp: bool = True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    plan = lp.model
    bs = plan.bootserver
    host = ports.host or str(bs.listen or plan.network.server)
    files = boot_files(lp)
    admission = Admission(max_active=bs.max_transfers)
    run = Running(host=host, admission=admission)
    lp.state_dir.mkdir(parents=True, exist_ok=True)
    leases = LeaseStore(lp.state_dir / "leases.journal") if dhcp and plan.dhcp.mode != "external" else None
    try:
        async with trio.open_nursery() as nursery:
            tftp_port = bs.tftp_port if ports.tftp is None else ports.tftp
            if tftp_port >= 0:
                _, run.tftp = await nursery.start(lambda task_status: serve_tftp(
                    files, host, tftp_port, events=events, admission=admission,
                    blksize_max=min(bs.blksize_max, (plan.network.mtu or 1500) - 32),
                    windowsize_max=bs.windowsize_max, max_transfers=bs.max_transfers,
                    counters=run.tftp_counters, task_status=task_status))
            http_port = bs.http_port if ports.http is None else ports.http
            if http_port >= 0:
                _, run.http = await nursery.start(lambda task_status: serve_http(
                    files, host, http_port, events=events, admission=admission,
                    stats=run.http_stats, task_status=task_status))
            if leases is not None:
                core = DhcpServerCore(plan_config(lp), plan_policy(lp), leases)
                run.dhcp_core = core
                dhcp_port = bs.dhcp_port if ports.dhcp is None else ports.dhcp
                pxe_port = bs.proxy_port if ports.pxe is None else ports.pxe
                interface = ports.interface if ports.interface is not None else plan.network.interface
                run.dhcp, run.pxe = await nursery.start(lambda task_status: serve_dhcp(
                    core, host="0.0.0.0" if interface else host, port=dhcp_port,
                    pxe_port=pxe_port if pxe_port >= 0 else None, interface=interface or None,
                    events=events, stats=run.dhcp_stats, task_status=task_status))
            task_status.started(run)
    finally:
        if leases is not None:
            leases.close()


def format_event(ev: BootEvent) -> str:
    who = ev.mac or ev.client_ip or "-"
    if ev.source in ("dhcp", "proxydhcp"):
        d = ev.detail
        arrow = "<-" if d.get("direction") == "in" else "->"
        extra = f" {d['boot_file']}" if d.get("boot_file") else ""
        return f"{ev.source} {arrow} {d.get('msg')} {who} {ev.client_ip or ''} {d.get('kind', '')}{extra}".rstrip()
    size = f" {ev.bytes}B" if ev.bytes else ""
    took = f" {ev.duration:.3f}s" if ev.duration is not None else ""
    return f"{ev.source} {ev.kind.value} {ev.client_ip} {ev.filename} {ev.result or ''}{size}{took}".rstrip()


def format_transition(t) -> str:
    flags = f" [{', '.join(t.flags)}]" if t.flags else ""
    return f"{t.node} {t.from_stage.value} -> {t.to_stage.value} (attempt {t.attempt}){flags}: {t.evidence}"


async def run_serve(lp: LoadedPlan, ports: Ports, *, dhcp: bool, as_json: bool, events_too: bool = False,
                    metrics_port: int | None | bool = None) -> None:
    """Serve, track every node's stage from the servers' evidence, journal and print each change.

    The journal (``<state_dir>/state.db``) is restored first, so a restarted
    ``serve`` continues every node's timeline where it stopped.
    """
    import json
    import signal

    from orchestrator.store import Store
    from orchestrator.tracker import Tracker, plan_nodes, plan_timeouts

    from orchestrator.metrics import Metrics, serve_metrics, split_listen

    import time

    from orchestrator.control import ControlServer, OrchestratorLock, lock_path
    from orchestrator.power import SecretError, Unavailable, resolve_secret
    from orchestrator.power.drivers import plan_drivers
    from orchestrator.readiness import Readiness
    from orchestrator.scheduler import Scheduler

    lp.state_dir.mkdir(parents=True, exist_ok=True)
    lock = OrchestratorLock(lock_path(lp))
    lock.acquire()  # control.Busy when a rollout (or another serve) runs for this plan
    store = Store(lp.state_dir / "state.db")
    tracker = Tracker(plan_nodes(lp), timeouts=plan_timeouts(lp))
    metrics = Metrics().attach(tracker=tracker, timeouts=plan_timeouts(lp))
    send, recv = trio.open_memory_channel[BootEvent](4096)
    # No rollout here, but on-call requests (bootorch wake/reboot/slurm) arrive on the control API
    # and are carried out by a scheduler that otherwise only journals what the servers see.
    try:
        wake, bmc = plan_drivers(lp)
    except SecretError as e:  # serving boot files needs no credentials: power actions report the problem instead
        print(f"bootorch serve: on-call power actions are unavailable: {e}", file=sys.stderr, flush=True)
        wake = bmc = Unavailable(str(e))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_change(ts) -> None:
        metrics.observe_transitions(ts)
        for t in ts:
            if as_json:
                print(json.dumps({"type": "transition", "node": t.node, "mac": t.mac, "from": t.from_stage.value,
                                  "to": t.to_stage.value, "time": t.time, "attempt": t.attempt,
                                  "evidence": t.evidence, "flags": list(t.flags)}), flush=True)
            else:
                print(format_transition(t), flush=True)

    sched = Scheduler(lp, tracker, store, wake=wake, bmc=bmc, readiness=Readiness.from_plan(lp), clock=time.time,
                      log=log, on_change=on_change, rollout=False)
    sched.standing = True
    sched.restore()
    try:
        async with trio.open_nursery() as nursery:
            server = ControlServer(lp, sched, mode="serve", token=resolve_secret(lp.model.control.token, lp.base), log=log)
            sock_path, tcp = await nursery.start(server.serve)
            where = "".join(f", tcp {a[0]}:{a[1]}" for a in tcp)
            print(f"control API on {sock_path}{where}", file=sys.stderr, flush=True)
            nursery.start_soon(sched.run)
            if lp.model.metrics.listen and metrics_port is not False:
                host, port = split_listen(lp.model.metrics.listen)
                mhost, mport = await nursery.start(serve_metrics, metrics, host, port if metrics_port is None else metrics_port)
                print(f"metrics on http://{mhost}:{mport}/metrics", file=sys.stderr, flush=True)
            run: Running = await nursery.start(lambda task_status: serve_plan(lp, ports, events=send, dhcp=dhcp, task_status=task_status))
            metrics.attach(running=run)
            parts = [f"tftp {run.host}:{run.tftp}" if run.tftp else None, f"http {run.host}:{run.http}" if run.http else None,
                     f"dhcp :{run.dhcp}" if run.dhcp else None, f"pxe :{run.pxe}" if run.pxe else None]
            print("serving " + ", ".join(p for p in parts if p), file=sys.stderr, flush=True)

            async def consume() -> None:
                async for ev in recv:
                    if events_too and not as_json:
                        print(format_event(ev), flush=True)
                    sched.feed_event(ev)  # transitions are printed by on_change
                    if as_json:
                        if events_too:
                            print(json.dumps({"type": "event", "time": ev.wall, "source": ev.source, "kind": ev.kind.value,
                                              "mac": ev.mac, "ip": ev.client_ip, "file": ev.filename, "bytes": ev.bytes,
                                              "result": ev.result, "detail": dict(ev.detail)}, default=str), flush=True)

            nursery.start_soon(consume)
            if lp.model.logs:
                from orchestrator.logwatch.watch import track_logs

                def show(changes) -> None:
                    metrics.observe_transitions(changes)
                    for t in changes:
                        print(format_transition(t), flush=True)

                nursery.start_soon(lambda: track_logs(lp, store, tracker, on_change=show))
                print(f"following {len(lp.model.logs)} log(s): " + ", ".join(f"{e.source} {e.path}" for e in lp.model.logs),
                      file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        store.close()
        lock.release()
