"""The error base shared by every sans-IO protocol core (h11's two-type idea, ``h11/_util.py``).

A core raises one of two kinds of error, and a server treats them differently:

* :class:`LocalProtocolError` -- *we* used the core wrongly (called ``start()``
  twice, passed limits outside the RFC's range): a bug on our side, which should
  surface, not be counted away;
* :class:`RemoteProtocolError` -- the *peer* sent something malformed or
  impossible: the server counts it and drops the datagram (or answers with the
  protocol's error message where answering makes sense).

Each core subclasses these with its own details (TFTP's carry the ERROR code to
answer with: :mod:`orchestrator.protocols.tftp.errors`; the DHCP codec's
``MalformedPacket`` is a :class:`RemoteProtocolError`), so ``except
RemoteProtocolError`` from this module catches garbage from any peer, and
``except tftp.RemoteProtocolError`` only a TFTP peer's.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of both kinds: something went wrong in a protocol exchange."""


class LocalProtocolError(ProtocolError):
    """We used a protocol core wrongly (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or impossible: count it and drop it."""
