"""The stage tracker: evidence in, stage transitions out. Pure: no I/O, no clock.

Why it is shaped like this
--------------------------
A node's boot is never observed directly; we see *evidence*: a DHCP packet with
the PXE vendor class, a TFTP read of ``pxelinux.0``, a read of the kernel the
node's profile names, a DHCP packet without the PXE class (the kernel's
``ip=dhcp``), an SSH banner. Evidence arrives late, twice (retransmits, two log
sources), out of order (a log line flushed after a wire event), and sometimes
not at all (a boot path without a stage: RAM-disk root with static ``ip=`` has
no ``os_dhcp``; iPXE fetching over HTTP has no pxelinux ``loader``).

So the tracker does not demand a sequence. Each piece of evidence *names* the
stage it proves (:func:`Classifier.stage_of`), and the rule is one table:

================  ====================================================================
evidence names    effect
================  ====================================================================
a later stage     move forward to it (stages in between were skipped: allowed)
the same stage    duplicate: remember it as the latest evidence, no transition
an earlier stage  late or duplicate evidence: ignored -- except PXE DHCP seen at
                  ``kernel`` or later, or after ``ready``/``failed``: the node
                  rebooted, a **new attempt** starts at ``pxe_dhcp`` (counted)
================  ====================================================================

A DHCP without the PXE class at ``loader`` or ``config`` is a network loader's
own (syslinux.efi asks without option 60/93), not the OS's: it counts as
``pxe_dhcp`` evidence there, so it moves nothing.

Evidence comes from hosts that can lie (any host on the boot LAN can send a
DHCPDISCOVER with any MAC), so it may move a node's stage -- forward, or back
to ``pxe_dhcp`` as a new attempt -- but it never *authorises* anything. Each
attempt remembers who started it (:attr:`NodeState.attempt_source`): bootorch
(``"scheduler"``: a wake, power-on or power cycle it sent) or the evidence's
source. The scheduler takes power actions only in attempts bootorch started.

``waking`` comes from the scheduler (a magic packet or power-on was sent),
``ssh`` and ``ready`` from the readiness checker, ``failed`` from the
scheduler's escalation ladder. A node that reaches ``ssh`` with no PXE evidence
in the current attempt is flagged **booted without netboot**: it came up from a
disk or a stale kernel, whatever the plan says.

TFTP and HTTP evidence carries only the client's IP; DHCP evidence joins MAC and
IP (and the plan's reservations give the join in advance), so file reads land
on the right node.

Timeouts are data too: :meth:`Tracker.check_timeouts` reports each node that has
overstayed its stage once per stage entry; what to do about it (re-wake, power
cycle, give up) is the scheduler's business.
"""

from __future__ import annotations

import enum
import heapq
import math
import posixpath
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from orchestrator.events import BootEvent, EventKind


class Stage(str, enum.Enum):
    """Stage names are part of the product: metrics, JSON output and docs use them."""

    PENDING = "pending"
    WAKING = "waking"
    PXE_DHCP = "pxe_dhcp"
    LOADER = "loader"
    CONFIG = "config"
    KERNEL = "kernel"
    INITRD = "initrd"
    OS_DHCP = "os_dhcp"
    SSH = "ssh"
    READY = "ready"
    FAILED = "failed"

    @property
    def index(self) -> int:
        return _ORDER[self]


ORDERED = [Stage.PENDING, Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL,
           Stage.INITRD, Stage.OS_DHCP, Stage.SSH, Stage.READY]
_ORDER = {s: i for i, s in enumerate(ORDERED)}
_ORDER[Stage.FAILED] = len(ORDERED)
TERMINAL = {Stage.READY, Stage.FAILED}
#: Stages in which a node is downloading from the boot server (admission counts these).
DOWNLOADING = {Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD}


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class BootFilesOf:
    """The file names that mark each stage for one node (from its profile)."""

    loaders: frozenset[str] = frozenset({"pxelinux.0", "lpxelinux.0", "syslinux.efi", "ipxe.efi", "undionly.kpxe",
                                         "ldlinux.e64", "ldlinux.e32"})
    kernels: frozenset[str] = frozenset()
    initrds: frozenset[str] = frozenset()


