"""A simulated cluster for scheduler tests: nodes that boot on the trio clock.

Each simulated node, once woken (or power-cycled), emits the BootEvents a real
PXE boot leaves on the boot server -- PXE DHCP, loader, config, kernel, initrd,
OS DHCP -- after configurable delays, then "answers SSH". Behaviours are
per node: ``deaf`` ignores magic packets (a lost packet or WoL disabled: only a
power cycle starts it), ``hang_in`` stops in a stage, ``bad_checks`` makes its
readiness checks fail. Everything runs on trio's clock, so with
``MockClock(autojump_threshold=0)`` a whole rollout takes no real time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from orchestrator.bootserver.admission import Load
from orchestrator.events import BootEvent, EventKind
from orchestrator.power import PowerResult, Target
from orchestrator.readiness import CheckResult, Verdict

STEPS = [  # (delay after previous, kind, payload)
    (2.0, "dhcp_pxe", None),
    (1.0, "file", "pxelinux.0"),
    (0.5, "file", "pxelinux.cfg/{cfg}"),
    (0.5, "file", "vmlinuz"),
    (3.0, "file", "rootfs.gz"),
    (5.0, "dhcp_os", None),
    (4.0, "ssh", None),
]


@dataclass
class SimNode:
    mac: str
    ip: str
    deaf: bool = False
    hang_in: str | None = None  # a file name or "dhcp_os": stops before it
    bad_checks: bool = False
    stubborn: bool = False  # a power cycle does not cure hang_in
    boots: int = 0
    ssh_up: bool = False
    scope: trio.CancelScope | None = None


@dataclass
class SimCluster:
    send: trio.MemorySendChannel
    nodes: dict[str, SimNode] = field(default_factory=dict)
    nursery: trio.Nursery | None = None
    wakes: list[tuple[float, str]] = field(default_factory=list)
    cycles: list[tuple[float, str]] = field(default_factory=list)
    retransmit_rate: float = 0.0
    client_retry_rate: float = 0.0
    rtt: float | None = None
    active: int = 0
    cycle_delay: float = 0.0  # seconds a power cycle takes to return (a slow BMC)

    def add(self, mac: str, ip: str, **kw) -> SimNode:
        n = self.nodes[mac] = SimNode(mac, ip, **kw)
        return n

    def _boot(self, node: SimNode) -> None:
        if node.scope is not None:
            node.scope.cancel()
        node.ssh_up = False
        node.boots += 1
        assert self.nursery is not None
        self.nursery.start_soon(self._run, node)

    async def _run(self, node: SimNode) -> None:
        with trio.CancelScope() as scope:
            node.scope = scope
            for delay, kind, payload in STEPS:
                await trio.sleep(delay)
                name = payload.format(cfg="01-" + node.mac.replace(":", "-")) if payload else None
                if node.hang_in is not None and node.hang_in in (kind, name):
                    await trio.sleep_forever()
                now = trio.current_time()
                if kind == "dhcp_pxe" or kind == "dhcp_os":
                    ev = BootEvent(time=now, wall=now, source="dhcp", kind=EventKind.DHCP, mac=node.mac, client_ip=node.ip,
                                   detail={"msg": "DISCOVER", "direction": "in", "pxe": kind == "dhcp_pxe"})
                    await self.send.send(ev)
                elif kind == "file":
                    for k in (EventKind.FILE_REQUEST, EventKind.FILE_DONE):
                        await self.send.send(BootEvent(time=now, wall=now, source="tftp", kind=k, client_ip=node.ip, filename=name))
                else:
                    node.ssh_up = True

    # -- power drivers --------------------------------------------------------

    async def on(self, t: Target) -> PowerResult:
        self.wakes.append((trio.current_time(), t.name))
        node = self.nodes[t.mac]
        if not node.deaf and node.scope is None:
            self._boot(node)
        return PowerResult(True, "sim magic packet")

    async def cycle(self, t: Target) -> PowerResult:
        self.cycles.append((trio.current_time(), t.name))
        if self.cycle_delay:
            await trio.sleep(self.cycle_delay)
        node = self.nodes[t.mac]
        node.deaf = False  # a power cycle always starts it
        if not node.stubborn:
            node.hang_in = None
        self._boot(node)
        return PowerResult(True, "sim power cycle")

    async def off(self, t: Target) -> PowerResult:
        return PowerResult(True)

    async def status(self, t: Target) -> str | None:
        return None

    # -- boot server load ------------------------------------------------------

    def load(self) -> Load:
        return Load(active=self.active, queued=0, bytes_per_s=0.0, retransmit_rate=self.retransmit_rate,
                    client_retry_rate=self.client_retry_rate, rtt=self.rtt)


class SimReadiness:
    """Readiness against simulated nodes: SSH answers once the node booted."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.by_ip = lambda ip: next(n for n in cluster.nodes.values() if n.ip == ip)
        self.checks_run: list[str] = []

    async def port_open(self, host: str, timeout: float | None = None) -> bool:
        await trio.sleep(0)
        return self.by_ip(host).ssh_up

    async def check(self, host: str, timeout: float | None = None) -> Verdict:
        node = self.by_ip(host)
        self.checks_run.append(host)
        await trio.sleep(0.5)
        if node.bad_checks:
            return Verdict(False, True, [CheckResult("kernel", True, 0, "6.1.0"), CheckResult("mount /usr", False, 1, "", "exit status 1, expected 0")])
        return Verdict(node.ssh_up, node.ssh_up, [CheckResult("kernel", True, 0, "6.1.0")] if node.ssh_up else [], "" if node.ssh_up else "down")

    async def until_ready(self, host: str, deadline: float) -> Verdict:
        return await self.check(host)
