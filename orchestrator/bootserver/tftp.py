"""The trio TFTP server: the listening socket, limits, admission, counters and events around the sans-IO core.

Shape: one trio task reads the listening socket. Each read request is parsed,
checked against the limits and opened, and becomes a
:class:`~orchestrator.protocols.tftp.ReadTransfer` (the sans-IO core: everything
about TFTP lives there) and a small trio task that holds the transfer's
admission slot and bookkeeping and sleeps until the transfer ends. The
transfer itself -- its own ephemeral UDP socket (a new TID, RFC 1350 section 4),
its datagrams and its timers -- is driven by the engine,
:mod:`orchestrator.bootserver.tftp_engine`: one epoll thread for most
transfers, a thread of their own (running the native C loop when it is built)
for the first few, windows sent with UDP GSO, or one trio task under a virtual
clock or a byte-rate budget; that module's docstring says how. This module
keeps what is decided once per request: who may talk (TIDs, limits,
admission) and what to report (counters, events).

Robustness rules, each with a test in ``tests/test_tftp_server.py`` or
``tests/test_tftp_security.py``:

* malformed datagrams are counted and dropped; only a malformed *request* (opcode
  1 or 2) gets an ERROR back, so garbage cannot be reflected at a third party;
* a datagram on a transfer port from the wrong address/port gets ERROR 5 and the
  transfer carries on (RFC 1350 section 4);
* until the client's first ACK proves its address (a source address is easily
  forged), its transfer's timer runs at the server's own ``timeout`` whatever
  timeout was negotiated, and it is guaranteed one resend of its first datagram
  (OACK or DATA 1, :data:`UNPROVEN_RETRIES`); further resends, up to
  ``retries``, come out of a budget all transfers share
  (``unproven_resend_rate`` per second, default :data:`UNPROVEN_RESEND_RATE`,
  banking up to four seconds' worth). A real client on a lossy link keeps its
  full retries; a flood of forged RRQs drains the budget, after which each
  reflects at most two datagrams at its victim and holds a slot for two short
  timeouts, not 255 s x the retries ("Peers that do not answer" in
  :mod:`orchestrator.protocols.tftp.transfer`);
* an RRQ repeated from the *same* source port while its transfer runs is the
  client retransmitting its request: before the client's first ACK it is
  answered with that one resend of the first datagram (at once: the client's
  timer says ours was lost), if the transfer has not used it yet; after the
  first ACK, or when its request still waits (for a slot or for admission), it
  is ignored. From a *new* source port it is a new transfer;
* the retransmit timeout of a client that has ACKed adapts to the measured
  round trip (RFC 6298, :mod:`orchestrator.protocols.tftp.rto`): ``timeout``
  is its first value and the unproven timeout; it lies within ``[rto_min,
  rto_max]`` (defaults :data:`~orchestrator.protocols.tftp.rto.RTO_MIN` and
  four times ``timeout``) and doubles on each retransmission;
* a negotiated RFC 2349 timeout above ``timeout_max`` (default 30 s) is not
  honoured (left out of the OACK), and any transfer without progress for
  ``max_stall`` seconds (default 60) ends, whatever its timeout and retries;
* netascii is refused for files over :data:`~orchestrator.protocols.tftp.NETASCII_MAX`
  before any read, and a file's converted size is computed once per version of
  the file (:class:`~orchestrator.protocols.tftp.NetasciiSizes`), so a client
  cannot make the server scan big files on the request path over and over;
* at most ``max_transfers`` transfers run (those queued by admission included).
  A request that finds them all taken **waits** -- a PXE ROM takes any ERROR
  as final, so a busy server never answers one -- in a FIFO of at most
  ``max_waiting`` requests (default: ``max_transfers``), holding no file, no
  socket and no slot, only its datagram (so the queue holds at most
  ``max_waiting`` x 64 KiB); it starts when a slot frees, unless it
  waited longer than ``max_stall`` or its client has not re-sent it for
  :data:`STALE_WAITER` seconds (15: a PXE ROM re-sends at most 8 s apart,
  pxelinux 14 s, so its client has given up or asks from a new port:
  dropped, ``wait_expired``, no slot spent on it). Requests from addresses
  that already completed an ACKed transfer (the last :data:`PROVEN_IPS` such
  addresses: booting nodes after their ROM) wait in a queue of their own, the
  others (ROMs, and forged RRQs) in another, FIFO in each. The two queues
  **take turns** while the transfers to unproven addresses mostly get ACKed
  (a storm of real ROMs: each ROM gives up after ~15 s, so none may be starved
  by the first nodes' later files); the proven queue **goes first** while more
  than half of the last :data:`UNPROVEN_OUTCOMES` (32) such transfers died
  without any ACK (a forged-RRQ flood; :meth:`TftpServer.flooded`). When the
  queue is full a newcomer takes the place of the newest waiter of the other
  class if that class holds more than its share: a proven request when the
  unproven hold at least half of the queue (always under a flood), an
  unproven one when the proven hold more than half (never under a flood; a
  proven client is patient: pxelinux re-sends for ~2 minutes). So a flood
  cannot keep a booting node from its next file: proven requests keep at
  least half of the queue, the k-th proven waiter starts within the next 2k
  starts (k under a flood, where every proven request gets a place), and a
  forged transfer holds its slot for two short timeouts; and a ROM that comes
  late to a queue full of the first nodes' later files still gets a place.
  A request that gets a place but names a file that does not exist (or may
  not be read) is answered with its ERROR at once instead: that needs no
  slot (pxelinux's config walk asks for several missing names per boot).
  The per-address cap ``max_per_client`` counts running and waiting requests
  together. A request over either cap is dropped **without an answer**
  (``refused``): its client retries on its own timer, as after a lost datagram,
  and a forged request reflects nothing;
* a transfer's slot is free the moment the engine reports its end (its last
  ACK, ERROR or give-up), before its client's next request can be read, and
  the first waiter starts then;
* a request retransmitted while it waits is ignored (it keeps its place, and
  its client counts as still there); a
  *different* request from a waiting port replaces it in place; one from the
  port of a transfer waiting for an admission slot ends that wait
  ("superseded") and starts in its turn;
* a transfer whose client vanished (no ACK, not even a duplicate) ends after its
  retry budget; one whose client keeps re-ACKing while our DATA is lost (a full
  queue on the way) is alive: its resends go on, on the backed-off timer and
  never in answer to a duplicate ACK, until it progresses or ``max_stall``
  ends it ("Peers that answer but receive nothing" in
  :mod:`orchestrator.protocols.tftp.transfer`). A failed transfer of a client
  that had ACKed is logged (WARNING: file, client, reason, bytes, retransmits,
  duplicate ACKs, longest stall); before any ACK, and for transfers that needed
  resends, at DEBUG. Its socket and file are closed in ``finally`` whatever happens.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

import trio

from orchestrator.bootserver.files import AccessViolation, BootFile, BootFiles, NotFound
from orchestrator.bootserver.tftp_engine import Transfer, TransferEngine
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as proto
from orchestrator.protocols.tftp.rto import RTO_MIN

__all__ = ["MAX_STALL", "PROVEN_IPS", "STALE_WAITER", "TIMEOUT_MAX", "UNPROVEN_OUTCOMES", "UNPROVEN_RESEND_RATE", "UNPROVEN_RETRIES", "TftpCounters", "TftpDownloadError", "TftpServer", "serve_tftp", "tftp_get"]

log = logging.getLogger(__name__)

#: Biggest datagram we read on the listening socket (a UDP payload can be 65507).
_REQUEST_BUFSIZE = 65536
#: Datagrams handled from the listening socket before yielding to transfers.
_LISTEN_BATCH = 64
#: Receive buffer of the listening socket, bytes (what fits: ~4 000 RRQs).
LISTEN_RCVBUF = 4 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Resends of its first datagram a transfer gets before its client's first ACK.
UNPROVEN_RETRIES = 1
#: Resends per second, shared by all transfers, to clients that have not ACKed yet beyond their
#: guaranteed one: a lossy boot storm needs a few dozen a second; a reflection flood gets no more.
UNPROVEN_RESEND_RATE = 50.0
#: Largest RFC 2349 timeout honoured by default, in seconds: half of
#: :data:`MAX_STALL`, so a transfer at that timeout still gets one retransmission.
TIMEOUT_MAX = 30
#: Default bound, in seconds, on a transfer's time without progress.
MAX_STALL = 60.0
#: Client addresses remembered as proven (they ACKed a transfer), for the waiting queue's order.
PROVEN_IPS = 4096
#: A waiting request whose client has not repeated it for this long (seconds) is dropped before it gets a slot:
#: a PXE ROM re-sends its RRQ at most 8 s apart (1, 2, 4, 8 s) and pxelinux at most 14 s apart, or has given up.
STALE_WAITER = 15.0
#: Transfers to not-yet-proven addresses whose end the waiting order looks at: while more than half of the last
#: ones died without an ACK (a forged flood) proven requests go first, otherwise the two queues take turns.
UNPROVEN_OUTCOMES = 32
#: Fewer ended unproven transfers than this say nothing yet (the queues take turns).
_FLOOD_MIN_OUTCOMES = 8


@dataclass(slots=True)
class TftpCounters:
    """Plain counters for metrics (read them; only the server writes them)."""

    packets_in: int = 0
    packets_out: int = 0
    malformed: int = 0
    retransmits: int = 0
    transfers_ok: int = 0
    transfers_failed: int = 0
    #: Every block sent, but the client's final ACK never came (see
    #: ``TransferFailed``): most likely delivered; neither ok nor failed.
    transfers_unconfirmed: int = 0
    #: The client answered the OACK with ERROR 8 before any data: a size probe
    #: (UEFI PXE asks ``tsize`` first, then reads the file in a second request).
    #: Neither ok nor failed, and no sign of loss.
    options_declined: int = 0
    #: Ended because its client sent another request from the same port (it moved on).
    superseded: int = 0
    bytes_sent: int = 0  # payload bytes acknowledged by clients
    active: int = 0  # transfers in progress (including those queued by admission)
    #: Requests dropped unanswered: the waiting queue or the address's cap was full (the client retries).
    refused: int = 0
    waiting: int = 0  # requests waiting for a transfer slot now (no file, no socket)
    waited: int = 0  # requests that had to wait for a slot (total)
    wait_expired: int = 0  # waiters dropped after max_stall (their client gave up or asked again)
    wrong_tid: int = 0
    errors: int = 0  # unexpected exceptions contained (I/O errors, bugs): see the log
    duplicate_requests: int = 0
    events_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _sendto_nowait(sock: socket.socket, data: bytes, addr: Any) -> bool:
    """Best-effort single datagram (errors to refused requests, ERROR 5): never blocks."""
    try:
        sock.sendto(data, addr)
        return True
    except OSError:  # BlockingIOError included: a dropped ERROR is like a lost one
        return False


@dataclass(eq=False, slots=True)
class _Job:
    """One accepted request: its transfer and what the server tracks about it."""

    addr: tuple[str, int]
    req: proto.ReadRequest
    xfer: proto.ReadTransfer
    f: BootFile
    t0: float
    x: Transfer | None = None  # set once handed to the engine
    released: bool = False  # ended: counted, reported, its slot given back (TftpServer._end)
    scope: trio.CancelScope | None = None  # while waiting for an admission slot
    superseded: bool = False  # a newer request from its port ended it
    unproven_ip: bool = False  # its address had not completed an ACKed transfer when it started


@dataclass(eq=False, slots=True)
class _Waiting:
    """A request waiting for a transfer slot: its datagram (at most one, <= 64 KiB; parsed again when it starts),
    when it came and when its client last sent it (a retransmission, or a different request from its port)."""

    sock: socket.socket
    data: bytes
    since: float
    heard: float


class TftpServer:
    """One TFTP server instance. Use :func:`serve_tftp` unless you need the object."""

    def __init__(
        self,
        files: BootFiles,
        *,
        events: trio.MemorySendChannel[BootEvent] | None = None,
        admission: Any = None,
        blksize_max: int = proto.PATH_MTU_BLKSIZE,
        windowsize_max: int = 64,
        client_rcvbuf: int | None = proto.CLIENT_RCVBUF,
        max_transfers: int = 50,
        max_per_client: int = 8,
        max_waiting: int | None = None,
        timeout: float = 1.0,
        retries: int = 5,
        timeout_max: int = TIMEOUT_MAX,
        max_stall: float = MAX_STALL,
        unproven_resend_rate: float = UNPROVEN_RESEND_RATE,
        rto_min: float | None = RTO_MIN,
        rto_max: float | None = None,
        counters: TftpCounters | None = None,
        engine: str = "auto",
    ) -> None:
        # Validate once here (LocalProtocolError from the core on bad limits).
        proto.negotiate({}, tsize=None, blksize_max=blksize_max, windowsize_max=windowsize_max, timeout_max=timeout_max)
        if max_transfers < 1 or max_per_client < 1:
            raise ValueError("max_transfers and max_per_client must be >= 1")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if not (0 < timeout <= max_stall and timeout_max <= max_stall):
            # Otherwise a single timeout would outlast the bound on time without progress.
            raise ValueError(f"need 0 < timeout ({timeout}) and timeout_max ({timeout_max}) <= max_stall ({max_stall})")
        if rto_min is not None:
            rto_min = min(rto_min, timeout)  # a configured timeout below the floor is the floor
            rto_max = min(max(4 * timeout, rto_min), max_stall) if rto_max is None else rto_max
            if not (0 < rto_min <= rto_max <= max_stall):
                raise ValueError(f"need 0 < rto_min ({rto_min}) <= rto_max ({rto_max}) <= max_stall ({max_stall})")
        if engine not in ("auto", "thread", "trio"):
            raise ValueError(f"engine must be 'auto', 'thread' or 'trio', not {engine!r}")
        self.files = files
        self.events = events
        self.admission = admission
        self.blksize_max = blksize_max
        self.windowsize_max = windowsize_max
        self.client_rcvbuf = client_rcvbuf
        self.max_transfers = max_transfers
        self.max_per_client = max_per_client
        self.max_waiting = max_transfers if max_waiting is None else max_waiting
        self.timeout = timeout
        self.retries = retries
        self.timeout_max = timeout_max
        self.max_stall = max_stall
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.counters = counters if counters is not None else TftpCounters()
        #: Accepted requests (running, or queued by admission), by client TID.
        self._jobs: dict[tuple[str, int], _Job] = {}
        #: A different request a running job's port sent meanwhile: it starts once that job is released.
        self._next_request: dict[tuple[str, int], tuple[socket.socket, bytes]] = {}
        #: Requests waiting for a slot, FIFO (dicts keep insertion order): from proven addresses, and the rest.
        self._waiting_proven: dict[tuple[str, int], _Waiting] = {}
        self._waiting: dict[tuple[str, int], _Waiting] = {}
        #: Addresses whose client ACKed a transfer (LRU, at most PROVEN_IPS).
        self._proven_ips: OrderedDict[str, None] = OrderedDict()
        #: How the last UNPROVEN_OUTCOMES transfers to unproven addresses ended: True if it died without any ACK.
        self._unproven_outcomes: deque[bool] = deque(maxlen=UNPROVEN_OUTCOMES)
        self._last_started_proven = False  # the class of the last waiter started (the queues take turns)
        self._netascii_sizes = proto.NetasciiSizes()
        self._resend_budget = proto.ResendBudget(unproven_resend_rate, 4 * unproven_resend_rate)
        self._per_client: Counter[str] = Counter()  # running and waiting requests per address
        self._bind_host = "0.0.0.0"
        self.engine_mode = engine
        self._engine: TransferEngine | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> int:
        """Requests holding a transfer slot now (running, or queued by admission)."""
        return len(self._jobs)

    # -- events -------------------------------------------------------------------
    def _emit(self, kind: EventKind, addr: tuple[str, int], filename: str | None, **kw: Any) -> None:
        if self.events is None:
            return
        ev = BootEvent(
            time=trio.current_time(), source="tftp", kind=kind, client_ip=addr[0],
            client_port=addr[1], filename=filename, wall=time.time(), **kw,
        )
        try:
            self.events.send_nowait(ev)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            # Never let a slow or gone consumer block or crash the server.
            self.counters.events_dropped += 1

    # -- listening socket -------------------------------------------------------------
    def _pick_engine(self) -> str:
        """``thread`` unless time is virtual or sends must be paced (see tftp_engine)."""
        if self.engine_mode != "auto":
            return self.engine_mode
        clock = trio.lowlevel.current_clock()
        # trio's real clock is the private class SystemClock; anything else (MockClock
        # in tests) is a clock an OS thread cannot follow.
        if type(clock).__name__ != "SystemClock":
            return "trio"
        if self.admission is not None and getattr(self.admission, "rate", None) is not None:
            return "trio"
        return "thread"

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # A boot storm (or a flood) is a burst of requests: the default ~208 KiB buffer holds
            # a few hundred; dropping a real ROM's RRQ costs it a retry timeout. FORCE passes rmem_max as root.
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, LISTEN_RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
            sock.bind((host, port))
            self._bind_host = host
            bound = sock.getsockname()[:2]
            engine = TransferEngine(mode=self._pick_engine(), counters=self.counters, admission=self.admission, on_done=self._on_done)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                self._engine = engine
                self._nursery = nursery
                task_status.started(bound)
                await self._listen(sock)
        finally:
            self._engine = None
            self._nursery = None
            self.counters.waiting -= len(self._waiting) + len(self._waiting_proven)
            self._waiting.clear()
            self._waiting_proven.clear()
            sock.close()

    async def _listen(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_LISTEN_BATCH):
                try:
                    data, addr = sock.recvfrom(_REQUEST_BUFSIZE)
                except BlockingIOError:
                    break
                except OSError as e:
                    # E.g. ECONNREFUSED from an ICMP error on some kernels: not fatal.
                    log.debug("tftp listen recvfrom: %s", e)
                    continue
                self.counters.packets_in += 1
                try:
                    self._on_request(sock, data, addr[:2])
                except proto.RemoteProtocolError:
                    self.counters.malformed += 1
                except Exception:
                    # A bug must cost one request, not the server; keep it visible.
                    self.counters.errors += 1
                    log.exception("tftp: request from %s:%s failed", *addr[:2])

    def _refuse(self, sock: socket.socket, addr: tuple[str, int], code: int, message: str | None = None) -> None:
        if _sendto_nowait(sock, proto.encode_error(code, message), addr):
            self.counters.packets_out += 1

    def _on_request(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            req = proto.parse_packet(data)
        except proto.RemoteProtocolError as e:
            self.counters.malformed += 1
            if len(data) >= 2 and data[0] == 0 and data[1] in (proto.RRQ, proto.WRQ):
                self._refuse(sock, addr, e.error_code, str(e))
            return  # anything else on the request port is dropped silently
        if isinstance(req, proto.WriteRequest):
            # Read-only server: RFC 1350's code 2 is the conventional refusal.
            self._emit(EventKind.FILE_FAILED, addr, req.filename, result="access_violation", detail={"op": "wrq"})
            self.counters.transfers_failed += 1
            self._refuse(sock, addr, proto.ERR_ACCESS_VIOLATION, "Read-only server")
            return
        if not isinstance(req, proto.ReadRequest):
            self.counters.malformed += 1
            return
        key = (req.filename, req.mode, req.options)
        job = self._jobs.get(addr)
        if job is not None:
            running = job.req
            if key != (running.filename, running.mode, running.options):
                # Another request from the same port: the client moved on (UEFI PXE
                # re-reads its loader from the port it probed the size from, and that
                # RRQ may overtake the ERROR 8 ending the probe on the transfer's own
                # socket; or a new client got a port a vanished one used). The old
                # transfer ends now ("superseded"), also while it waits for an
                # admission slot; the request starts when the old one is released
                # (one waits per port).
                self._next_request[addr] = (sock, data)
                self._supersede(job)
                return
            # The same client port asking again: its request retransmission (our
            # OACK/DATA was lost or crossed it, or admission queued it). One
            # transfer per TID; before the client's first ACK the core may answer
            # with its first datagram again (ReadTransfer.repeated_request).
            self._duplicate()
            if job.x is not None and self._engine is not None:
                self._engine.repeated_request(job.x)
            return
        w = self._waiting_proven.get(addr) or self._waiting.get(addr)
        if w is not None:
            w.heard = trio.current_time()  # its client is still there
            if data == w.data:
                self._duplicate()  # it keeps its place
            else:
                w.sock, w.data = sock, data  # the client moved on: the new request takes its place
                self.counters.superseded += 1
            return
        if self._per_client[addr[0]] >= self.max_per_client:
            self.counters.refused += 1  # unanswered: the client retries (a forged request reflects nothing)
            return
        now = trio.current_time()
        if len(self._jobs) >= self.max_transfers and self._engine is not None:
            # A transfer whose final ACK came in just before this request is over: retire it
            # first (its client's next request must find its slot free; it starts waiters too).
            self._engine.reap()
        if len(self._jobs) >= self.max_transfers or self._waiting or self._waiting_proven:
            self._wait(sock, data, req, addr, now)  # FIFO: no barging past requests already waiting
            return
        self._emit(EventKind.FILE_REQUEST, addr, req.filename, detail={"mode": req.mode, "options": dict(req.options)})
        self._start(sock, req, addr, now)

    def _duplicate(self) -> None:
        self.counters.duplicate_requests += 1
        if self.admission is not None and hasattr(self.admission, "note_client_retries"):
            self.admission.note_client_retries(1, trio.current_time())  # its timer fired before our answer

    def _wait(self, sock: socket.socket, data: bytes, req: proto.ReadRequest, addr: tuple[str, int], now: float) -> None:
        """Queue a request that found every slot taken, or drop it (unanswered) when the queue is full."""
        proven = addr[0] in self._proven_ips
        other: dict[tuple[str, int], _Waiting] | None = None  # the queue that gives up its newest waiter
        if len(self._waiting) + len(self._waiting_proven) >= self.max_waiting:
            # Full: the newcomer takes the place of the other class's newest waiter when that class holds
            # more than its share (a proven newcomer: at least half, or always under a flood; an unproven one:
            # more than half, never under a flood). Otherwise, or when there is none, it is dropped unanswered.
            own, other = (self._waiting_proven, self._waiting) if proven else (self._waiting, self._waiting_proven)
            if proven:
                evict = bool(other) and (len(other) >= len(own) or self.flooded())
            else:
                evict = len(other) > len(own) and not self.flooded()
            if not evict:
                self.counters.refused += 1
                return
        if self._answer_if_missing(sock, req, addr, now):
            return
        if other is not None:
            victim = next(reversed(other))
            del other[victim]
            self._uncount(victim[0])
            self.counters.waiting -= 1
            self.counters.refused += 1
        (self._waiting_proven if proven else self._waiting)[addr] = _Waiting(sock, bytes(data), now, now)
        self._per_client[addr[0]] += 1
        self.counters.waiting += 1
        self.counters.waited += 1
        self._emit(EventKind.FILE_REQUEST, addr, req.filename, detail={"mode": req.mode, "options": dict(req.options), "waiting": True})

    def _answer_if_missing(self, sock: socket.socket, req: proto.ReadRequest, addr: tuple[str, int], now: float) -> bool:
        """A request about to wait for a file it cannot have is answered now (its ERROR needs no slot): True then.

        pxelinux walks several config names that do not exist on every boot; each would otherwise
        wait its turn in a full queue. The file is opened and closed at once (a waiter holds none)."""
        try:
            self.files.open(req.filename, addr[0]).close()
        except NotFound:
            code, result = proto.ERR_FILE_NOT_FOUND, "not_found"
        except AccessViolation:
            code, result = proto.ERR_ACCESS_VIOLATION, "access_violation"
        except Exception:  # noqa: BLE001 -- reported when the request starts
            return False
        else:
            return False
        self._emit(EventKind.FILE_REQUEST, addr, req.filename, detail={"mode": req.mode, "options": dict(req.options)})
        self._fail_request(sock, addr, req, code, result, now)
        return True

    def flooded(self) -> bool:
        """True while most of the last transfers to unproven addresses died without an ACK (forged requests):
        then the proven queue goes first; otherwise the two queues take turns."""
        n = len(self._unproven_outcomes)
        return n >= _FLOOD_MIN_OUTCOMES and 2 * sum(self._unproven_outcomes) > n

    def _next_queue(self) -> dict[tuple[str, int], _Waiting]:
        """The queue whose first request starts next: the proven one under a flood, else the one not served last."""
        if not self._waiting:
            return self._waiting_proven
        if not self._waiting_proven:
            return self._waiting
        return self._waiting_proven if self.flooded() or not self._last_started_proven else self._waiting

    def _admit(self) -> None:
        """Start waiting requests while slots are free (FIFO in each queue; which queue: :meth:`_next_queue`)."""
        engine = self._engine
        while (self._waiting_proven or self._waiting) and len(self._jobs) < self.max_transfers:
            if engine is None or engine.closed:
                return
            queue = self._next_queue()
            addr = next(iter(queue))
            w = queue.pop(addr)
            self._uncount(addr[0])
            self.counters.waiting -= 1
            now = trio.current_time()
            if now - w.since > self.max_stall or now - w.heard > STALE_WAITER:
                self.counters.wait_expired += 1  # its client gave up (or asks from a new port now)
                continue
            self._last_started_proven = queue is self._waiting_proven
            try:
                req = proto.parse_packet(w.data)  # it parsed as an RRQ when it came
                assert isinstance(req, proto.ReadRequest)
                self._start(w.sock, req, addr, now)
            except Exception:  # noqa: BLE001 -- as in _listen: one request, not the server
                self.counters.errors += 1
                log.exception("tftp: request from %s:%s failed", *addr)

    def _uncount(self, ip: str) -> None:
        self._per_client[ip] -= 1
        if self._per_client[ip] <= 0:
            del self._per_client[ip]

    def _start(self, sock: socket.socket, req: proto.ReadRequest, addr: tuple[str, int], t0: float) -> None:
        """Open the file and hand the transfer to its task (the slot is free: the caller checked)."""
        try:
            f = self.files.open(req.filename, addr[0])
        except NotFound:
            self._fail_request(sock, addr, req, proto.ERR_FILE_NOT_FOUND, "not_found", t0)
            return
        except AccessViolation:
            self._fail_request(sock, addr, req, proto.ERR_ACCESS_VIOLATION, "access_violation", t0)
            return
        except Exception:  # an I/O error, or a bug in the plan's dynamic source
            self.counters.errors += 1
            log.exception("tftp: opening %r for %s failed", req.filename, addr[0])
            self._fail_request(sock, addr, req, proto.ERR_NOT_DEFINED, "error", t0)
            return
        try:
            xfer = proto.ReadTransfer(
                req, f, blksize_max=self.blksize_max, windowsize_max=self.windowsize_max,
                client_rcvbuf=self.client_rcvbuf, timeout=self.timeout, retries=self.retries,
                timeout_max=self.timeout_max, max_stall=self.max_stall,
                unproven_retries=UNPROVEN_RETRIES, unproven_timeout=self.timeout, resend_budget=self._resend_budget,
                netascii_sizes=self._netascii_sizes, rto_min=self.rto_min, rto_max=self.rto_max,
            )
        except proto.RemoteProtocolError as e:  # e.g. an unknown mode
            f.close()
            self._fail_request(sock, addr, req, e.error_code, "error", t0, str(e))
            return
        except BaseException:
            f.close()
            raise
        assert self._nursery is not None
        job = _Job(addr, req, xfer, f, t0, unproven_ip=addr[0] not in self._proven_ips)
        self._jobs[addr] = job
        self._per_client[addr[0]] += 1
        self.counters.active += 1
        self._nursery.start_soon(self._transfer_task, job)

    def _fail_request(self, sock: socket.socket, addr: tuple[str, int], req: proto.ReadRequest, code: int, result: str, t0: float, message: str | None = None) -> None:
        self.counters.transfers_failed += 1
        self._emit(EventKind.FILE_FAILED, addr, req.filename, result=result, duration=trio.current_time() - t0)
        self._refuse(sock, addr, code, message)

    def _supersede(self, job: _Job) -> None:
        """End ``job``: its client sent another request from the same port."""
        job.superseded = True
        if job.x is not None:
            if self._engine is not None:
                self._engine.supersede(job.x)  # the engine reports the end: _on_done releases the job
        elif job.scope is not None:
            job.scope.cancel()  # still waiting for an admission slot: stop waiting
        # else its task has not run yet: it sees ``superseded`` and ends at once

    def _on_done(self, x: Transfer) -> None:
        """The engine reports ``x`` ended (in the trio thread): account for it and free its slot now, then wake its task."""
        job = x.cookie
        if isinstance(job, _Job) and not job.released:
            if x.outcome == "error":
                self.counters.errors += 1
                self._end(job, "error", None)
            else:
                failure: proto.TransferFailed | None = x.outcome  # type: ignore[assignment]
                self._end(job, "ok" if failure is None else failure.reason, failure)
        x.done.set()

    def _end(self, job: _Job, result: str, failure: proto.TransferFailed | None) -> None:
        """Once per job: its counters and its last event, then its slot back and the waiters started."""
        if job.released:
            return
        xfer = job.xfer
        if result == "ok":
            self.counters.transfers_ok += 1
        elif result == "unconfirmed":
            self.counters.transfers_unconfirmed += 1
        elif result == "options_declined":
            self.counters.options_declined += 1
        elif result == "superseded":
            self.counters.superseded += 1
        else:
            self.counters.transfers_failed += 1
        self.counters.bytes_sent += xfer.bytes_acked
        if job.unproven_ip:
            # Died without any ACK (a forged source, or a ROM that gave up) -- a size probe, a client ERROR
            # or a superseding request came from the client: alive.
            self._unproven_outcomes.append(not xfer.proven and result in ("timeout", "unconfirmed"))
        detail: dict[str, Any] = {"blksize": xfer.blksize, "windowsize": xfer.windowsize, "mode": xfer.mode}
        if failure is not None and failure.code is not None:
            detail["error_code"] = failure.code
            detail["error_message"] = failure.message
        if xfer.negotiated.oack:
            detail["oack"] = dict(xfer.negotiated.oack)
        # "unconfirmed" is reported as FILE_DONE with that result: the client
        # has every block unless the final ones were lost on every retry, and
        # a boot that moves on proves it; a FILE_FAILED would claim a failure.
        # "options_declined" (a size probe) moved nothing: a FILE_REQUEST, as its RRQ was;
        # so does a transfer superseded before any ACK (the probe, when the re-read
        # overtook its ERROR 8). Neither is a failure of the path.
        moved_nothing = result == "options_declined" or (result == "superseded" and xfer.bytes_acked == 0)
        kind = (EventKind.FILE_DONE if result in ("ok", "unconfirmed")
                else EventKind.FILE_REQUEST if moved_nothing else EventKind.FILE_FAILED)
        now = trio.current_time()
        self._emit(
            kind,
            job.addr, xfer.request.filename, bytes=xfer.bytes_acked, size=xfer.size,
            duration=now - job.t0, result=result,
            retransmits=xfer.retransmits, detail=detail,
        )
        if kind is EventKind.FILE_FAILED:
            # A client that ACKed (it receives at its address) lost its download: worth an operator's
            # eye. Before the first ACK it may be a forged request: debug only (a flood must not flood the log).
            log.log(logging.WARNING if xfer.proven else logging.DEBUG,
                    "tftp: %r to %s:%s failed (%s%s) after %.1fs: %d of %d bytes, %d retransmits, %d duplicate ACKs, "
                    "rto %.2fs, longest stall %.1fs",
                    xfer.request.filename[:128], job.addr[0], job.addr[1], result, "" if xfer.proven else ", before any ACK",
                    now - job.t0, xfer.bytes_acked, xfer.size, xfer.retransmits, xfer.dup_acks, xfer.timeout, xfer.longest_stall)
        elif xfer.retransmits and log.isEnabledFor(logging.DEBUG):
            log.debug("tftp: %r to %s:%s %s after %.1fs: %d retransmits, %d duplicate ACKs, longest stall %.1fs",
                      xfer.request.filename[:128], job.addr[0], job.addr[1], result, now - job.t0,
                      xfer.retransmits, xfer.dup_acks, xfer.longest_stall)
        self._release(job)

    def _release(self, job: _Job) -> None:
        """Give back ``job``'s slot and per-address count, then start what waits for them."""
        job.released = True
        addr = job.addr
        if self._jobs.get(addr) is job:
            del self._jobs[addr]
        self._uncount(addr[0])
        self.counters.active -= 1
        if job.xfer.proven:
            self._proven_ips[addr[0]] = None
            self._proven_ips.move_to_end(addr[0])
            if len(self._proven_ips) > PROVEN_IPS:
                self._proven_ips.popitem(last=False)
        engine = self._engine
        nxt = self._next_request.pop(addr, None)
        if engine is None or engine.closed:
            return  # shutting down: start nothing
        if nxt is not None:
            try:
                self._on_request(nxt[0], nxt[1], addr)
            except Exception:  # noqa: BLE001 -- as in _listen: one request, not the server
                self.counters.errors += 1
                log.exception("tftp: request from %s:%s failed", *addr)
        self._admit()

    # -- one transfer -----------------------------------------------------------------
    async def _transfer_task(self, job: _Job) -> None:
        """Hold ``job``'s admission slot (if any) while the engine runs it; close its file at the end.

        The job normally ends in :meth:`_on_done` (the engine's report, before this task
        wakes); the ``finally`` ends it for every other way out (cancelled, superseded
        while queued by admission, an exception).
        """
        addr, xfer, f = job.addr, job.xfer, job.f
        result: str = "aborted"  # stays so if we are cancelled (server shutdown)
        x: Transfer | None = None
        engine = self._engine
        assert engine is not None
        try:
            if engine.closed:
                return  # shutting down: spawned after the engine stopped ("aborted")
            if job.superseded:
                result = "superseded"
                return
            slot = None
            if self.admission is not None:
                slot = self.admission.slot()
                with trio.CancelScope() as scope:
                    job.scope = scope
                    await slot.__aenter__()
                job.scope = None
                if scope.cancelled_caught:
                    result = "superseded" if job.superseded else "aborted"
                    return  # no slot was taken (admission is cancellation-safe)
            try:
                if engine.closed:
                    return
                if job.superseded:  # in the instant between the slot and now
                    result = "superseded"
                    return
                x = job.x = engine.add(addr, xfer, self._bind_host, _family(addr[0]), trio.Event(), job)
                await x.done.wait()
            finally:
                if slot is not None:
                    await slot.__aexit__(None, None, None)
        except Exception:
            # E.g. no socket left (EMFILE): this transfer fails, the server lives on.
            result = "error"
            self.counters.errors += 1
            log.exception("tftp: transfer of %r to %s:%s failed", xfer.request.filename, *addr)
        finally:
            if x is not None:
                engine.remove(x)  # the engine is done with the socket and the core: close the file
            f.close()
            self._end(job, result, None)  # a no-op when _on_done ended it


