"""Sans-IO TFTP: packets, option negotiation and one read transfer's state machine.

Shape (h11's): bytes and timestamps go in, bytes to send and small event objects
come out. Nothing here opens a socket, reads a clock or imports trio; the trio
server in :mod:`orchestrator.bootserver.tftp` owns the sockets, the one clock and
the tasks, and is a thin loop around :class:`ReadTransfer`.

* **Codec** -- :func:`parse_packet` turns a datagram into one of the frozen
  packet dataclasses (:class:`ReadRequest`, :class:`WriteRequest`, :class:`Data`,
  :class:`Ack`, :class:`Error`, :class:`OptionAck`) or raises
  :class:`RemoteProtocolError`; ``encode_*`` functions build datagrams.
* **Negotiation** -- :func:`negotiate` applies RFC 2347/2348/2349/7440 to a
  request's options and says what goes into the OACK. Every out-of-range rule
  is written next to the RFC sentence it follows.
* **Transfer** -- :class:`ReadTransfer` is the server side of one RRQ. Feed it
  ``start(now)``, then ``datagram(data, now)`` for every packet from the peer's
  TID and ``timer(now)`` whenever ``now >= next_deadline`` (and
  ``repeated_request(now)`` when the peer sends its RRQ again). Each call returns
  ``(packets, events)``: datagrams to send to the peer, in order, and
  :class:`TransferComplete` / :class:`TransferFailed` when the transfer ends.
* **Client** -- :class:`ReadClient` is the other end, used by the tests (two
  objects joined by a fake link), the fuzz test's control download and the lab.

Two error types, as in h11: :class:`LocalProtocolError` means *we* misused this
API (a bug in our server); :class:`RemoteProtocolError` means the peer sent
garbage. A server catches the second, counts it and drops the datagram; its
``error_code`` says which TFTP ERROR to answer with when answering makes sense.

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
block not yet sent, a stray DATA -- changes nothing. That single rule is the
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
OACK_SENT / SENDING   ACK k, k <= acked or k>high  ignore (no Sorcerer's Appr.)    same
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
``unproven_retries`` before (next section).

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

Two more bounds hold for every transfer: a negotiated RFC 2349 timeout above
``timeout_max`` is not honoured (left out of the OACK, which RFC 2347 allows
for any option), and a transfer that has made no progress for ``max_stall``
seconds fails whatever its timeout and retries.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Union

__all__ = [
    "RRQ", "WRQ", "DATA", "ACK", "ERROR", "OACK",
    "ERR_NOT_DEFINED", "ERR_FILE_NOT_FOUND", "ERR_ACCESS_VIOLATION", "ERR_DISK_FULL",
    "ERR_ILLEGAL_OPERATION", "ERR_UNKNOWN_TID", "ERR_FILE_EXISTS", "ERR_NO_SUCH_USER",
    "ERR_OPTION_NEGOTIATION",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "ReadRequest", "WriteRequest", "Data", "Ack", "Error", "OptionAck", "Packet",
    "parse_packet", "encode_request", "encode_data", "encode_ack", "encode_error", "encode_oack",
    "Negotiated", "negotiate", "parse_uint", "CLIENT_RCVBUF", "datagram_cost",
    "State", "TransferComplete", "TransferFailed", "ReadTransfer", "ReadClient",
    "NetasciiSource", "NetasciiSizes", "ResendBudget", "NETASCII_MAX", "netascii_encode", "netascii_decode", "netascii_size",
]

# --- RFC 1350 section 5: opcodes ------------------------------------------------
RRQ = 1  #: Read request (RFC 1350 section 5)
WRQ = 2  #: Write request (RFC 1350 section 5)
DATA = 3  #: Data (RFC 1350 section 5)
ACK = 4  #: Acknowledgment (RFC 1350 section 5)
ERROR = 5  #: Error (RFC 1350 section 5)
OACK = 6  #: Option Acknowledgment (RFC 2347 "Packet Formats")

# --- RFC 1350 appendix "Error Codes", plus RFC 2347 code 8 ----------------------
ERR_NOT_DEFINED = 0  #: "Not defined, see error message (if any)."
ERR_FILE_NOT_FOUND = 1  #: "File not found."
ERR_ACCESS_VIOLATION = 2  #: "Access violation."
ERR_DISK_FULL = 3  #: "Disk full or allocation exceeded."
ERR_ILLEGAL_OPERATION = 4  #: "Illegal TFTP operation."
ERR_UNKNOWN_TID = 5  #: "Unknown transfer ID."
ERR_FILE_EXISTS = 6  #: "File already exists."
ERR_NO_SUCH_USER = 7  #: "No such user."
ERR_OPTION_NEGOTIATION = 8  #: RFC 2347: "terminate the transfer" after an unwanted OACK.

ERROR_MESSAGES = {
    ERR_NOT_DEFINED: "Not defined",
    ERR_FILE_NOT_FOUND: "File not found",
    ERR_ACCESS_VIOLATION: "Access violation",
    ERR_DISK_FULL: "Disk full or allocation exceeded",
    ERR_ILLEGAL_OPERATION: "Illegal TFTP operation",
    ERR_UNKNOWN_TID: "Unknown transfer ID",
    ERR_FILE_EXISTS: "File already exists",
    ERR_NO_SUCH_USER: "No such user",
    ERR_OPTION_NEGOTIATION: "Option negotiation failed",
}

# --- option ranges --------------------------------------------------------------
DEFAULT_BLKSIZE = 512  #: RFC 1350 section 2: "data field from 0 to 512 bytes long"
BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464  #: RFC 2348: "between 8 and 65464 octets, inclusive"
#: 1500-byte Ethernet MTU - 20 (IPv4) - 8 (UDP) - 4 (TFTP header): no IP fragmentation.
PATH_MTU_BLKSIZE = 1468
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255  #: RFC 2349: "between 1 and 255 seconds, inclusive"
WINDOWSIZE_MIN, WINDOWSIZE_MAX = 1, 65535  #: RFC 7440: "between 1 and 65535 blocks, inclusive"

#: Bytes read from the file at a time by :class:`ReadTransfer` (rounded down to
#: whole blocks, at least one block and one window).
READ_AHEAD = 64 * 1024

#: Largest file (before conversion) served in netascii mode. Netascii is for
#: text -- menus and scripts of a few kB -- and its transfer size (tsize, and the
#: last block) is only known after converting the whole file, a scan on the
#: server's request path. A bigger file in netascii is nearly always a binary
#: asked for in the wrong mode (tftp-hpa's client defaults to netascii), which
#: the conversion would corrupt anyway: it is refused with a message saying so.
NETASCII_MAX = 1 << 20

MODES = ("netascii", "octet")  #: RFC 1350 section 5; "mail" is write-only and obsolete.

#: The longest ERROR message we keep from a peer (the rest is dropped, not stored).
MAX_PEER_MESSAGE = 200

_HDR = struct.Struct("!HH")  # opcode, block number / error code
_OP = struct.Struct("!H")


# --- errors ---------------------------------------------------------------------
class ProtocolError(Exception):
    """Base of both protocol errors. ``error_code`` is the TFTP ERROR code to answer with."""

    def __init__(self, msg: str, error_code: int = ERR_ILLEGAL_OPERATION) -> None:
        super().__init__(msg)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """We used this module wrongly (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or impossible; count it and drop it."""


# --- packets --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReadRequest:
    """RFC 1350 RRQ, with RFC 2347 options (names lower-cased, first occurrence kept)."""

    filename: str
    mode: str
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """RFC 1350 WRQ. We are a read-only server; this exists to be refused."""

    filename: str
    mode: str
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    options: Mapping[str, str]


Packet = Union[ReadRequest, WriteRequest, Data, Ack, Error, OptionAck]


def _decode_name(raw: bytes) -> str:
    # Unix file names are bytes; surrogateescape round-trips them through os.open
    # unchanged (os.fsdecode's convention) while keeping the str API.
    return raw.decode("utf-8", "surrogateescape")


def _parse_options(tokens: list[bytes]) -> dict[str, str]:
    """Pair up RFC 2347 option tokens.

    RFC 2347: "| opt1 | 0 | value1 | 0 | ... | optN | 0 | valueN | 0 |" and
    "The option names are case-insensitive". Decisions where the RFC is silent:

    * a dangling name without a value (odd token count) is ignored -- it cannot be
      negotiated, and the RFC 1350 part of the request is still well formed;
    * a *duplicate* option keeps its first value and the later ones are ignored,
      so the OACK names each option at most once and a client cannot smuggle a
      second value past a check of the first;
    * names that are not ASCII cannot be any option we know: ignored.
    """
    opts: dict[str, str] = {}
    for i in range(0, len(tokens) - 1, 2):
        try:
            name = tokens[i].decode("ascii").lower()
        except UnicodeDecodeError:
            continue
        if name and name not in opts:
            opts[name] = tokens[i + 1].decode("latin-1")
    return opts


def _parse_request(data: bytes, cls: type) -> ReadRequest | WriteRequest:
    # RFC 1350 section 5: | 01/02 | Filename | 0 | Mode | 0 |, then RFC 2347 options.
    parts = bytes(data[2:]).split(b"\0")
    # split() leaves what follows the last NUL as the final element: b"" when the
    # packet ends in NUL, as RFC 1350 requires.
    if len(parts) < 3:
        # "file" or "file\0octet": the mode is missing or not NUL-terminated. RFC 1350
        # section 5 requires both strings "terminated by a zero byte"; without the NUL
        # we cannot tell a truncated datagram from a complete one, so refuse.
        raise RemoteProtocolError("request without a NUL-terminated file name and mode")
    raw_name, raw_mode, tokens = parts[0], parts[1], parts[2:]
    tail = tokens.pop()
    # A non-empty tail is an option token without its NUL (truncated or sloppy):
    # the option part cannot be trusted to be complete, so that token is ignored
    # and the request is served as if the option had not been sent (RFC 2347
    # allows a server to ignore any option).
    del tail
    if not raw_name:
        raise RemoteProtocolError("empty file name")
    try:
        mode = raw_mode.decode("ascii").lower()  # RFC 1350: "any combination of upper and lower case"
    except UnicodeDecodeError:
        raise RemoteProtocolError("mode is not ASCII") from None
    return cls(_decode_name(raw_name), mode, _parse_options(tokens))


def parse_packet(data: bytes | bytearray | memoryview) -> Packet:
    """Parse one datagram. Raises :class:`RemoteProtocolError` for anything malformed."""
    if len(data) < 2:
        raise RemoteProtocolError("datagram shorter than an opcode")
    (op,) = _OP.unpack_from(data, 0)
    if op == RRQ:
        return _parse_request(data, ReadRequest)
    if op == WRQ:
        return _parse_request(data, WriteRequest)
    if op == DATA:
        if len(data) < 4:
            raise RemoteProtocolError("DATA shorter than its header")
        return Data(_OP.unpack_from(data, 2)[0], bytes(data[4:]))
    if op == ACK:
        if len(data) < 4:
            raise RemoteProtocolError("ACK shorter than 4 bytes")
        # Trailing bytes after the block number are ignored (lenient: some embedded
        # clients pad short frames, and the block number is all we need).
        return Ack(_OP.unpack_from(data, 2)[0])
    if op == ERROR:
        return _parse_error(data)
    if op == OACK:
        tokens = bytes(data[2:]).split(b"\0")
        tokens.pop()
        return OptionAck(_parse_options(tokens))
    raise RemoteProtocolError(f"unknown opcode {op}")


def _parse_error(data: bytes | bytearray | memoryview) -> Error:
    """Parse an ERROR leniently: even a 2-byte one ends a transfer.

    RFC 1350 section 5: | 05 | ErrorCode | ErrMsg | 0 |. A peer that sends a
    truncated ERROR still means "stop"; an enormous message is cut to
    :data:`MAX_PEER_MESSAGE` characters so it cannot bloat logs or events.
    """
    code = _OP.unpack_from(data, 2)[0] if len(data) >= 4 else ERR_NOT_DEFINED
    raw = bytes(data[4 : 4 + MAX_PEER_MESSAGE])
    msg = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return Error(code, msg)


def encode_request(filename: str, mode: str = "octet", options: Mapping[str, object] | None = None, *, write: bool = False) -> bytes:
    """RRQ (or WRQ with ``write=True``), RFC 1350 section 5 plus RFC 2347 options."""
    parts = [_OP.pack(WRQ if write else RRQ), filename.encode("utf-8", "surrogateescape"), b"\0", mode.encode("ascii"), b"\0"]
    for name, value in (options or {}).items():
        parts += [name.encode("ascii"), b"\0", str(value).encode("ascii"), b"\0"]
    return b"".join(parts)


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """DATA, RFC 1350 section 5: | 03 | Block # | Data |. ``block`` is taken modulo 2**16."""
    return _HDR.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """ACK, RFC 1350 section 5: | 04 | Block # |. ``block`` is taken modulo 2**16."""
    return _HDR.pack(ACK, block & 0xFFFF)


def encode_error(code: int, message: str | None = None) -> bytes:
    """ERROR, RFC 1350 section 5: | 05 | ErrorCode | ErrMsg | 0 |."""
    if message is None:
        message = ERROR_MESSAGES.get(code, "Error")
    # RFC 1350: the message is "intended for human consumption" in netascii; keep
    # it ASCII, NUL-free and short.
    msg = message.encode("ascii", "replace").replace(b"\0", b" ")[:MAX_PEER_MESSAGE]
    return _HDR.pack(ERROR, code & 0xFFFF) + msg + b"\0"


def encode_oack(options: Mapping[str, str]) -> bytes:
    """OACK, RFC 2347: | 06 | opt1 | 0 | value1 | 0 | ... |."""
    parts = [_OP.pack(OACK)]
    for name, value in options.items():
        parts += [name.encode("ascii"), b"\0", str(value).encode("ascii"), b"\0"]
    return b"".join(parts)


# --- option negotiation -----------------------------------------------------------
_UINT = re.compile(r"[0-9]{1,10}\Z")


def parse_uint(value: str) -> int | None:
    """A decimal option value, or None.

    Strict ASCII digits only: Python's ``int()`` also takes ``" 8"``, ``"+8"``,
    ``"1_0"`` and non-ASCII digits, none of which a TFTP peer should send (fbtftp
    passed option values through ``int()`` unchecked).
    """
    if _UINT.match(value) is None:
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of option negotiation for one read request."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    #: Seconds, when the client negotiated RFC 2349 timeout; else None (server default).
    timeout: int | None = None
    #: What the OACK carries, in the client's order; empty means "no OACK" (RFC 2347).
    oack: Mapping[str, str] = field(default_factory=dict)


#: The client receive buffer a window must fit in, by default. A window is sent
#: back to back, so it sits in the client's socket buffer until the client reads
#: it; what does not fit is dropped, the client waits for the rest, and every
#: window costs a retransmit timeout (seen with atftp asking windowsize 64 at
#: blksize 8192 on loopback). Linux's default receive buffer (rmem_default) is
#: 208 KiB counted in skb *truesize*, so we assume 160 KiB and cost each
#: datagram with :func:`datagram_cost`.
CLIENT_RCVBUF = 160 * 1024


def datagram_cost(blksize: int) -> int:
    """Estimated receive-buffer charge (Linux skb truesize) of one DATA datagram.

    The kernel allocates the packet data in power-of-two slabs (headers
    included) plus a few hundred bytes of skb bookkeeping: a 1468-byte block
    costs about 2.5 KiB, an 8192-byte one about 16.5 KiB.
    """
    return (1 << (blksize + 64 - 1).bit_length()) + 512


def negotiate(
    options: Mapping[str, str], *, tsize: int | None, blksize_max: int = PATH_MTU_BLKSIZE, windowsize_max: int = 64,
    client_rcvbuf: int | None = CLIENT_RCVBUF, timeout_max: int = TIMEOUT_MAX,
) -> Negotiated:
    """Apply RFC 2347/2348/2349/7440 to a read request's options.

    RFC 2347: "Options which the server does not support should be omitted from
    the OACK; they must not cause an error to be generated." -- unknown options
    (including tftp-hpa's ``utimeout`` and ``rollover``) are ignored.

    The rule for values out of range, applied uniformly: a value *above* the range
    is clamped, because each RFC lets the server answer a smaller value than asked
    (RFC 2348: "The specified value must be less than or equal to the value
    specified by the client"; RFC 7440 says the same of windowsize). A value
    *below* the range, or not a decimal number, cannot be answered with any valid
    value that is not larger than the request, so the option is ignored and RFC
    1350's defaults apply (the client sees no OACK entry and knows it). RFC 2349's
    timeout is never clamped: "the server ... sends an OACK with the same value"
    -- out of range means ignored, and so does a value above ``timeout_max``: a
    server need not honour a retransmit interval that would let one silent
    client hold a transfer slot for many minutes (255 s x the retry budget).

    RFC 7440 lets the server answer a smaller windowsize, and we also cap the
    window so it fits ``client_rcvbuf`` (see :data:`CLIENT_RCVBUF`), whatever
    order blksize and windowsize arrive in; None disables that cap.
    """
    if not (BLKSIZE_MIN <= blksize_max <= BLKSIZE_MAX):
        raise LocalProtocolError(f"blksize_max {blksize_max} outside RFC 2348's {BLKSIZE_MIN}..{BLKSIZE_MAX}")
    if not (WINDOWSIZE_MIN <= windowsize_max <= WINDOWSIZE_MAX):
        raise LocalProtocolError(f"windowsize_max {windowsize_max} outside RFC 7440's range")
    if not (TIMEOUT_MIN <= timeout_max <= TIMEOUT_MAX):
        raise LocalProtocolError(f"timeout_max {timeout_max} outside RFC 2349's {TIMEOUT_MIN}..{TIMEOUT_MAX}")
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    oack: dict[str, str] = {}
    for name, raw in options.items():
        value = parse_uint(raw)
        if name == "blksize":
            # RFC 2348: "Valid values range between 8 and 65464 octets, inclusive."
            if value is None or value < BLKSIZE_MIN:
                continue
            blksize = min(value, BLKSIZE_MAX, blksize_max)
            oack[name] = str(blksize)
        elif name == "tsize":
            # RFC 2349: "In Read Request packets, a size of "0" is specified in the
            # request and the size of the file, in octets, is returned in the OACK."
            # We answer the size whatever number was sent; a non-number is ignored.
            if value is None or tsize is None:
                continue
            if tsize == 0:
                # Client quirk, curl (7.88 and earlier at least): an OACK with
                # "tsize 0" makes it fail with "invalid tsize -:0:- value in OACK
                # packet" (tftpd-hpa trips it too). Omitting the option is allowed
                # (the server may ignore any option), and an empty file is still
                # delivered as one empty DATA block.
                continue
            oack[name] = str(tsize)
        elif name == "timeout":
            # RFC 2349: "Valid values range between 1 and 255 seconds, inclusive."
            # Above timeout_max: not honoured, so not acknowledged (RFC 2347).
            if value is None or not (TIMEOUT_MIN <= value <= timeout_max):
                continue
            timeout = value
            oack[name] = str(value)
        elif name == "windowsize":
            # RFC 7440: "Valid values range between 1 and 65535 blocks, inclusive."
            if value is None or value < WINDOWSIZE_MIN:
                continue
            windowsize = min(value, WINDOWSIZE_MAX, windowsize_max)
            oack[name] = ""  # filled in below, once blksize is known whatever the order
    if "windowsize" in oack:
        if client_rcvbuf is not None:
            windowsize = max(1, min(windowsize, client_rcvbuf // datagram_cost(blksize)))
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack)


# --- netascii ---------------------------------------------------------------------
def netascii_encode(data: bytes) -> bytes:
    """Unix text to netascii (RFC 764 via RFC 1350 section 1): CR -> CR NUL, LF -> CR LF.

    Order matters: CRs first, or the CR of each new CR LF would become CR NUL.
    """
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def netascii_decode(data: bytes) -> bytes:
    """The inverse of :func:`netascii_encode` (for clients and tests)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


def _netascii_len(raw: bytes) -> int:
    return len(raw) + raw.count(b"\r") + raw.count(b"\n")


class _Source(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


def netascii_size(source: _Source, chunk: int = 1 << 20) -> int:
    """The size of ``source`` after netascii conversion (its tsize), by one streaming scan.

    tftp-hpa reports tsize only in octet mode; we compute it so pxelinux-style
    clients that insist on tsize also work in netascii mode.
    """
    total, off = 0, 0
    while off < source.size:
        raw = source.pread(off, chunk)
        if not raw:
            break
        total += _netascii_len(raw)
        off += len(raw)
    return total


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


class NetasciiSizes:
    """Converted sizes of files already scanned, by file identity (a bounded LRU map).

    :func:`netascii_size` reads the whole file; without this, a client repeating
    a netascii RRQ (and aborting it) makes the server scan the same file again
    and again. The key is the file's ``identity`` attribute (for a file on
    disk, ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``): any write
    changes the ctime (to the file system's timestamp granularity), even one
    that puts the mtime back (``cp -p``, ``rsync -t``), so a changed file is a
    new key. Files without an identity (in-memory, dynamic content) are not
    cached.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._sizes: dict[object, int] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, key: object) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._sizes[key] = size  # most recently used last
        return size

    def put(self, key: object, size: int) -> None:
        self._sizes.pop(key, None)
        self._sizes[key] = size
        while len(self._sizes) > self.maxsize:
            del self._sizes[next(iter(self._sizes))]


class NetasciiSource:
    """A read-only view of a file as its netascii conversion, block by block.

    Output offsets differ from input offsets, so the view remembers, for each
    block boundary it has produced, where in the input that block starts and
    whether the first input byte's two-byte expansion was split by the previous
    block (CR|LF or CR|NUL across the boundary). Reads must start at a boundary
    already produced (0 or the end of an earlier read) and never go backwards --
    exactly how :class:`ReadTransfer` reads (windows start at ``acked + 1``, and
    ``acked`` only grows) -- so checkpoints behind the read offset are dropped.
    """

    def __init__(self, source: _Source, blksize: int, size: int | None = None) -> None:
        self._src = source
        self._bs = blksize
        #: The converted size: ``size`` when the caller knows it (see :class:`NetasciiSizes`), else one scan.
        self.size = netascii_size(source) if size is None else size
        self._marks: dict[int, tuple[int, int]] = {0: (0, 0)}  # out offset -> (in offset, skip)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            in_off, skip = self._marks[offset]
        except KeyError:
            raise LocalProtocolError(f"netascii read at {offset}, not a produced block boundary") from None
        for k in [k for k in self._marks if k < offset]:
            del self._marks[k]
        out = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            n = min(self._bs, end - pos)
            chunk, in_off, skip = self._block(in_off, skip, n)
            if not chunk:
                break  # the file shrank under us
            out.append(chunk)
            pos += len(chunk)
            self._marks[pos] = (in_off, skip)
        return b"".join(out)

    def _block(self, in_off: int, skip: int, n: int) -> tuple[bytes, int, int]:
        # Each input byte yields 1 or 2 output bytes, so n input bytes always suffice.
        raw = self._src.pread(in_off, n)
        conv = netascii_encode(raw)[skip:]
        if len(conv) <= n:
            return conv, in_off + len(raw), 0
        # Find the shortest input prefix whose conversion covers n output bytes.
        lo, hi = 1, len(raw)
        while lo < hi:
            mid = (lo + hi) // 2
            if _netascii_len(raw[:mid]) - skip >= n:
                hi = mid
            else:
                lo = mid + 1
        produced = _netascii_len(raw[:lo]) - skip
        if produced == n:
            return conv[:n], in_off + lo, 0
        # The last input byte's expansion was split: its second byte opens the next block.
        return conv[:n], in_off + lo - 1, 1


# --- the read transfer ------------------------------------------------------------
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
    "dally"), or "aborted" (the peer sent ERROR ``code`` with ``message``).
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
    ``timeout_max``); after ``retries`` consecutive timeouts without progress the
    transfer fails, and after ``max_stall`` seconds without progress (None: no
    bound) whatever the retries. ``unproven_retries`` and ``unproven_timeout``
    (None: no special case) govern a peer that has not ACKed yet: see "Peers
    that do not answer" in the module docstring.

    Netascii: a file larger than ``netascii_max`` bytes is refused
    (:class:`RemoteProtocolError`, before any read); ``netascii_sizes`` keeps
    converted sizes between transfers.
    """

    def __init__(
        self,
        request: ReadRequest,
        source: _Source,
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
        if len(data) < 2:
            raise RemoteProtocolError("datagram shorter than an opcode")
        op = (data[0] << 8) | data[1]
        if op == ACK:
            if len(data) < 4:
                raise RemoteProtocolError("ACK shorter than 4 bytes")
            # Any ACK from the peer's TID proves that the peer receives at its address:
            # without our packets a spoofer does not know our new port (RFC 1350 section 4).
            self.proven = True
            wire = (data[2] << 8) | data[3]
            k = self._ack_index(wire)
            if k is None:
                if wire == self.acked & 0xFFFF:
                    self.dup_acks += 1
                return [], _NOTHING
            self._advance(k, now)
            if k >= self.last_block:
                self.state = State.DONE
                self.next_deadline = None
                return [], (TransferComplete(self.size, self.last_block, self.retransmits),)
            self.state = State.SENDING
            self.next_deadline = now + self.timeout
            return self._window(k + 1), _NOTHING
        if op == ERROR:
            err = _parse_error(data)
            return [], (self._fail("aborted", err.code, err.message),)
        if op in (RRQ, WRQ, DATA, OACK):
            # A read server never expects these on a transfer port. RFC 1350 would
            # allow an ERROR 4 that ends the transfer; ignoring keeps a stray or
            # spoofed packet from killing a good download.
            raise RemoteProtocolError(f"unexpected opcode {op} on a read transfer")
        raise RemoteProtocolError(f"unknown opcode {op}")

    def next_block(self, data: bytes, now: float) -> bytes | None:
        """Lock-step fast path: the next DATA datagram for the expected ACK, else None.

        Exactly :meth:`datagram` for its most common input -- in lock-step
        (windowsize 1), the ACK of the block just sent, when that is not the last
        block -- without building lists and tuples. For anything else (another
        opcode, a duplicate or unexpected ACK, the final ACK, a window) it changes
        nothing and returns None: call :meth:`datagram`.
        """
        if self.windowsize != 1 or len(data) < 4 or data[0] != 0 or data[1] != ACK or self.state not in _ACTIVE:
            return None
        k = self.acked + 1
        if k != self.high or k >= self.last_block or ((data[2] << 8) | data[3]) != (k & 0xFFFF):
            return None
        self._advance(k, now)
        self.state = State.SENDING
        self.next_deadline = now + self.timeout
        bs = self.blksize
        pos = k * bs - self._buf_off  # block k+1 in the read-ahead buffer
        if pos >= 0 and pos + bs <= len(self._buf):
            self.high = k + 1
            return _HDR.pack(DATA, (k + 1) & 0xFFFF) + self._mv[pos : pos + bs]
        return self._window(k + 1)[0]

    # -- a native driver's view (orchestrator/bootserver/_lockstep.c) -------------------
    @property
    def source(self) -> _Source:
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
        self._progress_at = deadline - self.timeout  # the native loop sets deadline = last ACK + timeout
        self.next_deadline = deadline
        self.rtt_sum += rtt_sum
        self.rtt_n += rtt_n

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
        stalled = self.max_stall is not None and now >= self._progress_at + self.max_stall
        if stalled or (self._tries > budget and not self._extra_resend(self._tries, now)):
            # Every block went out at least once (so every earlier window was
            # acknowledged): only the final ACK is missing. Not a failure we can prove.
            unconfirmed = self.state is State.SENDING and self.high >= self.last_block
            return [], (self._fail("unconfirmed" if unconfirmed else "timeout"),)
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
    def _netascii(self, source: _Source, limit: int | None, sizes: NetasciiSizes | None) -> NetasciiSource:
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
        last = min(first + self.windowsize - 1, self.last_block)
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
        pack = _HDR.pack
        pkts = []
        pos = off - boff
        for blk in range(first, last + 1):
            chunk = mv[pos : pos + bs]
            pkts.append(pack(DATA, blk & 0xFFFF) + chunk)
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


# --- the client side ---------------------------------------------------------------
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
