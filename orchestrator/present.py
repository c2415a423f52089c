"""How bootorch shows what happened: one presenter for stage changes, events, rollouts and the journal.

Every surface that shows a :class:`~orchestrator.tracker.Transition` -- the
control API's stream, ``serve``'s output, the rollout's progress and its
``--json`` summary, ``replay`` -- uses :func:`transition_dict` for JSON and
:func:`transition_line` for text, so a stage change reads the same everywhere.
The texts these print were made safe where they entered
(:mod:`orchestrator.safetext`); the live view hands them to rich as ``Text``,
never as markup.

Results go to stdout, progress and diagnostics to stderr: :class:`Progress`
prints one line per event with the seconds since start, :class:`LiveProgress`
a live table on a terminal.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any, Callable, TextIO

import trio

from orchestrator.events import BootEvent
from orchestrator.tracker import ORDERED, Stage, Tracker, Transition

#: Version of the ``bootorch rollout --json`` object (docs/rollout.md).
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- transitions and events


def transition_dict(t: Transition) -> dict[str, Any]:
    """A stage change as JSON: node, mac, from, to, time, attempt, source, evidence, flags."""
    return {"node": t.node, "mac": t.mac, "from": t.from_stage.value, "to": t.to_stage.value, "time": t.time,
            "attempt": t.attempt, "source": t.source, "evidence": t.evidence, "flags": list(t.flags)}


def transition_line(t: Transition, *, width: int = 0, evidence: int | None = None) -> str:
    """A stage change as one line: ``node01 kernel -> initrd (attempt 1) [flags]: evidence``.

    ``width`` pads the node name (aligned columns in progress output);
    ``evidence`` cuts the evidence to that many characters.
    """
    text = t.evidence if evidence is None else t.evidence[:evidence]
    if t.from_stage == t.to_stage:
        return f"{t.node:<{width}} {t.to_stage.value} again (attempt {t.attempt}): {text}"
    flags = f" [{', '.join(t.flags)}]" if t.flags else ""
    return f"{t.node:<{width}} {t.from_stage.value} -> {t.to_stage.value} (attempt {t.attempt}){flags}: {text}"


def event_dict(ev: BootEvent) -> dict[str, Any]:
    """A piece of evidence as JSON (``serve --json --events``)."""
    return {"time": ev.wall, "source": ev.source, "kind": ev.kind.value, "mac": ev.mac, "ip": ev.client_ip,
            "file": ev.filename, "bytes": ev.bytes, "result": ev.result, "detail": dict(ev.detail)}


def event_line(ev: BootEvent) -> str:
    """A piece of evidence as one line (``serve --events``)."""
    who = ev.mac or ev.client_ip or "-"
    if ev.source in ("dhcp", "proxydhcp"):
        d = ev.detail
        arrow = "<-" if d.get("direction") == "in" else "->"
        extra = f" {d['boot_file']}" if d.get("boot_file") else ""
        return f"{ev.source} {arrow} {d.get('msg')} {who} {ev.client_ip or ''} {d.get('kind', '')}{extra}".rstrip()
    size = f" {ev.bytes}B" if ev.bytes else ""
    took = f" {ev.duration:.3f}s" if ev.duration is not None else ""
    return f"{ev.source} {ev.kind.value} {ev.client_ip} {ev.filename} {ev.result or ''}{size}{took}".rstrip()


# --------------------------------------------------------------------------- progress


class Progress:
    """Plain progress lines: one per stage change or action, with seconds since start.

    They go to ``out`` (default stderr), or to ``sink`` when given (a command
    that also logs to a file, such as ``bootorch slurm``).
    """

    def __init__(self, out: TextIO | None = None, *, sink: Callable[[str], None] | None = None) -> None:
        self.out = out or sys.stderr
        self.sink = sink
        self.t0 = time.time()

    def line(self, text: str) -> None:
        text = f"{time.time() - self.t0:8.1f}s  {text}"
        if self.sink is not None:
            self.sink(text)
        else:
            print(text, file=self.out, flush=True)

    def transitions(self, ts: list[Transition]) -> None:
        for t in ts:
            self.line(transition_line(t, width=12, evidence=120))


class LiveProgress(Progress):
    """A live view on a terminal (rich): nodes per stage, then the nodes in trouble or slowest.

    rich's own refresh thread would fight trio, so ``Live(auto_refresh=False)``
    is refreshed from a trio task (:meth:`refresher`). Log lines print above it.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, auto_refresh=False, transient=True)
        self.tracker: Tracker | None = None

    def line(self, text: str) -> None:
        self.console.print(f"{time.time() - self.t0:8.1f}s  {text}", markup=False, highlight=False)

    def transitions(self, ts: list[Transition]) -> None:
        for t in ts:
            if t.to_stage in (Stage.READY, Stage.FAILED) or t.from_stage == t.to_stage:
                super().transitions([t])

    def render(self):
        """The live table. Node names and evidence go in as ``rich.text.Text``: never parsed as markup."""
        from rich.table import Table
        from rich.text import Text

        tr = self.tracker
        table = Table(box=None, pad_edge=False)
        if tr is None:
            return table
        counts = tr.counts()
        table.add_column("stage")
        table.add_column("nodes", justify="right")
        for s in [*ORDERED, Stage.FAILED]:
            if counts[s]:
                table.add_row(s.value, str(counts[s]))
        now = time.time()
        busy = [st for st in tr.nodes.values() if st.stage not in (Stage.PENDING, Stage.READY, Stage.FAILED)]
        busy.sort(key=lambda st: st.since)
        nodes = Table(box=None, pad_edge=False, title="slowest nodes in flight")
        for col in ("node", "stage", "in stage", "last evidence"):
            nodes.add_column(col)
        for st in busy[:8]:
            limit = tr.timeouts.get(st.stage)
            age = now - st.since
            style = "red" if limit is not None and age >= limit else None
            nodes.add_row(Text(st.node), st.stage.value, f"{age:.0f}s", Text(st.last_evidence[:70]), style=style)
        outer = Table.grid()
        outer.add_row(table)
        if busy:
            outer.add_row(nodes)
        return outer

    async def refresher(self) -> None:
        with self.live:
            while True:
                self.live.update(self.render(), refresh=True)
                await trio.sleep(0.5)