_GENERIC_KERNEL = ("vmlinuz", "linux", "bzimage", "kernel")
_GENERIC_INITRD = ("initrd", "rootfs", "initramfs", ".cpio", ".img")


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/")


class Classifier:
    """Which stage a piece of evidence proves."""

    def __init__(self, files: BootFilesOf | None = None) -> None:
        self.files = files or BootFilesOf()

    def stage_of(self, ev: BootEvent) -> Stage | None:
        if ev.kind == EventKind.DHCP:
            d = ev.detail
            if d.get("direction", "in") != "in":
                return None  # our own replies prove nothing about the node
            if str(d.get("msg", "")).upper() not in ("DISCOVER", "REQUEST"):
                return None
            return Stage.PXE_DHCP if d.get("pxe") else Stage.OS_DHCP
        if ev.kind in (EventKind.FILE_REQUEST, EventKind.FILE_DONE) and ev.filename:
            return self.file_stage(ev.filename)
        return None

    def file_stage(self, filename: str) -> Stage | None:
        name = _norm(filename)
        base = posixpath.basename(name)
        f = self.files
        if name in f.kernels:
            return Stage.KERNEL
        if name in f.initrds:
            return Stage.INITRD
        if name in f.loaders or base in f.loaders or base.endswith((".c32", ".e64", ".e32")):
            return Stage.LOADER
        if name.startswith("pxelinux.cfg/") or name.endswith(".ipxe") or name.startswith("ipxe/"):
            return Stage.CONFIG
        if not f.kernels and not f.initrds:
            # No plan (replay of a log): recognise the usual names.
            low = base.lower()
            if any(k in low for k in _GENERIC_KERNEL):
                return Stage.KERNEL
            if any(k in low for k in _GENERIC_INITRD) or low.endswith(".gz"):
                return Stage.INITRD
        return None


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Transition:
    """A node moved from one stage to another, because of ``evidence``."""

    mac: str
    node: str
    from_stage: Stage
    to_stage: Stage
    time: float
    attempt: int
    evidence: str
    source: str = ""
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Stuck:
    mac: str
    node: str
    stage: Stage
    since: float
    timeout: float
    attempt: int


@dataclass(slots=True)
class NodeState:
    mac: str
    node: str
    ip: str | None = None
    stage: Stage = Stage.PENDING
    since: float = 0.0
    attempt: int = 0
    pxe_seen: bool = False
    flags: set[str] = field(default_factory=set)
    last_evidence: str = ""
    last_evidence_time: float = 0.0
    #: Completed downloads in this attempt (kernel/initrd "done" evidence).
    done: set[str] = field(default_factory=set)
    stuck_reported: bool = False
    history: list[Transition] = field(default_factory=list)
    #: The source of the transition that started the current attempt: ``"scheduler"``
    #: when bootorch woke or power-cycled the node, else the evidence's source
    #: (``"dhcp"``, ``"log:dnsmasq"``, ...): a boot nobody here asked for.
    attempt_source: str = ""

    @property
    def requested(self) -> bool:
        """Did bootorch itself start the current attempt (a wake, power-on or power cycle it sent)?"""
        return self.attempt_source == "scheduler"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    ip: str | None = None
    files: BootFilesOf = BootFilesOf()


def describe(ev: BootEvent) -> str:
    """A one-line human description of the evidence (the raw log line when there is one)."""
    line = ev.detail.get("line") if ev.detail else None
    if line:
        return str(line)[:500]
    if ev.kind == EventKind.DHCP:
        d = ev.detail
        vc = f" vendor-class {d['vendor_class']!r}" if d.get("vendor_class") else ""
        via = f" via relay {d['relay']}" if d.get("relay") else ""
        return f"{ev.source}: {d.get('msg')} from {ev.mac}{via}{vc}".strip()
    what = {EventKind.FILE_REQUEST: "read", EventKind.FILE_DONE: "sent", EventKind.FILE_FAILED: "failed"}[ev.kind]
    extra = f" ({ev.bytes} bytes)" if ev.kind == EventKind.FILE_DONE else (f" ({ev.result})" if ev.result else "")
    return f"{ev.source}: {what} {ev.filename} to {ev.client_ip}{extra}"


