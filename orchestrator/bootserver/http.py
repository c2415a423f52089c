"""HTTP/1.1 boot file server for iPXE clients, on h11.

iPXE fetches its script, the kernel and the initrd over HTTP when it can: TCP
beats lock-step TFTP by an order of magnitude. This server publishes the same
:class:`~orchestrator.bootserver.files.BootFiles` root (static files plus the
plan's rendered configs and iPXE scripts) that TFTP serves.

Shape
-----
* **h11 does all HTTP parsing and framing** (no hand-written parser). The pure
  parts that are ours -- turning a request target into a boot-file name
  (:func:`request_name`) and a ``Range`` header into a byte span
  (:func:`parse_range`) -- are plain functions, tested without sockets.
* **The trio shell** is one accept loop per listener and one task per
  connection. A connection is a loop of request cycles: wait for a complete
  request (under a deadline), answer it, ``start_next_cycle()`` for keep-alive.

Choices
-------
* Methods: ``GET`` and ``HEAD``; anything else is ``405`` with ``Allow``.
* Names: the path of the target, percent-decoded (UTF-8), after the leading
  ``/``; the query string is ignored; absolute-form targets
  (``http://host/path``, RFC 9112 §3.2.2) are accepted. The decoded name goes to
  ``BootFiles.open``, which owns confinement: ``%2e%2e`` decodes to ``..`` and
  is refused there (``403``), as are NUL and backslash. ``GET /`` is ``404``.
* Status mapping: ``NotFound`` -> 404, ``AccessViolation`` -> 403, a target h11
  accepts but we cannot decode -> 400, garbage on the wire
  (``h11.RemoteProtocolError``) -> 400 (when a response can still be sent) and
  close; an HTTP version other than 1.0/1.1 (h11 parses any ``d.d``) -> 505;
  a dynamic source that raises -> 500 (logged; the server carries on). Error
  responses keep the connection alive (a client walking a list of candidate
  names reuses it), except 400, 413 and 505.
* Ranges (RFC 9110 §14): one range -- ``bytes=a-b``, ``a-``, ``-n`` -- gives
  ``206`` with ``Content-Range``; a first byte past the end, or ``-0``, gives
  ``416`` with ``Content-Range: bytes */size``. A last byte past the end is
  clamped. **Multi-range requests are answered 200 with the whole file**
  (RFC 9110 §14.2 lets a server ignore ``Range``; boot clients never ask for
  multipart/byteranges and we would rather not build it). Syntactically
  invalid ``Range`` values, unknown units, and any ``Range`` sent with
  ``If-Range`` (we issue no validators, so the condition cannot hold) are
  ignored the same way. ``HEAD`` ignores ``Range`` (range handling is defined
  for GET only, §14.2).
* Bodies stream in ``chunk_size`` pieces (256 KiB). A file on disk goes out
  with ``os.sendfile`` from the page cache straight into the socket (no copy
  through Python, no buffer held: a transfer, waiting or not, holds a few dozen
  bytes of rate samples); h11 still frames the body (it is handed a
  placeholder of the chunk's length). Dynamic content, and files on a
  filesystem that refuses ``sendfile`` (``EINVAL``/``ENOSYS``/``EOPNOTSUPP``
  on the first call), are read with ``pread`` and sent with ``send_all``: one
  chunk held per transfer. Both run on the event loop: boot files are hot in
  the page cache during a storm, and a thread hop per chunk would cost more
  than it saves. ``sendfile=False`` forces the ``pread`` path (benchmarks).
* Admission: each GET body transfer holds, in this order, one of its client
  address's ``max_per_client`` transfers (default 4) and an :class:`Admission`
  slot, and every chunk asks the byte budget first. Both waits are FIFO queues
  *before* the response head is sent, so a waiting client simply sees a slower
  first byte. **Excess requests queue; they are never refused**: iPXE's
  ``httpcore.c`` does retry a 503 that carries ``Retry-After`` (current builds
  any response with it), but builds older than that support -- still found in
  NIC ROMs -- and other firmware fail the download on a 503, and a retried
  request loses its place in line. The per-address wait comes first, so one
  address's surplus never takes a place in the shared slot queue (which TFTP
  shares too). The address is the TCP peer's: unlike a UDP source it cannot be
  forged off-path. An IPv6 host can hold many addresses; they are counted
  apart (a /64 would lump a whole boot LAN together). Error responses and HEAD
  take neither.
* Overload, and what iPXE makes of it (``src/net/tcp/httpcore.c``,
  ``tcp.c``): a fresh connection that is refused or reset, or a 5xx without
  ``Retry-After``, fails the download for good (``imgfetch`` does not retry);
  a *reused* keep-alive connection that the server closed is reopened and the
  request sent again (``pool_reopen``); a SYN nobody answers is retried with
  back-off for about 15 s (retry timers give up past a 10 s timeout); an
  established connection waiting for its response has no deadline on iPXE's
  side. So every overload path here ends in a wait on an established
  connection or in the closing of an *idle* one -- never in a refusal, a reset
  of a fresh connection or a 503: excess transfers wait in the FIFO queues
  above (the response head not yet sent), excess connections wait in the
  kernel's listen backlog (``somaxconn``, 4096 by default: the handshake is
  completed and the request acknowledged by the kernel, so the client just
  sees a slow first byte), and at the connection cap the oldest *idle*
  connection makes room (see Connections). A connection held in the listen
  backlog costs this process nothing; one accepted and queued for a slot holds
  its h11 state, one open descriptor of the file and a few small objects (the
  tests pin both).
* Slow readers: while a transfer waits for an :class:`Admission` slot, a
  transfer that delivers less than ``min_rate`` (default 64 KiB/s) per second
  *the client makes us wait* loses its slot: the connection is reset and the
  transfer ends with FILE_FAILED ``too_slow``. "Makes us wait" is time blocked
  in ``send_all`` (the client's window or our socket buffer is full) -- never
  the time we sleep for the byte budget, which is our own pacing. "Delivers" is
  bytes the client's TCP acknowledged (Linux ``TCP_INFO``; elsewhere, bytes
  written), so a multi-megabyte socket buffer does not hide a client that takes
  nothing. A watchdog samples each transfer every ``rate_window / 10`` seconds
  (default 1 s) and judges its last ``rate_window`` (10 s), once the client has
  made us wait at least half of it. It ends only as many transfers as there are
  waiters, slowest first, and nobody when nobody waits: a slow node alone on the
  server is served at its own pace. Why 64 KiB/s: a node's fair share on a
  congested 100 Mbit/s link with 50 slots is ~250 KB/s, on 1 Gbit/s with 200
  slots ~625 KB/s; 64 KiB/s sits 4-10x below those and at twice the ~32 KB/s a
  slot-pinning attack was seen to use. Keep ``min_rate x max_active`` well under
  the link rate (a 100 Mbit/s link with 200 slots is too many slots), or set the
  byte budget below the link rate: when our budget is the bottleneck, clients
  rarely make us wait and are not judged. An attacker can still hold slots by
  reading at ``min_rate`` -- from ``max_active / max_per_client`` addresses, at
  the price of ``min_rate`` per slot in real bandwidth.
* Connections: a cap (``max_connections``). When it is reached the accept loop
  first closes the *oldest idle connection* -- one that has sent no byte of its
  next request, not even one still unread in the socket (allowed at any time,
  RFC 9112 §9.6; iPXE reopens a reused connection; a half-sent request is left
  to its deadline). A connection that has not completed a request yet counts
  as idle only after ``FRESH_GRACE`` (2 s) of silence: iPXE takes the close of
  a *fresh* connection as a failed download. Otherwise it waits while further
  clients queue in the kernel's listen backlog: queue, don't refuse, as for
  transfers. While it waits it looks again whenever a connection ends or goes
  idle, so a keep-alive that goes idle (a node that fetched its kernel and
  booted leaves one behind, silently) makes room at once instead of after its
  ``idle_timeout``; one idle connection is closed at a time. Clients in the
  backlog are accepted in the order the kernel queued them (FIFO). One address
  may hold at most ``max_connections_per_client`` (default 16) connections: a
  new one beyond that first closes that address's own oldest idle connection,
  and is closed at once when it has none (a node needs one or two; the cap
  keeps one address from filling ``max_connections`` with requests queued at
  its own per-address transfer gate, where no other client would ever wait).
* Timeouts: a request must arrive complete within ``idle_timeout`` of the
  connection becoming idle (kills idle keep-alives *and* slowloris
  half-requests); each ``send_all`` -- one chunk -- must finish within
  ``send_timeout`` (kills clients that stop reading, whether or not anyone
  waits: a 256 KiB chunk in 30 s is ~9 KB/s). A client that stopped reading
  (timeout or ``too_slow``) gets a reset, not a FIN, so the kernel drops the
  megabytes still queued for it. Time spent queued for a client or admission
  slot is not bounded: that is the point of queueing (a waiting connection
  counts against ``max_connections`` like any busy one).
* Events (source ``"http"``): ``FILE_REQUEST`` when a GET names a file,
  ``FILE_DONE`` when the last body byte is written (``bytes`` = body bytes,
  ``size`` = whole file, ``detail["range"]`` set for a 206 so the tracker can
  tell a partial fetch from a complete one), ``FILE_FAILED`` with ``result``
  ``not_found`` / ``access_violation`` / ``range_not_satisfiable`` /
  ``aborted`` (client went away) / ``timeout`` (client stopped reading) /
  ``too_slow`` (below ``min_rate`` while others waited; ``detail["rate"]`` is
  the measured bytes/s) / ``error``. HEAD emits nothing: it moves no file.
  Events go out with ``send_nowait``; a full or closed channel drops the event
  and counts it in :attr:`HttpStats.events_dropped` -- the server never blocks
  on its observers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import socket
import struct
import termios
import time
import urllib.parse
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any, Callable

import h11
import trio

from ..events import BootEvent, EventKind
from .admission import Admission
from .files import AccessViolation, BootFile, BootFiles, NotFound

__all__ = ["HttpStats", "RangeNotSatisfiable", "BadTarget", "parse_range", "request_name", "serve_http"]

log = logging.getLogger(__name__)

SERVER_HEADER = b"bootorch"
#: Body chunk read with pread and written with one send_all. Measured on
#: loopback with curl (64 MiB file): 64 KiB ~440 MB/s, 256 KiB ~830 MB/s,
#: 1 MiB ~1 GB/s; per-chunk overhead dominates below 256 KiB. Memory per
#: transfer is one chunk.
CHUNK_SIZE = 256 * 1024
RECEIVE_SIZE = 16 * 1024
#: Request line plus headers; h11's default is 16 KiB as well.
MAX_HEADER_BYTES = 16 * 1024
#: GET/HEAD carry no body; tolerate a small one, refuse (413 + close) a big one.
MAX_REQUEST_BODY = 64 * 1024
#: accept() errors meaning "out of descriptors/memory for now": back off, retry.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: Body transfers one client address may run at once (``max_per_client``). iPXE
#: fetches one file at a time; the spare slots cover a node that rebooted
#: mid-download and left a dying connection behind, or a few VMs behind one NAT.
MAX_PER_CLIENT = 4
#: Slowest a transfer may go while others wait for its slot (``min_rate``, bytes/s).
#: A node's fair share on a congested 100 Mbit/s link with 50 slots is ~250 KB/s,
#: on 1 Gbit/s with 200 slots ~625 KB/s: 64 KiB/s is 4-10x below both, and twice
#: the ~32 KB/s that slow readers need to pin every slot for the length of an initrd.
MIN_RATE = 64 * 1024
#: Seconds of recent history the rate is judged on (``rate_window``); a transfer
#: is judged once the client has made us wait for at least half of it.
RATE_WINDOW = 10.0
#: Seconds a connection that has not sent a whole request yet is safe from being closed
#: for room at the connection cap: iPXE sends its request right after the handshake, and
#: takes the close of a fresh connection as a failed download (a reused one it reopens).
FRESH_GRACE = 2.0
#: ``struct tcp_info`` (linux/tcp.h): ``tcpi_bytes_acked`` is a u64 at this offset (Linux >= 4.2).
_TCPI_BYTES_ACKED = 120


# -- pure core ---------------------------------------------------------------------


class BadTarget(ValueError):
    """A request target we cannot turn into a file name (answered 400)."""


class RangeNotSatisfiable(ValueError):
    """A single byte range that lies wholly outside the file (answered 416)."""


def request_name(target: bytes) -> str:
    """The boot-file name a request target asks for: decoded path minus the leading ``/``.

    >>> request_name(b"/pxelinux.cfg/01-aa-bb?x=1")
    'pxelinux.cfg/01-aa-bb'
    >>> request_name(b"/%2e%2e/etc/passwd")  # refused later, by BootFiles
    '../etc/passwd'
    """
    if target.startswith(b"/"):
        path = target
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # absolute-form (RFC 9112 §3.2.2): servers must accept it; drop scheme+authority.
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        path = rest[slash:] if slash >= 0 else b"/"
    else:
        raise BadTarget("request target is not a path")
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    try:
        name = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("path is not UTF-8") from None
    return name[1:]


def _num(digits: bytes) -> int:
    """A decimal of any length, saturating: Python refuses int() of >4300 digits."""
    digits = digits.lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else 10**18


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """The inclusive byte span ``(first, last)`` a ``Range`` value asks for.

    Returns None when the header is to be ignored (whole file, 200): unknown
    unit, invalid syntax, or more than one range. Raises
    :class:`RangeNotSatisfiable` for a single range with no byte in the file.
    RFC 9110 §14.1.2 (syntax), §14.2 (ignoring), §15.5.17 (416).

    >>> parse_range(b"bytes=0-99", 1000), parse_range(b"bytes=-100", 1000)
    ((0, 99), (900, 999))
    """
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    ranges = [r.strip() for r in spec.split(b",") if r.strip()]  # empty list elements are legal
    if len(ranges) != 1:
        return None  # multi-range (or none): documented choice, 200 with the whole file
    first, dash, last = ranges[0].partition(b"-")
    if not dash:
        return None
    if not first:  # suffix-range: the last n bytes
        if not last.isdigit():
            return None
        n = _num(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(value)
        return (max(0, size - n), size - 1)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    a = _num(first)
    b = _num(last) if last else None
    if b is not None and b < a:
        return None  # invalid range-spec: ignore the header
    if a >= size:
        raise RangeNotSatisfiable(value)
    return (a, size - 1 if b is None else min(b, size - 1))


# -- counters ------------------------------------------------------------------------


@dataclass(slots=True)
class HttpStats:
    """Live counters; pass one in to read them (metrics scrape these)."""

    #: Requests answered (any status).
    requests: int = 0
    #: Response body bytes written (not counting heads).
    bytes_sent: int = 0
    #: Body transfers in progress (holding an admission slot when admission is on).
    active: int = 0
    #: Connections open now, and accepted in total.
    connections: int = 0
    connections_total: int = 0
    #: Most connections open at once (never above ``max_connections``).
    connections_peak: int = 0
    #: Accepted connections that found every connection slot taken and waited for one
    #: (while they wait, later clients queue in the kernel's listen backlog).
    cap_waits: int = 0
    #: Responses by status code.
    by_status: Counter[int] = field(default_factory=Counter)
    #: Garbage from clients (h11 RemoteProtocolError).
    protocol_errors: int = 0
    #: Connections closed by us for idleness / a stalled request or send / eviction at the cap.
    timeouts: int = 0
    evictions: int = 0
    #: Connections closed at once: their address already held ``max_connections_per_client``, none idle.
    refused: int = 0
    #: Transfers ended because they ran below ``min_rate`` while others waited for a slot.
    too_slow: int = 0
    #: Requests that had to wait because their client address already ran
    #: ``max_per_client`` transfers (in total, and waiting now).
    client_waits: int = 0
    client_queued: int = 0
    #: BootEvents dropped because the channel was full or closed.
    events_dropped: int = 0
    #: Unexpected exceptions in a connection handler (a bug: logged, connection closed).
    internal_errors: int = 0


# -- trio shell ----------------------------------------------------------------------


class _Abort(Exception):
    """End this connection now (after an error response, or when a body cannot be completed)."""


class _TooSlow(Exception):
    """The transfer was ended for running below ``min_rate`` while others waited for a slot."""


def _bytes_acked(sock: trio.socket.SocketType) -> int | None:
    """Bytes the peer has acknowledged on this TCP connection (Linux ``TCP_INFO``), or None.

    Bytes *acknowledged*, not bytes written: a socket's send buffer grows to
    megabytes (4 MB on loopback), so a client that has taken nothing can have
    swallowed several whole chunks from our point of view.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # no TCP_INFO on this platform, or the socket is gone
        return None
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return None
    return int(struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0])


