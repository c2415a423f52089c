"""Satellite boot servers: a ``bootorch serve`` near its racks streams its evidence and load to the orchestrator.

Two ends, each a thin trio shell around :mod:`orchestrator.protocols.evstream`:

* on the satellite, an :class:`EventTap` sees every BootEvent its servers emit
  (hook :meth:`EventTap.record` where the events flow) and keeps them in an
  :class:`~orchestrator.protocols.evstream.EventLog`; the control API answers
  ``{"op": "events", "epoch": E, "after": N, "token": ...}`` with
  :meth:`EventTap.stream`: a header ``{"event": "stream", "epoch", "lost",
  "last"}``, the records after ``N`` (``{"seq": n, "event": {...}}``), then new
  records as they come and, every ``heartbeat`` seconds, the server's load
  (``{"load": {...}, "last": n}``). The connection stays open.
* on the orchestrator, :func:`follow` connects to the satellite's control
  address (TCP, the token, TLS when given an ``ssl.SSLContext``), feeds each new
  record's event to the tracker and journals its transitions *together with
  the cursor* (``store.append_with_offset``, key ``satellite:<name>``), so a
  crash or a broken connection anywhere loses no record and applies none
  twice: the next connection asks from the journaled cursor. A connection that
  is silent for three heartbeats, breaks, or sends something malformed is
  dropped and retried with backoff (0.5 s doubling to 10 s).

What crosses is bounded on both sides: a line is at most
:data:`~orchestrator.protocols.evstream.MAX_LINE` bytes, the tap keeps at most
``capacity`` records (older ones are counted lost to a receiver that fell that
far behind), events are re-checked field by field and their text made safe
where they are read (:func:`~orchestrator.protocols.evstream.event_from_wire`).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from orchestrator.bootserver.admission import Load
from orchestrator.events import BootEvent
from orchestrator.protocols.evstream import MAX_LINE, EventLog, StreamCursor, StreamError, event_from_wire, event_to_wire

log = logging.getLogger(__name__)

#: Seconds between load lines on an idle stream (the receiver drops a stream silent for three of them).
HEARTBEAT = 1.0
#: Reconnect backoff: first delay and cap (seconds).
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0


def offset_key(name: str) -> str:
    """The journal key under which a satellite's cursor is kept."""
    return f"satellite:{name}"


# --------------------------------------------------------------------------- satellite side


