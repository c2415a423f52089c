"""The satellite event stream, sans-IO: sequence-numbered evidence, resent from the last one the receiver has.

A satellite boot server (``bootorch serve`` near its racks) keeps what its
servers saw in an :class:`EventLog`; the orchestrator pulls it over the control
API (``{"op": "events", "epoch": E, "after": N}``) and keeps a
:class:`StreamCursor`. Every record carries a sequence number, so a connection
that breaks anywhere loses nothing and doubles nothing: the orchestrator asks
again from the last record it applied, the satellite resends from there, and a
record at or below the cursor is dropped as a duplicate.

* **epoch**: a random id of one satellite process. A restarted satellite starts
  a new epoch at sequence 1; the cursor sees the new epoch and starts over
  (what the old process had not sent yet is lost, and counted).
* **bounded**: the log holds the last ``capacity`` records. A receiver that
  fell further behind gets what is left and is told how many it missed
  (``lost``), never an unbounded backlog held for it.
* **records on the wire** are JSON objects: ``{"seq": n, "event": {...}}`` for
  a :class:`~orchestrator.events.BootEvent` (:func:`event_to_wire`) and
  ``{"seq": n, "load": {...}}`` for the server's load (not logged: only the
  newest matters). :func:`event_from_wire` checks every field's type and
  bound, and stamps the event with the receiver's clock (the satellite's
  monotonic clock means nothing here; its wall time is kept).

Both sides are plain objects with no I/O and no clock: the trio code around
them (``orchestrator.satellite``) does the sockets and the time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from orchestrator.events import BootEvent, EventKind

#: Longest line of the stream accepted (one record).
MAX_LINE = 65536
#: Most records one answer to ``after`` carries (the receiver asks again for more).
MAX_BATCH = 4096

_INT_FIELDS = ("client_port", "bytes", "size", "retransmits")
_FLOAT_FIELDS = ("duration", "wall")
_STR_FIELDS = ("source", "client_ip", "mac", "filename", "result")
#: Largest integer a field may carry (bytes of a file, a port).
_INT_MAX = 1 << 53


class StreamError(ValueError):
    """A record that does not follow the stream's format (the connection is dropped, the cursor kept)."""


def event_to_wire(ev: BootEvent) -> dict[str, Any]:
    """A BootEvent as a JSON-able dict (``time`` left out: it is the sender's monotonic clock)."""
    d: dict[str, Any] = {"kind": ev.kind.value, "source": ev.source}
    for name in (*_STR_FIELDS[1:], *_INT_FIELDS, *_FLOAT_FIELDS):
        v = getattr(ev, name)
        if v is not None:
            d[name] = v
    if ev.detail:
        d["detail"] = dict(ev.detail)
    return d


def event_from_wire(d: Any, now: float, *, via: str) -> BootEvent:
    """The BootEvent a wire record describes, received at ``now``; ``via`` names the satellite.

    Raises :class:`StreamError` for a wrong type or an unknown kind. Text is made
    safe by BootEvent itself; ``source`` becomes ``<via>:<source>`` so status
    and the journal say which server saw it.
    """
    if not isinstance(d, dict):
        raise StreamError("an event is a JSON object")
    try:
        kind = EventKind(d.get("kind"))
    except ValueError:
        raise StreamError(f"unknown event kind {str(d.get('kind'))[:40]!r}") from None
    kw: dict[str, Any] = {}
    for name in _STR_FIELDS:
        v = d.get(name)
        if v is not None and not isinstance(v, str):
            raise StreamError(f"event field {name} is not a string")
        kw[name] = v
    for name in _INT_FIELDS:
        v = d.get(name)
        if v is not None and (type(v) is not int or not 0 <= v <= _INT_MAX):
            raise StreamError(f"event field {name} is not a count")
        if v is not None:
            kw[name] = v
    for name in _FLOAT_FIELDS:
        v = d.get(name)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v < 0):
            raise StreamError(f"event field {name} is not a time")
        kw[name] = None if v is None else float(v)
    detail = d.get("detail", {})
    if not isinstance(detail, dict):
        raise StreamError("event field detail is not an object")
    kw["source"] = f"{via}:{kw['source'] or '?'}"
    return BootEvent(time=now, kind=kind, detail=detail, **kw)


