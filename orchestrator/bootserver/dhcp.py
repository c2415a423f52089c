"""The DHCP / ProxyDHCP server: a thin trio shell around :mod:`orchestrator.protocols.dhcp_server`.

One task per listening socket (port 67, and 4011 for PXE boot-server requests).
Each runs one loop: drain the socket (non-blocking ``recvfrom`` until it is
empty, at most ``DRAIN_MAX`` datagrams, no checkpoint per datagram) into a
:class:`Backlog`, feed the core a slice of at most ``SLICE`` datagrams taken
from the backlog, checkpoint, repeat. Each datagram goes first to the core's
fast path (:meth:`~orchestrator.protocols.dhcp_server.DhcpServerCore.answer`:
the common DISCOVER and REQUEST, same bytes and lease changes as the general
path) and, when that declines, to
:meth:`~orchestrator.protocols.dhcp_server.DhcpServerCore.receive`. A reply
that needs no commit (OFFER, NAK) is sent as soon as it is made, so replies
leave spread over the slice's work instead of as one burst that overruns the
receive buffer of a relay or client. A datagram that changed the lease table
has its replies (ACKs) held for the committer task, which commits the lease
store (group commit, in a worker thread) and only then releases them: an ACK
is never on the wire before its lease is on disk. The loop sends released ACKs
paced: one after each datagram it answers and at most ``SLICE`` more after
each slice (``SLICE`` per ``READY_PACE`` when no datagram waits), so the ACKs
of a commit that took long do not leave as one burst. The core's lease table is the
journal, :class:`~orchestrator.bootserver.leases.LeaseStore`
(:func:`make_core`); the shell reaches it as ``core.leases`` to commit it.

Overload (more datagrams than the core can answer): the socket is drained far
more often than the kernel buffer can fill, so the kernel never drops at
random; what cannot be answered is shed in user space, by :class:`Backlog`,
before the core spends any work on it:

* exchanges under way first: a datagram whose first option says REQUEST,
  DECLINE, RELEASE or INFORM (option 53, which clients put first) is served
  before the DISCOVERs. A REQUEST answered late costs its client the whole
  DORA; a DISCOVER dropped costs one retry. An eighth of each slice stays for
  DISCOVERs while any wait, so a REQUEST flood cannot lock new clients out;
* DISCOVERs (and anything whose first option is not 53) newest first: under a
  backlog the newest one's client is still waiting, the oldest one's is about
  to retry (RFC 2131 §4.1: 4 s, randomised; perfdhcp gives up after 1 s);
* a DISCOVER that waited longer than ``DISCOVER_MAX_AGE`` is shed unread
  (``discover_stale``): its client has retried or given up, the answer would
  be worth nothing;
* each queue holds at most ``QUEUE_MAX`` datagrams: past that the oldest
  DISCOVER is shed (``discover_overflow``) or the newest other datagram is
  refused (``request_overflow``), so memory stays bounded whatever arrives.

What was shed is counted per reason in :attr:`DhcpStats.shed` (the metric
``bootorch_dhcp_shed_total{reason}``).

Sockets: bound to ``0.0.0.0`` (Linux delivers broadcasts only to sockets bound
to the wildcard or the broadcast address) and pinned to the plan's interface
with ``SO_BINDTODEVICE``, so a server for the boot network never answers on, or
broadcasts to, any other interface. Without an interface (unit tests on
loopback) nothing is ever broadcast: a reply that would be broadcast goes back
to the datagram's source address instead.

A datagram that makes the core raise (a bug, since the core drops what it
cannot parse) is dropped and counted as ``internal_error`` in the core's
counters, logged on one line (at 1, 2, 4, 8, ... occurrences, so a packet that
keeps hitting the bug cannot flood the log); the server goes on.

Binding port 67 needs root or CAP_NET_BIND_SERVICE, and SO_BINDTODEVICE needs
CAP_NET_RAW on kernels before 5.7; :class:`DhcpPrivilegeError` says which.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Iterable

import trio

from orchestrator.bootserver.leases import LeaseStore
from orchestrator.events import BootEvent
from orchestrator.protocols.dhcp import PXE_PORT, ip_int
from orchestrator.protocols.dhcp_server import (
    BootAnswer,
    ClientKind,
    DhcpServerCore,
    Reply,
    Reservation,
    ServerConfig,
    Subnet,
)
from orchestrator.safetext import safe_text

log = logging.getLogger(__name__)

#: Most datagrams read from the socket in one pass (then a slice is answered and the loop reads again).
DRAIN_MAX = 1024
#: Most datagrams the core answers between two passes over the socket (about 5 ms of work).
SLICE = 64
#: Most datagrams each backlog queue holds (priority, DISCOVER): bounds memory at 2 x QUEUE_MAX x MAX_DATAGRAM.
QUEUE_MAX = 2048
#: A DISCOVER read longer ago than this (seconds) is shed unanswered: its client has retried.
DISCOVER_MAX_AGE = 1.0
#: Least time between two lease commits (seconds): bounds the commit rate, and its CPU, under load.
COMMIT_GAP = 0.002
#: With no datagram waiting, committed ACKs still to send go out SLICE per READY_PACE seconds.
READY_PACE = 0.001
MAX_DATAGRAM = 4096
RCVBUF = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
EXPIRE_EVERY = 5.0


class DhcpPrivilegeError(PermissionError):
    """The process may not bind the DHCP ports or pin to the interface."""


# --------------------------------------------------------------------------- policy


class StaticPolicy:
    """A table of reservations and boot files: the plan's answer, or a test's.

    ``gate`` holds MACs that get no boot file any more (the netboot gate: a
    node that is ready should boot from what it has, not loop through PXE).
    """

    def __init__(
        self,
        reservations: dict[str, Reservation],
        *,
        next_server: IPv4Address | str,
        loaders: dict[ClientKind, str],
        ipxe_script: str | None = None,
        ipxe_script_for: dict[str, str] | None = None,
        gate_unknown: bool = False,
        ipxe_gets_loader: bool = False,
        ipxe_gets_loader_for: dict[str, bool] | None = None,
    ) -> None:
        self._res = {m.lower(): r for m, r in reservations.items()}
        self._ips = {r.ip for r in self._res.values()}
        self.next_server = ip_int(next_server)
        self.loaders = loaders
        self.ipxe_script = ipxe_script
        self.ipxe_script_for = ipxe_script_for or {}
        self.gate_unknown = gate_unknown
        self.ipxe_gets_loader = ipxe_gets_loader
        self.ipxe_gets_loader_for = {m.lower(): v for m, v in (ipxe_gets_loader_for or {}).items()}
        self.gated: set[str] = set()

    def reservation(self, mac: str) -> Reservation | None:
        return self._res.get(mac)

    def is_reserved_ip(self, ip: int) -> bool:
        return ip in self._ips

    def boot(self, mac: str, kind: ClientKind, uefi: bool = False) -> BootAnswer | None:
        if mac in self.gated or (self.gate_unknown and mac not in self._res):
            return None
        if kind == ClientKind.IPXE:
            if self.ipxe_gets_loader_for.get(mac, self.ipxe_gets_loader):
                # iPXE runs the loader a PXE ROM of its firmware would: pxelinux.0 or syslinux.efi.
                kind = ClientKind.UEFI if uefi else ClientKind.BIOS
            else:
                script = self.ipxe_script_for.get(mac, self.ipxe_script)
                return BootAnswer(script, self.next_server) if script else None
        name = self.loaders.get(kind)
        return BootAnswer(name, self.next_server) if name else None

    def close_gate(self, mac: str) -> None:
        self.gated.add(mac.lower())

    def open_gate(self, mac: str) -> None:
        self.gated.discard(mac.lower())


def plan_policy(plan) -> StaticPolicy:  # plan: orchestrator.plan.LoadedPlan (import kept lazy)
    from orchestrator.render import http_base, ipxe_script_name

    model = plan.model
    server = model.bootserver.listen or model.network.server
    base = http_base(plan)
    return StaticPolicy(
        {n.mac: Reservation(int(n.ip), n.name) for n in plan.nodes},
        next_server=server,
        loaders={
            ClientKind.BIOS: model.boot.loaders.bios,
            ClientKind.UEFI: model.boot.loaders.uefi,
            ClientKind.UEFI_HTTP: f"{base}/{model.boot.loaders.uefi_http.lstrip('/')}",
        },
        ipxe_script=f"{base}/boot.ipxe",
        ipxe_script_for={n.mac: f"{base}/{ipxe_script_name(n.mac)}" for n in plan.nodes},
        ipxe_gets_loader=model.boot.ipxe == "loader",
        ipxe_gets_loader_for={
            n.mac: model.profiles[n.profile].ipxe == "loader" for n in plan.nodes if model.profiles[n.profile].ipxe
        },
    )


def plan_config(plan) -> ServerConfig:
    model = plan.model
    pool = model.dhcp.pool
    subnet = Subnet(
        network=model.network.subnet,
        router=model.network.gateway,
        dns=tuple(model.network.dns),
        domain=model.network.domain,
        pool=(int(pool.start), int(pool.end)) if pool else None,
        lease_time=int(model.dhcp.lease_time),
    )
    # network.relayed: one subnet per routed rack network, chosen by a relayed request's giaddr;
    # its router option is the relay's address there, boot files still come from network.server.
    relayed = tuple(
        Subnet(network=r.subnet, router=r.gateway, dns=tuple(model.network.dns), domain=model.network.domain,
               pool=(int(r.pool.start), int(r.pool.end)) if r.pool else None, lease_time=int(model.dhcp.lease_time))
        for r in model.network.relayed
    )
    return ServerConfig(
        server_ip=model.bootserver.listen or model.network.server,
        subnets=(subnet, *relayed),
        mode="proxy" if model.dhcp.mode == "proxy" else "full",
    )


# --------------------------------------------------------------------------- sockets


def open_socket(host: str, port: int, interface: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # A boot storm is a burst: 1 000 DISCOVERs must fit in the receive buffer
        # (the default ~208 KiB holds about 160). FORCE works past rmem_max as root.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
            except PermissionError:
                raise DhcpPrivilegeError(
                    f"pinning the DHCP socket to {interface} (SO_BINDTODEVICE) needs root or CAP_NET_RAW"
                ) from None
            except OSError as e:
                if e.errno == errno.ENODEV:
                    raise OSError(f"interface {interface!r} does not exist") from None
                raise
        try:
            sock.bind((host, port))
        except PermissionError:
            raise DhcpPrivilegeError(
                f"binding UDP port {port} needs root or CAP_NET_BIND_SERVICE "
                "(run as root, or `setcap cap_net_bind_service,cap_net_raw+ep` on the Python binary; "
                "tests use high ports)"
            ) from None
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


@dataclass(slots=True)
class DhcpStats:
    events_dropped: int = 0
    send_errors: int = 0
    #: Slices of the backlog answered.
    batches: int = 0
    #: Datagrams shed unanswered, by reason: discover_stale, discover_overflow, request_overflow.
    shed: Counter[str] = field(default_factory=Counter)


# The first option of a DHCP message (RFC 2131 §3: option 53 comes first in practice) for the
# message types that continue an exchange under way: REQUEST 3, DECLINE 4, RELEASE 7, INFORM 8.
_PRIORITY_HEADS = frozenset(b"\x35\x01" + bytes((t,)) for t in (3, 4, 7, 8))


class Backlog:
    """Datagrams read but not answered yet, in the order the core should take them (module docstring).

    ``add`` files a datagram with the time it was read; ``take`` returns the
    next ones to answer, after shedding the DISCOVERs that waited too long.
    Sans-IO: the caller reads the socket and gives the time, so tests drive it
    directly.
    """

    __slots__ = ("priority", "discovers", "shed", "max_age", "queue_max")

    def __init__(self, shed: Counter[str], *, max_age: float = DISCOVER_MAX_AGE, queue_max: int = QUEUE_MAX) -> None:
        self.priority: deque[tuple[bytes, tuple[str, int]]] = deque()
        self.discovers: deque[tuple[float, bytes, tuple[str, int]]] = deque()
        self.shed = shed
        self.max_age = max_age
        self.queue_max = queue_max

    def __len__(self) -> int:
        return len(self.priority) + len(self.discovers)

    def add(self, data: bytes, src: tuple[str, int], now: float) -> None:
        if data[240:243] in _PRIORITY_HEADS:
            if len(self.priority) >= self.queue_max:
                self.shed["request_overflow"] += 1
                return
            self.priority.append((data, src))
        else:
            if len(self.discovers) >= self.queue_max:
                self.discovers.popleft()
                self.shed["discover_overflow"] += 1
            self.discovers.append((now, data, src))

    def take(self, now: float, n: int) -> list[tuple[bytes, tuple[str, int]]]:
        """Up to ``n`` datagrams: priority ones in arrival order, then DISCOVERs newest first.

        An eighth of ``n`` is kept for waiting DISCOVERs, so a flood of REQUESTs
        (or of datagrams made to look like them) slows new clients down but
        cannot lock them out.
        """
        discovers = self.discovers
        horizon = now - self.max_age
        while discovers and discovers[0][0] < horizon:
            discovers.popleft()
            self.shed["discover_stale"] += 1
        out: list[tuple[bytes, tuple[str, int]]] = []
        priority = self.priority
        first = n - min(len(discovers), n >> 3)
        while priority and len(out) < first:
            out.append(priority.popleft())
        while discovers and len(out) < n:
            _, data, src = discovers.pop()
            out.append((data, src))
        while priority and len(out) < n:
            out.append(priority.popleft())
        return out


async def serve_dhcp(
    core: DhcpServerCore[LeaseStore],
    *,
    host: str = "0.0.0.0",
    port: int = 67,
    pxe_port: int | None = PXE_PORT,
    interface: str | None = None,
    events: trio.MemorySendChannel[BootEvent] | None = None,
    stats: DhcpStats | None = None,
    task_status: trio.TaskStatus[tuple[int, int | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started((port, pxe_port))`` gives the bound ports."""
    stats = stats if stats is not None else DhcpStats()
    core.emit_events = events is not None  # no one to hand events to: do not build them
    main = open_socket(host, port, interface)
    socks: list[tuple[socket.socket, int]] = [(main, port)]
    try:
        bound = main.getsockname()[1]
        pxe_bound = None
        if pxe_port is not None:
            pxe = open_socket(host, pxe_port, interface)
            pxe_bound = pxe.getsockname()[1]
            socks.append((pxe, PXE_PORT))
        else:
            pxe = None
        async with trio.open_nursery() as nursery:
            for sock, logical in socks:
                nursery.start_soon(_serve_socket, core, sock, logical, interface is not None, events, stats)
            nursery.start_soon(_expire_loop, core)
            task_status.started((bound, pxe_bound))
    finally:
        for sock, _ in socks:
            sock.close()