# --------------------------------------------------------------------------- a rollout's result


def rollout_json(plan, summary, tracker: Tracker) -> dict[str, Any]:
    """The ``bootorch rollout --json`` object (schema in docs/rollout.md)."""
    nodes = []
    for job in summary.nodes.values():
        st = tracker.nodes[job.node.mac]
        nodes.append({
            "name": job.node.name, "mac": job.node.mac, "ip": str(job.node.ip), "wave": job.wave,
            "result": job.result or "unfinished", "reason": job.reason, "stage": st.stage.value,
            "attempts": st.attempt, "flags": sorted(st.flags),
            "timeline": [transition_dict(t) for t in st.history],
            "actions": job.actions,
        })
    counts = {s.value: 0 for s in [*ORDERED, Stage.FAILED]}
    for n in nodes:
        counts[n["stage"]] += 1
    return {
        "schema": SCHEMA_VERSION, "ok": summary.ok, "aborted": summary.aborted, "plan": str(plan.path),
        "ready": len(summary.ready), "failed": len(summary.failed), "total": len(nodes), "counts": counts,
        "window_history": [{"time": t, "window": w} for t, w in summary.window_history], "nodes": nodes,
    }


def print_rollout(summary, tracker: Tracker, out: TextIO | None = None) -> None:
    """A rollout's result as text on stdout: the verdict, then one line per node."""
    out = out or sys.stdout
    print(f"rollout {'OK' if summary.ok else 'FAILED'}{' (aborted: failure budget exceeded)' if summary.aborted else ''}: "
          f"{len(summary.ready)}/{len(summary.nodes)} ready, {len(summary.failed)} failed", file=out)
    for job in summary.nodes.values():
        st = tracker.nodes[job.node.mac]
        took = ""
        if st.history:
            took = f" in {st.history[-1].time - st.history[0].time:.1f}s"
        line = f"  {job.node.name:<12} {st.stage.value:<9} attempts {st.attempt}{took}"
        if job.result == "failed":
            line += f"  {job.reason}"
        print(line, file=out)