@dataclass(frozen=True, slots=True)
class Batch:
    """An answer to ``after``: the records that follow, and how many the receiver can no longer get."""

    epoch: str
    records: list[tuple[int, Mapping[str, Any]]]
    #: Records between the receiver's cursor and the oldest one kept: gone from the log.
    lost: int
    #: The newest sequence number the log has handed out.
    last: int


class EventLog:
    """The sender's side: the last ``capacity`` records, numbered from 1 in this ``epoch``."""

    def __init__(self, epoch: str, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.epoch = epoch
        self._records: deque[tuple[int, Mapping[str, Any]]] = deque(maxlen=capacity)
        self.last = 0

    def append(self, record: Mapping[str, Any]) -> int:
        """Keep ``record`` (dropping the oldest when full); returns its sequence number."""
        self.last += 1
        self._records.append((self.last, record))
        return self.last

    def extend(self, records: Iterable[Mapping[str, Any]]) -> int:
        for r in records:
            self.append(r)
        return self.last

    @property
    def first(self) -> int:
        """The oldest sequence number still kept (``last + 1`` when empty)."""
        return self._records[0][0] if self._records else self.last + 1

    def after(self, epoch: str | None, seq: int, limit: int = MAX_BATCH) -> Batch:
        """The records after ``seq`` of ``epoch`` (another epoch, or None: from the start of this one)."""
        if epoch != self.epoch or seq < 0 or seq > self.last:
            seq = 0  # another process's numbers, or nonsense: everything this process has
        first = self.first
        lost = max(0, first - seq - 1)
        start = max(seq + 1, first)
        if start > self.last:
            return Batch(self.epoch, [], lost, self.last)
        skip = start - first
        out = [self._records[i] for i in range(skip, min(len(self._records), skip + limit))]
        return Batch(self.epoch, out, lost, self.last)


class StreamCursor:
    """The receiver's side: the epoch and the sequence number up to which every record is applied or lost.

    The caller journals ``(epoch, last)`` with what the records changed, so a
    restarted receiver resumes from there.
    """

    def __init__(self, epoch: str | None = None, last: int = 0) -> None:
        self.epoch, self.last = epoch, last
        #: Records the receiver will never see (dropped from a full log, or a satellite restarted before sending).
        self.lost = 0
        #: Records received twice (after a reconnect) and dropped.
        self.duplicates = 0

    def request(self) -> dict[str, Any]:
        """The ``events`` request to send on (re)connecting."""
        return {"op": "events", "epoch": self.epoch, "after": self.last}

    def begin(self, epoch: Any, lost: Any) -> None:
        """The answer's header: the sender's epoch and how many records it no longer has for us."""
        if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
            raise StreamError("epoch is not a short string")
        if type(lost) is not int or lost < 0:
            raise StreamError("lost is not a count")
        if epoch != self.epoch:
            self.epoch, self.last = epoch, 0
        self.lost += lost
        self.last += lost  # gone for good: the cursor moves past them

    def accept(self, seq: Any) -> bool:
        """True when record ``seq`` is new (apply it, then :meth:`applied`); False for a duplicate."""
        if type(seq) is not int or seq < 1:
            raise StreamError("seq is not a positive integer")
        if self.epoch is None:
            raise StreamError("a record before the header")
        if seq <= self.last:
            self.duplicates += 1
            return False
        if seq > self.last + 1:
            self.lost += seq - self.last - 1
        return True

    def applied(self, seq: int) -> None:
        """Record ``seq`` is applied (and journaled): a reconnect asks for what follows it."""
        self.last = max(self.last, seq)