class _Transfer:
    """One body transfer holding a slot: how long the client has made us wait, and how much it took.

    ``blocked`` accumulates the time spent inside ``send_all`` (the client's
    window or our socket buffer was full) -- not the time we sleep for the byte
    budget, which is ours. The watchdog samples ``(time, bytes taken, blocked)``
    every ``rate_window / 10`` seconds; the rate is the bytes the client took per
    second of blocked time across the window.
    """

    __slots__ = ("conn", "started", "blocked", "blocked_since", "written", "acked", "samples", "scope", "evicted")

    def __init__(self, conn: _Connection, now: float, samples: int) -> None:
        self.conn = conn
        self.started = now
        self.blocked = 0.0
        self.blocked_since: float | None = None
        #: Bytes handed to the kernel by completed sends: the fallback measure without TCP_INFO.
        self.written = 0
        #: Whether TCP_INFO works for this socket (decided at the first sample; None = not yet).
        self.acked: bool | None = None
        self.samples: deque[tuple[float, int, float]] = deque(maxlen=samples)
        self.scope = trio.CancelScope()
        self.evicted = False

    def sample(self, now: float) -> None:
        taken = None
        if self.acked is not False:
            taken = _bytes_acked(self.conn.stream.socket)
            if self.acked is None:
                self.acked = taken is not None
            elif taken is None:
                return  # the socket is going away; never mix the two measures
        if taken is None:
            taken = self.written
        blocked = self.blocked + (now - self.blocked_since if self.blocked_since is not None else 0.0)
        self.samples.append((now, taken, blocked))

    def rate(self, evidence: float) -> float | None:
        """Bytes/s over the samples held, or None until the client has made us wait ``evidence`` seconds."""
        if len(self.samples) < 2:
            return None
        _, taken0, blocked0 = self.samples[0]
        _, taken1, blocked1 = self.samples[-1]
        waited = blocked1 - blocked0
        if waited < evidence:
            return None
        return max(0, taken1 - taken0) / waited


