"""``bootorch status``, ``history``, ``wake``, ``reboot`` and ``slurm``: the on-call commands and how they print.

The data comes from :mod:`orchestrator.oncall` (``status``'s boot servers from
the running orchestrator's ``admission`` answer, :func:`orchestrator.control.admission_view`);
this module parses the arguments, prints (progress to stderr, results to stdout,
both to a log file for ``slurm``, whose output Slurm discards) and turns answers
into exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, load
from orchestrator.nodeset import NodeSetError
from orchestrator.plan import LoadedPlan

SLURM_ACTIONS = {"resume": "wake", "fail": "power_off", "suspend": "power_off"}


class Reporter:
    """Progress to stderr, results to stdout, and both to a log file when asked (Slurm discards our output)."""

    def __init__(self, log_path: Path | None, as_json: bool) -> None:
        self.log = open(log_path, "a") if log_path else None
        self.as_json = as_json

    def progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self._log(text)

    def result(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)
        self._log(text)

    def _log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"{datetime.now().isoformat(timespec='seconds')} [{os.getpid()}] {text}\n")
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _select(plan: LoadedPlan, expr: str | None) -> list[str] | None:
    if not expr:
        return None
    return [n.name for n in plan.select(expr)]


#: Seconds ``status`` waits for a running orchestrator's ``admission`` answer.
STATUS_TIMEOUT = 2.0


def run_status(plan: LoadedPlan, args: argparse.Namespace) -> int:
    """The nodes from the journal, then each boot server's window and load from the running orchestrator, if any.

    The second part asks the plan's control socket (``admission``, at most
    :data:`STATUS_TIMEOUT` seconds); with no orchestrator answering it is one
    line saying so, and the exit code is the same.
    """
    from orchestrator import control
    from orchestrator.oncall import node_rows
    from orchestrator.present import print_servers, print_status
    from orchestrator.store import Store

    try:
        nodes = _select(plan, args.nodes)
    except NodeSetError as e:
        print(f"bootorch status: {e}", file=sys.stderr)
        return EXIT_USAGE
    db = plan.state_dir / "state.db"
    if not db.exists():
        print(f"bootorch status: no journal at {db} yet (no rollout or serve has run for this plan): "
              "every node is pending", file=sys.stderr)
    store = Store(db)
    try:
        rows = node_rows(plan, store, time.time(), nodes)
    finally:
        store.close()
    if args.stuck:
        rows = [r for r in rows if r["stuck"] or r["stage"] == "failed"]
    view = control.admission_view(control.socket_path(plan), timeout=STATUS_TIMEOUT)
    if args.json:
        print(json.dumps({"time": time.time(), "nodes": rows, "orchestrator": view}, indent=2))
    else:
        print_status(rows)
        print()
        print_servers(view)
    return EXIT_OK


def run_history(plan: LoadedPlan, args: argparse.Namespace) -> int:
    from orchestrator.oncall import history_rows
    from orchestrator.present import print_history
    from orchestrator.store import Store

    try:
        nodes = _select(plan, args.nodes)
    except NodeSetError as e:
        print(f"bootorch history: {e}", file=sys.stderr)
        return EXIT_USAGE
    store = Store(plan.state_dir / "state.db")
    try:
        rows = history_rows(plan, store, nodes)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_history(rows)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    plan = load(args.plan, True)
    if plan is None:
        return EXIT_FAILED
    return (run_status if args.command == "status" else run_history)(plan, args)


def _perform(plan: LoadedPlan, op: str, names: list[str], *, reason: str, actor: str, hard: bool, wait: bool,
             argv: list[str] | None, out: Reporter) -> dict[str, Any] | int:
    """The operation's answer, or an exit code when this process re-executed itself in the plan's namespace."""
    from orchestrator import netns_exec
    from orchestrator.oncall import NEEDS_REEXEC, perform

    answer = perform(plan, op, names, reason=reason, actor=actor, hard=hard, wait=wait, progress=out.progress)
    if answer == NEEDS_REEXEC:
        problem = netns_exec.lab_down_problem(plan)
        if problem:
            out.progress(f"bootorch {op}: {problem}")
            return EXIT_FAILED
        return netns_exec.reexec_in_namespace(plan, argv or [])
    assert isinstance(answer, dict)
    if answer.get("via") == "none":
        out.progress(f"bootorch {op}: {answer['error']}")
    return answer


OK_RESULTS = {"ready", "off", "acted"}


def _report(op: str, answer: dict[str, Any], out: Reporter, as_json: bool, *, stdout: bool = True) -> int:
    """Print the answer (results to stdout, or with ``stdout=False`` to stderr and the log only); the exit code."""
    results, busy = answer["results"], answer["busy"]
    ok = not busy and "error" not in answer and bool(results) and all(r["result"] in OK_RESULTS for r in results.values())
    if as_json:
        print(json.dumps({"ok": ok, "op": op, **answer}, indent=2))
    say = out.result if stdout else out.progress
    for name, why in busy.items():
        say(f"{name}: {why}")
    for name, r in results.items():
        path = " -> ".join(r.get("path") or []) or "-"
        say(f"{name}: {r['result']}{': ' + r['reason'] if r.get('reason') else ''}  (via {path})")
    return EXIT_OK if ok else EXIT_FAILED


#: Longest node reason bootorch hands Slurm (``scontrol update ... Reason=``).
SLURM_REASON_MAX = 160


def _slurm_text(text: str) -> str:
    """One line of printable text without tabs, for a Slurm node reason."""
    from orchestrator.safetext import safe_text

    return " ".join(safe_text(text, SLURM_REASON_MAX * 2).replace("\t", " ").split())[:SLURM_REASON_MAX]


def _diagnosis(plan: LoadedPlan, names: list[str]) -> dict[str, str]:
    """Each node's stage and last evidence in the journal, as ``stage: evidence``."""
    from orchestrator.oncall import node_rows
    from orchestrator.store import Store

    db = plan.state_dir / "state.db"
    if not db.exists():
        return {}
    store = Store(db)
    try:
        rows = node_rows(plan, store, time.time(), names)
    finally:
        store.close()
    return {r["node"]: f"{r['stage']}: {r['evidence']}" if r["evidence"] else r["stage"] for r in rows}


