"""Admission: how much boot traffic the file servers let through, and how loaded they are.

A boot storm is a file-transfer storm. The TFTP and HTTP servers share one
:class:`Admission` object, which controls load with two independent knobs and
reports it back through :meth:`Admission.load`:

* **Transfer slots** (``max_active``): at most this many file transfers move
  data at once. A transfer that finds no free slot *queues* -- FIFO, never
  refused -- because a refused PXE client gives up or backs off for tens of
  seconds, while a queued one merely waits a little longer for its first block.
  ``async with admission.slot(): ...`` wraps one transfer. The queue is
  cancellation-safe: a cancelled waiter leaves the queue, and a slot is handed
  directly from the releasing transfer to the first waiter, so it is never
  leaked and never stolen by a late arrival (no barging).

* **A global byte-rate budget** (``rate`` bytes/s, ``burst`` bytes): a token
  bucket. Before sending a chunk a server calls
  ``try_consume(nbytes, now)``; ``0.0`` means go, anything else is the number of
  seconds to wait before asking again. The math is pure: time is passed in (the
  trio clock in servers, plain floats in tests), nothing here reads a clock.
  :meth:`Admission.consume` is the awaitable convenience wrapper.

* **Load reporting**: servers call :meth:`note_sent` after putting bytes on the
  wire and :meth:`note_retransmits` when TFTP retransmits (a sign of loss or of
  clients that cannot keep up). :meth:`load` returns a :class:`Load` snapshot --
  active transfers, queued transfers, bytes/s and retransmits/s over a recent
  sliding window.

**The scheduler reads ``load(now)`` to adapt how many nodes it admits** (wakes)
at a time: a long queue, a byte rate pinned at the budget or a rising
retransmit rate all mean "wake fewer nodes for now"; an idle server means
"widen the window". This module only measures and enforces; the policy lives in
the scheduler. It may also call :meth:`set_max_active` to resize the slot pool
at run time.

Token-bucket details, so the numbers are predictable:

* the bucket starts full (``burst`` tokens) and refills at ``rate`` tokens per
  second, capped at ``burst``;
* a request for more than ``burst`` bytes is granted as soon as the bucket is
  full, and the bucket goes *into debt* (negative) by the excess; the debt is
  repaid by refill before anyone else is served. Long-run throughput therefore
  stays at ``rate`` whatever chunk size the servers use, and a large chunk can
  never wait forever;
* time going backwards (it should not on a monotonic clock) refills nothing;
* the bucket is not a queue: concurrent pollers are not served in arrival
  order. Fairness between transfers comes from the slot queue, not the bucket.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from types import TracebackType

import trio

__all__ = ["Admission", "Load", "RateWindow", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class Load:
    """A snapshot of the file servers' load, for the scheduler."""

    #: Transfers holding a slot right now.
    active: int
    #: Transfers waiting for a slot.
    queued: int
    #: Payload bytes per second put on the wire, over the recent window.
    bytes_per_s: float
    #: Retransmitted packets per second, over the recent window.
    retransmit_rate: float
    #: Clients re-sending per second (duplicate ACKs and repeated requests: *their*
    #: timeouts fired before our data arrived), over the recent window.
    client_retry_rate: float = 0.0
    #: Median block round trip (DATA sent to its ACK received, Karn: never over a
    #: retransmitted block) in seconds over the recent window; None without samples.
    rtt: float | None = None


