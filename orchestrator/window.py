"""The admission window: how many nodes may be in flight at once. Pure: load and time in, a decision out.

The scheduler wakes a node only while fewer than :attr:`AdmissionWindow.size`
nodes are *in flight* -- woken and not yet past ``initrd``, i.e. about to
download or downloading from the boot server. Every ``adapt_every`` seconds its
``_adapt`` task hands :meth:`AdmissionWindow.update` the file servers' load
(:class:`orchestrator.bootserver.admission.Load`), the time and its own counts;
the window changes size and returns a :class:`Decision` saying which rule fired
and why, which the scheduler logs (:meth:`Decision.log_line`) when the size
changed. Nothing here reads a clock or awaits: the tests (``tests/test_window.py``)
drive it with plain numbers.

The rules, checked in this order; the first that holds decides:

===================  ==========================================================  ===========================
decision             when                                                        new size
===================  ==========================================================  ===========================
``SHRINK_LOSS``      *loss*: server retransmits, or client re-sends (duplicate   half (at least 1)
                     ACKs, repeated requests), above ``retransmit_threshold``/s,
                     and no more nodes in flight than the window
``SHRINK_DELAY``     *delay*: more than ``queue_target`` blocks queued (below),  a quarter off (at least 1)
                     and no more nodes in flight than the window
``HOLD``             loss or delay, but more nodes in flight than the window     unchanged
``GROW``             nodes queued, the window full, slow start over              an eighth more (at least 1)
``GROW_SLOW_START``  nodes queued, the window full, in slow start, and at        double
                     least half the window really downloading
``HOLD``             otherwise                                                   unchanged
===================  ==========================================================  ===========================

Growth never passes ``max_window`` (the plan's ``admission.max_downloading``).
Either congestion signal ends slow start for good, and so does a queue of more
than half ``queue_target`` blocks (HyStart's delay exit, RFC 9406): nodes reach
the link seconds after they are woken, so a doubling on a queue already
building overshoots by the time it shows. With ``adaptive: false`` the
window is ``max_window`` and never changes.

Why it is shaped like this
--------------------------
It is TCP's congestion window, with nodes for segments: additive growth and
multiplicative shrinking (AIMD), after a slow start that doubles. The window
starts at ``initial_window`` = 8: like TCP's initial window of 10 segments
(RFC 6928), a handful of nodes is no load for any boot server, and a node
spends seconds in POST before its first block, so a smaller start leaves the
link idle. For the same reason slow start doubles only once half the window is
really downloading: doubling on nodes still in POST and DHCP overshoots blind.

Loss alone is not enough. Lock-step TFTP keeps one block per transfer in
flight, so transfers beyond what the link carries do not overflow a queue, they
only wait in it: a shallow link queue never drops, and without a second signal
the window grows until the clients' timers fire. The *delay* signal is TCP
Vegas's estimate, on transfer counts: with ``active`` transfers, a median block
round trip ``rtt`` and an unloaded round trip ``base`` (the smallest seen in the
last ``rtt_base_window`` seconds), about ``active * (1 - base/rtt)`` blocks wait
in a queue (the link's or the server's CPU) rather than move. A few dozen
queued blocks keep the link busy through every hiccup; more only add waiting.
The nodes in flight share the link, so nodes admitted together finish
together, and their replacements spend seconds in POST and DHCP before their
first block: a smaller target means more, shorter such generations and more
of these gaps (docs/benchmarks.md, "Scale-out storm", measured 16 against 64).
Delay takes a quarter off, loss half.
Either shrinks once per backlog, as TCP cuts once per loss event: nodes
admitted before the signal showed stay in flight for a while, and shrinking
again while more are in flight than the window admits nobody fewer; it only
collapses the window (to 1, on a client-retry rate that stays above the
threshold for a few seconds) and leaves the link idle once the backlog drains.

To change a rule, change :meth:`AdmissionWindow.update` and its row above; the
tuning is :class:`WindowTuning`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Protocol


class ServerLoad(Protocol):
    """What the window reads of the file servers' load (:class:`orchestrator.bootserver.admission.Load`)."""

    #: Transfers holding a slot right now.
    active: int
    #: Retransmitted packets per second.
    retransmit_rate: float
    #: Clients re-sending per second (duplicate ACKs, repeated requests).
    client_retry_rate: float
    #: Median block round trip in seconds; None without samples.
    rtt: float | None


@dataclass(frozen=True, slots=True)
class WindowTuning:
    """The window's knobs (the plan sets only ``max_downloading`` and ``adaptive``)."""

    #: Seconds between two updates (the scheduler's ``_adapt`` period).
    adapt_every: float = 1.0
    #: Server retransmits, or client re-sends, per second above which the window halves.
    retransmit_threshold: float = 5.0
    #: Blocks allowed to wait in the boot server's queues (link, CPU) before the window shrinks.
    queue_target: float = 64.0
    #: The first window (capped by ``max_window``).
    initial_window: int = 8
    #: How long the smallest round trip seen stays the unloaded reference (seconds).
    rtt_base_window: float = 600.0