class EventTap:
    """The satellite's record of its evidence, and the ``events`` answer of its control API."""

    def __init__(self, *, load: Callable[[], Load] | None = None, capacity: int = 20_000,
                 heartbeat: float = HEARTBEAT) -> None:
        self.log = EventLog(secrets.token_hex(8), capacity)
        self.load, self.heartbeat = load, heartbeat
        self._more = trio.Event()
        #: Streams open now (each a receiver following this satellite).
        self.streams = 0

    def record(self, ev: BootEvent) -> None:
        """Keep ``ev`` for the receivers (call for every event the servers emit, in order)."""
        self.log.append(event_to_wire(ev))
        more, self._more = self._more, trio.Event()
        more.set()

    async def stream(self, req: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Answer an ``events`` request until the receiver goes away (``send`` raises) or this is cancelled."""
        epoch, after = req.get("epoch"), req.get("after", 0)
        if epoch is not None and not isinstance(epoch, str):
            await send({"event": "error", "error": "epoch: a string or null"})
            return
        if type(after) is not int or after < 0:
            await send({"event": "error", "error": "after: a sequence number (integer >= 0)"})
            return
        log_ = self.log
        batch = log_.after(epoch, after)
        await send({"event": "stream", "epoch": batch.epoch, "lost": batch.lost, "last": batch.last})
        # Where the receiver stands now: just before the first record sent, or at the end.
        pos = batch.records[0][0] - 1 if batch.records else batch.last
        self.streams += 1
        next_load = trio.current_time()
        try:
            while True:
                for seq, rec in batch.records:
                    await send({"seq": seq, "event": rec})
                    pos = seq
                now = trio.current_time()
                if now >= next_load:
                    await send({"load": load_to_wire(self.load()) if self.load else None, "last": pos})
                    next_load = now + self.heartbeat
                more = self._more
                if log_.last == pos:
                    with trio.move_on_after(max(0.0, next_load - now)):
                        await more.wait()
                batch = log_.after(log_.epoch, pos)
                if batch.lost:  # the log overran this receiver: say how many it will never get
                    await send({"event": "stream", "epoch": batch.epoch, "lost": batch.lost, "last": batch.last})
        finally:
            self.streams -= 1


def load_to_wire(load: Load) -> dict[str, Any]:
    return {"active": load.active, "queued": load.queued, "bytes_per_s": load.bytes_per_s,
            "retransmit_rate": load.retransmit_rate, "client_retry_rate": load.client_retry_rate, "rtt": load.rtt}


def load_from_wire(d: Any) -> Load:
    """A satellite's load line, checked (counts are integers >= 0, rates finite and >= 0)."""
    if not isinstance(d, dict):
        raise StreamError("load is not an object")
    out: dict[str, Any] = {}
    for name in ("active", "queued"):
        v = d.get(name)
        if type(v) is not int or not 0 <= v < 1 << 31:
            raise StreamError(f"load.{name} is not a count")
        out[name] = v
    for name in ("bytes_per_s", "retransmit_rate", "client_retry_rate", "rtt"):
        v = d.get(name)
        if v is None and name == "rtt":
            out[name] = None
            continue
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise StreamError(f"load.{name} is not a rate")
        out[name] = float(v)
    return Load(**out)


# --------------------------------------------------------------------------- orchestrator side


@dataclass(slots=True)
class SatelliteLink:
    """How the orchestrator reaches one satellite, and what it has seen of it."""

    name: str
    host: str
    port: int
    token: str
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    heartbeat: float = HEARTBEAT
    #: The satellite's newest load (None before its first load line).
    load: Load | None = None
    #: trio.current_time() when ``load`` arrived.
    load_at: float | None = None
    connected: bool = False
    connects: int = 0
    #: Malformed answers and broken connections (each followed by a reconnect).
    errors: int = 0
    cursor: StreamCursor | None = None
    #: The satellite's newest record when this connection began (its header's ``last``): until the
    #: cursor reaches it, the stream is still replaying what happened while it was down.
    replay_to: int = 0

    def load_reader(self) -> Load | None:
        """The scheduler's load reader for this satellite: None while its stream is down or before its first
        load line (the window then holds: no signal is not an idle server)."""
        return self.load if self.connected else None

    def blind(self) -> bool:
        """True while the orchestrator cannot know what the satellite saw (the scheduler's ``server_blind``): the
        stream is down, or it is still replaying the records of an outage (a node's stage then lags behind)."""
        return not self.connected or (self.cursor is not None and self.cursor.last < self.replay_to)


async def follow(link: SatelliteLink, tracker, store, *, on_change: Callable[[list], None] | None = None,
                 clock: Callable[[], float] = trio.current_time, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Follow one satellite's events into ``tracker`` and the journal until cancelled (reconnecting as needed)."""
    saved = store.load_offset(offset_key(link.name)) or {}
    epoch, last = saved.get("epoch"), saved.get("last", 0)
    link.cursor = cursor = StreamCursor(epoch if isinstance(epoch, str) else None, last if type(last) is int else 0)
    task_status.started()
    delay = BACKOFF_FIRST
    while True:
        try:
            await _one_connection(link, cursor, tracker, store, on_change, clock)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ssl.SSLError,
                StreamError, ValueError) as e:
            link.errors += 1
            if link.connected:
                delay = BACKOFF_FIRST  # it was answering: try again soon
            log.warning("satellite %s: %s; reconnecting in %.1f s", link.name, _why(e), delay)
        finally:
            link.connected = False
        await trio.sleep(delay)
        delay = min(BACKOFF_MAX, delay * 2)


def _why(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "silent for three heartbeats"
    return str(e) or type(e).__name__


async def _one_connection(link: SatelliteLink, cursor: StreamCursor, tracker, store, on_change, clock) -> None:
    """One connection: request from the cursor, apply records until it ends (it always ends with an exception)."""
    with trio.fail_after(10):
        stream: trio.abc.Stream = await trio.open_tcp_stream(link.host, link.port)
        if link.ssl_context is not None:
            stream = trio.SSLStream(stream, link.ssl_context, server_hostname=link.server_hostname or link.host)
            await stream.do_handshake()
    async with stream:
        await stream.send_all(json.dumps({**cursor.request(), "token": link.token}).encode() + b"\n")
        link.connects += 1
        got_header = False
        buf = b""
        key = offset_key(link.name)
        while True:
            with trio.fail_after(3 * link.heartbeat + 1):
                chunk = await stream.receive_some(65536)
            if not chunk:
                if not got_header:
                    raise StreamError("the satellite closed the connection before answering")
                raise trio.BrokenResourceError("the satellite closed the stream")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > MAX_LINE:
                raise StreamError(f"a line longer than {MAX_LINE} bytes")
            changes: list = []
            newest = None
            for line in lines:
                if not line.strip():
                    continue
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise StreamError("a line that is not a JSON object")
                if "seq" in msg and "event" in msg:
                    seq = msg["seq"]
                    if cursor.accept(seq):
                        ev = event_from_wire(msg["event"], clock(), via=link.name)
                        try:
                            changes += tracker.feed(ev)
                        except Exception:
                            log.exception("satellite %s: an event could not be applied; dropped", link.name)
                        newest = seq
                        cursor.applied(seq)
                elif msg.get("event") == "stream":
                    lost_before = cursor.lost
                    cursor.begin(msg.get("epoch"), msg.get("lost"))
                    if cursor.lost > lost_before:
                        log.warning("satellite %s: %d event(s) were gone from its log before they reached us",
                                    link.name, cursor.lost - lost_before)
                    last = msg.get("last")
                    link.replay_to = last if type(last) is int and last >= 0 else 0
                    if not got_header:
                        got_header = link.connected = True
                    store.save_offset(key, {"epoch": cursor.epoch, "last": cursor.last})
                elif "load" in msg:
                    if msg["load"] is not None:
                        link.load = load_from_wire(msg["load"])
                        link.load_at = trio.current_time()
                elif msg.get("event") == "error":
                    raise StreamError(f"the satellite refused: {str(msg.get('error'))[:200]}")
                else:
                    raise StreamError("a line of unknown shape")
            if newest is not None:
                # The transitions and the cursor in one transaction: after a crash, neither runs ahead.
                store.append_with_offset(changes, key, {"epoch": cursor.epoch, "last": cursor.last})
                if on_change is not None and changes:
                    on_change(changes)
