"""The embedded boot servers of a plan: DHCP, TFTP and HTTP, started together.

DHCP (full or proxy, per the plan), TFTP and HTTP (and, with
``bootserver.router_advertisements``, null IPv6 Router Advertisements), all answering from one
:class:`BootFiles`: the plan's boot root plus the rendered per-node files
(``pxelinux.cfg/...``, ``ipxe/...``, ``hostkeys/...``) served from memory. The
file servers share one :class:`Admission` (transfer slots). Every request
becomes a BootEvent on the ``events`` channel, which the orchestrator's
scheduler consumes (:mod:`orchestrator.app`).

A reload (``systemctl reload``, SIGHUP to ``serve``) changes what the running
servers answer without closing a socket: :func:`prepare_reload` builds the new
plan's rendered files and DHCP policy (pure, run in a worker thread), and
:func:`apply_reload` swaps them in between two packets: ``BootFiles.dynamic``
(per-node ``pxelinux.cfg``, iPXE scripts, host-key archives) and the DHCP
core's policy (reservations and boot files). A transfer in flight holds the
file it opened and finishes with it; leases stay, except those of MACs the new
plan no longer has, which are dropped (and committed) so that a removed node
is not answered from its old lease. What a reload may not change (ports,
subnets, pools, the boot root) is decided in :mod:`orchestrator.service`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.dhcp import DhcpStats, plan_config, plan_policy, serve_dhcp
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.http import HttpStats, serve_http
from orchestrator.bootserver.leases import LeaseStore
from orchestrator.bootserver.ra import RaStats, serve_ra
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
class BootServers:
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
    ra_stats: RaStats | None = None
    #: What TFTP and HTTP answer from; a reload replaces its ``dynamic`` overlay.
    files: BootFiles | None = None
    leases: LeaseStore | None = None


def boot_files(plan: LoadedPlan) -> BootFiles:
    root = plan.boot_root
    return BootFiles(root if root.is_dir() else None, dynamic_source(plan))


async def serve_plan(
    plan: LoadedPlan,
    ports: Ports,
    *,
    events: trio.MemorySendChannel[BootEvent] | None = None,
    dhcp: bool = True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    model = plan.model
    bs = model.bootserver
    host = ports.host or str(bs.listen or model.network.server)
    files = boot_files(plan)
    admission = Admission(max_active=bs.max_transfers)
    servers = BootServers(host=host, admission=admission, files=files)
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    leases = LeaseStore(plan.state_dir / "leases.journal") if dhcp and model.dhcp.mode != "external" else None
    servers.leases = leases
    try:
        async with trio.open_nursery() as nursery:
            tftp_port = bs.tftp_port if ports.tftp is None else ports.tftp
            if tftp_port >= 0:
                _, servers.tftp = await nursery.start(lambda task_status: serve_tftp(
                    files, host, tftp_port, events=events, admission=admission,
                    blksize_max=min(bs.blksize_max, (model.network.mtu or 1500) - 32),
                    windowsize_max=bs.windowsize_max, max_transfers=bs.max_transfers,
                    counters=servers.tftp_counters, task_status=task_status))
            http_port = bs.http_port if ports.http is None else ports.http
            if http_port >= 0:
                _, servers.http = await nursery.start(lambda task_status: serve_http(
                    files, host, http_port, events=events, admission=admission,
                    stats=servers.http_stats, task_status=task_status))
            if leases is not None:
                core = DhcpServerCore(plan_config(plan), plan_policy(plan), leases)
                servers.dhcp_core = core
                dhcp_port = bs.dhcp_port if ports.dhcp is None else ports.dhcp
                pxe_port = bs.proxy_port if ports.pxe is None else ports.pxe
                interface = ports.interface if ports.interface is not None else model.network.interface
                servers.dhcp, servers.pxe = await nursery.start(lambda task_status: serve_dhcp(
                    core, host="0.0.0.0" if interface else host, port=dhcp_port,
                    pxe_port=pxe_port if pxe_port >= 0 else None, interface=interface or None,
                    events=events, stats=servers.dhcp_stats, task_status=task_status))
            interface = ports.interface if ports.interface is not None else model.network.interface
            if bs.router_advertisements and interface:
                servers.ra_stats = RaStats()
                await nursery.start(lambda task_status: serve_ra(interface, stats=servers.ra_stats, task_status=task_status))
            task_status.started(servers)
    finally:
        if leases is not None:
            leases.close()


# --------------------------------------------------------------------------- reload


@dataclass(slots=True)
class Reload:
    """A plan's serving state, built before it replaces the running one (:func:`prepare_reload`)."""

    plan: LoadedPlan
    dynamic: Any
    policy: Any | None


def prepare_reload(plan: LoadedPlan, *, dhcp: bool) -> Reload:
    """Render ``plan``'s per-node files and build its DHCP policy. Touches no running server:
    safe in a worker thread while the servers answer."""
    return Reload(plan, dynamic_source(plan), plan_policy(plan) if dhcp else None)


def swap_policy(core: DhcpServerCore, policy: Any) -> None:
    """Make ``policy`` the core's answer from the next datagram on.

    The netboot gate's closed MACs carry over; the core starts its free-address
    hints over (:meth:`~orchestrator.protocols.dhcp_server.DhcpServerCore.set_policy`).
    """
    old = core.policy
    gated = getattr(old, "gated", None)
    if gated is not None and hasattr(policy, "gated"):
        policy.gated = gated
    core.set_policy(policy)


async def apply_reload(servers: BootServers, new: Reload, removed_macs: list[str]) -> int:
    """Swap ``new`` into the running servers; drop and commit the leases of ``removed_macs``.

    Returns how many leases were dropped. Everything up to the lease commit
    happens without a checkpoint: no datagram is answered half from the old
    plan and half from the new one.
    """
    if servers.files is not None:
        servers.files.dynamic = new.dynamic
    if servers.dhcp_core is not None and new.policy is not None:
        swap_policy(servers.dhcp_core, new.policy)
    dropped = 0
    if servers.leases is not None and removed_macs:
        for mac in removed_macs:
            if servers.leases.by_mac(mac) is not None:
                servers.leases.remove(mac)
                dropped += 1
        if dropped:
            # LeaseStore is thread-safe; the DHCP committer may commit these first, which is as good.
            await trio.to_thread.run_sync(servers.leases.commit)
    return dropped
