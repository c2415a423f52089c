"""A boot's post-mortem from daemon logs alone (``bootorch replay``).

Each log line goes through the parser for its daemon (:mod:`orchestrator.logwatch.parsers`),
the resulting BootEvents -- ordered by their log timestamps -- through the same
tracker the live rollout uses, and each node's (MAC's) stage timeline is printed
with the time spent in every stage, like xCAT's ``xcatprobe osdeploy -r``
(printed by :func:`orchestrator.present.print_timelines`; the command is
:mod:`orchestrator.cli.tools`).
With a plan, MACs are shown by node name and the plan's file names mark the
kernel and initrd; without one, the usual names are recognised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from orchestrator.events import BootEvent
from orchestrator.tracker import Tracker, plan_nodes

SOURCES = ("dnsmasq", "iscdhcpd", "tftp-hpa", "kea", "syslog")


def read_events(files: Sequence[Path], sources: Sequence[str], year_hint: int | None = None) -> list[BootEvent]:
    from orchestrator.logwatch.parsers import parser_for

    events: list[tuple[float, int, BootEvent]] = []
    seq = 0
    for path in files:
        parsers = [parser_for(s, year_hint=year_hint) for s in sources]
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                for p in parsers:
                    for ev in p.feed(line):
                        events.append((ev.time, seq, ev))
                        seq += 1
        for p in parsers:
            for ev in p.flush():
                events.append((ev.time, seq, ev))
                seq += 1
    events.sort(key=lambda x: (x[0], x[1]))
    return [e for _, _, e in events]


def replay(events: Sequence[BootEvent], plan=None) -> Tracker:
    tracker = Tracker(plan_nodes(plan) if plan is not None else None, track_unknown=plan is None)
    for ev in events:
        tracker.feed(ev)
    return tracker


def timelines(tracker: Tracker) -> list[dict[str, Any]]:
    """Each node's timeline: its transitions (:func:`~orchestrator.present.transition_dict`), each with
    ``stage`` (the stage entered) and ``duration`` (seconds until the next one; None for the last)."""
    from orchestrator.present import transition_dict

    out = []
    for st in tracker.nodes.values():
        if not st.history:
            continue
        rows = []
        for i, t in enumerate(st.history):
            nxt = st.history[i + 1].time if i + 1 < len(st.history) else None
            rows.append({**transition_dict(t), "stage": t.to_stage.value,
                         "duration": None if nxt is None else round(nxt - t.time, 3)})
        out.append({"mac": st.mac, "node": st.node, "ip": st.ip, "stage": st.stage.value, "attempts": st.attempt,
                    "flags": sorted(st.flags), "timeline": rows})
    out.sort(key=lambda n: n["timeline"][0]["time"])
    return out
