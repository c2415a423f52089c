"""TFTP's two error types, on the base every protocol core shares (:mod:`orchestrator.protocols.errors`).

:class:`LocalProtocolError` means *we* misused this package (a bug in our
server); :class:`RemoteProtocolError` means the peer sent garbage. A server
catches the second, counts it and drops the datagram; ``error_code`` says which
TFTP ERROR to answer with when answering makes sense.
"""

from __future__ import annotations

from orchestrator.protocols import errors
from orchestrator.protocols.tftp.constants import ERR_ILLEGAL_OPERATION

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class ProtocolError(errors.ProtocolError):
    """Base of both TFTP protocol errors. ``error_code`` is the TFTP ERROR code to answer with."""

    def __init__(self, msg: str, error_code: int = ERR_ILLEGAL_OPERATION) -> None:
        super().__init__(msg)
        self.error_code = error_code


class LocalProtocolError(ProtocolError, errors.LocalProtocolError):
    """We used this package wrongly (a bug on our side)."""


class RemoteProtocolError(ProtocolError, errors.RemoteProtocolError):
    """The peer sent something malformed or impossible; count it and drop it."""