def _slurm_reasons(action: str, names: list[str], answer: dict[str, Any], before: dict[str, str]) -> dict[str, str]:
    """What ``bootorch slurm`` prints on stdout, one ``NODE<TAB>REASON`` line each (the wrapper sets them in Slurm).

    ``fail``: every node, with bootorch's diagnosis from before the power off (and the power
    off's outcome when it did not work); ``resume``/``suspend``: the nodes that did not get there.
    """
    results, busy = answer.get("results", {}), answer.get("busy", {})
    reasons: dict[str, str] = {}
    for name in names:
        r = results.get(name)
        outcome = (f"busy: {busy[name]}" if name in busy else
                   f"{r['result']}: {r.get('reason') or ''}" if r else answer.get("error", "no answer"))
        done = r is not None and r["result"] in OK_RESULTS
        if action == "fail":
            text = f"bootorch: {before.get(name, 'no record')}" + ("" if done else f"; power off {outcome}")
        elif not done:
            text = f"bootorch {action}: {outcome}"
        else:
            continue
        reasons[name] = _slurm_text(text)
    return reasons


def cmd_action(args: argparse.Namespace) -> int:
    """``bootorch wake|reboot NODES``."""
    from orchestrator.oncall import actor_name
    from orchestrator.power import SecretError

    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    op = "wake" if args.command == "wake" else "reboot"
    try:
        names = [n.name for n in plan.select(args.nodes)]
    except NodeSetError as e:
        print(f"bootorch {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not names:
        print(f"bootorch {args.command}: {args.nodes!r} names no node of the plan", file=sys.stderr)
        return EXIT_USAGE
    out = Reporter(None, args.json)
    try:
        answer = _perform(plan, op, names, reason=args.reason or f"bootorch {args.command} by hand", actor=actor_name(),
                          hard=getattr(args, "hard", False), wait=not args.no_wait, argv=getattr(args, "argv", None), out=out)
        if isinstance(answer, int):
            return answer
        return _report(op, answer, out, args.json)
    except SecretError as e:
        print(f"bootorch {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        out.close()


def cmd_slurm(args: argparse.Namespace) -> int:
    """``bootorch slurm resume|suspend|fail HOSTLIST``: Slurm's ResumeProgram / SuspendProgram / ResumeFailProgram.

    Slurm calls the program with one argument, the hostlist; the plan comes from
    ``--plan`` or ``$BOOTORCH_PLAN``. Exit 0 when every node reached the wanted
    state (ready, or off), 1 otherwise; everything is appended to the log file
    (Slurm keeps no output of these programs).
    """
    from orchestrator.oncall import actor_name
    from orchestrator.power import SecretError

    path = args.plan or os.environ.get("BOOTORCH_PLAN")
    if not path:
        print("bootorch slurm: which plan? pass --plan PLAN or set BOOTORCH_PLAN (Slurm passes only the hostlist)",
              file=sys.stderr)
        return EXIT_USAGE
    plan = load(path, False)
    if plan is None:
        return EXIT_FAILED
    log_path = Path(args.log) if args.log else plan.state_dir / "slurm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = Reporter(log_path, args.json)
    try:
        try:
            names = [n.name for n in plan.select(args.hostlist)]
        except NodeSetError as e:
            out.progress(f"bootorch slurm {args.action}: {e}")
            return EXIT_FAILED
        if not names:
            out.progress(f"bootorch slurm {args.action}: {args.hostlist!r} names no node of plan {path}")
            return EXIT_FAILED
        out.progress(f"slurm {args.action} {args.hostlist}")
        op = SLURM_ACTIONS[args.action]
        # What bootorch knew of the nodes before Slurm gave up on them: the reason Slurm shows for them.
        before = _diagnosis(plan, names) if args.action == "fail" else {}
        answer = _perform(plan, op, names, reason=f"slurm {args.action}", actor=f"slurm@{actor_name().split('@', 1)[1]}",
                          hard=args.action == "fail", wait=True, argv=getattr(args, "argv", None), out=out)
        if isinstance(answer, int):
            out.progress(f"slurm {args.action} {args.hostlist}: exit {answer}")
            return answer
        code = _report(op, answer, out, args.json, stdout=False)
        if not args.json:
            for name, reason in _slurm_reasons(args.action, names, answer, before).items():
                print(f"{name}\t{reason}", flush=True)
        return code
    except SecretError as e:
        out.progress(f"bootorch slurm: {e}")
        return EXIT_FAILED
    finally:
        out.close()


def add_commands(sub, plan_cmd) -> None:
    st = plan_cmd("status", "each node's stage, time in stage, attempts, last evidence and action, the worst first; then each "
                            "boot server's admission window and load from the running orchestrator", cmd_status)
    st.add_argument("nodes", nargs="?", metavar="NODES", help="node set, e.g. node[01-04] or @rack1 (default: all)")
    st.add_argument("--stuck", action="store_true", help="only nodes over their stage's timeout, and failed ones")
    hi = plan_cmd("history", "every stage change and action (who, when, why, result) from the journal", cmd_status)
    hi.add_argument("nodes", nargs="?", metavar="NODES", help="node set (default: all)")

    for name, help in (
        ("wake", "power NODES on (magic packet, then the plan's escalation ladder) and wait until they are ready"),
        ("reboot", "reboot NODES the gentlest way that works (SSH reboot, else BMC power cycle, else magic packet), "
                   "under the plan's admission limits, and wait until they are ready again"),
    ):
        ac = plan_cmd(name, help, cmd_action, json_help="print the result as one JSON object on stdout")
        ac.add_argument("nodes", metavar="NODES", help="node set in ClusterShell syntax: node[01-04], @rack1, node1,node7")
        ac.add_argument("--reason", metavar="TEXT", help="why (audited in the journal, shown by `bootorch history`)")
        ac.add_argument("--no-wait", action="store_true", help="return once the power action is done; do not wait for ready")
        if name == "reboot":
            ac.add_argument("--hard", action="store_true", help="skip the SSH reboot: BMC power cycle straight away")
        ac.epilog = ("A running `bootorch rollout` or `serve` for the plan does the work (through its control socket); "
                     "otherwise this command runs the boot server and tracker itself until the nodes are ready. "
                     "Exit 0 when every node is ready, 1 when one failed or is busy with another request.")

    sl = sub.add_parser("slurm", help="Slurm power saving: resume|suspend|fail HOSTLIST (ResumeProgram, SuspendProgram, ResumeFailProgram)",
                        description="Programs for Slurm's power saving. resume boots the nodes and waits until ready; "
                                    "suspend powers them off cleanly (SSH poweroff, else BMC); fail powers them off hard "
                                    "(BMC). Exit 0 when every node reached that state, else 1. See docs/oncall.md "
                                    "for the slurm.conf lines.")
    sl.add_argument("action", choices=sorted(SLURM_ACTIONS), help="what Slurm asks for")
    sl.add_argument("hostlist", metavar="HOSTLIST", help="Slurm hostlist, e.g. node[01-04],gpu7")
    sl.add_argument("--plan", metavar="PLAN", help="plan file (default: $BOOTORCH_PLAN; Slurm passes only the hostlist)")
    sl.add_argument("--log", metavar="FILE", help="append what happens here (default: <state_dir>/slurm.log)")
    sl.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    sl.set_defaults(func=cmd_slurm)
