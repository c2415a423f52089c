"""The retransmit timeout of one transfer: RFC 6298's estimator, applied to TFTP blocks.

A fixed timeout is wrong both ways: on a congested link (round trips of tens
of milliseconds growing to hundreds) a short one answers every queued block
with a duplicate, and on an idle LAN (round trips well under a millisecond) a
one-second one leaves a transfer silent for a second after each loss. So each
transfer keeps its own estimate, the way TCP does (RFC 6298 section 2):

* the first round-trip sample R sets ``srtt = R`` and ``rttvar = R / 2``;
* each later sample: ``rttvar = 3/4 rttvar + 1/4 |srtt - R|``, then
  ``srtt = 7/8 srtt + 1/8 R``;
* ``rto = srtt + max(G, 4 rttvar)`` (``G``: :data:`GRANULARITY`), clamped to
  ``[rto_min, rto_max]``;
* before any sample the RTO is ``initial`` (RFC 6298 says 1 s; the server's
  ``timeout``);
* each retransmission by the timer doubles the RTO, up to ``rto_max``
  (section 5.5: back off), until the next sample recomputes it;
* samples are taken only from data that was *not* retransmitted (Karn's rule,
  section 3): the caller does not call :meth:`RtoEstimator.sample` for an ACK
  that may answer a resend (:class:`~orchestrator.protocols.tftp.ReadTransfer`
  clears its send time when it resends).

``rto_min`` defaults to :data:`RTO_MIN` (200 ms, Linux TCP's floor, not RFC
6298's conservative 1 s): a PXE ROM or pxelinux ACKs within microseconds of
receiving a block, so the round trip measures the path, and a floor of 200 ms
still leaves a congested link's queueing delay (40 ms on the storm bench's
256 KB queue at 50 Mbit/s) several times over. ``rto_max`` bounds what a
vanished client costs: with the server's 5 retries, a transfer whose client
went away gives up after ``sum(min(rto * 2**i, rto_max))`` seconds.

Pure: no clock, no I/O; times are floats passed in (seconds).
"""

from __future__ import annotations

from orchestrator.protocols.tftp.errors import LocalProtocolError

__all__ = ["GRANULARITY", "RTO_MIN", "RtoEstimator"]

#: RFC 6298's clock granularity G: the variance term is at least this (seconds).
GRANULARITY = 0.001
#: Default lower bound of the adaptive RTO, seconds.
RTO_MIN = 0.2


class RtoEstimator:
    """Smoothed round trip, its variance and the retransmit timeout they give (RFC 6298).

    ``rto`` is the value in force. Feed :meth:`sample` with each valid round
    trip (Karn's rule is the caller's), :meth:`backoff` at each timer
    retransmission.
    """

    __slots__ = ("srtt", "rttvar", "rto", "rto_min", "rto_max", "samples")

    def __init__(self, initial: float, rto_min: float = RTO_MIN, rto_max: float = 4.0) -> None:
        if not (0 < rto_min <= rto_max) or initial <= 0:
            raise LocalProtocolError(f"need 0 < rto_min ({rto_min}) <= rto_max ({rto_max}) and initial ({initial}) > 0")
        self.rto_min, self.rto_max = float(rto_min), float(rto_max)
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0
        self.rto = min(max(float(initial), self.rto_min), self.rto_max)

    def sample(self, r: float, n: int = 1) -> float:
        """One round trip ``r`` (seconds), or ``n`` samples of mean ``r``; returns the new RTO.

        ``n > 1`` is for a driver that reports only a sum over several windows
        (the native loop, once per slice): each of the ``n`` applies the update
        with the mean, so the estimate moves as it would over ``n`` equal samples.
        Called once per ACK on the Python paths, so written without calls.
        """
        if r < 0 or n < 1:
            return self.rto
        srtt, var = self.srtt, self.rttvar
        if srtt is None:
            srtt, var = r, r / 2  # RFC 6298 (2.2)
            n -= 1
        # After 64 equal samples the estimate has converged (7/8 ** 64 < 1e-3).
        for _ in range(n if n < 64 else 64):
            d = srtt - r
            var = 0.75 * var + 0.25 * (d if d >= 0 else -d)  # (2.3), with the old srtt
            srtt = 0.875 * srtt + 0.125 * r
        self.srtt, self.rttvar = srtt, var
        self.samples += 1
        k = 4 * var
        rto = srtt + (k if k > GRANULARITY else GRANULARITY)
        rto = self.rto_min if rto < self.rto_min else self.rto_max if rto > self.rto_max else rto
        self.rto = rto
        return rto

    def backoff(self) -> float:
        """The timer fired and the data goes out again: double the RTO (RFC 6298 (5.5)), up to ``rto_max``."""
        self.rto = min(self.rto * 2, self.rto_max)
        return self.rto