class DecisionKind(enum.Enum):
    """Which rule of the table in the module docstring decided."""

    GROW_SLOW_START = "grow_slow_start"
    GROW = "grow"
    SHRINK_LOSS = "shrink_loss"
    SHRINK_DELAY = "shrink_delay"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Decision:
    """One update's outcome. ``size`` may equal ``old`` for a grow or shrink at ``max_window`` or at 1."""

    kind: DecisionKind
    old: int
    size: int
    #: Why, in words: the congestion signal for a shrink ("loss: ...", "delay: ..."),
    #: "room" for growth, the reason nothing changed for a hold.
    reason: str
    load: ServerLoad

    @property
    def changed(self) -> bool:
        return self.size != self.old

    def log_line(self) -> str:
        """The line the scheduler logs when the size changed."""
        load = self.load
        rtt = f", rtt {load.rtt * 1000:.1f} ms" if load.rtt is not None else ""
        return (f"admission window {self.old} -> {self.size} ({self.reason}: retransmits {load.retransmit_rate:.1f}/s, "
                f"client retries {load.client_retry_rate:.1f}/s{rtt})")


class AdmissionWindow:
    """How many nodes may be in flight; :meth:`update` adapts it to the boot server's load."""

    def __init__(self, max_window: int, *, adaptive: bool = True, tuning: WindowTuning = WindowTuning()) -> None:
        self.max_window = max_window
        self.adaptive = adaptive
        self.tuning = tuning
        self.size = min(tuning.initial_window, max_window) if adaptive else max_window
        #: Doubling until the first congestion signal.
        self.slow_start = True
        #: (time, rtt) samples of the last ``rtt_base_window`` seconds: their minimum is the unloaded round trip.
        self._rtt_seen: deque[tuple[float, float]] = deque()
        #: The newest estimate of blocks waiting in the server's queues (0 before a round-trip sample).
        self.queued_blocks = 0.0

    def update(self, load: ServerLoad, now: float, *, in_flight: int, downloading: int, queued: bool) -> Decision:
        """Adapt the size to ``load`` at ``now``.

        ``in_flight``: nodes woken and not yet past initrd; ``downloading``: those
        of them past pxe_dhcp (loader to initrd); ``queued``: a node waits to be woken.
        """
        old = self.size
        if not self.adaptive:
            return Decision(DecisionKind.HOLD, old, old, "not adaptive", load)
        signal = self._congestion(load, now)
        if signal is not None:
            kind, why = signal
            self.slow_start = False
            if in_flight > old:  # the backlog admitted before the signal showed is still in flight: shrunk for it already
                return Decision(DecisionKind.HOLD, old, old, f"{why}; {in_flight} in flight > window {old}", load)
            self.size = max(1, old // 2) if kind is DecisionKind.SHRINK_LOSS else max(1, old - max(1, old // 4))
            return Decision(kind, old, self.size, why, load)
        if self.slow_start and self.queued_blocks > self.tuning.queue_target / 2:
            self.slow_start = False  # HyStart's delay exit: the queue is growing, doubling again would overshoot
        if not queued:
            return Decision(DecisionKind.HOLD, old, old, "nothing queued", load)
        if in_flight < old:
            return Decision(DecisionKind.HOLD, old, old, "window not full", load)
        if not self.slow_start:
            self.size = min(self.max_window, old + max(1, old // 8))
            return Decision(DecisionKind.GROW, old, self.size, "room", load)
        if downloading * 2 >= old:  # not before: woken nodes spend seconds in POST and DHCP before their first block
            self.size = min(self.max_window, old * 2)
            return Decision(DecisionKind.GROW_SLOW_START, old, self.size, "room", load)
        return Decision(DecisionKind.HOLD, old, old, f"slow start: {downloading} of {old} downloading, waiting for half", load)

    def _congestion(self, load: ServerLoad, now: float) -> tuple[DecisionKind, str] | None:
        """The congestion signal in ``load`` (SHRINK_LOSS or SHRINK_DELAY, and why), or None.

        Loss is checked first; an update that finds loss adds no round-trip sample.
        """
        threshold = self.tuning.retransmit_threshold
        if load.retransmit_rate > threshold:
            return DecisionKind.SHRINK_LOSS, f"loss: {load.retransmit_rate:.1f} retransmits/s"
        if load.client_retry_rate > threshold:
            return DecisionKind.SHRINK_LOSS, f"loss: {load.client_retry_rate:.1f} client re-sends/s"
        rtt = load.rtt
        if rtt is None:
            return None
        samples = self._rtt_seen
        samples.append((now, rtt))
        while samples and samples[0][0] < now - self.tuning.rtt_base_window:
            samples.popleft()
        base = min(v for _, v in samples)
        queued = load.active * (1.0 - base / rtt) if rtt > base else 0.0
        self.queued_blocks = queued
        if queued > self.tuning.queue_target:
            return DecisionKind.SHRINK_DELAY, (f"delay: ~{queued:.0f} blocks queued (rtt {rtt * 1000:.1f} ms vs "
                                               f"{base * 1000:.1f} ms unloaded, {load.active} transfers)")
        return None
