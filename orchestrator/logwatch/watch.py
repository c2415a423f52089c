"""Evidence from a site's own boot servers: follow their logs, parse, track, journal.

For each ``logs:`` entry of the plan a task follows the file
(:mod:`orchestrator.logwatch.follow`), feeds every complete line to the parser
for its daemon (:mod:`orchestrator.logwatch.parsers`) and hands the resulting
BootEvents, tagged with the position just after their line, to the consumer.

Exactly once across restarts: the consumer journals a line's transitions and
that line's position in one transaction (:meth:`Store.append_with_offset`).
Positions are saved only at lines that produced evidence; the lines after it
-- including context lines a parser needs, such as dnsmasq's ``vendor class:``
line that precedes its DHCPDISCOVER -- are read again after a restart, and
evidence the tracker already has changes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from orchestrator.events import BootEvent
from orchestrator.logwatch.follow import Follower, Offset, follow_lines
from orchestrator.logwatch.parsers import parser_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LogEvidence:
    """BootEvents from one log line, and where to resume after that line."""

    key: str
    offset: dict[str, Any]
    events: list[BootEvent]


def offset_key(source: str, path: Path) -> str:
    return f"log:{source}:{os.path.abspath(path)}"


async def watch_log(source: str, path: Path, store, send: trio.MemorySendChannel, *, poll: float = 0.2,
                    year_hint: int | None = None) -> None:
    key = offset_key(source, path)
    saved = store.load_offset(key)
    follower = Follower(path, Offset.from_dict(saved) if saved else None)
    if year_hint is None:
        year_hint = datetime.fromtimestamp(path.stat().st_mtime).year if path.exists() else None
    parser = parser_for(source, year_hint=year_hint)
    try:
        async for line in follow_lines(follower, poll=poll):
            events = parser.feed(line.data)
            if events:
                await send.send(LogEvidence(key, line.offset.to_dict(), events))
    finally:
        follower.close()


async def watch_plan_logs(plan, store, send: trio.MemorySendChannel, *, poll: float = 0.2) -> None:
    async with trio.open_nursery() as nursery:
        for entry in plan.model.logs:
            nursery.start_soon(lambda e=entry: watch_log(e.source, plan.resolve_path(e.path), store, send, poll=poll))


def apply(tracker, store, item: LogEvidence) -> list:
    """Feed one line's events to the tracker; journal the transitions with the line's offset.

    An event the tracker raises on is logged and dropped (the line's offset is
    still saved): one hostile log line costs only itself.
    """
    changes = []
    for ev in item.events:
        try:
            changes += tracker.feed(ev)
        except Exception:
            log.exception("log evidence from %s could not be applied; dropped", item.key)
    store.append_with_offset(changes, item.key, item.offset)
    return changes


async def track_logs(plan, store, tracker, *, poll: float = 0.2, on_change=None) -> None:
    """Follow the plan's logs into the tracker and the journal until cancelled."""
    send, recv = trio.open_memory_channel[LogEvidence](1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watch_plan_logs(plan, store, send, poll=poll))
        async for item in recv:
            changes = apply(tracker, store, item)
            if on_change is not None and changes:
                on_change(changes)