async def _expire_loop(core: DhcpServerCore) -> None:
    while True:
        await trio.sleep(EXPIRE_EVERY)
        core.expire(trio.current_time())


async def _serve_socket(
    core: DhcpServerCore[LeaseStore],
    sock: socket.socket,
    logical_port: int,
    may_broadcast: bool,
    events: trio.MemorySendChannel[BootEvent] | None,
    stats: DhcpStats,
) -> None:
    """Receive and answer; replies that wait for a lease go through the committer.

    Replies whose packet changed the lease store (ACKs, mostly) are held until
    the store's commit has returned; everything else (OFFERs, NAKs) goes at
    once. The commit runs in a worker thread while this task keeps draining
    the socket, so an fsync never stalls reception (a stalled receiver
    overflows the socket buffer under a burst and the ROMs retry 4 s later).
    Commits are at least ``COMMIT_GAP`` apart, so under load one covers many ACKs.
    """
    commit_now = functools.partial(core.leases.commit, compact=False)
    held: list[tuple[bytes, tuple[str, int]]] = []  # replies waiting for the commit of their leases
    ready: deque[tuple[bytes, tuple[str, int]]] = deque()  # committed, waiting for the loop to send them
    more = trio.Event()

    async def committer() -> None:
        nonlocal more
        last = -COMMIT_GAP
        while True:
            await more.wait()
            # At most one commit per COMMIT_GAP: under load each commit (a worker-thread round
            # trip, ~50 us of CPU, plus the fdatasync) covers more ACKs; when idle, none waits.
            await trio.sleep_until(last + COMMIT_GAP)
            more = trio.Event()
            batch = held[:]
            del held[:]
            # Group commit: one fsync covers every change staged so far. The journal's compaction,
            # when due, runs after these ACKs are released, not before.
            await trio.to_thread.run_sync(commit_now)
            last = trio.current_time()
            # Released to the loop, which sends them paced (see the loop), and woken if idle.
            ready.extend(batch)
            idle.cancel()
            await trio.to_thread.run_sync(core.leases.compact_if_due)

    backlog = Backlog(stats.shed, max_age=DISCOVER_MAX_AGE, queue_max=QUEUE_MAX)
    shed_logged = max(1, 2 * stats.shed.total())
    recvfrom = sock.recvfrom
    sendto = sock.sendto
    add = backlog.add
    answer = core.answer
    receive = core.receive
    idle = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer)
        while True:
            if not backlog:
                if ready:
                    # Idle but for released ACKs: at most SLICE of them per READY_PACE.
                    with trio.move_on_after(READY_PACE):
                        await trio.lowlevel.wait_readable(sock)
                else:
                    with trio.CancelScope() as idle:  # the committer cancels it when it releases ACKs
                        await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            # Drain without a checkpoint per datagram: the kernel buffer is emptied far more
            # often than it can fill, so shedding happens here, by priority, not there, at random.
            for _ in range(DRAIN_MAX):
                try:
                    data, src = recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # e.g. ICMP errors surfacing on the socket
                add(data, src, now)
            wall = time.time()
            dirty = False
            for data, src in backlog.take(now, SLICE):
                if ready:
                    # One committed ACK per datagram answered: ACKs leave paced, not in one burst per commit.
                    try:
                        sendto(*ready.popleft())
                    except OSError:
                        stats.send_errors += 1
                try:
                    # The common exchange takes the core's fast path (same bytes, same lease changes);
                    # anything else, and everything when events are wanted, the general one.
                    fast = answer(data, src, now, wall, logical_port)
                    if fast is not None:
                        if fast:  # () is "answer nothing"
                            reply, ip, dport, bcast, changed = fast
                            dest = src if bcast and not may_broadcast else (ip, dport)
                            if changed:
                                held.append((reply, dest))
                                dirty = True
                            else:
                                # Sent as soon as it is made: replies leave spread over the slice's work,
                                # not as one burst that overruns a client's (or relay's) receive buffer.
                                try:
                                    sendto(reply, dest)
                                except OSError:
                                    stats.send_errors += 1  # e.g. socket buffer full: the client retransmits
                        continue
                    out = receive(data, src, now, wall, logical_port)
                except Exception as exc:  # noqa: BLE001 -- one datagram must not stop the server
                    _internal_error(core, src, exc)
                    continue
                if out.replies:
                    batch = [(r.data, _destination(r, src, may_broadcast)) for r in out.replies]
                    if out.dirty:
                        held.extend(batch)
                        dirty = True
                    else:
                        _send_all(sock, batch, stats)
                elif out.dirty:
                    dirty = True
                if events is not None and out.events:
                    for ev in out.events:
                        try:
                            events.send_nowait(ev)
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            stats.events_dropped += 1
            if dirty:
                more.set()
            shed_total = stats.shed.total()
            if shed_total >= shed_logged:
                # One line at 1, 2, 4, 8, ... shed datagrams: an operator sees the overload, the log does not flood.
                log.warning("dhcp: overloaded, %d datagram(s) shed unanswered so far (%s)", shed_total,
                            ", ".join(f"{k} {v}" for k, v in sorted(stats.shed.items())))
                shed_logged = 2 * shed_total
            stats.batches += 1
            # Released ACKs: one went after each datagram answered; at most SLICE more now. A
            # commit that took long (an fsync stall, a compaction) has released many at once:
            # sent all together they would overrun the receive buffer of the relay or client.
            for _ in range(min(len(ready), SLICE)):
                try:
                    sendto(*ready.popleft())
                except OSError:
                    stats.send_errors += 1
            await trio.lowlevel.checkpoint()


def _destination(reply: Reply, src: tuple[str, int], may_broadcast: bool) -> tuple[str, int]:
    if reply.broadcast and not may_broadcast:
        return src  # no interface pinned: never broadcast (tests on loopback)
    return reply.ip, reply.port


def _internal_error(core: DhcpServerCore, src: tuple[str, int], exc: Exception) -> None:
    core.counters["internal_error"] += 1
    n = core.counters["internal_error"]
    if n & (n - 1) == 0:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        log.error("dhcp: a datagram from %s:%s raised %s at %s; dropped (%d so far)",
                  src[0], src[1], safe_text(repr(exc), 200), where, n)


def _send_all(sock: socket.socket, replies: Iterable[tuple[bytes, tuple[str, int]]], stats: DhcpStats) -> None:
    sendto = sock.sendto
    for data, dest in replies:
        try:
            sendto(data, dest)
        except BlockingIOError:
            stats.send_errors += 1  # socket buffer full: the client retransmits
        except OSError:
            stats.send_errors += 1


def make_core(config: ServerConfig, policy: StaticPolicy, leases_path: str | None) -> DhcpServerCore[LeaseStore]:
    return DhcpServerCore(config, policy, LeaseStore(leases_path))
