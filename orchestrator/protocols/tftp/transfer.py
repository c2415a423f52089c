"""The server side of one TFTP read: :class:`ReadTransfer` and its state machine.

Feed it ``start(now)``, then ``datagram(data, now)`` for every packet from the
peer's TID and ``timer(now)`` whenever ``now >= next_deadline`` (and
``repeated_request(now)`` when the peer sends its RRQ again). Each call returns
``(packets, events)``: datagrams to send to the peer, in order, and
:class:`TransferComplete` / :class:`TransferFailed` when the transfer ends.
Reading file data through its ``source`` is the one effect it performs; it never
touches the network or reads a clock.

The read transfer's state machine
---------------------------------

A TFTP read is lock-step (RFC 1350) or windowed (RFC 7440, lock-step is
windowsize 1). The sender keeps two numbers, both *absolute* block indices that
never wrap (the wire carries them modulo 2**16, see :meth:`ReadTransfer._ack_index`):
``acked``, the highest block the client has acknowledged, and ``high``, the
highest block ever sent. An OACK counts as block 0, so a transfer that sends an
OACK starts at ``acked = -1, high = 0``; one that does not starts at
``acked = 0`` and sends block 1 straight away.

Why it is shaped so: the only input that moves data is an ACK that *advances*
``acked`` to a block we have sent. Anything else -- a duplicate ACK, an ACK for a
block not yet sent, a stray DATA -- sends nothing (a duplicate ACK only tells the
timer that the peer is alive, below). That single rule is the
Sorcerer's Apprentice fix (RFC 1123 section 4.2.3.1: "The sender (i.e., the side
originating the DATA packets) must never resend the current DATA packet on
receipt of a duplicate ACK"), and with windows it also makes RFC 7440's partial
window ACK and the normal end-of-window ACK the same case: send the window
starting at ``acked + 1``. Lost packets are recovered by the timer alone.

====================  ===========================  ==============================  ==========
state                 input                        action                          next
====================  ===========================  ==============================  ==========
START                 start(), options accepted    send OACK                       OACK_SENT
START                 start(), no options          send window 1..ws               SENDING
OACK_SENT / SENDING   ACK k, acked < k <= high,    send window k+1..k+ws           SENDING
                      k < last block
OACK_SENT / SENDING   ACK of the last block        (nothing)                       DONE
OACK_SENT / SENDING   ACK k, k == acked            send nothing (no Sorcerer's     same
                      (a duplicate)                Apprentice); tries = 0: alive
OACK_SENT / SENDING   ACK k, k < acked or k > high ignore                          same
OACK_SENT             ERROR 8 (options declined)   (nothing; "options_declined")   FAILED
OACK_SENT / SENDING   ERROR (any length)           (nothing)                       FAILED
OACK_SENT / SENDING   timer, tries <= budget and   resend OACK / window from       same
                      progress within max_stall    acked+1
OACK_SENT / SENDING   timer, tries > budget, or    (nothing; peer vanished, or     FAILED
                      no progress for max_stall    only the last ACK is missing:
                                                   reason "unconfirmed")
OACK_SENT / SENDING   repeated RRQ, peer unproven, resend the first datagram       same
                      tries < budget
DONE / FAILED         anything                     ignore                          same
====================  ===========================  ==============================  ==========

``budget`` is ``retries`` once the peer has proven its address, and
``unproven_retries`` before (next section). ``tries`` counts the timer's
resends since the peer last showed it is alive: an ACK that advances, or a
duplicate ACK (next sections but one).

Peers that do not answer
------------------------

Anyone can send an RRQ with someone else's source address, so until the peer's
first ACK arrives from its TID (the proof that it receives our datagrams at
that address) the transfer is **unproven**, and the server treats it as cheap
and suspect. With ``unproven_retries`` set (the trio server sets 1), an
unproven transfer may resend its first datagram that many times -- by the
timer, or at once when the peer repeats its RRQ (its own retry: our datagram
was lost), whichever comes first -- and its timer runs at
``min(timeout, unproven_timeout)`` whatever timeout the peer negotiated. So a
spoofed RRQ reflects at most two datagrams at its victim, and an unproven
transfer holds its slot for two short timeouts. A server can also give its
transfers a shared :class:`ResendBudget`: an unproven transfer that has used
its guaranteed resends may go on up to ``retries`` while the budget has
tokens, so a real client on a lossy link is not dropped after one lost answer,
while a flood of spoofed requests (which drains the budget at once) reflects
at most the budget's rate beyond two datagrams per request. Any ACK from the
peer's TID proves it; from then on ``retries`` is the budget.

Peers that answer but receive nothing
-------------------------------------

A duplicate ACK (of block ``acked`` again) means the peer's timer fired before
our next DATA (or OACK) reached it: the datagram was lost or is late. It is
never answered with a resend -- that would be the Sorcerer's Apprentice -- but
it proves the peer is alive and still waiting, so it resets ``tries``: the
timer keeps resending (at the backed-off timeout) for as long as the peer keeps
re-ACKing, and a transfer that goes on without progress ends only at
``max_stall``. Otherwise a queue that stays full for longer than ``retries``
backed-off timeouts (a boot storm through a drop-tail switch buffer, where a
flow that lost its ACK clock competes with every other flow's ACK-clocked
sends) would make the server give up on a client that is still asking, and a
PXE ROM or pxelinux would wait out its own, longer schedule (pxelinux's ~131 s)
against a closed port and stop for good. ``max_stall`` is also the cap for a
peer that only re-ACKs: it holds its slot no longer than a silent one, and
draws only the timer's resends.

The retransmit timeout
----------------------

With ``rto_min`` set (the trio server sets it), the timeout of a proven peer
adapts: an :class:`~orchestrator.protocols.tftp.rto.RtoEstimator` (RFC 6298:
smoothed round trip and variance) is fed each window's round trip -- never
one over a retransmitted window (Karn's rule: the send time is cleared on every
resend) -- and doubles at each retransmission by the timer, up to ``rto_max``.
``timeout`` is then the RTO before the first sample, and :attr:`ReadTransfer.timeout`
always holds the one in force. A timeout the peer negotiated (RFC 2349) is
honoured as a fixed value, as is ``timeout`` when ``rto_min`` is None. The
unproven timeout (above) does not adapt: there is no sample before the first ACK.

Two more bounds hold for every transfer: a negotiated RFC 2349 timeout above
``timeout_max`` is not honoured (left out of the OACK, which RFC 2347 allows
for any option), and a transfer that has made no progress for ``max_stall``
seconds fails whatever its timeout and retries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from orchestrator.protocols.tftp.constants import DATA, ERR_NOT_DEFINED, ERR_OPTION_NEGOTIATION, MODES, PATH_MTU_BLKSIZE, TIMEOUT_MAX
from orchestrator.protocols.tftp.errors import LocalProtocolError, RemoteProtocolError
from orchestrator.protocols.tftp.negotiate import CLIENT_RCVBUF, negotiate
from orchestrator.protocols.tftp.netascii import NETASCII_MAX, NetasciiSizes, NetasciiSource, Source
from orchestrator.protocols.tftp.packets import HEADER, Ack, Error, ReadRequest, encode_ack, encode_oack, parse_packet
from orchestrator.protocols.tftp.rto import RtoEstimator

__all__ = ["READ_AHEAD", "State", "TransferComplete", "TransferFailed", "Event", "ResendBudget", "ReadTransfer"]


#: Bytes read from the file at a time by :class:`ReadTransfer` (rounded down to
#: whole blocks, at least one block and one window).
READ_AHEAD = 64 * 1024


class ResendBudget:
    """Resends to unproven peers beyond their guaranteed ones, shared by one server's transfers.

    A token bucket (``rate`` resends per second, at most ``burst`` banked);
    pure: the time is passed in. :meth:`take` is called from whichever thread
    drives a transfer; two takes racing can lose an update, which lets one
    more resend through: the bound is approximate by that much.
    """

    __slots__ = ("rate", "burst", "tokens", "_last")

    def __init__(self, rate: float, burst: float) -> None:
        if rate < 0 or burst < 0:
            raise LocalProtocolError("rate and burst must be >= 0")
        self.rate, self.burst, self.tokens = float(rate), float(burst), float(burst)
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """One resend now, if the bucket holds a token."""
        if self._last is not None and now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class State(enum.Enum):
    START = "start"
    OACK_SENT = "oack_sent"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TransferComplete:
    """Every block was acknowledged."""

    bytes: int
    blocks: int
    retransmits: int


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """The transfer ended without the last ACK.

    ``reason``: "timeout" (the peer vanished: retry budget spent), "unconfirmed"
    (the retry budget was spent after *every* block had been sent at least once:
    the client most likely has the file and only its final ACK was lost -- RFC
    1350 section 6 leaves the last ACK unprotected, which is why clients
    "dally"), "aborted" (the peer sent ERROR ``code`` with ``message``), or
    "options_declined": the peer answered our OACK with ERROR 8 before any data
    (RFC 2347 lets a client refuse the options so; UEFI PXE firmware does it on
    purpose after a ``tsize`` probe: it wanted only the size, and asks again). A
    declined OACK moved no data and says nothing about the path: not a failure.
    """

    reason: str
    bytes: int
    retransmits: int
    code: int | None = None
    message: str = ""


Event = Union[TransferComplete, TransferFailed]
_NOTHING: tuple = ()
_TERMINAL = (State.DONE, State.FAILED)
_ACTIVE = (State.OACK_SENT, State.SENDING)


class ReadTransfer:
    """The server side of one read request (see the module docstring for the table).

    ``source`` is anything with ``size`` and ``pread(offset, length)`` (a
    :class:`~orchestrator.bootserver.files.BootFile`). Reading file data through it
    is the one effect this class performs; it never blocks on the network.

    ``timeout`` (seconds) is used unless the client negotiated RFC 2349's (up to
    ``timeout_max``); with ``rto_min`` (and ``rto_max``, default four times
    ``timeout``) it is only the first value of an adaptive timeout ("The
    retransmit timeout" in the module docstring); after ``retries`` consecutive
    timeouts without any sign of the peer (no ACK, not even a duplicate) the
    transfer fails, and after ``max_stall`` seconds without progress whatever the
    retries (None: no bound -- then a peer that keeps re-ACKing holds the
    transfer forever: a server sets it). ``unproven_retries`` and ``unproven_timeout``
    (None: no special case) govern a peer that has not ACKed yet: see "Peers
    that do not answer" in the module docstring.

    Netascii: a file larger than ``netascii_max`` bytes is refused
    (:class:`RemoteProtocolError`, before any read); ``netascii_sizes`` keeps
    converted sizes between transfers.
    """

    def __init__(
        self,
        request: ReadRequest,
        source: Source,
        *,
        blksize_max: int = PATH_MTU_BLKSIZE,
        windowsize_max: int = 64,
        client_rcvbuf: int | None = CLIENT_RCVBUF,
        timeout: float = 1.0,
        retries: int = 5,
        timeout_max: int = TIMEOUT_MAX,
        max_stall: float | None = None,
        unproven_retries: int | None = None,
        unproven_timeout: float | None = None,
        netascii_max: int | None = NETASCII_MAX,
        netascii_sizes: NetasciiSizes | None = None,
        resend_budget: ResendBudget | None = None,
        rto_min: float | None = None,
        rto_max: float | None = None,
    ) -> None:
        if request.mode not in MODES:
            # RFC 1350 section 5 defines netascii, octet and mail; mail is for
            # writes and obsolete. Anything else is an illegal operation.
            raise RemoteProtocolError(f"unsupported transfer mode {request.mode!r}")
        if timeout <= 0 or retries < 0:
            raise LocalProtocolError("timeout must be > 0 and retries >= 0")
        if (max_stall is not None and max_stall <= 0) or (unproven_timeout is not None and unproven_timeout <= 0):
            raise LocalProtocolError("max_stall and unproven_timeout must be > 0")
        if unproven_retries is not None and unproven_retries < 0:
            raise LocalProtocolError("unproven_retries must be >= 0")
        self.request = request
        self.mode = request.mode
        limits = dict(blksize_max=blksize_max, windowsize_max=windowsize_max, client_rcvbuf=client_rcvbuf, timeout_max=timeout_max)
        self.negotiated = negotiate(request.options, tsize=None, **limits)
        self.blksize = self.negotiated.blksize
        if self.mode == "netascii":
            source = self._netascii(source, netascii_max, netascii_sizes)
        self._source = source
        self.size = source.size
        # Renegotiate with the now-known size (tsize must be the converted size).
        self.negotiated = negotiate(request.options, tsize=self.size, **limits)
        self.windowsize = self.negotiated.windowsize
        self.timeout = float(self.negotiated.timeout) if self.negotiated.timeout is not None else float(timeout)
        #: The adaptive timeout's estimator; None when the timeout is fixed (no ``rto_min``, or negotiated).
        self.rto_estimator: RtoEstimator | None = None
        if rto_min is not None and self.negotiated.timeout is None:
            self.rto_estimator = RtoEstimator(self.timeout, rto_min, rto_max if rto_max is not None else max(4 * self.timeout, rto_min))
            self.timeout = self.rto_estimator.rto
        self.retries = retries
        self.max_stall = max_stall
        self._resend_budget = resend_budget
        #: False until the peer's first ACK from its TID (True from the start without an unproven policy).
        self.proven = unproven_retries is None
        self._unproven_retries = min(retries, unproven_retries) if unproven_retries is not None else retries
        self._unproven_timeout = min(self.timeout, unproven_timeout) if unproven_timeout is not None else self.timeout
        #: Absolute index of the final block, which is short (possibly empty):
        #: RFC 1350 section 6, "a data packet of less than 512 bytes signals termination".
        self.last_block = self.size // self.blksize + 1
        self.state = State.START
        self.acked = 0
        self.high = 0
        self.retransmits = 0
        #: Round trips (window sent -> its ACK, never over a retransmitted window:
        #: Karn's rule), summed, and duplicate ACKs (the client's timer fired first):
        #: the boot server's congestion signals, harvested by the shell.
        self.rtt_sum = 0.0
        self.rtt_n = 0
        self.dup_acks = 0
        #: The longest time without progress seen by the retransmit timer, seconds (a lower bound on the
        #: longest stall, short of it by less than one timeout; 0.0 if the timer never fired).
        self.longest_stall = 0.0
        self._sent_at: float | None = None
        self._tries = 0
        self._progress_at = 0.0  # when the transfer last moved: start, or an ACK that advanced
        self._first: bytes | None = None  # the first datagram, resent to an unproven peer
        self._oack = encode_oack(self.negotiated.oack) if self.negotiated.oack else None
        # Read-ahead buffer (see _window): file bytes [_buf_off, _buf_off + len(_buf)).
        self._read_ahead = max(READ_AHEAD // self.blksize, 1) * self.blksize
        self._buf = b""
        self._buf_off = 0
        self._buf_eof = False
        self._mv = memoryview(self._buf)
        #: When to call :meth:`timer` next; None once the transfer is over.
        self.next_deadline: float | None = None

    # -- public API -------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL

    @property
    def bytes_acked(self) -> int:
        return min(max(self.acked, 0) * self.blksize, self.size)

    @property
    def rto(self) -> float:
        """The retransmit timeout in force: the short unproven one until the peer's first ACK."""
        return self.timeout if self.proven else self._unproven_timeout

    def start(self, now: float) -> tuple[list[bytes], tuple]:
        """The first datagram(s): an OACK (RFC 2347) or the first window (RFC 1350)."""
        if self.state is not State.START:
            raise LocalProtocolError("start() called twice")
        self.next_deadline = now + self.rto
        self._sent_at = now
        self._progress_at = now
        if self._oack is not None:
            self.state = State.OACK_SENT
            self.acked = -1  # the OACK is "block 0": RFC 2347 has the client ACK it with 0
            self._first = self._oack
            return [self._oack], _NOTHING
        self.state = State.SENDING
        pkts = self._window(1)
        self._first = pkts[0]  # windowsize > 1 needs an OACK: without one this is the only datagram
        return pkts, _NOTHING

    def repeated_request(self, now: float) -> list[bytes]:
        """The peer sent its RRQ again from the same TID: our first datagram again, or nothing.

        Before its first ACK a peer repeats its RRQ because our first datagram
        (OACK or DATA 1) did not reach it: resend that datagram at once if the
        unproven budget allows -- it is shared with the timer, so a spoofed peer
        still gets at most ``1 + unproven_retries`` datagrams -- and give the
        peer a full timeout to answer. Once the peer has ACKed, a repeated RRQ
        is a stale duplicate: nothing. A resend counts as a retransmission.
        """
        if self.proven or self.state not in _ACTIVE or self._first is None:
            return []
        if self._tries >= self._unproven_retries and not self._extra_resend(self._tries + 1, now):
            return []
        self._tries += 1
        self.retransmits += 1
        self._sent_at = None  # Karn: an ACK after a retransmission is no round-trip sample
        self.next_deadline = self._clamp(now + self.rto)
        return [self._first]

    def datagram(self, data: bytes, now: float) -> tuple[list[bytes], tuple]:
        """A datagram from the peer's TID. Raises RemoteProtocolError for garbage (state unchanged)."""
        state = self.state
        if state is State.START:
            raise LocalProtocolError("datagram() before start()")
        if state in _TERMINAL:
            return [], _NOTHING
        pkt = parse_packet(data)
        if type(pkt) is Ack:
            return self._ack(pkt.block, now)
        if type(pkt) is Error:
            if state is State.OACK_SENT and pkt.code == ERR_OPTION_NEGOTIATION:
                return [], (self._fail("options_declined", pkt.code, pkt.message),)
            return [], (self._fail("aborted", pkt.code, pkt.message),)
        # RRQ, WRQ, DATA, OACK: a read server never expects these on a transfer port.
        # RFC 1350 would allow an ERROR 4 that ends the transfer; ignoring keeps a
        # stray or spoofed packet from killing a good download.
        raise RemoteProtocolError(f"unexpected opcode {(data[0] << 8) | data[1]} on a read transfer")

    def next_block(self, data: bytes, now: float) -> bytes | None:
        """:meth:`datagram` for lock-step's common input, returning its one DATA datagram; else None.

        The common input: in lock-step (windowsize 1), the ACK of the block just
        sent, when that is not the last block. For it this is :meth:`datagram`
        without parsing the ACK into a packet object and without the result
        tuple (the same transition, :meth:`_ack`, runs). For anything else
        (another opcode, a duplicate or unexpected ACK, the final ACK, a window)
        it changes nothing and returns None: call :meth:`datagram`.
        """
        if self.windowsize != 1 or self.state not in _ACTIVE:
            return None
        k = self.high
        if k != self.acked + 1 or k >= self.last_block or data[:4] != encode_ack(k):
            return None
        return self._ack(k & 0xFFFF, now)[0][0]

    # -- a native driver's view (orchestrator/bootserver/_lockstep.c) -------------------
    @property
    def source(self) -> Source:
        """Where file bytes come from (for netascii, the converting wrapper)."""
        return self._source

    @property
    def sent_at(self) -> float | None:
        """When block ``high`` left (None after a retransmission: no round-trip sample)."""
        return self._sent_at

    def forwardable(self) -> bool:
        """True when the next input may be the ACK of a whole window that is not the last one.

        A native driver may then take over :meth:`datagram`'s most common case --
        answer the ACK of block ``high`` (the last of a full window; in lock-step,
        :meth:`next_block`'s case) with the next window, read from
        :attr:`source` -- for as long as that is all that happens, and report it
        with :meth:`fast_forward`. Netascii is excluded: its bytes are converted here.
        """
        return (
            self.mode == "octet" and self.state is State.SENDING
            and self.high == min(self.acked + self.windowsize, self.last_block) and self.high < self.last_block
        )

    def fast_forward(self, acked: int, sent_at: float | None, deadline: float, rtt_sum: float, rtt_n: int) -> None:
        """A native driver did :meth:`datagram`'s work for windows up to the one ending at ``acked``.

        The state is exactly what those ACKs would have left: the window after
        block ``acked`` sent at ``sent_at`` (None after a retransmission, Karn's
        rule), its timer at ``deadline``; ``rtt_sum``/``rtt_n`` are the round
        trips measured on the way.
        """
        if not (self.acked < acked < self.last_block) or self.state is not State.SENDING:
            raise LocalProtocolError(f"fast_forward to block {acked} from acked={self.acked} state={self.state.value}")
        self._tries = 0
        self.proven = True
        self.acked = acked
        self.high = min(acked + self.windowsize, self.last_block)
        self._sent_at = sent_at
        self._progress_at = deadline - self.timeout  # the native loop sets deadline = last ACK + timeout (as loaded)
        self.rtt_sum += rtt_sum
        self.rtt_n += rtt_n
        if self.rto_estimator is not None and rtt_n:
            self.timeout = self.rto_estimator.sample(rtt_sum / rtt_n, rtt_n)
        self.next_deadline = self._progress_at + self.timeout

    def _extra_resend(self, tries: int, now: float) -> bool:
        """May an unproven peer have resend number ``tries`` beyond its guaranteed ones (the shared budget)?"""
        return not self.proven and tries <= self.retries and self._resend_budget is not None and self._resend_budget.take(now)

    def timer(self, now: float) -> tuple[list[bytes], tuple]:
        """Call when ``now >= next_deadline``: retransmit, or give up after ``retries``."""
        if self.state in _TERMINAL or self.state is State.START:
            return [], _NOTHING
        if self.next_deadline is None or now < self.next_deadline:
            return [], _NOTHING
        self._tries += 1
        budget = self.retries if self.proven else self._unproven_retries
        if now - self._progress_at > self.longest_stall:
            self.longest_stall = now - self._progress_at
        stalled = self.max_stall is not None and now >= self._progress_at + self.max_stall
        if stalled or (self._tries > budget and not self._extra_resend(self._tries, now)):
            # Every block went out at least once (so every earlier window was
            # acknowledged): only the final ACK is missing. Not a failure we can prove.
            unconfirmed = self.state is State.SENDING and self.high >= self.last_block
            return [], (self._fail("unconfirmed" if unconfirmed else "timeout"),)
        est = self.rto_estimator
        if est is not None and self.proven:
            self.timeout = est.backoff()  # RFC 6298 (5.5)
        self.next_deadline = self._clamp(now + self.rto)
        self._sent_at = None  # Karn: an ACK after a retransmission is no round-trip sample
        if self.state is State.OACK_SENT:
            pkts = [self._oack]  # type: ignore[list-item]
        else:
            pkts = self._window(self.acked + 1)
        self.retransmits += len(pkts)
        return pkts, _NOTHING

    def restart_timer(self, now: float) -> None:
        """Count the timeout from ``now`` (the shell held the packets back, e.g. rate limiting).

        The ``max_stall`` clock goes on: time held back counts as time without
        progress, so pacing cannot keep a silent peer's transfer alive.
        """
        if self.next_deadline is not None:
            self.next_deadline = now + self.rto
        if self._sent_at is not None:
            self._sent_at = now  # the round trip starts when the packets really leave

    def abort(self, reason: str = "aborted") -> TransferFailed:
        """End the transfer from our side (shutdown); returns the failure event."""
        if self.finished:
            raise LocalProtocolError("abort() on a finished transfer")
        return self._fail(reason)

    # -- internals --------------------------------------------------------------
    def _netascii(self, source: Source, limit: int | None, sizes: NetasciiSizes | None) -> NetasciiSource:
        """``source`` as netascii: refused above ``limit`` before a byte is read; the size from ``sizes`` when known."""
        if limit is not None and source.size > limit:
            raise RemoteProtocolError(f"file too large for netascii mode ({source.size} > {limit} bytes): use octet", ERR_NOT_DEFINED)
        key = getattr(source, "identity", None)
        size = sizes.get(key) if sizes is not None and key is not None else None
        view = NetasciiSource(source, self.blksize, size)
        if size is None and sizes is not None and key is not None:
            sizes.put(key, view.size)
        return view

    def _clamp(self, deadline: float) -> float:
        """``deadline``, or the end of the ``max_stall`` allowance if that comes first."""
        if self.max_stall is not None:
            return min(deadline, self._progress_at + self.max_stall)
        return deadline

    def _ack(self, wire: int, now: float) -> tuple[list[bytes], tuple]:
        """The peer ACKed block number ``wire`` (the 16-bit number on the wire): the one input that moves data."""
        # Any ACK from the peer's TID proves that the peer receives at its address:
        # without our packets a spoofer does not know our new port (RFC 1350 section 4).
        self.proven = True
        k = self._ack_index(wire)
        if k is None:
            if wire == self.acked & 0xFFFF:
                # A duplicate: the peer re-ACKs because our DATA (or OACK) did not reach it. Never a
                # resend (Sorcerer's Apprentice), but proof that it is alive and waiting: the retry
                # count starts again, so only max_stall ends a peer that keeps answering ("Peers that
                # answer but receive nothing" in the module docstring).
                self.dup_acks += 1
                self._tries = 0
            return [], _NOTHING
        self._advance(k, now)
        if k >= self.last_block:
            self.state = State.DONE
            self.next_deadline = None
            return [], (TransferComplete(self.size, self.last_block, self.retransmits),)
        self.state = State.SENDING
        self.next_deadline = now + self.timeout
        return self._window(k + 1), _NOTHING

    def _advance(self, k: int, now: float) -> None:
        """The client acknowledged up to block ``k``: progress, and a round-trip sample (Karn)."""
        self._tries = 0
        self.proven = True
        self._progress_at = now
        self.acked = k
        sent = self._sent_at
        if sent is not None:
            self.rtt_sum += now - sent
            self.rtt_n += 1
            if self.rto_estimator is not None:
                self.timeout = self.rto_estimator.sample(now - sent)
        self._sent_at = now

    def _ack_index(self, wire: int) -> int | None:
        """Map an ACK's 16-bit block number to the absolute block it acknowledges.

        Block numbers roll over past 65535 (files over 32 MB at blksize 512). RFC
        1350 does not say to what; tftp-hpa, curl, busybox, atftp and iPXE all
        continue at 0, and so do we (``block & 0xFFFF``). Because at most 65535
        blocks are outstanding (RFC 7440's windowsize limit), the absolute block is
        the one in ``acked .. acked + 65535`` with that residue -- unambiguous.

        Returns None for an ACK that does not advance: a duplicate (``<= acked``,
        the Sorcerer's Apprentice case) or a block never sent (``> high``).
        """
        k = self.acked + ((wire - self.acked) & 0xFFFF)
        if k == self.acked or k > self.high:
            return None
        return k

    def _window(self, first: int) -> list[bytes]:
        """DATA packets for blocks ``first .. first+windowsize-1`` (at most the last one).

        File data comes from a read-ahead buffer of at least :data:`READ_AHEAD`
        bytes (and at least one window), so a lock-step transfer does one
        ``pread`` per 64 KiB instead of one per block; retransmissions are served
        from it too. Windows only move forward (``acked`` only grows), so a refill
        always starts at a block boundary at or after the previous read -- which
        :class:`NetasciiSource` requires. Each packet is one allocation (header +
        payload slice of a memoryview).
        """
        bs = self.blksize
        last = first + self.windowsize - 1
        if last > self.last_block:
            last = self.last_block
        off = (first - 1) * bs
        end = last * bs
        boff = self._buf_off
        if off < boff or (end > boff + len(self._buf) and not self._buf_eof):
            want = max(end - off, self._read_ahead)
            self._buf = self._source.pread(off, want)
            self._buf_off = boff = off
            self._buf_eof = len(self._buf) < want
            self._mv = memoryview(self._buf)
        mv = self._mv
        pack = HEADER.pack
        pkts = []
        pos = off - boff
        for blk in range(first, last + 1):
            chunk = mv[pos : pos + bs]
            pkts.append(pack(DATA, blk & 0xFFFF) + chunk)  # encode_data(), without a call per block
            pos += bs
            if len(chunk) < bs:
                # Short before the planned end: the file shrank while being served.
                # This short block now ends the transfer (RFC 1350 section 6).
                self.last_block = last = blk
                break
        if last > self.high:
            self.high = last
        return pkts

    def _fail(self, reason: str, code: int | None = None, message: str = "") -> TransferFailed:
        self.state = State.FAILED
        self.next_deadline = None
        return TransferFailed(reason, self.bytes_acked, self.retransmits, code, message)