class _ClientGate:
    """The per-address transfer cap: a FIFO semaphore, dropped when its last user leaves."""

    __slots__ = ("sem", "users")

    def __init__(self, limit: int) -> None:
        # trio.Semaphore hands a released unit straight to the first waiter: FIFO, no barging.
        self.sem = trio.Semaphore(limit)
        self.users = 0


class _ClientSlot:
    """``async with server.client_slot(ip):`` -- one of the address's ``max_per_client`` transfers."""

    __slots__ = ("_server", "_ip", "_gate")

    def __init__(self, server: _Server, ip: str | None) -> None:
        self._server = server
        self._ip = ip
        self._gate: _ClientGate | None = None

    async def __aenter__(self) -> None:
        s, ip = self._server, self._ip
        if s.max_per_client is None or ip is None:
            await trio.lowlevel.checkpoint()
            return
        gate = s.clients.get(ip)
        if gate is None:
            gate = s.clients[ip] = _ClientGate(s.max_per_client)
        gate.users += 1
        waiting = gate.sem.value == 0
        if waiting:
            s.stats.client_waits += 1
            s.stats.client_queued += 1
        try:
            await gate.sem.acquire()
        except BaseException:
            self._leave(gate)
            raise
        finally:
            if waiting:
                s.stats.client_queued -= 1
        self._gate = gate

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._gate is not None:
            self._gate.sem.release()
            self._leave(self._gate)

    def _leave(self, gate: _ClientGate) -> None:
        gate.users -= 1
        if gate.users == 0:
            # Memory stays bounded by the addresses with a transfer running or waiting.
            del self._server.clients[self._ip]  # type: ignore[arg-type]


