"""The client side of one TFTP read (:class:`ReadClient`), sans-IO like the server side.

Used by the tests (a :class:`ReadClient` and a
:class:`~orchestrator.protocols.tftp.transfer.ReadTransfer` joined by a fake
link), the fuzz test's control download, :func:`orchestrator.bootserver.tftp.tftp_get`
and the simulator's machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from orchestrator.protocols.tftp.constants import DEFAULT_BLKSIZE, ERR_OPTION_NEGOTIATION
from orchestrator.protocols.tftp.errors import RemoteProtocolError
from orchestrator.protocols.tftp.negotiate import parse_uint
from orchestrator.protocols.tftp.packets import Data, Error, OptionAck, encode_ack, encode_error, encode_request, parse_packet

__all__ = ["ReadClient", "DownloadComplete", "DownloadFailed"]

_NOTHING: tuple = ()


@dataclass(frozen=True, slots=True)
class DownloadComplete:
    data: bytes


@dataclass(frozen=True, slots=True)
class DownloadFailed:
    reason: str
    code: int | None = None
    message: str = ""


class ReadClient:
    """The client side of one RRQ (RFC 1350 + RFC 2347 + RFC 7440 receiver rules).

    ``start(now)`` returns the RRQ; feed datagrams from the server's TID. The
    caller pins the server's TID from the first reply (RFC 1350 section 4).
    Received data is in :attr:`data` (raw, still netascii-encoded in that mode).
    """

    def __init__(self, filename: str, mode: str = "octet", options: Mapping[str, object] | None = None, *, timeout: float = 1.0, retries: int = 5) -> None:
        self.request = encode_request(filename, mode, options)
        self.asked = {k.lower(): str(v) for k, v in (options or {}).items()}
        self.timeout = timeout
        self.retries = retries
        self.blksize = DEFAULT_BLKSIZE
        self.windowsize = 1
        self.tsize: int | None = None
        self.oack: Mapping[str, str] | None = None
        self.data = bytearray()
        self.received = 0  # absolute index of the last in-order block
        self.finished = False
        self.failed: DownloadFailed | None = None
        self.next_deadline: float | None = None
        self._first = True
        self._last_ack: bytes | None = None
        self._acked_at = 0
        self._gap_reported = False
        self._tries = 0

    def start(self, now: float) -> list[bytes]:
        self.next_deadline = now + self.timeout
        return [self.request]

    def datagram(self, data: bytes, now: float) -> tuple[list[bytes], tuple]:
        if self.finished:
            # RFC 1350 section 6 "dallying": our final ACK may have been lost, and the
            # server resends the last DATA until it hears it. Answer it again.
            if self.failed is None and self._last_ack is not None and data[:2] == b"\x00\x03" and data[2:4] == self._last_ack[2:4]:
                return [self._last_ack], _NOTHING
            return [], _NOTHING
        pkt = parse_packet(data)
        if isinstance(pkt, Error):
            return [], (self._fail("aborted", pkt.code, pkt.message),)
        if isinstance(pkt, OptionAck):
            if not self._first:
                return [], _NOTHING
            self._first = False
            self.oack = pkt.options
            for name, value in pkt.options.items():
                # RFC 2347: the server may only OACK options the client asked for.
                if name not in self.asked:
                    return [encode_error(ERR_OPTION_NEGOTIATION)], (self._fail("bad_oack", ERR_OPTION_NEGOTIATION, name),)
                v = parse_uint(value)
                if name == "blksize" and v is not None:
                    self.blksize = v
                elif name == "windowsize" and v is not None:
                    self.windowsize = v
                elif name == "tsize" and v is not None:
                    self.tsize = v
            return self._ack(now), _NOTHING
        if isinstance(pkt, Data):
            self._first = False
            if len(pkt.payload) > self.blksize:
                raise RemoteProtocolError("DATA longer than the block size")
            if pkt.block == (self.received + 1) & 0xFFFF:
                self.received += 1
                self._gap_reported = False
                self._tries = 0
                self.next_deadline = now + self.timeout
                self.data += pkt.payload
                if len(pkt.payload) < self.blksize:
                    self.finished = True
                    self.next_deadline = None
                    return self._ack(now), (DownloadComplete(bytes(self.data)),)
                if self.received - self._acked_at >= self.windowsize:
                    return self._ack(now), _NOTHING
                return [], _NOTHING
            ahead = (pkt.block - self.received) & 0xFFFF
            if 1 < ahead <= self.windowsize and not self._gap_reported:
                # RFC 7440 section 4: on a gap, ACK the last block received in order
                # so the sender restarts the window from there.
                self._gap_reported = True
                return self._ack(now), _NOTHING
            return [], _NOTHING
        raise RemoteProtocolError(f"unexpected {type(pkt).__name__} for a read client")

    def timer(self, now: float) -> list[bytes]:
        if self.finished or self.next_deadline is None or now < self.next_deadline:
            return []
        self._tries += 1
        if self._tries > self.retries:
            self._fail("timeout")
            return []
        self.next_deadline = now + self.timeout
        return [self._last_ack if self._last_ack is not None else self.request]

    def _ack(self, now: float) -> list[bytes]:
        self._acked_at = self.received
        self._last_ack = encode_ack(self.received)
        if not self.finished:
            self.next_deadline = now + self.timeout
        return [self._last_ack]

    def _fail(self, reason: str, code: int | None = None, message: str = "") -> DownloadFailed:
        self.finished = True
        self.next_deadline = None
        self.failed = DownloadFailed(reason, code, message)
        return self.failed