async def serve_tftp(
    files: BootFiles,
    host: str = "0.0.0.0",
    port: int = 69,
    *,
    events: trio.MemorySendChannel[BootEvent] | None = None,
    admission: Any = None,
    blksize_max: int = proto.PATH_MTU_BLKSIZE,
    windowsize_max: int = 64,
    client_rcvbuf: int | None = proto.CLIENT_RCVBUF,
    max_transfers: int = 50,
    max_per_client: int = 8,
    max_waiting: int | None = None,
    timeout: float = 1.0,
    retries: int = 5,
    timeout_max: int = TIMEOUT_MAX,
    max_stall: float = MAX_STALL,
    unproven_resend_rate: float = UNPROVEN_RESEND_RATE,
    rto_min: float | None = RTO_MIN,
    rto_max: float | None = None,
    counters: TftpCounters | None = None,
    engine: str = "auto",
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``files`` over TFTP on ``host:port`` until cancelled.

    ``task_status.started((host, bound_port))`` fires once the socket is bound, so
    ``await nursery.start(serve_tftp, files, "127.0.0.1", 0)`` returns the real
    port. ``max_transfers`` defaults to dnsmasq's 50; ``max_waiting`` requests
    (default ``max_transfers``) may wait for a slot beyond it. ``timeout`` is the
    first retransmit timeout (and the longest one used before a client's first
    ACK); after that it adapts within ``[rto_min, rto_max]`` (``rto_min=None``:
    fixed at ``timeout``),
    ``timeout_max`` the largest RFC 2349 timeout a client may negotiate, and
    ``max_stall`` the most seconds a transfer may go without progress;
    ``unproven_resend_rate`` is the shared budget of resends (per second) to
    clients that have not ACKed yet beyond their one guaranteed resend.
    ``counters`` lets the caller read :class:`TftpCounters` while the server
    runs. ``engine`` picks how transfers are driven (``"thread"``, ``"trio"``;
    ``"auto"``: see :mod:`orchestrator.bootserver.tftp_engine`).
    """
    server = TftpServer(
        files, events=events, admission=admission, blksize_max=blksize_max,
        windowsize_max=windowsize_max, client_rcvbuf=client_rcvbuf, max_transfers=max_transfers,
        max_per_client=max_per_client, max_waiting=max_waiting, timeout=timeout, retries=retries, timeout_max=timeout_max,
        max_stall=max_stall, unproven_resend_rate=unproven_resend_rate, rto_min=rto_min, rto_max=rto_max,
        counters=counters, engine=engine,
    )
    await server.serve(host, port, task_status=task_status)


class TftpDownloadError(Exception):
    """:func:`tftp_get` failed; ``failure`` says how."""

    def __init__(self, failure: proto.DownloadFailed) -> None:
        super().__init__(f"{failure.reason}: {failure.code} {failure.message}".strip())
        self.failure = failure


async def tftp_get(
    host: str,
    port: int,
    filename: str,
    *,
    mode: str = "octet",
    options: dict[str, object] | None = None,
    timeout: float = 1.0,
    retries: int = 5,
) -> proto.ReadClient:
    """Download one file with the sans-IO :class:`~orchestrator.protocols.tftp.ReadClient`.

    A small trio client for probes (is the boot server answering?) and tests.
    Returns the finished client (``.data``, ``.oack``, ``.tsize``); raises
    :class:`TftpDownloadError` on an ERROR or a timeout. The server's TID is
    pinned from its first reply; datagrams from any other port are ignored.
    """
    client = proto.ReadClient(filename, mode, options, timeout=timeout, retries=retries)
    sock = trio.socket.socket(_family(host), socket.SOCK_DGRAM)
    with sock:
        peer: tuple[str, int] | None = None
        for pkt in client.start(trio.current_time()):
            await sock.sendto(pkt, (host, port))
        while not client.finished:
            data = None
            with trio.move_on_at(client.next_deadline or trio.current_time()):
                data, src = await sock.recvfrom(65536)
            now = trio.current_time()
            if data is None:
                out = client.timer(now)
            else:
                if peer is None:
                    peer = src[:2]
                elif src[:2] != peer:
                    continue  # someone else's packet; a real client answers ERROR 5
                try:
                    out, _ = client.datagram(data, now)
                except proto.RemoteProtocolError:
                    continue
            for pkt in out:
                await sock.sendto(pkt, peer or (host, port))
    if client.failed is not None:
        raise TftpDownloadError(client.failed)
    return client
