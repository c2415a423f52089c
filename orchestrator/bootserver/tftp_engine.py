"""The TFTP transfer engine: every transfer socket in one epoll, one timer heap.

Why this exists. The first server ran one trio task per transfer and awaited
each ACK (``move_on_at`` + ``wait_readable``). On a lock-step download that is a
full trip through trio per packet: a new cancel scope, two ``epoll_ctl`` calls
to register and unregister the socket, a reschedule. py-spy put 48 % of the
server's Python time there and the rest of the server loop at 28 %; the server
reached 0.40-0.59x tftpd-hpa and ~114 000 packets per CPU-second at best.

What the engine does instead:

* each transfer socket is registered **once** in a level-triggered
  :class:`select.epoll` of our own (``EPOLLIN``; ``EPOLLOUT`` only while a send
  is blocked by a full socket buffer), so waiting costs no ``epoll_ctl``;
* retransmit deadlines live in one **timer heap**, lazily: a transfer keeps at
  most one heap entry; an ACK that moves its deadline later costs nothing, and
  the stale entry is re-pushed at the real deadline when it pops;
* the heap and the epoll are driven by **one dedicated OS thread** blocking in
  ``epoll.poll(timeout)`` (``mode="thread"``): per packet the Python work is
  poll, ``recvfrom``, the sans-IO core and ``sendto``, with no trio at all;
* **lock-step** transfers (windowsize 1, what curl, tftp-hpa and most PXE ROMs
  ask for) are one round trip per block, so there the server's latency per ACK
  is the throughput. The first :data:`LOCKSTEP_THREADS` transfers get a thread
  of their own (when the native loop is built, windowed transfers too; without
  it only lock-step ones, since a Python thread per window gains nothing over
  the epoll thread). That thread runs the **native loop**
  (``_lockstep.c`` via :mod:`~orchestrator.bootserver.lockstep_native`):
  ``recvfrom``, one compare, ``sendmsg`` of the next block or GSO window, in C,
  without the engine lock or the GIL, for as long as each datagram is the ACK
  that ends the current window; anything else is handed back and goes through
  the core below, under the lock, like a datagram from ``recvfrom``. The state
  is copied back into the core (``ReadTransfer.fast_forward``) after every
  return, at least every :data:`~orchestrator.bootserver.lockstep_native.SLICE`
  seconds. Before it sleeps, the loop polls without blocking until the ACK is
  due (learned from the measured answer time, at most 300 us; after four misses
  in a row it blocks for the next 128 receives): on this 2-vCPU VM a cross-CPU
  wakeup cost ~90 us of a ~140 us round trip. Without
  the library (no C compiler at install) the thread blocks in Python's
  ``recvfrom`` and answers through
  :meth:`~orchestrator.protocols.tftp.ReadTransfer.next_block`, the core's
  list-free entry for that case. Measured on the bench machine (curl, blksize
  512): ~19 us of CPU per block in Python against ~12 us for tftpd-hpa; the C
  loop is at tftpd-hpa's cost, and with the polling it ran 2-4x tftpd-hpa's
  speed (``docs/benchmarks.md``). More threads than that would only compete
  for two cores, so later transfers share the epoll thread;
* a whole window of equal-sized DATA datagrams goes out with one ``sendmsg``
  using **UDP GSO** (``UDP_SEGMENT``, Linux 4.18+): the kernel cuts the buffer
  into datagrams, so a window of 44 blocks costs one syscall instead of 44.
  Paths that cannot do it (``EIO``: no checksum offload; ``EMSGSIZE``: a block
  bigger than the MTU; ``EINVAL``, ``ENOPROTOOPT``, ``EOPNOTSUPP``) turn GSO off
  for that transfer, and it sends one by one (IP fragments what is too big).

Results go back to trio in **batches**: counter deltas, admission accounting
(``note_sent``/``note_retransmits``) and finished transfers are collected under
the engine's lock and applied in the trio thread by one ``run_sync_soon``
callback -- at once when a transfer ends (so a transfer's counters are in
:class:`TftpCounters` before its FILE_DONE/FILE_FAILED event), otherwise at most
every :data:`FLUSH_INTERVAL` seconds. Only the trio thread ever writes the
counters object or calls the admission object.

The same engine also runs as a **trio task** (``mode="trio"``): it waits on the
epoll's file descriptor with ``wait_readable`` and reads time from trio's clock.
The server picks it when time is not real (``trio.testing.MockClock``: the
thread could not follow a virtual clock, and tests of timeouts rely on one) and
when the admission object has a byte-rate budget (its token bucket is not
thread-safe, and pacing needs ``try_consume`` before every send). Both modes run
the same code below; only the waiting differs.

Locking: one :class:`threading.Lock` guards the maps, the heap and every
transfer's core. The engine thread holds it while it processes a batch of ready
sockets and timers, a lock-step thread while it handles one datagram (neither
while blocked in a syscall); the trio side takes it to add or remove a
transfer, and to resend a transfer's first datagram when its client repeats
its request (:meth:`TransferEngine.repeated_request`).
:meth:`TransferEngine.remove` returns only once the engine will never
touch that transfer's socket or core again, so the caller may close the file
right after: a lock-step thread is woken with ``shutdown()`` (closing an fd
another thread is blocked on is unsafe, the number may be reused at once) and
joined, and it closes its own socket. On cancellation every thread is stopped
and joined the same way before :func:`~orchestrator.bootserver.tftp.serve_tftp`
returns.

Not done here (see ``docs/benchmarks.md``): an adaptive, RFC 6298-style
retransmit timeout -- the timeout is still the configured (or negotiated) one.
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

__all__ = ["TransferEngine", "Transfer", "FLUSH_INTERVAL"]

log = logging.getLogger("orchestrator.bootserver.tftp")

#: On a transfer socket only ACK (4 bytes) and ERROR matter; a larger datagram is
#: truncated by the kernel, which is harmless (an ERROR's message is cut).
_TRANSFER_BUFSIZE = 1024
#: Seconds between counter flushes to trio while transfers run.
FLUSH_INTERVAL = 0.25
#: Lock-step transfers (windowsize 1) that get their own OS thread in thread mode
#: (see :meth:`TransferEngine._lockstep_main`); the rest share the epoll thread.
LOCKSTEP_THREADS = 2
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
        "addr", "core", "sock", "fd", "held", "hold_until", "waited", "want_out", "heap_at",
        "gso", "closed", "outcome", "error", "done", "cookie", "thread", "h_rtt_sum", "h_rtt_n", "h_dup",
    )

    def __init__(self, addr: tuple[str, int], core: proto.ReadTransfer, sock: socket.socket, done: Any, cookie: Any) -> None:
        self.addr = addr
        self.core = core
        self.sock = sock
        self.fd = sock.fileno()
        self.held: list[bytes] | None = None  # packets waiting for the byte budget or the socket buffer
        self.hold_until: float | None = None  # when to try ``held`` again (None: on EPOLLOUT)
        self.waited = False  # ``held`` was paced by the byte budget: restart the core's timer on release
        self.want_out = False
        self.heap_at: float | None = None  # the deadline of this transfer's one valid heap entry
        self.gso = True
        self.closed = False
        #: ``None`` for success, a :class:`~orchestrator.protocols.tftp.TransferFailed`,
        #: or "error" with ``error`` set (an exception inside the transfer).
        self.outcome: proto.TransferFailed | str | None = None
        self.error: BaseException | None = None
        self.done = done
        self.cookie = cookie
        #: The transfer's own OS thread on the lock-step fast path, else None.
        self.thread: threading.Thread | None = None
        #: The core's round-trip and duplicate-ACK tallies already handed to admission.
        self.h_rtt_sum = 0.0
        self.h_rtt_n = 0
        self.h_dup = 0


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
        self._sync = mode == "trio"  # results applied at once, not handed over
        self._counters = counters
        self._admission = admission
        self._gate = admission.try_consume if (admission is not None and mode == "trio" and getattr(admission, "rate", None) is not None) else None
        self._note_sent = getattr(admission, "note_sent", None) if admission is not None else None
        self._note_retransmits = getattr(admission, "note_retransmits", None) if admission is not None else None
        self._on_done = on_done
        self._clock: Callable[[], float] = time.monotonic if mode == "thread" else trio.current_time
        self._lock = threading.Lock()
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, _EPOLLIN)
        self._by_fd: dict[int, Transfer] = {}
        self._heap: list[tuple[float, int, Transfer]] = []
        self._seq = itertools.count()
        self._stopping = False
        #: Set once :meth:`run` has ended: :meth:`add` must not be called any more.
        self.closed = False
        self._scope: trio.CancelScope | None = None  # the trio driver's wait (trio mode)
        self._token: trio.lowlevel.TrioToken | None = None
        # Batched results, guarded by the lock.
        self._d_in = self._d_out = self._d_malformed = self._d_retrans = self._d_wrong_tid = 0
        self._d_bytes_out = 0
        self._finished: list[Transfer] = []
        self._last_flush = -math.inf
        self._lockstep: set[Transfer] = set()
        self.lockstep_threads = LOCKSTEP_THREADS
        #: Lock-step threads run the C loop of ``_lockstep.c`` when it was built.
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
        fast = (self.mode == "thread" and (core.windowsize == 1 or self.native) and self._gate is None
                and len(self._lockstep) < self.lockstep_threads)
        with self._lock:
            if fast:
                # Lock-step fast path (see _lockstep_main): a blocking socket whose
                # recvfrom times out after the retransmit timeout (the short one
                # until the client's first ACK: ReadTransfer.rto).
                sock.setblocking(True)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(core.rto))
                # A send never blocks for long while this thread holds the lock.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0.05))
                x.thread = threading.Thread(target=self._lockstep_main, args=(x,), name="tftp-transfer", daemon=True)
                self._lockstep.add(x)
            else:
                self._by_fd[x.fd] = x
                self._ep.register(x.fd, _EPOLLIN)
            now = self._clock()
            try:
                pkts, _ = core.start(now)
                self._send(x, pkts, now)
                self._schedule(x)
            except Exception as e:  # noqa: BLE001 - e.g. EIO on the first read: this transfer fails
                self._crash(x, e)
            self._flush_locked(now, force=self._sync)
            if x.thread is not None and not x.closed:
                x.thread.start()
        if x.thread is not None:
            pass  # its own thread keeps its own time (SO_RCVTIMEO)
        elif self.mode == "thread":
            os.eventfd_write(self._wake_fd, 1)  # the thread recomputes its poll timeout
        elif self._scope is not None and x.heap_at is not None and x.heap_at < self._scope.deadline:
            self._scope.deadline = x.heap_at
        return x

    def repeated_request(self, x: Transfer) -> None:
        """The client of ``x`` sent its RRQ again: resend the first datagram if the core says so.

        From the trio thread. The datagram leaves from the transfer's own socket
        (its TID). A lock-step thread may be blocked in ``recvfrom`` on that
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
            self._d_retrans += len(pkts)
            self._send(x, pkts, now)
            self._schedule(x)
            self._flush_locked(now, force=self._sync)
        # A send held back (full buffer, byte budget) may have an earlier due time
        # than the driver is waiting for: let it recompute, as add() does.
        if x.thread is not None:
            pass
        elif self.mode == "thread":
            os.eventfd_write(self._wake_fd, 1)
        elif self._scope is not None and x.heap_at is not None and x.heap_at < self._scope.deadline:
            self._scope.deadline = x.heap_at

    def remove(self, x: Transfer) -> None:
        """Forget ``x`` (idempotent): close its socket; the engine will not touch it again."""
        with self._lock:
            self._drop(x)
        self._join(x)

    def _join(self, x: Transfer) -> None:
        # A lock-step thread closes its socket on the way out; _drop woke it
        # (shutdown), so this returns within microseconds.
        t = x.thread
        if t is not None and t.ident is not None and t is not threading.current_thread():
            t.join()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine until cancelled; every socket is closed on the way out."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            if self.mode == "thread":
                await self._run_thread(task_status)
            else:
                await self._run_trio(task_status)
        finally:
            self.closed = True
            with self._lock:
                for x in list(self._by_fd.values()) + list(self._lockstep):
                    self._drop(x)
            for x in list(self._lockstep):
                self._join(x)
            self._ep.close()
            os.close(self._wake_fd)

    async def _run_thread(self, task_status: Any) -> None:
        token = self._token
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
            self._thread_main()

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
        epfd = self._ep.fileno()
        while True:
            with self._lock:
                deadline = self._wake_deadline()
            with trio.CancelScope(deadline=deadline) as scope:
                self._scope = scope
                await trio.lowlevel.wait_readable(epfd)
            self._scope = None
            events = self._ep.poll(0)
            with self._lock:
                self._step(events, trio.current_time())
            # At least one checkpoint per loop, so a flood cannot starve trio.
            await trio.lowlevel.checkpoint()

    # -- the engine thread -------------------------------------------------------------

    def _thread_main(self) -> None:
        ep, lock, clock = self._ep, self._lock, time.monotonic
        with lock:
            wake = self._wake_deadline()
        while not self._stopping:
            events = ep.poll(-1.0 if wake == math.inf else max(0.0, wake - clock()))
            with lock:
                self._step(events, clock())
                wake = self._wake_deadline()

    def _lockstep_main(self, x: Transfer) -> None:
        """Drive one transfer on its own thread: the fast path.

        Lock-step is one round trip per block, so its speed is the server's
        latency per ACK. While the core is :meth:`~ReadTransfer.forwardable`
        and the native loop is built, the thread is inside it (no lock, no
        GIL) and comes back for whatever the loop hands back, a receive
        timeout, or every slice. Otherwise (no library, netascii, an
        in-memory file, or the OACK and final-ACK steps) it is ``recvfrom``
        (blocking; ``SO_RCVTIMEO`` is the retransmit timeout), the core and
        ``sendto`` -- no ``epoll_wait``, no dispatch. Same rules as the epoll
        path (TIDs, counters, timers), under the same lock.
        """
        sock, addr, core, lock, clock = x.sock, x.addr, x.core, self._lock, time.monotonic
        rcvtimeo = core.timeout
        drv = lockstep_native.Driver.for_transfer(core, sock, addr) if self.native else None
        try:
            while True:
                data = src = None
                native = False
                if drv is not None:
                    with lock:
                        if x.closed:
                            return
                        native = core.forwardable()
                        if native:
                            drv.load()
                if native:
                    # The C loop answers ACK after ACK without the lock or the GIL;
                    # what it hands back goes through the same code as a recvfrom.
                    assert drv is not None
                    drv.st.gso = x.gso
                    code = drv.run()
                    with lock:
                        x.gso = bool(drv.st.gso)
                        n_in, n_out, n_bytes = drv.store()
                        self._d_in += n_in
                        self._d_out += n_out
                        self._d_bytes_out += n_bytes
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
                    if src == addr:
                        # The common case, ACK of the block just sent: no lists, no dispatch.
                        try:
                            pkt = core.next_block(data, now)  # type: ignore[arg-type]
                        except Exception as e:  # noqa: BLE001 - e.g. EIO reading the file
                            self._crash(x, e)
                            self._flush_locked(now, force=True)
                            return
                        if pkt is not None:
                            try:
                                sock.sendto(pkt, addr)
                            except OSError:
                                pass  # lost (ENOBUFS, an ICMP error): the retransmit timer copes
                            self._d_in += 1
                            self._d_out += 1
                            self._d_bytes_out += len(pkt)
                            if now - self._last_flush >= FLUSH_INTERVAL:
                                self._flush_locked(now, force=False)
                            continue
                    try:
                        if src is not None:
                            self._d_in += 1
                            if src[0] != addr[0] or src[1] != addr[1]:
                                self._d_wrong_tid += 1  # RFC 1350 section 4, as in _readable
                                try:
                                    sock.sendto(_ERR_UNKNOWN_TID, src)
                                    self._d_out += 1
                                except OSError:
                                    pass
                            else:
                                try:
                                    pkts, evs = core.datagram(data, now)
                                except proto.RemoteProtocolError:
                                    self._d_malformed += 1
                                    pkts, evs = [], ()
                                if pkts:
                                    self._write(x, pkts, now)
                                self._finish_core(x, evs)
                        deadline = core.next_deadline
                        if not x.closed and deadline is not None and now >= deadline:
                            pkts, evs = core.timer(now)
                            if pkts:
                                self._d_retrans += len(pkts)
                                self._write(x, pkts, now)
                            self._finish_core(x, evs)
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
                self._lockstep.discard(x)
                if not x.closed:  # a bug above: the transfer must still end
                    self._crash(x, RuntimeError("lock-step thread ended early"))
                    self._flush_locked(clock(), force=True)
            x.sock.close()

    # -- shared by both drivers (lock held) ----------------------------------------------

    def _wake_deadline(self) -> float:
        wake = self._heap[0][0] if self._heap else math.inf
        if self._dirty():
            wake = min(wake, self._last_flush + FLUSH_INTERVAL)
        return wake

    def _dirty(self) -> bool:
        # Every other delta comes with one of these (a malformed or wrong-TID datagram
        # was received; a retransmit or a byte was sent).
        return bool(self._d_in or self._d_out or self._d_retrans or self._finished)

    def _step(self, events: list[tuple[int, int]], now: float) -> None:
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
        self._flush_locked(now, force=self._sync)

    def _readable(self, x: Transfer, now: float) -> None:
        sock, addr, core = x.sock, x.addr, x.core
        for _ in range(_READ_BATCH):
            try:
                data, src = sock.recvfrom(_TRANSFER_BUFSIZE)
            except BlockingIOError:
                return
            except OSError:  # e.g. ECONNREFUSED left by an ICMP error: nothing to read
                continue
            self._d_in += 1
            if src == addr and x.held is None:
                pkt = core.next_block(data, now)  # lock-step's common case (see the core)
                if pkt is not None:
                    self._write(x, [pkt], now)  # the deadline moved later: the lazy heap copes
                    return
            if src[0] != addr[0] or src[1] != addr[1]:
                # RFC 1350 section 4: "If a source TID does not match, the packet
                # should be discarded as erroneously sent from somewhere else. An
                # error packet should be sent to the source of the incorrect
                # packet, while not disturbing the transfer."
                self._d_wrong_tid += 1
                try:
                    sock.sendto(_ERR_UNKNOWN_TID, src)
                    self._d_out += 1
                except OSError:
                    pass
                continue
            try:
                pkts, evs = core.datagram(data, now)
            except proto.RemoteProtocolError:
                self._d_malformed += 1
                continue
            if pkts:
                self._send(x, pkts, now)
            if self._finish_core(x, evs):
                return
            if x.heap_at is None or (core.next_deadline is not None and core.next_deadline < x.heap_at):
                self._schedule(x)
            # One datagram from the client per wakeup: the next ACK is usually a
            # round trip away, and a recvfrom that fails with EAGAIN costs more
            # than letting the level-triggered poll() report a queued one.
            return

    def _timer(self, x: Transfer, now: float) -> None:
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
            self._d_retrans += len(pkts)
            self._send(x, pkts, now)
        self._finish_core(x, evs)

    def _schedule(self, x: Transfer) -> None:
        """Make sure ``x`` has a heap entry no later than its next due time."""
        if x.closed or x.thread is not None:
            return  # a lock-step thread runs its own timer
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
        if self._gate is not None:
            nbytes = sum(map(len, pkts))
            wait = self._gate(nbytes, now)
            if wait > 0:
                # At least 1 us: a float-rounding remainder must still move the clock.
                x.held, x.hold_until, x.waited = pkts, now + max(wait, 1e-6), True
                self._schedule(x)
                return
            if x.waited:
                x.waited = False
                x.core.restart_timer(now)
        self._write(x, pkts, now)

    def _write(self, x: Transfer, pkts: list[bytes], now: float) -> None:
        sock, addr = x.sock, x.addr
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
                            self._d_out += j - i
                            i = j
                            continue
                        self._count_out(batch)
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
            self._d_out += 1
            self._d_bytes_out += len(pkt)
            i += 1
        return None

    def _count_out(self, batch: list[bytes]) -> None:
        self._d_out += len(batch)
        self._d_bytes_out += sum(map(len, batch))

    def _hold_for_room(self, x: Transfer, rest: list[bytes]) -> None:
        if x.thread is not None:
            return  # a lock-step thread's socket (SO_SNDTIMEO expired): lost, the timer copes
        x.held, x.hold_until = rest, None
        if not x.want_out:
            x.want_out = True
            self._ep.modify(x.fd, _EPOLLIN | _EPOLLOUT)

    def _hold_a_moment(self, x: Transfer, rest: list[bytes], now: float) -> None:
        if x.thread is not None:
            return  # a lock-step thread's socket: lost, its timer copes
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
        self._finished.append(x)

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
                self._lockstep.discard(x)
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
                self._ep.unregister(x.fd)
            except (OSError, ValueError):
                pass
        x.sock.close()

    def _flush_locked(self, now: float, *, force: bool) -> None:
        if not (force or self._finished or now - self._last_flush >= FLUSH_INTERVAL):
            return
        if not self._dirty():
            return
        self._last_flush = now
        rtt_sum, rtt_n, dups = self._harvest()
        batch = (self._d_in, self._d_out, self._d_malformed, self._d_retrans, self._d_wrong_tid, self._d_bytes_out, self._finished,
                 rtt_sum, rtt_n, dups)
        self._d_in = self._d_out = self._d_malformed = self._d_retrans = self._d_wrong_tid = 0
        self._d_bytes_out = 0
        self._finished = []
        if self.mode == "trio":
            self._apply(batch)
            return
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._apply, batch)
        except trio.RunFinishedError:  # pragma: no cover - shutting down
            pass

    def _harvest(self) -> tuple[float, int, int]:
        """Round-trip time and duplicate ACKs since the last flush, over every transfer (lock held).

        O(transfers) per flush (every FLUSH_INTERVAL at most), nothing per packet:
        the cores keep running sums; the lock-step threads update theirs without
        the lock, and a sum read a packet early only shifts it to the next flush.
        """
        rtt_sum, rtt_n, dups = 0.0, 0, 0
        for group in (self._by_fd.values(), self._lockstep, self._finished):
            for x in group:
                c = x.core
                s, n, d = c.rtt_sum, c.rtt_n, c.dup_acks
                if n != x.h_rtt_n:
                    rtt_sum += s - x.h_rtt_sum
                    rtt_n += n - x.h_rtt_n
                    x.h_rtt_sum, x.h_rtt_n = s, n
                if d != x.h_dup:
                    dups += d - x.h_dup
                    x.h_dup = d
        return rtt_sum, rtt_n, dups

    def _apply(self, batch: tuple) -> None:
        """In the trio thread: counters, admission accounting, then finished transfers."""
        d_in, d_out, d_mal, d_re, d_tid, d_bytes, finished, rtt_sum, rtt_n, dups = batch
        c = self._counters
        c.packets_in += d_in
        c.packets_out += d_out
        c.malformed += d_mal
        c.retransmits += d_re
        c.wrong_tid += d_tid
        if d_bytes or d_re:
            now = trio.current_time()
            if d_bytes and self._note_sent is not None:
                self._note_sent(d_bytes, now)
            if d_re and self._note_retransmits is not None:
                self._note_retransmits(d_re, now)
        if (rtt_n or dups) and self._admission is not None:
            now = trio.current_time()
            if rtt_n and hasattr(self._admission, "note_rtt"):
                self._admission.note_rtt([rtt_sum / rtt_n], now)  # this flush's mean block round trip
            if dups and hasattr(self._admission, "note_client_retries"):
                self._admission.note_client_retries(dups, now)
        for x in finished:
            self._on_done(x)


_ERR_UNKNOWN_TID = proto.encode_error(proto.ERR_UNKNOWN_TID)


def _timeval(seconds: float) -> bytes:
    """``struct timeval`` for SO_RCVTIMEO (at least 1 ms: zero would mean "never")."""
    us = max(int(seconds * 1e6), 1000)
    return (us // 1_000_000).to_bytes(8, "little", signed=True) + (us % 1_000_000).to_bytes(8, "little", signed=True)