class _Server:
    def __init__(
        self,
        files: BootFiles,
        *,
        events: trio.MemorySendChannel[BootEvent] | None,
        admission: Admission | None,
        stats: HttpStats,
        max_connections: int,
        idle_timeout: float,
        send_timeout: float,
        chunk_size: int,
        max_per_client: int | None,
        min_rate: float | None,
        rate_window: float,
        max_connections_per_client: int | None = None,
        sendfile: bool = True,
    ) -> None:
        self.files = files
        #: Send disk files with os.sendfile (else pread + send_all).
        self.sendfile = sendfile and hasattr(os, "sendfile")
        self.events = events
        self.admission = admission
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.chunk_size = chunk_size
        self.max_per_client = max_per_client
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.conn_slots = trio.Semaphore(max_connections)
        self.max_connections_per_client = max_connections_per_client
        #: Client address -> connections open now.
        self.conns_per_ip: Counter[str] = Counter()
        #: Connections waiting for their next request, oldest first -> scope to cancel.
        self.idle: OrderedDict[_Connection, trio.CancelScope] = OrderedDict()
        #: Client address -> its transfer gate (only addresses with a transfer running or waiting).
        self.clients: dict[str, _ClientGate] = {}
        #: Body transfers holding a slot, for the watchdog.
        self.transfers: set[_Transfer] = set()
        #: Transfers the watchdog has cancelled that have not given their slot back yet.
        self.evicting = 0
        self._transfers_started = trio.Event()
        #: Set when a connection ends or goes idle: an accept loop waiting at the cap looks again.
        self._room = trio.Event()
        #: Idle connections closed to make room that have not ended yet.
        self.closing_idle = 0

    def client_slot(self, ip: str | None) -> _ClientSlot:
        return _ClientSlot(self, ip)

    def new_transfer(self, conn: _Connection) -> _Transfer:
        tr = _Transfer(conn, trio.current_time(), samples=_SAMPLES + 1)
        self.transfers.add(tr)
        self._transfers_started.set()
        return tr

    def end_transfer(self, tr: _Transfer) -> None:
        self.transfers.discard(tr)
        if tr.evicted:
            self.evicting -= 1

    async def watchdog(self) -> None:
        """Sample every transfer's progress; while transfers wait for a slot, end the slowest below ``min_rate``.

        Runs only with an :class:`Admission` (without one nobody waits for a
        slot) and ``min_rate`` set; sleeps on an event while no transfer runs.
        """
        interval = self.rate_window / _SAMPLES
        while True:  # until cancelled with the server; one pass per interval while transfers run
            if not self.transfers:
                self._transfers_started = trio.Event()
                await self._transfers_started.wait()
            await trio.sleep(interval)
            now = trio.current_time()
            for tr in self.transfers:
                tr.sample(now)
            self.evict_slow(now)

    def evict_slow(self, now: float) -> None:
        assert self.admission is not None and self.min_rate is not None
        evidence = self.rate_window / 2
        slow = []
        for tr in self.transfers:
            if tr.evicted:
                continue
            rate = tr.rate(evidence)
            if rate is not None and rate < self.min_rate:
                slow.append((rate, tr.started, id(tr), tr))
        if not slow:
            return
        # One eviction per waiter: the released slot goes straight to the first of them.
        need = self.admission.queued - self.evicting
        for rate, _, _, tr in sorted(slow)[: max(0, need)]:
            log.warning(
                "http: ending transfer to %s (%.0f B/s over the last %.0f s, below min_rate %.0f) -- others wait for a slot",
                tr.conn.client_ip, rate, self.rate_window, self.min_rate,
            )
            tr.evicted = True
            self.evicting += 1
            tr.scope.cancel()

    def emit(self, kind: EventKind, conn: _Connection, name: str | None, **kw: Any) -> None:
        if self.events is None:
            return
        ev = BootEvent(
            time=trio.current_time(),
            source="http",
            kind=kind,
            client_ip=conn.client_ip,
            client_port=conn.client_port,
            filename=name,
            wall=time.time(),
            **kw,
        )
        try:
            self.events.send_nowait(ev)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats.events_dropped += 1

    def evict_idle_of(self, ip: str) -> bool:
        """Close the oldest idle connection of ``ip``; False when it has none."""
        return self._evict_first(ip)

    def evict_one_idle(self) -> bool:
        """Close the oldest idle connection; False when there is none."""
        return self._evict_first(None)

    def _evict_first(self, ip: str | None) -> bool:
        """Close the oldest evictable idle connection (of ``ip`` when given).

        Idle means waiting for the next request with none of it received: not
        even pending in the socket (``FIONREAD``), so a request that has arrived
        is answered rather than cut off. A connection that has not completed a
        request yet is left alone for ``FRESH_GRACE`` seconds of silence: iPXE
        reopens a *reused* connection the server closed, but takes the close
        of a fresh one as a failed download.
        """
        now = trio.current_time()
        for conn, scope in self.idle.items():
            if ip is not None and conn.client_ip != ip:
                continue
            if conn.cycles == 0 and now - conn.idle_since < FRESH_GRACE:
                continue
            if _pending(conn.stream.socket):
                continue
            del self.idle[conn]
            conn.evicted = True
            self.closing_idle += 1
            scope.cancel()
            return True
        return False

    def room(self) -> None:
        """A connection ended or went idle: wake an accept loop waiting at the cap."""
        self._room.set()

    async def connection_slot(self) -> None:
        """One of ``max_connections``; at the cap, close the oldest idle connection to make room.

        Waits while every connection is busy, and looks again whenever one ends
        or goes idle, so a connection that goes idle while others wait in the
        listen backlog is closed at once rather than after its ``idle_timeout``.
        One idle connection is closed at a time (its end frees the slot).
        """
        waited = False
        while True:  # ends when a slot is free; each pass waits for a connection to end or go idle
            try:
                self.conn_slots.acquire_nowait()
                return
            except trio.WouldBlock:
                pass
            if not waited:
                waited = True
                self.stats.cap_waits += 1
            if self.closing_idle == 0:
                self.evict_one_idle()
            self._room = trio.Event()
            # A fresh idle connection becomes evictable only after FRESH_GRACE: look again then.
            with trio.move_on_after(FRESH_GRACE if self.idle and self.closing_idle == 0 else math.inf):
                await self._room.wait()

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:  # runs until cancelled; one iteration per accepted connection
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("http: accept failed (%s); retrying in 0.1 s", e)
                await trio.sleep(0.1)
                continue
            limit = self.max_connections_per_client
            if limit is not None:
                ip = _peer_ip(stream)
                if ip is not None and self.conns_per_ip[ip] >= limit and not self.evict_idle_of(ip):
                    self.stats.refused += 1
                    await trio.aclose_forcefully(stream)
                    continue
            try:
                await self.connection_slot()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            nursery.start_soon(self.connection, stream)

    async def connection(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.stats.connections_peak = max(self.stats.connections_peak, self.stats.connections)
        ip = _peer_ip(stream)
        if ip is not None:
            self.conns_per_ip[ip] += 1
        conn: _Connection | None = None
        try:
            conn = _Connection(self, stream)
            await conn.run()
        except Exception:
            self.stats.internal_errors += 1
            log.exception("http: connection handler failed")
        finally:
            if ip is not None:
                self.conns_per_ip[ip] -= 1
                if self.conns_per_ip[ip] <= 0:
                    del self.conns_per_ip[ip]
            self.stats.connections -= 1
            if conn is not None and conn.evicted:
                self.closing_idle = max(0, self.closing_idle - 1)
            self.conn_slots.release()
            self.room()
            await trio.aclose_forcefully(stream)


def _pending(sock: trio.socket.SocketType) -> bool:
    """Whether received bytes wait unread in ``sock`` (``FIONREAD``); True when it cannot be told."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):
        return True


def _peer_ip(stream: trio.SocketStream) -> str | None:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:  # already reset
        return None


class _Connection:
    """One TCP connection: a loop of h11 request cycles."""

    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.evicted = False
        #: Requests answered on this connection; a connection with none is "fresh".
        self.cycles = 0
        #: When the connection last started waiting for a request (trio clock).
        self.idle_since = 0.0
        #: The current request is HEAD: responses carry no body.
        self.head = False
        #: The body transfer in progress (holding a slot), whose blocked time ``_send`` measures.
        self.transfer: _Transfer | None = None
        #: End with RST rather than FIN: set for a client that stopped reading, so the
        #: kernel drops what is still queued for it instead of trying to deliver it.
        self.reset = False
        try:
            peer = stream.socket.getpeername()
            self.client_ip: str | None = peer[0]
            self.client_port: int | None = peer[1]
        except OSError:  # already reset
            self.client_ip = self.client_port = None

    # -- I/O helpers --

    async def _next_event(self) -> Any:
        while True:  # each pass consumes data or returns; EOF makes h11 return ConnectionClosed
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if data:
                # A request is under way: no longer idle, so no longer evictable.
                self.server.idle.pop(self, None)
            self.h11.receive_data(data)

    async def _send(self, event: Any) -> None:
        chunks = self.h11.send_with_data_passthrough(event)
        if not chunks:
            return
        tr = self.transfer
        if tr is None:
            with trio.fail_after(self.server.send_timeout):
                for c in chunks:
                    await self.stream.send_all(c)
            return
        # Time inside send_all is time the client (its window, its reading) makes us wait.
        tr.blocked_since = trio.current_time()
        try:
            with trio.fail_after(self.server.send_timeout):
                for c in chunks:
                    await self.stream.send_all(c)
                    tr.written += len(c)
        finally:
            tr.blocked += trio.current_time() - tr.blocked_since
            tr.blocked_since = None

    async def _sendfile(self, fd: int, offset: int, count: int, *, first: bool = False) -> bool:
        """Send ``count`` bytes of ``fd`` from ``offset`` with ``os.sendfile``, framed by h11, within ``send_timeout``.

        Returns False, having sent nothing, when ``first`` and the kernel
        refuses sendfile for this file (the caller falls back to ``pread``).
        Raises ``trio.BrokenResourceError`` when the client has gone,
        :class:`_FileShrank` when the file ends early, ``trio.TooSlowError``
        past the deadline. Checkpoints at least once.
        """
        sock = self.stream.socket
        out = sock.fileno()
        tr = self.transfer
        framed = False
        yielded = False
        if tr is not None:
            # Time in here is time the client (its window, its reading) makes us wait.
            tr.blocked_since = trio.current_time()
        try:
            with trio.fail_after(self.server.send_timeout):
                while count > 0:  # bounded: each pass sends >= 1 byte, waits for room, or raises
                    try:
                        n = os.sendfile(out, fd, offset, count)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(out)
                        yielded = True
                        continue
                    except OSError as e:
                        if first and not framed and e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                            return False
                        raise trio.BrokenResourceError(f"sendfile: {e}") from e
                    if n == 0:
                        raise _FileShrank
                    if not framed:
                        # h11 frames the body (Content-Length bookkeeping) from a placeholder.
                        self.h11.send_with_data_passthrough(h11.Data(data=_Span(count)))
                        framed = True
                    offset += n
                    count -= n
                    if tr is not None:
                        tr.written += n
                if not yielded:
                    await trio.lowlevel.checkpoint()
        finally:
            if tr is not None and tr.blocked_since is not None:
                tr.blocked += trio.current_time() - tr.blocked_since
                tr.blocked_since = None
        return True

    # -- the loop --

    async def run(self) -> None:
        s = self.server
        try:
            while True:  # one pass per request; ends when either side closes
                request = await self._read_request()
                if request is None:
                    return
                await self._respond(request)
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return  # MUST_CLOSE (Connection: close, HTTP/1.0) or peer closed
                self.cycles += 1
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as e:
            s.stats.protocol_errors += 1
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(Exception):
                    await self._simple(e.error_status_hint, b"bad request\n", close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Abort):
            pass
        except trio.TooSlowError:
            s.stats.timeouts += 1
            self.reset = True
        finally:
            s.idle.pop(self, None)
            if self.reset:
                with contextlib.suppress(OSError):
                    self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def _read_request(self) -> h11.Request | None:
        """The next request with its (small) body drained, or None to close."""
        s = self.server
        self.head = False
        with trio.move_on_after(s.idle_timeout) as scope:
            self.idle_since = trio.current_time()
            s.idle[self] = scope
            s.room()
            try:
                event = await self._next_event()
            finally:
                s.idle.pop(self, None)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request), event
            if self.evicted:
                # Closed for room just as the request arrived (the cancellation never
                # reached a checkpoint): answer it and keep the connection.
                self.evicted = False
                s.closing_idle = max(0, s.closing_idle - 1)
            self.head = event.method == b"HEAD"
            body = 0
            while True:  # bounded by MAX_REQUEST_BODY and the deadline
                if self.h11.they_are_waiting_for_100_continue:
                    await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                ev = await self._next_event()
                if isinstance(ev, h11.EndOfMessage):
                    return event
                if isinstance(ev, h11.Data):
                    body += len(ev.data)
                    if body > MAX_REQUEST_BODY:
                        await self._simple(413, b"request body too large\n", close=True)
                        raise _Abort
                else:  # ConnectionClosed mid-request raises RemoteProtocolError in h11
                    return None
        if scope.cancelled_caught:
            if self.evicted:
                s.stats.evictions += 1
            else:
                s.stats.timeouts += 1
        return None

    async def _simple(
        self, status: int, body: bytes, *, close: bool = False, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A small text response (errors); ``close`` ends the connection after it."""
        headers = _base_headers()
        headers += [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if extra:
            headers += extra
        if close:
            headers.append((b"connection", b"close"))
        self.server.stats.requests += 1
        self.server.stats.by_status[status] += 1
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if body and not self.head:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _respond(self, req: h11.Request) -> None:
        s = self.server
        t0 = trio.current_time()
        if req.http_version not in (b"1.0", b"1.1"):
            # h11 parses any HTTP/d.d; we speak 1.x only (RFC 9110 §15.6.6).
            await self._simple(505, b"http version not supported\n", close=True)
            return
        if req.method not in (b"GET", b"HEAD"):
            await self._simple(405, b"method not allowed\n", extra=[(b"allow", b"GET, HEAD")])
            return
        is_get = req.method == b"GET"
        try:
            name = request_name(req.target)
        except BadTarget:
            await self._simple(400, b"bad request target\n", close=True)
            return
        range_hdr: list[bytes] = []
        if_range = False
        user_agent = b""
        for k, v in req.headers:
            if k == b"range":
                range_hdr.append(v)
            elif k == b"if-range":
                if_range = True
            elif k == b"user-agent":
                user_agent = v
        detail: dict[str, Any] = {"method": req.method.decode("ascii", "replace")}
        if user_agent:
            detail["user_agent"] = user_agent[:200].decode("latin-1")

        def failed(result: str, status: int, **kw: Any) -> None:
            if is_get:
                s.emit(
                    EventKind.FILE_FAILED,
                    self,
                    name,
                    result=result,
                    duration=trio.current_time() - t0,
                    detail={**detail, "status": status},
                    **kw,
                )

        if is_get:
            s.emit(EventKind.FILE_REQUEST, self, name, detail=detail)
        try:
            f = s.files.open(name, self.client_ip) if name else None
        except NotFound:
            f = None
        except AccessViolation:
            failed("access_violation", 403)
            await self._simple(403, b"forbidden\n")
            return
        except Exception:  # a dynamic source raised: the plan's bug, not the client's
            log.exception("http: opening %r failed", name)
            failed("error", 500)
            await self._simple(500, b"internal error\n")
            return
        if f is None:
            failed("not_found", 404)
            await self._simple(404, b"not found\n")
            return
        try:
            await self._send_file(req, f, name, is_get, range_hdr, if_range, detail, t0, failed)
        finally:
            f.close()

    async def _send_file(
        self,
        req: h11.Request,
        f: BootFile,
        name: str,
        is_get: bool,
        range_hdr: list[bytes],
        if_range: bool,
        detail: dict[str, Any],
        t0: float,
        failed: Callable[..., None],
    ) -> None:
        s = self.server
        size = f.size
        span: tuple[int, int] | None = None
        if is_get and len(range_hdr) == 1 and not if_range:
            try:
                span = parse_range(range_hdr[0], size)
            except RangeNotSatisfiable:
                failed("range_not_satisfiable", 416, size=size)
                extra = [(b"content-range", f"bytes */{size}".encode())]
                await self._simple(416, b"range not satisfiable\n", extra=extra)
                return
        headers = _base_headers()
        headers += [(b"content-type", content_type(name)), (b"accept-ranges", b"bytes")]
        if span is not None:
            start, length, status = span[0], span[1] - span[0] + 1, 206
            headers.append((b"content-range", f"bytes {span[0]}-{span[1]}/{size}".encode()))
            detail["range"] = span
        else:
            start, length, status = 0, size, 200
        headers.append((b"content-length", str(length).encode()))
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        if not is_get:  # HEAD: the head only, no slot, no events
            s.stats.requests += 1
            s.stats.by_status[status] += 1
            await self._send(response)
            await self._send(h11.EndOfMessage())
            return

        adm = s.admission
        sent = 0
        tr: _Transfer | None = None
        try:
            # The client's own cap first, so its excess requests wait without taking a
            # place in the shared slot queue; then a shared slot.
            async with s.client_slot(self.client_ip), adm.slot() if adm is not None else contextlib.nullcontext():
                detail["queued"] = trio.current_time() - t0
                s.stats.active += 1
                self.transfer = tr = s.new_transfer(self)
                try:
                    with tr.scope:  # the watchdog cancels it to take the slot back
                        s.stats.requests += 1
                        s.stats.by_status[status] += 1
                        await self._send(response)
                        offset, end = start, start + length
                        fd: int | None = getattr(f, "fd", None) if s.sendfile else None
                        while offset < end:  # bounded: each pass sends >= 1 byte or aborts
                            n = min(s.chunk_size, end - offset)
                            data = b""
                            if fd is None:
                                data = f.pread(offset, n)
                                if not data:
                                    # The file shrank under us; Content-Length cannot be honoured.
                                    raise _FileShrank
                                n = len(data)
                            if adm is not None:
                                # The byte budget. Not adm.consume(): that checkpoints even
                                # when tokens are there, and sending checkpoints anyway.
                                wait = adm.try_consume(n, trio.current_time())
                                while wait > 0.0:  # ends: each wait refills what was lacking
                                    await trio.sleep(wait)
                                    wait = adm.try_consume(n, trio.current_time())
                            if fd is not None and not await self._sendfile(fd, offset, n, first=sent == 0):
                                fd = None  # this filesystem does not do sendfile: pread from here on
                            if fd is None:
                                if not data:
                                    data = f.pread(offset, n)
                                    if not data:
                                        raise _FileShrank
                                    n = len(data)
                                await self._send(h11.Data(data=data))
                            offset += n
                            sent += n
                            s.stats.bytes_sent += n
                            if adm is not None:
                                adm.note_sent(n, trio.current_time())
                        await self._send(h11.EndOfMessage())
                    if tr.scope.cancelled_caught:
                        raise _TooSlow
                finally:
                    # No checkpoint from here to the slot's release: the watchdog's count
                    # of pending evictions and the slot queue change together.
                    self.transfer = None
                    s.end_transfer(tr)
                    s.stats.active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            failed("aborted", status, bytes=sent, size=size)
            raise
        except trio.TooSlowError:
            failed("timeout", status, bytes=sent, size=size)
            raise
        except _TooSlow:
            s.stats.too_slow += 1
            self.reset = True
            assert tr is not None
            rate = tr.rate(0.0)
            if rate is not None:
                detail["rate"] = round(rate)  # bytes/s the client took while it made us wait
            failed("too_slow", status, bytes=sent, size=size)
            raise _Abort from None
        except _FileShrank:
            failed("error", status, bytes=sent, size=size)
            raise _Abort from None
        s.emit(
            EventKind.FILE_DONE,
            self,
            name,
            bytes=sent,
            size=size,
            duration=trio.current_time() - t0,
            result="ok",
            detail={**detail, "status": status},
        )


class _FileShrank(Exception):
    pass


class _Span:
    """A stand-in for body bytes that go out by sendfile: h11 only takes its ``len()``."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


#: Watchdog samples per rate window.
_SAMPLES = 10


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


#: Content types by file suffix; everything else is application/octet-stream. UEFI
#: HTTP Boot takes an NBP only as ``application/efi`` (or named ``*.efi``).
CONTENT_TYPES = {".efi": b"application/efi", ".ipxe": b"text/plain; charset=utf-8", ".cfg": b"text/plain; charset=utf-8"}


def content_type(name: str) -> bytes:
    """The Content-Type for the file ``name``."""
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower(), b"application/octet-stream") if dot > name.rfind("/") else b"application/octet-stream"


def _base_headers() -> list[tuple[bytes, bytes]]:
    return [(b"server", SERVER_HEADER), (b"date", formatdate(usegmt=True).encode("ascii"))]


async def serve_http(
    files: BootFiles,
    host: str,
    port: int,
    *,
    events: trio.MemorySendChannel[BootEvent] | None = None,
    admission: Admission | None = None,
    stats: HttpStats | None = None,
    max_connections: int = 256,
    max_connections_per_client: int | None = 16,
    idle_timeout: float = 30.0,
    send_timeout: float = 30.0,
    chunk_size: int = CHUNK_SIZE,
    max_per_client: int | None = MAX_PER_CLIENT,
    min_rate: float | None = MIN_RATE,
    rate_window: float = RATE_WINDOW,
    sendfile: bool = True,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``files`` over HTTP on ``host:port`` until cancelled.

    ``port=0`` binds a free port; ``task_status.started((host, bound_port))``
    reports it, so ``await nursery.start(serve_http, files, "127.0.0.1", 0)``
    returns the address to connect to. Pass ``stats`` to read counters.
    ``max_connections_per_client`` caps one address's connections (None: no cap).

    ``max_per_client``: body transfers one client address may run at once
    (None: no cap). ``min_rate`` (bytes/s, None: off): while transfers wait for
    an ``admission`` slot, a transfer that made us wait at least
    ``rate_window / 2`` of the last ``rate_window`` seconds and delivered less
    than this per second of that wait loses its slot. ``sendfile=False`` sends
    disk files with ``pread`` + ``send_all`` instead of ``os.sendfile``. See the
    module docstring.
    """
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if max_per_client is not None and max_per_client < 1:
        raise ValueError("max_per_client must be >= 1 or None")
    if max_connections_per_client is not None and max_connections_per_client < 1:
        raise ValueError("max_connections_per_client must be >= 1 or None")
    if min_rate is not None and not min_rate > 0:
        raise ValueError("min_rate must be > 0 bytes/s or None")
    if not rate_window > 0:
        raise ValueError("rate_window must be > 0 seconds")
    server = _Server(
        files,
        events=events,
        admission=admission,
        stats=stats if stats is not None else HttpStats(),
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        send_timeout=send_timeout,
        chunk_size=chunk_size,
        max_per_client=max_per_client,
        min_rate=min_rate,
        rate_window=rate_window,
        max_connections_per_client=max_connections_per_client,
        sendfile=sendfile,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            if admission is not None and min_rate is not None:
                nursery.start_soon(server.watchdog)
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, nursery)
            task_status.started((bound[0], bound[1]))
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