class Tracker:
    """Per-node stage machines keyed by MAC.

    ``nodes`` maps MAC -> :class:`NodeInfo` (from the plan). With ``track_unknown``
    (log replay without a plan) any MAC seen in DHCP evidence is tracked too,
    named by its MAC.
    """

    def __init__(self, nodes: Mapping[str, NodeInfo] | None = None, *, track_unknown: bool = False,
                 timeouts: Mapping[Stage, float] | None = None) -> None:
        self.info = {m.lower(): i for m, i in (nodes or {}).items()}
        self.track_unknown = track_unknown
        self.timeouts = dict(timeouts or {})
        self.nodes: dict[str, NodeState] = {}
        self.ip_to_mac: dict[str, str] = {}
        self._classifiers: dict[str, Classifier] = {}
        self._by_files: dict[BootFilesOf, Classifier] = {}
        self._generic = Classifier()
        self.unmatched = 0
        # Indexes kept as stages change, so that a query costs O(1) (counts) or
        # O(log n) (deadlines) rather than a pass over every node: at 10 000
        # nodes the scheduler asks after every transition. See _reindex.
        self._stage_count: dict[Stage, int] = {s: 0 for s in Stage}
        self._order: dict[str, int] = {}  # mac -> creation index: check_timeouts reports in node order
        self._gen: dict[str, int] = {}  # mac -> the sequence number of its live heap entry
        self._seq = 0
        self._heap: list[tuple[float, int, str]] = []  # (since + timeout, seq, mac); stale entries dropped lazily
        self._heap_limits: dict[Stage, float] = dict(self.timeouts)
        #: Addresses the plan reserves, by node MAC (never re-learnt for another MAC).
        self._reserved: dict[str, str] = {}
        for mac, info in self.info.items():
            self._add(NodeState(mac, info.name, info.ip))
            if info.ip:
                self.ip_to_mac[info.ip] = mac
                self._reserved[info.ip] = mac

    # ---------------------------------------------------------------- evidence

    def feed(self, ev: BootEvent) -> list[Transition]:
        """Apply one piece of evidence; returns the transitions it caused (0 or 1)."""
        mac = self._mac_for(ev)
        if mac is None:
            self.unmatched += 1
            return []
        st = self.nodes[mac]
        now = ev.wall if ev.wall is not None else ev.time
        if (ev.kind == EventKind.DHCP and ev.client_ip and ev.detail.get("direction") == "out"
                and ev.detail.get("msg") in ("ACK", "OFFER") and not ev.detail.get("inform")):
            self._learn_ip(mac, ev.client_ip)
        stage = self._classifier(mac).stage_of(ev)
        if stage == Stage.OS_DHCP and ev.detail.get("pxe") is None:
            # The source cannot tell (ISC dhcpd logs no vendor class by default):
            # go by order -- before the kernel it is the ROM, after it the OS.
            stage = Stage.PXE_DHCP if st.stage.index < Stage.KERNEL.index else Stage.OS_DHCP
        elif stage == Stage.OS_DHCP and st.stage in (Stage.LOADER, Stage.CONFIG):
            # A loader's own DHCP (syslinux.efi asks without option 60/93): after a
            # loader and before any kernel it is still the firmware phase, not the OS.
            stage = Stage.PXE_DHCP
        if ev.kind == EventKind.FILE_DONE and stage in (Stage.KERNEL, Stage.INITRD, Stage.LOADER):
            st.done.add(stage.value)
        if stage is None:
            return []
        text = describe(ev)
        if stage == Stage.PXE_DHCP:
            st.pxe_seen = True
        return self._advance(st, stage, now, text, ev.source)

    def wake(self, mac: str, now: float, evidence: str = "magic packet sent") -> list[Transition]:
        """The scheduler woke (or powered on) the node: a new attempt starts at ``waking``."""
        st = self.nodes.get(mac.lower())
        if st is None:
            return []
        return [self._move(st, Stage.WAKING, now, evidence, "scheduler", new_attempt=True)]

    def ssh_up(self, mac: str, now: float, evidence: str = "TCP 22 answers") -> list[Transition]:
        st = self.nodes.get(mac.lower())
        if st is None:
            return []
        out = self._advance(st, Stage.SSH, now, evidence, "readiness")
        if out and not st.pxe_seen:
            st.flags.add("booted_without_netboot")
            out[-1] = replace(out[-1], flags=tuple(sorted(st.flags)))
            st.history[-1] = out[-1]
        return out

    def ready(self, mac: str, now: float, evidence: str = "readiness checks passed") -> list[Transition]:
        st = self.nodes.get(mac.lower())
        if st is None:
            return []
        return self._advance(st, Stage.READY, now, evidence, "readiness")

    def restart_stage(self, mac: str, now: float, evidence: str, source: str = "scheduler") -> list[Transition]:
        """Same stage, timer restarted (a re-sent magic packet): journaled, not a new attempt."""
        st = self.nodes.get(mac.lower())
        if st is None or st.stage in TERMINAL or st.stage == Stage.PENDING:
            return []
        t = Transition(st.mac, st.node, st.stage, st.stage, now, st.attempt, evidence, source, tuple(sorted(st.flags)))
        st.since, st.last_evidence, st.last_evidence_time = now, evidence, now
        st.stuck_reported = False
        self._touch(st)
        st.history.append(t)
        return [t]

    def fail(self, mac: str, now: float, reason: str) -> list[Transition]:
        st = self.nodes.get(mac.lower())
        if st is None or st.stage == Stage.FAILED:
            return []
        return [self._move(st, Stage.FAILED, now, reason, "scheduler")]

    def powered_off(self, mac: str, now: float, evidence: str) -> list[Transition]:
        """Powered off on purpose (``slurm suspend``/``fail``): back to ``pending``, a new attempt."""
        st = self.nodes.get(mac.lower())
        if st is None:
            return []
        return [self._move(st, Stage.PENDING, now, evidence, "scheduler", new_attempt=True)]

    # ---------------------------------------------------------------- timeouts

    def check_timeouts(self, now: float) -> list[Stuck]:
        """Nodes that overstayed their stage; each reported once per stage entry, in node order.

        Only the nodes whose deadline (``since + timeout``, a heap) has come are
        looked at; each is then judged by the exact test ``now - since >= timeout``.
        """
        self._sync()
        heap, gen, found, keep = self._heap, self._gen, [], []
        # Candidates: deadline <= now, with a margin for rounding (since + t <= now and
        # now - since >= t can disagree in the last bit); each is checked exactly below.
        bound = now + 8 * 2.2205e-16 * (abs(now) + self._max_limit)
        while heap and heap[0][0] <= bound:
            entry = heapq.heappop(heap)
            st = self.nodes.get(entry[2])
            if st is None or gen.get(entry[2]) != entry[1]:
                continue  # stale: the node moved (or was reported) since this entry was pushed
            if st.stage != Stage.PENDING and now - st.since >= self.timeouts[st.stage]:
                found.append(st)
            else:
                keep.append(entry)
        for entry in keep:
            heapq.heappush(heap, entry)
        found.sort(key=lambda st: self._order[st.mac])
        out = []
        for st in found:
            st.stuck_reported = True
            self._touch(st)
            out.append(Stuck(st.mac, st.node, st.stage, st.since, self.timeouts[st.stage], st.attempt))
        return out

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`check_timeouts` could report something.

        That is ``since + timeout``, except where that sum rounds below the time
        at which ``now - since >= timeout`` holds (e.g. 12.05 + 20.0 = 32.05 but
        32.05 - 12.05 < 20.0): then the next float up, so that a loop sleeping
        until the deadline and then checking never finds nothing and spins.
        """
        self._sync()
        heap, gen = self._heap, self._gen
        while heap:
            deadline, seq, mac = heap[0]
            if gen.get(mac) == seq:
                return deadline
            heapq.heappop(heap)
        return None

    # ---------------------------------------------------------------- queries

    def counts(self) -> dict[Stage, int]:
        self._sync()
        return dict(self._stage_count)

    def count(self, stages: Iterable[Stage]) -> int:
        """Nodes in any of ``stages`` (O(stages), not O(nodes))."""
        self._sync()
        return sum(self._stage_count[s] for s in stages)

    def downloading(self) -> int:
        return self.count(DOWNLOADING)

    # ---------------------------------------------------------------- plan changes

    def set_nodes(self, infos: Mapping[str, NodeInfo], removed: Iterable[str] = ()) -> None:
        """A reloaded plan's nodes: new ones start at ``pending``; changed ones get their new name,
        address and stage-marking files; ``removed`` MACs keep their state (``status``, ``history``)
        but lose their reserved address."""
        for mac in removed:
            mac = mac.lower()
            self.info.pop(mac, None)
            self._classifiers.pop(mac, None)
            for ip in [ip for ip, m in self._reserved.items() if m == mac]:
                del self._reserved[ip]
        for mac, info in infos.items():
            mac = mac.lower()
            self.info[mac] = info
            self._classifiers.pop(mac, None)  # the profile's files may have changed
            st = self.nodes.get(mac)
            if st is None:
                self._add(NodeState(mac, info.name, info.ip))
            else:
                st.node = info.name
                if info.ip:
                    st.ip = info.ip
            if info.ip:
                self.ip_to_mac[info.ip] = mac
                self._reserved[info.ip] = mac

    # ---------------------------------------------------------------- restore

    def restore(self, transitions: Iterable[Transition]) -> None:
        """Rebuild state from a journal: the same transitions, replayed in order."""
        for t in transitions:
            st = self.nodes.get(t.mac)
            if st is None:
                st = self._add(NodeState(t.mac, t.node))
            if t.attempt != st.attempt:
                st.attempt_source = t.source
            st.stage, st.since, st.attempt = t.to_stage, t.time, t.attempt
            st.last_evidence, st.last_evidence_time = t.evidence, t.time
            st.flags = set(t.flags)
            st.stuck_reported = False
            if t.to_stage in (Stage.WAKING, Stage.PXE_DHCP) and t.from_stage.index >= t.to_stage.index:
                st.pxe_seen = False
            if t.to_stage == Stage.PXE_DHCP:
                st.pxe_seen = True
            st.history.append(t)
        self._reindex()

    # ---------------------------------------------------------------- internals

    def _mac_for(self, ev: BootEvent) -> str | None:
        mac = ev.mac.lower() if ev.mac else None
        if mac is None and ev.client_ip:
            mac = self.ip_to_mac.get(ev.client_ip)
        if mac is None:
            return None
        if mac not in self.nodes:
            if not self.track_unknown or ev.kind != EventKind.DHCP:
                return None
            self._add(NodeState(mac, mac))
        return mac

    def _learn_ip(self, mac: str, ip: str) -> None:
        """``mac`` holds ``ip`` now (a server assigned it). An address the plan reserves for another
        node stays that node's: file reads from it are that node's evidence, whatever a DHCP exchange said."""
        owner = self._reserved.get(ip)
        if owner is not None and owner != mac:
            return
        old = self.nodes[mac].ip
        if old and self.ip_to_mac.get(old) == mac and old != ip:
            del self.ip_to_mac[old]
        self.nodes[mac].ip = ip
        self.ip_to_mac[ip] = mac

    def _classifier(self, mac: str) -> Classifier:
        info = self.info.get(mac)
        if info is None:
            return self._generic
        c = self._classifiers.get(mac)
        if c is None:
            # One classifier per distinct set of boot files (a profile), shared by its nodes.
            c = self._by_files.get(info.files)
            if c is None:
                c = self._by_files[info.files] = Classifier(info.files)
            self._classifiers[mac] = c
        return c

    def _advance(self, st: NodeState, stage: Stage, now: float, evidence: str, source: str) -> list[Transition]:
        if stage == Stage.PXE_DHCP and (st.stage.index >= Stage.KERNEL.index):
            # Seen PXE again after the kernel (or after ready/failed): it rebooted.
            return [self._move(st, stage, now, evidence, source, new_attempt=True)]
        if stage.index > st.stage.index and st.stage != Stage.FAILED:
            # Leaving ``pending`` on evidence alone (no wake of ours) is a boot of its own: a new attempt.
            return [self._move(st, stage, now, evidence, source, new_attempt=st.stage == Stage.PENDING)]
        if stage == st.stage:
            st.last_evidence, st.last_evidence_time = evidence, now
        return []

    def _move(self, st: NodeState, to: Stage, now: float, evidence: str, source: str, *, new_attempt: bool = False) -> Transition:
        if new_attempt or st.attempt == 0:
            st.attempt += 1
            st.attempt_source = source
            st.pxe_seen = to == Stage.PXE_DHCP
            st.done.clear()
            st.flags.discard("booted_without_netboot")
        t = Transition(st.mac, st.node, st.stage, to, now, st.attempt, evidence, source, tuple(sorted(st.flags)))
        counts = self._stage_count
        counts[st.stage] -= 1
        counts[to] += 1
        st.stage, st.since = to, now
        st.last_evidence, st.last_evidence_time = evidence, now
        st.stuck_reported = False
        self._touch(st)
        st.history.append(t)
        return t

    # -- indexes (stage counts, the deadline heap) ------------------------------------------
    #
    # Every change of a node's stage, ``since`` or ``stuck_reported`` goes through
    # _move, restart_stage, check_timeouts or restore, which keep them. _sync
    # rebuilds them (O(n)) if nodes were added behind the tracker's back or the
    # timeouts were changed, so a query never answers from a stale index.

    def _add(self, st: NodeState) -> NodeState:
        self.nodes[st.mac] = st
        self._order[st.mac] = len(self._order)
        self._stage_count[st.stage] += 1
        self._touch(st)
        return st

    def _touch(self, st: NodeState) -> None:
        """The node's deadline may have changed: supersede its heap entry."""
        self._seq += 1
        self._gen[st.mac] = self._seq
        stage = st.stage
        if stage in self.timeouts and stage not in TERMINAL and not st.stuck_reported:
            limit, since = self.timeouts[stage], st.since
            deadline = since + limit
            while deadline - since < limit and deadline < math.inf:  # rounded low: see next_deadline
                deadline = math.nextafter(deadline, math.inf)
            heapq.heappush(self._heap, (deadline, self._seq, st.mac))
            if len(self._heap) > 2 * len(self.nodes) + 1024:
                self._heap = [e for e in self._heap if self._gen.get(e[2]) == e[1]]
                heapq.heapify(self._heap)

    @property
    def _max_limit(self) -> float:
        return max((abs(v) for v in self._heap_limits.values()), default=0.0)

    def _sync(self) -> None:
        if len(self._order) != len(self.nodes) or self._heap_limits != self.timeouts:
            self._reindex()

    def _reindex(self) -> None:
        self._order = {mac: i for i, mac in enumerate(self.nodes)}
        counts = {s: 0 for s in Stage}
        for st in self.nodes.values():
            counts[st.stage] += 1
        self._stage_count = counts
        self._heap_limits = dict(self.timeouts)
        self._gen, self._heap = {}, []
        for st in self.nodes.values():
            self._touch(st)


def plan_nodes(plan) -> dict[str, NodeInfo]:
    """NodeInfo for every node of a LoadedPlan (stage-marking files from its profile)."""
    model = plan.model
    ld = model.boot.loaders
    loaders = frozenset({ld.bios, ld.uefi, ld.uefi_http, "pxelinux.0", "lpxelinux.0", "ldlinux.c32", "ldlinux.e64"})
    out = {}
    for n in plan.nodes:
        prof = model.profiles[n.profile]
        files = BootFilesOf(
            loaders=frozenset(_norm(x) for x in loaders),
            kernels=frozenset({_norm(prof.kernel)}),
            initrds=frozenset(_norm(x) for x in prof.initrd),
        )
        out[n.mac] = NodeInfo(n.name, str(n.ip), files)
    return out


def plan_timeouts(plan) -> dict[Stage, float]:
    t = plan.model.rollout.timeouts
    return {Stage(k): float(v) for k, v in t.model_dump().items()}
