"""``bootorch replay``: a boot's post-mortem from daemon logs alone.

Each log line goes through the parser for its daemon (:mod:`orchestrator.logwatch.parsers`),
the resulting BootEvents -- ordered by their log timestamps -- through the same
tracker the live rollout uses, and each node's (MAC's) stage timeline is printed
with the time spent in every stage, like xCAT's ``xcatprobe osdeploy -r``.
With a plan, MACs are shown by node name and the plan's file names mark the
kernel and initrd; without one, the usual names are recognised.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
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


def replay(events: Sequence[BootEvent], lp=None) -> Tracker:
    tracker = Tracker(plan_nodes(lp) if lp is not None else None, track_unknown=lp is None)
    for ev in events:
        tracker.feed(ev)
    return tracker


def timelines(tracker: Tracker) -> list[dict[str, Any]]:
    out = []
    for st in tracker.nodes.values():
        if not st.history:
            continue
        rows = []
        for i, t in enumerate(st.history):
            nxt = st.history[i + 1].time if i + 1 < len(st.history) else None
            rows.append({"stage": t.to_stage.value, "time": t.time, "attempt": t.attempt,
                         "duration": None if nxt is None else round(nxt - t.time, 3), "evidence": t.evidence})
        out.append({"mac": st.mac, "node": st.node, "ip": st.ip, "stage": st.stage.value, "attempts": st.attempt,
                    "flags": sorted(st.flags), "timeline": rows})
    out.sort(key=lambda n: n["timeline"][0]["time"])
    return out


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def print_timelines(nodes: list[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    if not nodes:
        print("no node's boot found in these logs", file=out)
        return
    for n in nodes:
        name = n["node"] if n["node"] != n["mac"] else n["mac"]
        extra = f" {n['mac']}" if n["node"] != n["mac"] else ""
        print(f"{name}{extra} {n['ip'] or ''}  attempts {n['attempts']}  now {n['stage']}".rstrip(), file=out)
        for r in n["timeline"]:
            took = f"{r['duration']:8.3f}s" if r["duration"] is not None else " " * 9
            print(f"  {_ts(r['time'])}  {r['stage']:<9} {took}  {r['evidence'][:140]}", file=out)


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="log files (plain text, or journalctl -o json)")
    p.add_argument("--source", required=True,
                   help=f"which daemon wrote them: {', '.join(SOURCES)}; 'syslog' routes each line of a shared "
                        "syslog file to its daemon's parser by tag (ISC dhcpd + tftp-hpa in one /var/log/syslog)")
    p.add_argument("--plan", help="name nodes and their boot files from this plan")
    p.add_argument("--year", type=int, help="year for syslog timestamps that carry none (default: the file's mtime year)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args) -> int:
    sources = [s.strip() for s in args.source.split(",") if s.strip()]
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        print(f"bootorch replay: unknown --source {', '.join(bad)} (choose from {', '.join(SOURCES)})", file=sys.stderr)
        return 2
    files = [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"bootorch replay: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    lp = None
    if args.plan:
        from orchestrator.plan import PlanError, load_plan

        try:
            lp = load_plan(args.plan)
        except PlanError as e:
            print(e, file=sys.stderr)
            return 1
    year = args.year or datetime.fromtimestamp(files[0].stat().st_mtime).year
    events = read_events(files, sources, year_hint=year)
    nodes = timelines(replay(events, lp))
    if args.json:
        print(json.dumps({"events": len(events), "nodes": nodes}, indent=2))
    else:
        print_timelines(nodes)
    return 0