class TokenBucket:
    """A token bucket in bytes; pure (``now`` is always passed in)."""

    __slots__ = ("rate", "burst", "tokens", "_last")

    def __init__(self, rate: float, burst: int) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number of bytes/s, not {rate!r}")
        if burst <= 0:
            raise ValueError(f"burst must be positive, not {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.tokens = float(burst)
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def try_consume(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens and return 0.0, or return seconds until they could be taken."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._refill(now)
        need = min(nbytes, self.burst)  # bigger than the bucket: go once it is full, into debt
        if self.tokens >= need:
            self.tokens -= nbytes
            return 0.0
        # At least a microsecond: float rounding can leave a shortfall of ~1e-17 s,
        # and a sleep that short does not move the clock, so the caller would spin.
        return max((need - self.tokens) / self.rate, MIN_WAIT)


#: Smallest wait try_consume returns when tokens are short.
MIN_WAIT = 1e-6


class RateWindow:
    """Events per second over a sliding window, in fixed-width time bins.

    Memory is bounded (one entry per bin). The rate divides the sum of the bins
    inside the window by the window length -- or, for the first ``window``
    seconds after the first sample, by the time elapsed since that sample (at
    least one bin width), so a fresh server does not under-report.
    """

    __slots__ = ("window", "bin_width", "_bins", "_start")

    def __init__(self, window: float = 5.0, bins: int = 10) -> None:
        if window <= 0 or bins <= 0:
            raise ValueError("window and bins must be positive")
        self.window = float(window)
        self.bin_width = self.window / bins
        self._bins: deque[list[float]] = deque(maxlen=bins)  # [bin index, total]
        self._start: float | None = None

    def add(self, amount: float, now: float) -> None:
        if self._start is None:
            self._start = now
        idx = math.floor(now / self.bin_width)
        if self._bins and self._bins[-1][0] >= idx:
            self._bins[-1][1] += amount  # same bin (or a clock hiccup): fold into the newest
        else:
            self._bins.append([idx, amount])

    def rate(self, now: float) -> float:
        if self._start is None:
            return 0.0
        idx = math.floor(now / self.bin_width)
        nbins = self._bins.maxlen or 1
        total = sum(amount for i, amount in self._bins if i > idx - nbins)
        span = min(self.window, max(self.bin_width, now - self._start))
        return total / span


class RttWindow:
    """Median of round-trip samples over a sliding window; bounded memory.

    Samples are folded into fixed-width time bins, each keeping at most
    ``per_bin`` samples (a reservoir would be fairer; the first ``per_bin`` of a
    bin are plenty for a median at the rates involved).
    """

    __slots__ = ("window", "bin_width", "per_bin", "_bins")

    def __init__(self, window: float = 5.0, bins: int = 10, per_bin: int = 512) -> None:
        self.window = float(window)
        self.bin_width = self.window / bins
        self.per_bin = per_bin
        self._bins: deque[tuple[int, list[float]]] = deque(maxlen=bins)

    def add(self, samples, now: float) -> None:
        idx = math.floor(now / self.bin_width)
        if not self._bins or self._bins[-1][0] < idx:
            self._bins.append((idx, []))
        b = self._bins[-1][1]
        room = self.per_bin - len(b)
        if room > 0:
            b.extend(samples[:room] if isinstance(samples, list) else list(samples)[:room])

    def median(self, now: float, min_samples: int = 8) -> float | None:
        idx = math.floor(now / self.bin_width)
        nbins = self._bins.maxlen or 1
        vals = sorted(v for i, b in self._bins if i > idx - nbins for v in b)
        if len(vals) < min_samples:
            return None
        return vals[len(vals) // 2]


class _Slot:
    """The async context manager returned by :meth:`Admission.slot`."""

    __slots__ = ("_adm",)

    def __init__(self, adm: Admission) -> None:
        self._adm = adm

    async def __aenter__(self) -> None:
        await self._adm._acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._adm._release()


class Admission:
    """Transfer slots (FIFO queue), a global byte-rate budget, and load reporting.

    ``max_active=None`` means unlimited slots (still counted); ``rate=None``
    means no byte-rate limit. One instance is shared by every file server of a
    boot server; use it from one trio run only.
    """

    def __init__(
        self,
        *,
        max_active: int | None = None,
        rate: float | None = None,
        burst: int = 1 << 20,
        window: float = 5.0,
    ) -> None:
        if max_active is not None and max_active < 1:
            raise ValueError(f"max_active must be >= 1 or None, not {max_active!r}")
        self._max_active = max_active
        self._active = 0
        # ParkingLot is FIFO; a parked task is woken with its slot already counted.
        self._lot = trio.lowlevel.ParkingLot()
        self._bucket = TokenBucket(rate, burst) if rate is not None else None
        self._sent = RateWindow(window)
        self._retransmits = RateWindow(window)
        self._client_retries = RateWindow(window)
        self._rtt = RttWindow(2.0)  # recent: the scheduler's delay signal must not lag seconds behind

    # -- slots -----------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Transfers waiting for a slot now."""
        return len(self._lot)

    @property
    def max_active(self) -> int | None:
        return self._max_active

    def _has_room(self) -> bool:
        return self._max_active is None or self._active < self._max_active

    def slot(self) -> _Slot:
        """``async with admission.slot():`` -- hold one transfer slot, queueing FIFO for it."""
        return _Slot(self)

    async def _acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._has_room() and not self._lot:
            self._active += 1
            # The slot is ours; a checkpoint that cannot raise keeps that true.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Queue. _release/set_max_active count the slot for us *before* unparking;
        # once unparked, park() returns normally (trio does not cancel a task that
        # has been rescheduled), so the slot is never lost. Cancelled while still
        # parked: trio removes us from the lot and no slot was counted.
        await self._lot.park()

    def _release(self) -> None:
        if self._lot and self._has_room_after_release():
            self._lot.unpark(count=1)  # hand over: _active unchanged
        else:
            self._active -= 1

    def _has_room_after_release(self) -> bool:
        return self._max_active is None or self._active <= self._max_active

    def set_max_active(self, max_active: int | None) -> None:
        """Resize the slot pool. Growing wakes queued transfers at once; shrinking
        lets running transfers finish and admits no one until below the new cap."""
        if max_active is not None and max_active < 1:
            raise ValueError(f"max_active must be >= 1 or None, not {max_active!r}")
        self._max_active = max_active
        while self._lot and self._has_room():  # bounded by the number of waiters
            self._active += 1
            self._lot.unpark(count=1)

    # -- byte budget -------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        return self._bucket.rate if self._bucket is not None else None

    def try_consume(self, nbytes: int, now: float) -> float:
        """0.0 when ``nbytes`` may be sent now (tokens taken), else seconds to wait and retry."""
        if self._bucket is None:
            return 0.0
        return self._bucket.try_consume(nbytes, now)

    async def consume(self, nbytes: int) -> None:
        """Wait (on the trio clock) until ``nbytes`` may be sent, and take the tokens."""
        if self._bucket is None:
            await trio.lowlevel.checkpoint()
            return
        # Terminates: each retry waits exactly until the tokens it lacked have
        # refilled; only other consumers racing for the same tokens can make it
        # loop again, and each of those was served.
        while True:
            wait = self._bucket.try_consume(nbytes, trio.current_time())
            if wait <= 0.0:
                await trio.lowlevel.checkpoint()
                return
            await trio.sleep(wait)

    # -- load reporting ------------------------------------------------------------

    def note_sent(self, nbytes: int, now: float) -> None:
        """Record payload bytes put on the wire (feeds ``Load.bytes_per_s``)."""
        self._sent.add(nbytes, now)

    def note_retransmits(self, n: int, now: float) -> None:
        """Record ``n`` retransmitted packets (feeds ``Load.retransmit_rate``)."""
        self._retransmits.add(n, now)

    def note_client_retries(self, n: int, now: float) -> None:
        """Record ``n`` client re-sends: duplicate ACKs, repeated requests (feeds ``Load.client_retry_rate``)."""
        self._client_retries.add(n, now)

    def note_rtt(self, samples: list[float], now: float) -> None:
        """Record block round trips in seconds (feeds ``Load.rtt``)."""
        if samples:
            self._rtt.add(samples, now)

    def load(self, now: float) -> Load:
        return Load(
            active=self._active,
            queued=len(self._lot),
            bytes_per_s=self._sent.rate(now),
            retransmit_rate=self._retransmits.rate(now),
            client_retry_rate=self._client_retries.rate(now),
            # The engine hands over one mean per flush (many ACKs each): one sample suffices.
            rtt=self._rtt.median(now, min_samples=1),
        )
