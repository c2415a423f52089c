"""The TFTP transfer engine: drives every :class:`~orchestrator.protocols.tftp.ReadTransfer` of one server.

The server (:mod:`orchestrator.bootserver.tftp`) decides once per request who
may download what; this engine then owns the transfer's socket (its TID) and
runs its sans-IO core until the transfer ends. A transfer is driven by one of
three drivers, all running the same code below for what they receive:

* **The epoll thread** (``mode="thread"``, the default on a real clock). Each
  transfer socket is registered **once** in a level-triggered
  :class:`select.epoll` of our own (``EPOLLIN``; ``EPOLLOUT`` only while a send
  is blocked by a full socket buffer), so waiting costs no ``epoll_ctl``.
  Retransmit deadlines live in one **timer heap**, lazily: a transfer keeps at
  most one heap entry; an ACK that moves its deadline later costs nothing, and
  the stale entry is re-pushed at the real deadline when it pops. One dedicated
  OS thread blocks in ``epoll.poll(timeout)``; per packet the Python work is
  poll, ``recvfrom``, the core and ``sendto``, with no trio at all.
* **Transfer threads.** The first :data:`TRANSFER_THREADS` transfers get an OS
  thread of their own (lock-step ones always; windowed ones only when the
  native loop is built, since a Python thread per window gains nothing over
  the epoll thread). Lock-step is one round trip per block, so there the
  server's latency per ACK is the throughput: the thread blocks in
  ``recvfrom`` (``SO_RCVTIMEO`` is the retransmit timer), with no
  ``epoll_wait`` and no dispatch. When the native loop is built
  (``_lockstep.c`` via :mod:`~orchestrator.bootserver.lockstep_native`) and the
  core is :meth:`~orchestrator.protocols.tftp.ReadTransfer.forwardable`, the
  thread is inside that C loop instead: ``recvfrom``, one compare, ``sendmsg``
  of the next block or GSO window, without the engine lock or the GIL, for as
  long as each datagram is the ACK that ends the current whole window. It
  polls without blocking until the ACK is due before it sleeps (a wakeup
  costs most of a loopback round trip; ``_lockstep.c`` says how it learns
  when). Anything else it hands back, and the state is copied back into the
  core (``ReadTransfer.fast_forward``) after every return, at least every
  :data:`~orchestrator.bootserver.lockstep_native.SLICE` seconds. More threads
  than that would only compete for two cores, so later transfers share the
  epoll thread.
* **A trio task** (``mode="trio"``): it waits on the epoll's file descriptor
  with ``wait_readable`` and reads time from trio's clock. The server picks it
  when time is not real (``trio.testing.MockClock``: a thread could not follow
  a virtual clock, and tests of timeouts rely on one) and when the admission
  object has a byte-rate budget (its token bucket is not thread-safe, and
  pacing needs ``try_consume`` before every send). No transfer threads then.

**One datagram handler.** Whatever received a datagram -- ``recvfrom`` on the
epoll path, ``recvfrom`` in a transfer thread, or a hand-back from the C loop --
it goes through :meth:`TransferEngine._on_datagram`: the TID check (RFC 1350
section 4: a stranger gets ERROR 5 and the transfer carries on), the core's
lock-step entry (:meth:`~orchestrator.protocols.tftp.ReadTransfer.next_block`),
else :meth:`~orchestrator.protocols.tftp.ReadTransfer.datagram`, and the
transfer's end. A due retransmit timer goes through
:meth:`TransferEngine._timer` whichever driver noticed it.

**Sending.** A whole window of equal-sized DATA datagrams goes out with one
``sendmsg`` using **UDP GSO** (``UDP_SEGMENT``, Linux 4.18+): the kernel cuts
the buffer into datagrams, so a window of 44 blocks costs one syscall instead of
44. Paths that cannot do it (``EIO``: no checksum offload; ``EMSGSIZE``: a block
bigger than the MTU; ``EINVAL``, ``ENOPROTOOPT``, ``EOPNOTSUPP``) turn GSO off
for that transfer, and it sends one by one (IP fragments what is too big).

**Results go back to trio in batches**: counter deltas, admission accounting
(``note_sent``/``note_retransmits``, round trips, duplicate ACKs) and finished
transfers are collected under the engine's lock (:class:`_Tally`) and applied in
the trio thread by one ``run_sync_soon`` callback -- at once when a transfer ends
(so a transfer's counters are in :class:`~orchestrator.bootserver.tftp.TftpCounters` before its
FILE_DONE/FILE_FAILED event), otherwise at most every :data:`FLUSH_INTERVAL`
seconds. Only the trio thread ever writes the counters object or calls the
admission object.

**Locking**: one :class:`threading.Lock` guards the maps, the heap and every
transfer's core. The epoll thread holds it while it processes a batch of ready
sockets and timers, a transfer thread while it handles one datagram or
timeout (neither while blocked in a syscall, nor while inside the C loop); the
trio side takes it to add or remove a transfer, and to resend a transfer's
first datagram when its client repeats its request
(:meth:`TransferEngine.repeated_request`). :meth:`TransferEngine.remove`
returns only once the engine will never touch that transfer's socket or core
again, so the caller may close the file right after: a transfer thread is
woken with ``shutdown()`` (closing an fd another thread is blocked on is
unsafe, the number may be reused at once) and joined, and it closes its own
socket. On cancellation every thread is stopped and joined the same way before
:func:`~orchestrator.bootserver.tftp.serve_tftp` returns.

The retransmit timeout is the core's (:attr:`~orchestrator.protocols.tftp.ReadTransfer.timeout`,
adaptive when the server asks for it: RFC 6298's estimator in
:mod:`orchestrator.protocols.tftp.rto`); every driver reads it from the core
after each step, and the native loop gets it again on each :meth:`~orchestrator.bootserver.lockstep_native.Driver.load`.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import os
import select
import socket
import threading
import time
from typing import Any, Callable

import trio

from orchestrator.bootserver import lockstep_native
from orchestrator.protocols import tftp as proto

__all__ = ["TransferEngine", "Transfer", "FLUSH_INTERVAL", "TRANSFER_THREADS"]

log = logging.getLogger("orchestrator.bootserver.tftp")

#: On a transfer socket only ACK (4 bytes) and ERROR matter; a larger datagram is
#: truncated by the kernel, which is harmless (an ERROR's message is cut).
_TRANSFER_BUFSIZE = 1024
#: Seconds between counter flushes to trio while transfers run.
FLUSH_INTERVAL = 0.25
#: Transfers that get an OS thread of their own in thread mode (see
#: :meth:`TransferEngine._transfer_thread_main`); the rest share the epoll thread.
TRANSFER_THREADS = 2
#: Datagrams read from one socket per wakeup (level-triggered: the rest wait).
_READ_BATCH = 8
#: Linux UDP_SEGMENT (include/uapi/linux/udp.h) and its per-call segment cap.
UDP_SEGMENT = 103
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000  # under IPv4's 65507-byte UDP payload limit
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLERR = select.EPOLLERR
#: Back-off when the kernel says ENOBUFS (a full qdisc): try again in 1 ms.
_NOBUFS_BACKOFF = 0.001


class Transfer:
    """One transfer inside the engine. The server reads ``outcome`` once ``done`` is set."""

    __slots__ = (
        "addr", "core", "sock", "fd", "held", "hold_until", "paced", "epollout", "heap_at",
        "gso", "closed", "outcome", "error", "done", "cookie", "thread",
        "reported_rtt_sum", "reported_rtt_n", "reported_dup_acks",
    )

    def __init__(self, addr: tuple[str, int], core: proto.ReadTransfer, sock: socket.socket, done: Any, cookie: Any) -> None:
        self.addr = addr
        self.core = core
        self.sock = sock
        self.fd = sock.fileno()
        self.held: list[bytes] | None = None  # packets waiting for the byte budget or the socket buffer
        self.hold_until: float | None = None  # when to try ``held`` again (None: on EPOLLOUT)
        self.paced = False  # ``held`` was paced by the byte budget: restart the core's timer on release
        self.epollout = False  # EPOLLOUT is registered for this socket (a send is waiting for room)
        self.heap_at: float | None = None  # the deadline of this transfer's one valid heap entry
        self.gso = True
        self.closed = False
        #: ``None`` for success, a :class:`~orchestrator.protocols.tftp.TransferFailed`,
        #: or "error" with ``error`` set (an exception inside the transfer).
        self.outcome: proto.TransferFailed | str | None = None
        self.error: BaseException | None = None
        self.done = done
        self.cookie = cookie
        #: The transfer's own OS thread (see TRANSFER_THREADS), else None: the epoll thread or the trio task drives it.
        self.thread: threading.Thread | None = None
        #: The core's round-trip and duplicate-ACK tallies already handed to admission (see ``_harvest``).
        self.reported_rtt_sum = 0.0
        self.reported_rtt_n = 0
        self.reported_dup_acks = 0


class _Tally:
    """What happened since the last flush to trio: counter deltas, named as in ``TftpCounters``, and ended transfers."""

    __slots__ = ("packets_in", "packets_out", "bytes_out", "malformed", "retransmits", "wrong_tid", "finished")

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_out = 0  # DATA bytes sent (admission's note_sent), not a TftpCounters field
        self.malformed = 0
        self.retransmits = 0
        self.wrong_tid = 0
        self.finished: list[Transfer] = []

    def __bool__(self) -> bool:
        # Every other delta comes with one of these (a malformed or wrong-TID datagram
        # was received; a retransmit or a byte was sent).
        return bool(self.packets_in or self.packets_out or self.retransmits or self.finished)


class TransferEngine:
    """Drives every :class:`~orchestrator.protocols.tftp.ReadTransfer` of one server.

    ``counters`` is the server's :class:`~orchestrator.bootserver.tftp.TftpCounters`
    (written only from the trio thread, in :meth:`_apply`); ``admission`` gets
    ``note_sent``/``note_retransmits`` in batches and, in trio mode only,
    ``try_consume`` before each send. ``on_done(transfer)`` runs in the trio
    thread when a transfer ends by itself.
    """

    def __init__(self, *, mode: str, counters: Any, admission: Any, on_done: Callable[[Transfer], None]) -> None:
        if mode not in ("thread", "trio"):
            raise ValueError(f"engine mode must be 'thread' or 'trio', not {mode!r}")
        self.mode = mode
        self._apply_at_once = mode == "trio"  # we are in the trio thread: no handing over
        self._counters = counters
        self._admission = admission
        #: admission.try_consume(nbytes, now) -> seconds to wait, when sends are paced by a byte budget (trio mode only).
        self._consume_bytes = admission.try_consume if (admission is not None and mode == "trio" and getattr(admission, "rate", None) is not None) else None
        self._note_sent = getattr(admission, "note_sent", None) if admission is not None else None
        self._note_retransmits = getattr(admission, "note_retransmits", None) if admission is not None else None
        self._on_done = on_done
        self._clock: Callable[[], float] = time.monotonic if mode == "thread" else trio.current_time
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _EPOLLIN)
        self._by_fd: dict[int, Transfer] = {}  # transfers driven by the epoll (thread or trio task)
        self._threaded: set[Transfer] = set()  # transfers on a thread of their own
        self._heap: list[tuple[float, int, Transfer]] = []
        self._seq = itertools.count()
        self._stopping = False
        #: Set once :meth:`run` has ended: :meth:`add` must not be called any more.
        self.closed = False
        self._wait_scope: trio.CancelScope | None = None  # the trio driver's wait (trio mode)
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._tally = _Tally()  # guarded by the lock
        self._last_flush = -math.inf
        self.transfer_threads = TRANSFER_THREADS
        #: Transfer threads run the C loop of ``_lockstep.c`` when it was built.
        self.native = lockstep_native.AVAILABLE

    # -- the trio side ---------------------------------------------------------------

    def add(self, addr: tuple[str, int], core: proto.ReadTransfer, bind_host: str, family: socket.AddressFamily, done: Any, cookie: Any = None) -> Transfer:
        """Open the transfer's socket (a new TID, RFC 1350 section 4), start the core, send its first packets."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((bind_host, 0))
        except BaseException:
            sock.close()
            raise
        x = Transfer(addr, core, sock, done, cookie)
        own_thread = (self.mode == "thread" and (core.windowsize == 1 or self.native) and self._consume_bytes is None
                      and len(self._threaded) < self.transfer_threads)
        with self._lock:
            if own_thread:
                # A blocking socket whose recvfrom times out after the retransmit
                # timeout (the short one until the client's first ACK: ReadTransfer.rto).
                sock.setblocking(True)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(core.rto))
                # A send never blocks for long while this thread holds the lock.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0.05))
                x.thread = threading.Thread(target=self._transfer_thread_main, args=(x,), name="tftp-transfer", daemon=True)
                self._threaded.add(x)
            else:
                self._by_fd[x.fd] = x
                self._epoll.register(x.fd, _EPOLLIN)
            now = self._clock()
            try:
                pkts, _ = core.start(now)
                self._send(x, pkts, now)
                self._schedule(x)
            except Exception as e:  # noqa: BLE001 - e.g. EIO on the first read: this transfer fails
                self._crash(x, e)
            self._flush_locked(now, force=self._apply_at_once)
            if x.thread is not None and not x.closed:
                x.thread.start()
        self._rewait(x)
        return x

    def repeated_request(self, x: Transfer) -> None:
        """The client of ``x`` sent its RRQ again: resend the first datagram if the core says so.

        From the trio thread. The datagram leaves from the transfer's own socket
        (its TID). A transfer thread may be blocked in ``recvfrom`` on that
        socket meanwhile, in Python or in the native loop, which is fine:
        sending does not disturb it, a deadline that moved later only makes its
        next wakeup find nothing due, and the native loop writes the core back
        only after ACKs (``fast_forward``), which supersede the resend (its one
        round-trip sample may then count from the first send).
        """
        with self._lock:
            if x.closed:
                return
            now = self._clock()
            pkts = x.core.repeated_request(now)
            if not pkts:
                return
            self._tally.retransmits += len(pkts)
            self._send(x, pkts, now)
            self._schedule(x)
            self._flush_locked(now, force=self._apply_at_once)
        # A send held back (full buffer, byte budget) may have an earlier due time
        # than the driver is waiting for: let it recompute.
        self._rewait(x)

    def supersede(self, x: Transfer) -> None:
        """The client of ``x`` sent another request from the same port: it moved on. End ``x`` now.

        From the trio thread. The core ends with reason ``"superseded"``; the
        transfer is handed back like any other ending, so its task retires it at
        once and the new request can start (:class:`~orchestrator.bootserver.tftp.TftpServer`).
        """
        with self._lock:
            if x.closed:
                return
            self._finish(x, x.core.abort("superseded"))
            self._flush_locked(self._clock(), force=True)

    def reap(self) -> None:
        """From the trio thread: handle what the epoll reports ready now, and hand back finished transfers at once.

        The server calls it when a request finds every slot taken: the final
        ACK of a transfer may sit unread on its socket (a client sends its next
        request right after it), or be read but not yet handed over; either way
        its slot is freed (``on_done``) before the request is judged. Wakeups
        meant for the epoll thread are left for it. The counter deltas of running
        transfers stay for the regular flush: this costs one ``epoll_wait(0)``
        plus the ready sockets, not a pass over every transfer.
        """
        if self.closed:
            return
        with self._lock:
            now = self._clock()
            events = [(fd, ev) for fd, ev in self._epoll.poll(0) if fd != self._wake_fd]
            self._process(events, now, flush=False)
            tally = self._tally
            if not tally.finished:
                return
            self._last_flush = now
            rtt_sum, rtt_n, dups = self._harvest()
            self._tally = _Tally()
        self._apply((tally, rtt_sum, rtt_n, dups))

    def _rewait(self, x: Transfer) -> None:
        """After ``x`` was added or changed from the trio side: make its driver wait for its new due time."""
        if x.thread is not None:
            pass  # its own thread keeps its own time (SO_RCVTIMEO)
        elif self.mode == "thread":
            os.eventfd_write(self._wake_fd, 1)  # the epoll thread recomputes its poll timeout
        elif self._wait_scope is not None and x.heap_at is not None and x.heap_at < self._wait_scope.deadline:
            self._wait_scope.deadline = x.heap_at

    def remove(self, x: Transfer) -> None:
        """Forget ``x`` (idempotent): close its socket; the engine will not touch it again."""
        with self._lock:
            self._drop(x)
        self._join(x)

    def _join(self, x: Transfer) -> None:
        # A transfer thread closes its socket on the way out; _drop woke it
        # (shutdown), so this returns within microseconds.
        t = x.thread
        if t is not None and t.ident is not None and t is not threading.current_thread():
            t.join()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine until cancelled; every socket is closed on the way out."""
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            if self.mode == "thread":
                await self._run_thread(task_status)
            else:
                await self._run_trio(task_status)
        finally:
            self.closed = True
            with self._lock:
                for x in list(self._by_fd.values()) + list(self._threaded):
                    self._drop(x)
            for x in list(self._threaded):
                self._join(x)
            self._epoll.close()
            os.close(self._wake_fd)

    async def _run_thread(self, task_status: Any) -> None:
        token = self._trio_token
        assert token is not None
        finished = trio.Event()
        box: list[Any] = []

        def deliver(outcome: Any) -> None:
            box.append(outcome)
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:  # pragma: no cover - the run is gone anyway
                pass

        running = trio.Event()

        def main() -> None:
            # started() only once the thread runs: trio's thread cache names a
            # worker "tftp-engine" when the worker picks the job up, not before.
            token.run_sync_soon(running.set)
            self._epoll_thread_main()

        trio.lowlevel.start_thread_soon(main, deliver, name="tftp-engine")
        try:
            await running.wait()
            task_status.started()
            await finished.wait()
        finally:
            # Cancelled (server shutdown) or the thread died: stop it and wait for it,
            # shielded, so no socket is closed under its feet. It wakes at once.
            self._stopping = True
            os.eventfd_write(self._wake_fd, 1)
            with trio.CancelScope(shield=True):
                await finished.wait()
        box[0].unwrap()  # a bug in the loop itself surfaces here

    async def _run_trio(self, task_status: Any) -> None:
        task_status.started()
        epfd = self._epoll.fileno()
        while True:
            with self._lock:
                deadline = self._wake_deadline()
            with trio.CancelScope(deadline=deadline) as scope:
                self._wait_scope = scope
                await trio.lowlevel.wait_readable(epfd)
            self._wait_scope = None
            events = self._epoll.poll(0)
            with self._lock:
                self._process(events, trio.current_time())
            # At least one checkpoint per loop, so a flood cannot starve trio.
            await trio.lowlevel.checkpoint()

    # -- the epoll thread --------------------------------------------------------------

    def _epoll_thread_main(self) -> None:
        epoll, lock, clock = self._epoll, self._lock, time.monotonic
        with lock:
            wake = self._wake_deadline()
        while not self._stopping:
            events = epoll.poll(-1.0 if wake == math.inf else max(0.0, wake - clock()))
            with lock:
                self._process(events, clock())
                wake = self._wake_deadline()

    # -- a transfer thread ---------------------------------------------------------------

    def _transfer_thread_main(self, x: Transfer) -> None:
        """Drive one transfer on its own thread.

        While the native loop is built and the core is
        :meth:`~orchestrator.protocols.tftp.ReadTransfer.forwardable`, the
        thread is inside the C loop (no lock, no GIL) and comes back for
        whatever the loop hands back, a receive timeout, or every slice.
        Otherwise (no library, netascii, an in-memory file, or the OACK and
        final-ACK steps) it blocks in ``recvfrom`` (``SO_RCVTIMEO`` is the time
        left until the core's deadline). Either way, what it received goes
        through :meth:`_on_datagram` and a due deadline through :meth:`_timer`,
        as on the epoll path, under the same lock.
        """
        sock, core, lock, clock = x.sock, x.core, self._lock, time.monotonic
        rcvtimeo = core.timeout
        drv = lockstep_native.Driver.for_transfer(core, sock, x.addr) if self.native else None
        try:
            while True:
                data = src = None
                in_c = False
                if drv is not None:
                    with lock:
                        if x.closed:
                            return
                        in_c = core.forwardable()
                        if in_c:
                            drv.load()
                if in_c:
                    assert drv is not None
                    drv.loop_state.gso = x.gso
                    code = drv.run()
                    with lock:
                        if x.closed:  # ended (superseded, cancelled) while the C loop ran: its core takes nothing more
                            return
                        x.gso = bool(drv.loop_state.gso)
                        acks_in, blocks_out, bytes_out = drv.store()
                        tally = self._tally
                        tally.packets_in += acks_in
                        tally.packets_out += blocks_out
                        tally.bytes_out += bytes_out
                        if code == lockstep_native.SLICE_CODE:
                            if not x.closed:
                                self._flush_locked(clock(), force=False)
                            continue
                    if code == lockstep_native.HANDOFF:
                        data, src = drv.handed_off()
                else:
                    try:
                        data, src = sock.recvfrom(_TRANSFER_BUFSIZE)
                    except OSError:  # BlockingIOError: SO_RCVTIMEO expired; ECONNREFUSED: an ICMP error
                        pass
                with lock:
                    if x.closed:
                        return
                    now = clock()
                    try:
                        if src is not None:
                            self._on_datagram(x, data, src, now)  # type: ignore[arg-type]
                        deadline = core.next_deadline
                        if deadline is not None and now >= deadline and not x.closed:
                            self._timer(x, now)
                    except Exception as e:  # noqa: BLE001 - e.g. EIO reading the file
                        self._crash(x, e)
                    self._flush_locked(now, force=False)
                    if x.closed:
                        return
                    deadline = core.next_deadline
                # Stray datagrams must not postpone the timer: wait only what is left.
                if deadline is not None:
                    left = max(deadline - clock(), 0.001)
                    if abs(left - rcvtimeo) > 0.002:
                        rcvtimeo = left
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
        finally:
            with lock:
                self._threaded.discard(x)
                if not x.closed:  # a bug above: the transfer must still end
                    self._crash(x, RuntimeError("transfer thread ended early"))
                    self._flush_locked(clock(), force=True)
            x.sock.close()

    # -- shared by every driver (lock held) ----------------------------------------------

    def _wake_deadline(self) -> float:
        wake = self._heap[0][0] if self._heap else math.inf
        if self._tally:
            wake = min(wake, self._last_flush + FLUSH_INTERVAL)
        return wake

    def _process(self, events: list[tuple[int, int]], now: float, flush: bool = True) -> None:
        """Handle what epoll reported ready, then the timers that are due, then flush (unless ``flush`` is False)."""
        by_fd = self._by_fd
        for fd, ev in events:
            x = by_fd.get(fd)
            if x is None:
                if fd == self._wake_fd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                continue  # a transfer removed since poll() returned
            try:
                if ev & _EPOLLOUT and x.held is not None and x.hold_until is None:
                    held, x.held = x.held, None
                    self._write(x, held, now)
                if x.epollout and x.held is None and not x.closed:
                    # Room again and nothing waits: stop asking for EPOLLOUT (level-triggered,
                    # it would report every poll and spin the thread while the socket is writable).
                    x.epollout = False
                    self._epoll.modify(x.fd, _EPOLLIN)
                if ev & (_EPOLLIN | _EPOLLERR) and not x.closed:
                    self._readable(x, now)
            except Exception as e:  # noqa: BLE001 - e.g. EIO reading the file: this transfer fails, the server lives on
                self._crash(x, e)
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, x = heapq.heappop(heap)
            if x.heap_at != d or x.closed:
                continue  # a stale entry
            x.heap_at = None
            try:
                self._timer(x, now)
            except Exception as e:  # noqa: BLE001
                self._crash(x, e)
            if not x.closed:
                self._schedule(x)
        if flush:
            self._flush_locked(now, force=self._apply_at_once)

    def _readable(self, x: Transfer, now: float) -> None:
        """Read ``x``'s socket (epoll path) until one datagram reached the core, or nothing is left."""
        sock = x.sock
        for _ in range(_READ_BATCH):
            try:
                data, src = sock.recvfrom(_TRANSFER_BUFSIZE)
            except BlockingIOError:
                return
            except OSError:  # e.g. ECONNREFUSED left by an ICMP error: nothing to read
                continue
            if self._on_datagram(x, data, src, now):
                # One datagram from the client per wakeup: the next ACK is usually a
                # round trip away, and a recvfrom that fails with EAGAIN costs more
                # than letting the level-triggered poll() report a queued one.
                return

    def _on_datagram(self, x: Transfer, data: bytes, src: tuple, now: float) -> bool:
        """One datagram received on ``x``'s socket, whoever received it. True if the core took it.

        False for a datagram from another address (answered with ERROR 5) or one
        the core calls garbage (counted as malformed): neither changes the transfer.
        """
        self._tally.packets_in += 1
        addr = x.addr
        if src[0] != addr[0] or src[1] != addr[1]:
            # RFC 1350 section 4: "If a source TID does not match, the packet
            # should be discarded as erroneously sent from somewhere else. An
            # error packet should be sent to the source of the incorrect
            # packet, while not disturbing the transfer."
            self._tally.wrong_tid += 1
            try:
                x.sock.sendto(_ERR_UNKNOWN_TID, src)
                self._tally.packets_out += 1
            except OSError:
                pass
            return False
        core = x.core
        if x.held is None:
            pkt = core.next_block(data, now)  # lock-step's common case, without the lists
            if pkt is not None:
                self._write(x, [pkt], now)  # the deadline moved later: the lazy heap copes
                return True
        try:
            pkts, evs = core.datagram(data, now)
        except proto.RemoteProtocolError:
            self._tally.malformed += 1
            return False
        if pkts:
            self._send(x, pkts, now)
        if not self._finish_core(x, evs):
            self._schedule(x)
        return True

    def _timer(self, x: Transfer, now: float) -> None:
        """Release held packets, or let the core retransmit or give up, if that is due."""
        if x.held is not None and x.hold_until is not None:
            if now >= x.hold_until:
                held, x.held, x.hold_until = x.held, None, None
                self._send(x, held, now)
            return  # while packets are held back, the core's timer waits (as it did awaiting admission)
        if x.held is not None:
            return  # waiting for EPOLLOUT
        core = x.core
        if core.next_deadline is None or now < core.next_deadline:
            return
        pkts, evs = core.timer(now)
        if pkts:
            self._tally.retransmits += len(pkts)
            self._send(x, pkts, now)
        self._finish_core(x, evs)

    def _schedule(self, x: Transfer) -> None:
        """Make sure ``x`` has a heap entry no later than its next due time."""
        if x.closed or x.thread is not None:
            return  # a transfer thread runs its own timer
        if x.held is not None:
            due = x.hold_until  # None: waiting for EPOLLOUT, no timer
        else:
            due = x.core.next_deadline
        if due is None:
            return
        if x.heap_at is not None and x.heap_at <= due:
            return
        x.heap_at = due
        heapq.heappush(self._heap, (due, next(self._seq), x))

    # -- sending -------------------------------------------------------------------------

    def _send(self, x: Transfer, pkts: list[bytes], now: float) -> None:
        if x.held is not None:
            # Something is already held back: the core has moved on, and what it
            # just returned (a newer window) supersedes it.
            x.held = pkts
            return
        if self._consume_bytes is not None:
            nbytes = sum(map(len, pkts))
            wait = self._consume_bytes(nbytes, now)
            if wait > 0:
                # At least 1 us: a float-rounding remainder must still move the clock.
                x.held, x.hold_until, x.paced = pkts, now + max(wait, 1e-6), True
                self._schedule(x)
                return
            if x.paced:
                x.paced = False
                x.core.restart_timer(now)
        self._write(x, pkts, now)

    def _write(self, x: Transfer, pkts: list[bytes], now: float) -> None:
        sock, addr, tally = x.sock, x.addr, self._tally
        n = len(pkts)
        i = 0
        if n > 2 and x.gso:
            seg = len(pkts[0])
            # A window: every DATA but the last is full-sized (the core's invariant).
            if len(pkts[-2]) == seg and len(pkts[-1]) <= seg:
                per = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // seg)
                if per >= 2:
                    cmsg = [(_SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, "little"))]
                    while n - i >= 2:
                        j = min(i + per, n)
                        batch = pkts[i:j]
                        try:
                            sock.sendmsg(batch, cmsg, 0, addr)
                        except BlockingIOError:
                            return self._hold_for_room(x, pkts[i:])
                        except OSError as e:
                            if e.errno == errno.ENOBUFS:
                                return self._hold_a_moment(x, pkts[i:], now)
                            if e.errno in (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                                x.gso = False  # this path cannot segment: one by one from here on
                                break
                            # ECONNREFUSED and friends: lost, the retransmit timer copes.
                            tally.packets_out += j - i
                            i = j
                            continue
                        tally.packets_out += len(batch)
                        tally.bytes_out += sum(map(len, batch))
                        i = j
        while i < n:
            pkt = pkts[i]
            try:
                sock.sendto(pkt, addr)
            except BlockingIOError:
                return self._hold_for_room(x, pkts[i:])
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return self._hold_a_moment(x, pkts[i:], now)
                # ECONNREFUSED (ICMP port unreachable from an earlier packet) and
                # friends: the packet is lost; the retransmit timer copes.
            tally.packets_out += 1
            tally.bytes_out += len(pkt)
            i += 1
        return None

    def _hold_for_room(self, x: Transfer, rest: list[bytes]) -> None:
        if x.thread is not None:
            return  # a transfer thread's socket (SO_SNDTIMEO expired): lost, the timer copes
        x.held, x.hold_until = rest, None
        if not x.epollout:
            x.epollout = True
            self._epoll.modify(x.fd, _EPOLLIN | _EPOLLOUT)

    def _hold_a_moment(self, x: Transfer, rest: list[bytes], now: float) -> None:
        if x.thread is not None:
            return  # a transfer thread's socket: lost, its timer copes
        x.held, x.hold_until = rest, now + _NOBUFS_BACKOFF
        self._schedule(x)

    # -- endings -------------------------------------------------------------------------

    def _finish_core(self, x: Transfer, evs: tuple) -> bool:
        """If the core ended the transfer (its one event), finish it: success, or the failure it names."""
        if not evs:
            return False
        ev = evs[0]
        self._finish(x, ev if isinstance(ev, proto.TransferFailed) else None)
        return True

    def _finish(self, x: Transfer, outcome: proto.TransferFailed | str | None) -> None:
        x.outcome = outcome
        self._drop(x)
        self._tally.finished.append(x)

    def _crash(self, x: Transfer, e: BaseException) -> None:
        log.error("tftp: transfer of %r to %s:%s failed", x.core.request.filename, *x.addr[:2], exc_info=e)
        x.error = e
        if not x.closed:
            self._finish(x, "error")

    def _drop(self, x: Transfer) -> None:
        if x.closed:
            return
        x.closed = True
        x.held = None
        if x.thread is not None:
            if x.thread is threading.current_thread() or x.thread.ident is None:
                self._threaded.discard(x)
                x.sock.close()
            else:
                # Its thread may be blocked in recvfrom on this socket: closing the fd
                # under it is unsafe (the number can be reused at once). shutdown()
                # wakes it (Linux, even on an unconnected UDP socket, answers
                # ENOTCONN but wakes the reader); the thread closes the socket.
                try:
                    x.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        if self._by_fd.get(x.fd) is x:
            del self._by_fd[x.fd]
            try:
                self._epoll.unregister(x.fd)
            except (OSError, ValueError):
                pass
        x.sock.close()

    # -- handing results to trio ---------------------------------------------------------

    def _flush_locked(self, now: float, *, force: bool) -> None:
        tally = self._tally
        if not (force or tally.finished or now - self._last_flush >= FLUSH_INTERVAL):
            return
        if not tally:
            return
        self._last_flush = now
        rtt_sum, rtt_n, dups = self._harvest()
        self._tally = _Tally()
        batch = (tally, rtt_sum, rtt_n, dups)
        if self.mode == "trio":
            self._apply(batch)
            return
        assert self._trio_token is not None
        try:
            self._trio_token.run_sync_soon(self._apply, batch)
        except trio.RunFinishedError:  # pragma: no cover - shutting down
            pass

    def _harvest(self) -> tuple[float, int, int]:
        """Round-trip time and duplicate ACKs since the last flush, over every transfer (lock held).

        O(transfers) per flush (every FLUSH_INTERVAL at most), nothing per packet:
        the cores keep running sums; the C loop updates its own without the
        lock, and a sum read a packet early only shifts it to the next flush.
        """
        rtt_sum, rtt_n, dups = 0.0, 0, 0
        for group in (self._by_fd.values(), self._threaded, self._tally.finished):
            for x in group:
                c = x.core
                s, n, d = c.rtt_sum, c.rtt_n, c.dup_acks
                if n != x.reported_rtt_n:
                    rtt_sum += s - x.reported_rtt_sum
                    rtt_n += n - x.reported_rtt_n
                    x.reported_rtt_sum, x.reported_rtt_n = s, n
                if d != x.reported_dup_acks:
                    dups += d - x.reported_dup_acks
                    x.reported_dup_acks = d
        return rtt_sum, rtt_n, dups

    def _apply(self, batch: tuple[_Tally, float, int, int]) -> None:
        """In the trio thread: counters, admission accounting, then finished transfers."""
        tally, rtt_sum, rtt_n, dups = batch
        c = self._counters
        c.packets_in += tally.packets_in
        c.packets_out += tally.packets_out
        c.malformed += tally.malformed
        c.retransmits += tally.retransmits
        c.wrong_tid += tally.wrong_tid
        if tally.bytes_out or tally.retransmits:
            now = trio.current_time()
            if tally.bytes_out and self._note_sent is not None:
                self._note_sent(tally.bytes_out, now)
            if tally.retransmits and self._note_retransmits is not None:
                self._note_retransmits(tally.retransmits, now)
        if (rtt_n or dups) and self._admission is not None:
            now = trio.current_time()
            if rtt_n and hasattr(self._admission, "note_rtt"):
                self._admission.note_rtt([rtt_sum / rtt_n], now)  # this flush's mean block round trip
            if dups and hasattr(self._admission, "note_client_retries"):
                self._admission.note_client_retries(dups, now)
        for x in tally.finished:
            self._on_done(x)


_ERR_UNKNOWN_TID = proto.encode_error(proto.ERR_UNKNOWN_TID)


def _timeval(seconds: float) -> bytes:
    """``struct timeval`` for SO_RCVTIMEO (at least 1 ms: zero would mean "never")."""
    us = max(int(seconds * 1e6), 1000)
    return (us // 1_000_000).to_bytes(8, "little", signed=True) + (us % 1_000_000).to_bytes(8, "little", signed=True)
