"""The TFTP codec: :func:`parse_packet` turns a datagram into a packet object, ``encode_*`` build datagrams.

Packets are small frozen dataclasses (:class:`ReadRequest`, :class:`WriteRequest`,
:class:`Data`, :class:`Ack`, :class:`Error`, :class:`OptionAck`), as h11's
events are. Anything malformed raises :class:`RemoteProtocolError`. The formats
are RFC 1350 section 5's, with RFC 2347's options on requests and the OACK.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping, Union

from orchestrator.protocols.tftp.constants import ACK, DATA, ERR_NOT_DEFINED, ERROR, ERROR_MESSAGES, MAX_PEER_MESSAGE, OACK, RRQ, WRQ
from orchestrator.protocols.tftp.errors import RemoteProtocolError

__all__ = [
    "ReadRequest", "WriteRequest", "Data", "Ack", "Error", "OptionAck", "Packet", "HEADER",
    "parse_packet", "encode_request", "encode_data", "encode_ack", "encode_error", "encode_oack",
]

#: Opcode, then the block number (DATA, ACK) or the error code (ERROR): RFC 1350 section 5.
HEADER = struct.Struct("!HH")
_OP = struct.Struct("!H")


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
    return HEADER.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """ACK, RFC 1350 section 5: | 04 | Block # |. ``block`` is taken modulo 2**16."""
    return HEADER.pack(ACK, block & 0xFFFF)


def encode_error(code: int, message: str | None = None) -> bytes:
    """ERROR, RFC 1350 section 5: | 05 | ErrorCode | ErrMsg | 0 |."""
    if message is None:
        message = ERROR_MESSAGES.get(code, "Error")
    # RFC 1350: the message is "intended for human consumption" in netascii; keep
    # it ASCII, NUL-free and short.
    msg = message.encode("ascii", "replace").replace(b"\0", b" ")[:MAX_PEER_MESSAGE]
    return HEADER.pack(ERROR, code & 0xFFFF) + msg + b"\0"


def encode_oack(options: Mapping[str, str]) -> bytes:
    """OACK, RFC 2347: | 06 | opt1 | 0 | value1 | 0 | ... |."""
    parts = [_OP.pack(OACK)]
    for name, value in options.items():
        parts += [name.encode("ascii"), b"\0", str(value).encode("ascii"), b"\0"]
    return b"".join(parts)
