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
from orchestrator.logwatch.follow import Follower, Offset
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
                    year_hint: int | None = None, task_status: Any = trio.TASK_STATUS_IGNORED, **options: Any) -> None:
    """Follow one log into ``send``: from the journal's saved offset, else from the end of what the file holds now.

    Lines written before the first start are never evidence (a rollout must not
    take yesterday's boots for today's). ``task_status.started()`` comes once the
    file is open and positioned: a line written after that is read. ``options``
    go to the parser (``tftp_root=`` for dnsmasq: its ``TFTP root is`` start line
    is not read when following starts at the end).
    """
    key = offset_key(source, path)
    saved = store.load_offset(key)
    follower = Follower(path, Offset.from_dict(saved) if saved else None, from_end=True)
    if year_hint is None:
        year_hint = datetime.fromtimestamp(path.stat().st_mtime).year if path.exists() else None
    parser = parser_for(source, year_hint=year_hint, **options)
    try:
        lines = follower.poll(trio.current_time())  # opens and positions the file
        task_status.started()
        while True:
            for line in lines:
                events = parser.feed(line.data)
                if events:
                    await send.send(LogEvidence(key, line.offset.to_dict(), events))
            if follower.more:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(poll)
            lines = follower.poll(trio.current_time())
    finally:
        follower.close()


async def watch_plan_logs(plan, store, send: trio.MemorySendChannel, *, poll: float = 0.2,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """One :func:`watch_log` per ``logs:`` entry; started once every file is positioned."""
    async with trio.open_nursery() as nursery:
        for entry in plan.model.logs:
            # dnsmasq logs file names with its TFTP root; the plan's boot root is the one
            # `bootorch render` writes into dnsmasq.conf (the log's own start line overrides it).
            opts = {"tftp_root": str(plan.boot_root)} if entry.source in ("dnsmasq", "syslog") else {}
            await nursery.start(lambda task_status, e=entry, o=opts: watch_log(
                e.source, plan.resolve_path(e.path), store, send, poll=poll, task_status=task_status, **o))
        task_status.started()


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


async def track_logs(plan, store, tracker, *, poll: float = 0.2, on_change=None,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Follow the plan's logs into the tracker and the journal until cancelled.

    ``on_change`` gets each line's transitions once they are journaled (the
    scheduler's :meth:`~orchestrator.scheduler.Scheduler.journaled`). Use as
    ``await nursery.start(track_logs, ...)``: it has started when every log is
    positioned, so nothing the site logs after that is missed.
    """
    send, recv = trio.open_memory_channel[LogEvidence](1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: watch_plan_logs(plan, store, send, poll=poll, task_status=task_status))
        task_status.started()
        async for item in recv:
            changes = apply(tracker, store, item)
            if on_change is not None and changes:
                on_change(changes)