# --------------------------------------------------------------------------- the journal: status, history


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def print_status(rows: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """``bootorch status``: stage counts, then one line per node (rows of :func:`orchestrator.oncall.node_rows`)."""
    out = out or sys.stdout
    tty = out.isatty()
    red, yellow, green, reset = ("\033[31m", "\033[33m", "\033[32m", "\033[0m") if tty else ("", "", "", "")
    counts = {s.value: 0 for s in [*ORDERED, Stage.FAILED]}
    for r in rows:
        counts[r["stage"]] += 1
    stuck = sum(1 for r in rows if r["stuck"])
    print("  ".join(f"{k} {v}" for k, v in counts.items() if v) + (f"  (stuck {stuck})" if stuck else ""), file=out)
    print(f"{'node':<14} {'stage':<9} {'in stage':>9} {'att':>3}  last evidence / action", file=out)
    for r in rows:
        colour = red if r["stage"] == "failed" else yellow if r["stuck"] else green if r["stage"] == "ready" else ""
        mark = "!" if r["stuck"] else " "
        line = f"{r['node']:<14} {colour}{r['stage']:<9}{reset} {_age(r['in_stage_seconds']):>8}{mark} {r['attempts']:>3}  {r['evidence'][:90]}"
        if r["last_action"]:
            a = r["last_action"]
            line += f"  [{a['action']}: {a['result']}]"
        print(line, file=out)


def _racks(racks: list[str], total: int, width: int = 16) -> str:
    """Rack names joined by commas, cut near ``width`` characters with ``+N`` for the ones left out."""
    if not racks:
        return "-"
    text = ""
    for i, r in enumerate(racks):
        joined = f"{text},{r}" if text else r
        more = total - i - 1
        if text and len(joined) + (len(f",+{more}") if more else 0) > width:
            return f"{text},+{total - i}"
        text = joined
    return text if total == len(racks) else f"{text},+{total - len(racks)}"


def _num(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def server_rows(view: dict[str, Any]) -> list[list[str]]:
    """The ``boot servers`` table's cells, header first (``view``: :func:`orchestrator.control.admission_view`, answered)."""
    rows = [["server", "kind", "racks", "nodes", "window", "in flight", "dl", "waiting", "active", "queued", "MB/s",
             "retrans/s", "resends/s", "rtt", "link"]]
    for s in view["servers"]:
        load, link = s["load"] or {}, s["link"]
        adaptive = "adaptive" if s["adaptive"] else "fixed" if s["adaptive"] is False else "?"
        if link is None:
            link_text = "-"
        else:
            up = "up" if link["connected"] else "DOWN" if link["connected"] is False else "?"
            age = f", load {link['load_age']:.1f}s old" if link["load_age"] is not None else ""
            link_text = f"{up}{age}" if s["load"] is not None else f"{up}, no load yet"
        rtt = load.get("rtt")
        rows.append([s["name"], s["kind"], _racks(s["racks"], s["racks_total"]), _num(s["nodes"]),
                     f"{_num(s['window'])}/{_num(s['max_downloading'])} {adaptive}", _num(s["in_flight"]),
                     _num(s["downloading"]), _num(s["waiting"]), _num(load.get("active")), _num(load.get("queued")),
                     _num(None if load.get("bytes_per_s") is None else load["bytes_per_s"] / 1e6, "{:.1f}"),
                     _num(load.get("retransmit_rate"), "{:.1f}"), _num(load.get("client_retry_rate"), "{:.1f}"),
                     "-" if rtt is None else f"{rtt * 1000:.1f}ms", link_text])
    return rows


def print_servers(view: dict[str, Any], out: TextIO | None = None) -> None:
    """``bootorch status``'s ``boot servers`` table (``view``: :func:`orchestrator.control.admission_view`).

    One line per boot server: its window and load from the running orchestrator;
    when none answered, one line saying why. The view's text was made safe and
    bounded where it was read (:func:`orchestrator.control.admission_from_wire`).
    """
    out = out or sys.stdout
    if not view.get("answered"):
        print(f"boot servers: {view['why']} ({view['socket']}); the nodes above are from the journal", file=out)
        return
    aborted = "; ABORTED (failure budget)" if view["aborted"] else ""
    print(f"boot servers (orchestrator pid {_num(view['pid'])}, {view['mode']}; window {_num(view['window'])} of "
          f"{_num(view['max_window'])} in all{aborted}):", file=out)
    rows = server_rows(view)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 5, 6, 7, 8, 9, 10, 11, 12, 13}
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip(), file=out)


def print_history(rows: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """``bootorch history``: one line per stage change or action (rows of :func:`orchestrator.oncall.history_rows`)."""
    out = out or sys.stdout
    for r in rows:
        ts = datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{ts}  {r['node']:<12} {r['kind']:<6} {r['what']:<22} {r['detail'][:100]}  ({r['actor']})", file=out)


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def print_timelines(nodes: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """``bootorch replay``: each node's timeline (rows of :func:`orchestrator.replay.timelines`)."""
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
            print(f"  {_ts(r['time'])}  {r['to']:<9} {took}  {r['evidence'][:140]}", file=out)
