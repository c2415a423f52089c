"""Sans-IO TFTP: packets, option negotiation and one read transfer's state machine.

Shape (h11's): bytes and timestamps go in, bytes to send and small event objects
come out. Nothing here opens a socket, reads a clock or imports trio; the trio
server in :mod:`orchestrator.bootserver.tftp` owns the sockets, the one clock and
the threads, and its engine (:mod:`orchestrator.bootserver.tftp_engine`) is a
loop around :class:`ReadTransfer`.

The modules, in the order they build on each other (import the public names
from this package: ``from orchestrator.protocols import tftp``):

* :mod:`.constants` -- opcodes, error codes and option ranges, each beside its RFC.
* :mod:`.errors` -- the two error types, as in h11 (on the base shared with the
  DHCP core, :mod:`orchestrator.protocols.errors`): :class:`LocalProtocolError`
  means *we* misused this API (a bug in our server); :class:`RemoteProtocolError`
  means the peer sent garbage. A server catches the second, counts it and drops
  the datagram; its ``error_code`` says which TFTP ERROR to answer with when
  answering makes sense.
* :mod:`.packets` -- the codec: :func:`parse_packet` turns a datagram into one of
  the frozen packet dataclasses (:class:`ReadRequest`, :class:`WriteRequest`,
  :class:`Data`, :class:`Ack`, :class:`Error`, :class:`OptionAck`) or raises
  :class:`RemoteProtocolError`; ``encode_*`` functions build datagrams.
* :mod:`.negotiate` -- :func:`negotiate` applies RFC 2347/2348/2349/7440 to a
  request's options and says what goes into the OACK.
* :mod:`.netascii` -- the netascii conversion and a file seen through it block
  by block (:class:`NetasciiSource`), with its size cache and size limit.
* :mod:`.rto` -- :class:`RtoEstimator`, RFC 6298's retransmit timeout (smoothed
  round trip and variance, backoff), which a transfer uses when asked to adapt.
* :mod:`.transfer` -- :class:`ReadTransfer`, the server side of one RRQ, and
  its state machine (the table is in that module's docstring); the hooks a
  native driver uses (``forwardable``, ``fast_forward``) are there too.
* :mod:`.client` -- :class:`ReadClient`, the other end, used by the tests (two
  objects joined by a fake link), the fuzz test's control download, the
  simulator and the lab.
"""

from __future__ import annotations

from orchestrator.protocols.tftp.client import DownloadComplete, DownloadFailed, ReadClient
from orchestrator.protocols.tftp.constants import (
    ACK, BLKSIZE_MAX, BLKSIZE_MIN, DATA, DEFAULT_BLKSIZE, ERR_ACCESS_VIOLATION, ERR_DISK_FULL, ERR_FILE_EXISTS,
    ERR_FILE_NOT_FOUND, ERR_ILLEGAL_OPERATION, ERR_NO_SUCH_USER, ERR_NOT_DEFINED, ERR_OPTION_NEGOTIATION, ERR_UNKNOWN_TID,
    ERROR, ERROR_MESSAGES, MAX_PEER_MESSAGE, MODES, OACK, PATH_MTU_BLKSIZE, RRQ, TIMEOUT_MAX, TIMEOUT_MIN, WINDOWSIZE_MAX,
    WINDOWSIZE_MIN, WRQ,
)
from orchestrator.protocols.tftp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from orchestrator.protocols.tftp.negotiate import CLIENT_RCVBUF, Negotiated, datagram_cost, negotiate, parse_uint
from orchestrator.protocols.tftp.netascii import (
    NETASCII_MAX, NetasciiSizes, NetasciiSource, Source, netascii_decode, netascii_encode, netascii_size,
)
from orchestrator.protocols.tftp.packets import (
    Ack, Data, Error, OptionAck, Packet, ReadRequest, WriteRequest, encode_ack, encode_data, encode_error, encode_oack,
    encode_request, parse_packet,
)
from orchestrator.protocols.tftp.rto import RTO_MIN, RtoEstimator
from orchestrator.protocols.tftp.transfer import (
    READ_AHEAD, Event, ReadTransfer, ResendBudget, State, TransferComplete, TransferFailed,
)

__all__ = [
    # constants
    "RRQ", "WRQ", "DATA", "ACK", "ERROR", "OACK",
    "ERR_NOT_DEFINED", "ERR_FILE_NOT_FOUND", "ERR_ACCESS_VIOLATION", "ERR_DISK_FULL",
    "ERR_ILLEGAL_OPERATION", "ERR_UNKNOWN_TID", "ERR_FILE_EXISTS", "ERR_NO_SUCH_USER",
    "ERR_OPTION_NEGOTIATION", "ERROR_MESSAGES",
    "DEFAULT_BLKSIZE", "BLKSIZE_MIN", "BLKSIZE_MAX", "PATH_MTU_BLKSIZE", "TIMEOUT_MIN", "TIMEOUT_MAX",
    "WINDOWSIZE_MIN", "WINDOWSIZE_MAX", "MODES", "MAX_PEER_MESSAGE",
    # errors
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    # packets
    "ReadRequest", "WriteRequest", "Data", "Ack", "Error", "OptionAck", "Packet",
    "parse_packet", "encode_request", "encode_data", "encode_ack", "encode_error", "encode_oack",
    # negotiate
    "Negotiated", "negotiate", "parse_uint", "CLIENT_RCVBUF", "datagram_cost",
    # netascii
    "NETASCII_MAX", "Source", "NetasciiSource", "NetasciiSizes", "netascii_encode", "netascii_decode", "netascii_size",
    # rto
    "RTO_MIN", "RtoEstimator",
    # transfer
    "READ_AHEAD", "State", "TransferComplete", "TransferFailed", "Event", "ResendBudget", "ReadTransfer",
    # client
    "ReadClient", "DownloadComplete", "DownloadFailed",
]
