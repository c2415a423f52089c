"""The trio TFTP server: sockets, tasks and limits around the sans-IO core.

Shape: one task reads the listening socket and turns each read request into a
transfer task; each transfer task owns one ephemeral UDP socket (a new TID, RFC
1350 section 4) and one :class:`~orchestrator.protocols.tftp.ReadTransfer`, and
loops "send what the core returned, wait for a datagram or the core's deadline,
feed it back". Everything about TFTP lives in the core; this module only decides
who may talk (TIDs, limits, admission) and what to report (counters, events).

The hot path. A trio ``await sock.sendto()`` per packet is a scheduling round
trip and tops out near 80 000 datagrams/s; a whole window sent with plain
non-blocking ``socket.sendto`` and one checkpoint per window goes ten times
faster. So the sockets here are stdlib sockets in non-blocking mode, driven
with :func:`trio.lowlevel.wait_readable` / :func:`~trio.lowlevel.wait_writable`,
and a transfer awaits only when the socket buffer is full (``BlockingIOError``),
when it waits for the client's ACK, or once per window as a checkpoint.

Robustness rules, each with a test in ``tests/test_tftp_server.py`` or
``tests/test_tftp_security.py``:

* malformed datagrams are counted and dropped; only a malformed *request* (opcode
  1 or 2) gets an ERROR back, so garbage cannot be reflected at a third party;
* a datagram on a transfer port from the wrong address/port gets ERROR 5 and the
  transfer carries on (RFC 1350 section 4);
* an RRQ repeated from the *same* source port while its transfer runs is the
  client retransmitting its request: ignored (the transfer's own timer resends);
  from a *new* source port it is a new transfer;
* at most ``max_transfers`` transfers (queued ones included) and
  ``max_per_client`` per client IP; the excess gets an ERROR and no memory;
* a transfer whose client vanished ends after its retry budget; its socket and
  file are closed in ``finally`` whatever happens.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import trio

from orchestrator.bootserver.files import AccessViolation, BootFile, BootFiles, NotFound
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as proto

__all__ = ["TftpCounters", "TftpDownloadError", "TftpServer", "serve_tftp", "tftp_get"]

log = logging.getLogger(__name__)

#: Biggest datagram we read on the listening socket (a UDP payload can be 65507).
_REQUEST_BUFSIZE = 65536
#: On a transfer socket only ACK (4 bytes) and ERROR matter; a larger datagram is
#: truncated by the kernel, which is harmless (an ERROR's message is cut).
_TRANSFER_BUFSIZE = 1024
#: Datagrams handled from the listening socket before yielding to transfers.
_LISTEN_BATCH = 64


@dataclass(slots=True)
class TftpCounters:
    """Plain counters for metrics (read them; only the server writes them)."""

    packets_in: int = 0
    packets_out: int = 0
    malformed: int = 0
    retransmits: int = 0
    transfers_ok: int = 0
    transfers_failed: int = 0
    bytes_sent: int = 0  # payload bytes acknowledged by clients
    active: int = 0  # transfers in progress (including those queued by admission)
    refused: int = 0  # requests refused by limits
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
        timeout: float = 1.0,
        retries: int = 5,
        counters: TftpCounters | None = None,
    ) -> None:
        # Validate once here (LocalProtocolError from the core on bad limits).
        proto.negotiate({}, tsize=None, blksize_max=blksize_max, windowsize_max=windowsize_max)
        if max_transfers < 1 or max_per_client < 1:
            raise ValueError("max_transfers and max_per_client must be >= 1")
        self.files = files
        self.events = events
        self.admission = admission
        self.blksize_max = blksize_max
        self.windowsize_max = windowsize_max
        self.client_rcvbuf = client_rcvbuf
        self.max_transfers = max_transfers
        self.max_per_client = max_per_client
        self.timeout = timeout
        self.retries = retries
        self.counters = counters if counters is not None else TftpCounters()
        self._transfers: set[tuple[str, int]] = set()
        self._per_client: Counter[str] = Counter()
        self._bind_host = "0.0.0.0"

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
    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
            self._bind_host = host
            bound = sock.getsockname()[:2]
            async with trio.open_nursery() as nursery:
                task_status.started(bound)
                await self._listen(sock, nursery)
        finally:
            sock.close()

    async def _listen(self, sock: socket.socket, nursery: trio.Nursery) -> None:
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
                    self._on_request(sock, data, addr[:2], nursery)
                except proto.RemoteProtocolError:
                    self.counters.malformed += 1
                except Exception:
                    # A bug must cost one request, not the server; keep it visible.
                    self.counters.errors += 1
                    log.exception("tftp: request from %s:%s failed", *addr[:2])

    def _refuse(self, sock: socket.socket, addr: tuple[str, int], code: int, message: str | None = None) -> None:
        if _sendto_nowait(sock, proto.encode_error(code, message), addr):
            self.counters.packets_out += 1

    def _on_request(self, sock: socket.socket, data: bytes, addr: tuple[str, int], nursery: trio.Nursery) -> None:
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
        if addr in self._transfers:
            # The same client port asking again: its request retransmission (our
            # OACK/DATA crossed it, or admission queued it). One transfer per TID.
            self.counters.duplicate_requests += 1
            return
        self._emit(EventKind.FILE_REQUEST, addr, req.filename, detail={"mode": req.mode, "options": dict(req.options)})
        if len(self._transfers) >= self.max_transfers or self._per_client[addr[0]] >= self.max_per_client:
            self.counters.refused += 1
            self.counters.transfers_failed += 1
            self._emit(EventKind.FILE_FAILED, addr, req.filename, result="refused")
            self._refuse(sock, addr, proto.ERR_NOT_DEFINED, "Server busy, too many transfers")
            return
        t0 = trio.current_time()
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
            )
        except proto.RemoteProtocolError as e:  # e.g. an unknown mode
            f.close()
            self._fail_request(sock, addr, req, e.error_code, "error", t0, str(e))
            return
        except BaseException:
            f.close()
            raise
        self._transfers.add(addr)
        self._per_client[addr[0]] += 1
        self.counters.active += 1
        nursery.start_soon(self._transfer_task, addr, xfer, f, t0)

    def _fail_request(self, sock: socket.socket, addr: tuple[str, int], req: proto.ReadRequest, code: int, result: str, t0: float, message: str | None = None) -> None:
        self.counters.transfers_failed += 1
        self._emit(EventKind.FILE_FAILED, addr, req.filename, result=result, duration=trio.current_time() - t0)
        self._refuse(sock, addr, code, message)

    # -- one transfer -----------------------------------------------------------------
    async def _transfer_task(self, addr: tuple[str, int], xfer: proto.ReadTransfer, f: BootFile, t0: float) -> None:
        result: str = "aborted"  # stays so if we are cancelled (server shutdown)
        failure: proto.TransferFailed | None = None
        try:
            try:
                if self.admission is not None:
                    async with self.admission.slot():
                        failure = await self._run(addr, xfer)
                else:
                    failure = await self._run(addr, xfer)
                result = "ok" if failure is None else failure.reason
            except Exception:
                # E.g. EIO reading the file: this transfer fails, the server lives on.
                result = "error"
                self.counters.errors += 1
                log.exception("tftp: transfer of %r to %s:%s failed", xfer.request.filename, *addr)
        finally:
            f.close()
            self._transfers.discard(addr)
            self._per_client[addr[0]] -= 1
            if self._per_client[addr[0]] <= 0:
                del self._per_client[addr[0]]
            self.counters.active -= 1
            if result == "ok":
                self.counters.transfers_ok += 1
            else:
                self.counters.transfers_failed += 1
            self.counters.bytes_sent += xfer.bytes_acked
            detail: dict[str, Any] = {"blksize": xfer.blksize, "windowsize": xfer.windowsize, "mode": xfer.mode}
            if failure is not None and failure.code is not None:
                detail["error_code"] = failure.code
                detail["error_message"] = failure.message
            self._emit(
                EventKind.FILE_DONE if result == "ok" else EventKind.FILE_FAILED,
                addr, xfer.request.filename, bytes=xfer.bytes_acked, size=xfer.size,
                duration=trio.current_time() - t0, result=result,
                retransmits=xfer.retransmits, detail=detail,
            )

    async def _run(self, addr: tuple[str, int], xfer: proto.ReadTransfer) -> proto.TransferFailed | None:
        """Drive one transfer to its end; returns the failure, or None on success."""
        sock = socket.socket(_family(addr[0]), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self._bind_host, 0))  # a fresh TID: RFC 1350 section 4
            counters = self.counters
            adm = self.admission
            pkts, events = xfer.start(trio.current_time())
            while True:
                if pkts:
                    if adm is not None:
                        await self._admit(xfer, pkts)
                    await self._send(sock, pkts, addr)
                for ev in events:
                    return ev if isinstance(ev, proto.TransferFailed) else None
                # Wait for one datagram or the deadline. The first recv is tried
                # before awaiting: in windowed mode the ACK is often already queued.
                data = None
                deadline = xfer.next_deadline
                if deadline is None or trio.current_time() < deadline:
                    # (When overdue -- a stream of stray datagrams kept us busy --
                    # skip the receive so the timer below runs: no immortal transfers.)
                    data, src = await self._recv(sock, deadline)
                else:
                    await trio.lowlevel.checkpoint()
                now = trio.current_time()
                if data is None:
                    pkts, events = xfer.timer(now)
                    if pkts:
                        counters.retransmits += len(pkts)
                        if adm is not None:
                            adm.note_retransmits(len(pkts), now)
                    continue
                counters.packets_in += 1
                if src[0] != addr[0] or src[1] != addr[1]:
                    # RFC 1350 section 4: "If a source TID does not match, the packet
                    # should be discarded as erroneously sent from somewhere else. An
                    # error packet should be sent to the source of the incorrect
                    # packet, while not disturbing the transfer."
                    counters.wrong_tid += 1
                    if _sendto_nowait(sock, proto.encode_error(proto.ERR_UNKNOWN_TID), src[:2]):
                        counters.packets_out += 1
                    pkts, events = [], ()
                    continue
                try:
                    pkts, events = xfer.datagram(data, now)
                except proto.RemoteProtocolError:
                    counters.malformed += 1
                    pkts, events = [], ()
        finally:
            sock.close()

    @staticmethod
    async def _recv(sock: socket.socket, deadline: float | None) -> tuple[bytes | None, Any]:
        """One datagram, or (None, None) at ``deadline``.

        The first recv is tried before awaiting: in windowed mode the ACK is often
        already queued, and then the only await is one checkpoint per window.
        """
        try:
            data, src = sock.recvfrom(_TRANSFER_BUFSIZE)
            await trio.lowlevel.checkpoint()
            return data, src
        except BlockingIOError:
            pass
        except OSError:  # e.g. ECONNREFUSED left by an ICMP error: nothing to read
            pass
        with trio.move_on_at(deadline if deadline is not None else trio.current_time()):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recvfrom(_TRANSFER_BUFSIZE)
                except OSError:  # BlockingIOError (spurious wakeup) included
                    continue
        return None, None

    async def _admit(self, xfer: proto.ReadTransfer, pkts: list[bytes]) -> None:
        """Wait until the admission byte budget lets ``pkts`` go."""
        nbytes = sum(len(p) for p in pkts)
        waited = False
        while True:
            wait = self.admission.try_consume(nbytes, trio.current_time())
            if wait <= 0:
                break
            waited = True
            # At least 1 us: a float-rounding remainder (1e-17 s) would otherwise be
            # a sleep that never moves the clock, and this loop would spin.
            await trio.sleep(max(wait, 1e-6))
        now = trio.current_time()
        if waited:
            xfer.restart_timer(now)
        note = getattr(self.admission, "note_sent", None)
        if note is not None:
            note(nbytes, now)

    async def _send(self, sock: socket.socket, pkts: list[bytes], addr: tuple[str, int]) -> None:
        """Send a whole window with non-blocking sendto; await only when the buffer is full."""
        counters = self.counters
        for pkt in pkts:
            while True:
                try:
                    sock.sendto(pkt, addr)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                except OSError as e:
                    if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                        await trio.sleep(0.001)
                        continue
                    # ECONNREFUSED (ICMP port unreachable from an earlier packet) and
                    # friends: the packet is lost; the retransmit timer copes.
                    break
            counters.packets_out += 1


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
    timeout: float = 1.0,
    retries: int = 5,
    counters: TftpCounters | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``files`` over TFTP on ``host:port`` until cancelled.

    ``task_status.started((host, bound_port))`` fires once the socket is bound, so
    ``await nursery.start(serve_tftp, files, "127.0.0.1", 0)`` returns the real
    port. ``max_transfers`` defaults to dnsmasq's 50. ``counters`` lets the caller
    read :class:`TftpCounters` while the server runs.
    """
    server = TftpServer(
        files, events=events, admission=admission, blksize_max=blksize_max,
        windowsize_max=windowsize_max, client_rcvbuf=client_rcvbuf, max_transfers=max_transfers,
        max_per_client=max_per_client, timeout=timeout, retries=retries, counters=counters,
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
