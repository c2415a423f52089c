"""``bootorch validate`` and ``bootorch render``: a plan checked, and turned into configs for a site's own servers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, load, plan_summary, problem_json


def cmd_validate(args: argparse.Namespace) -> int:
    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    if args.against_running:
        return against_running(plan, args)
    if args.json:
        out = {"ok": True, **plan_summary(plan), "problems": [problem_json(p) for p in plan.warnings]}
        print(json.dumps(out, indent=2))
    else:
        waves = ", ".join(f"{w} ({len(ns)})" for w, ns in plan.waves())
        print(f"{args.plan}: OK: {len(plan.nodes)} nodes, {len(plan.model.profiles)} profile(s), waves: {waves}")
    return EXIT_OK


def against_running(plan, args: argparse.Namespace) -> int:
    """``validate --against-running``: what ``systemctl reload`` (SIGHUP) would change in the running ``serve``.

    Asks the running orchestrator for its plan's fingerprint on the control
    socket (a read-only request: an operator in the service's group may ask).
    Exit 0 when a reload would apply the plan, 1 when it would refuse it (a
    change that needs a restart) or nobody runs.
    """
    from orchestrator.control import NoOrchestrator, request, socket_path
    from orchestrator.service import diff, fingerprint

    sock = socket_path(plan)
    running = None
    error = f"no bootorch runs for this plan (nobody answers on {sock})"
    try:
        for msg in request(sock, {"op": "plan"}, timeout=10):
            if msg.get("event") == "plan":
                running = msg["fingerprint"]
            elif msg.get("event") == "error":
                error = f"the running bootorch refused: {msg.get('error')}"
    except PermissionError:
        error = f"no permission to connect to {sock} (docs/service.md: the service's group may ask read-only)"
    except (NoOrchestrator, OSError, ValueError) as e:
        error = f"{error}: {e}" if not isinstance(e, NoOrchestrator) else error
    if running is None:
        if args.json:
            print(json.dumps({"ok": False, "plan": args.plan, "error": error}, indent=2))
        else:
            print(f"{args.plan}: valid, but {error}", file=sys.stderr)
        return EXIT_FAILED
    d = diff(running, fingerprint(plan))
    if args.json:
        print(json.dumps({"ok": not d.needs_restart, "plan": args.plan, "running": running.get("plan"),
                          "reload": d.as_json()}, indent=2))
    else:
        print(f"{args.plan}: valid; against the running plan ({running.get('plan')}), a reload would:")
        for line in d.lines():
            print(f"  {line}")
    return EXIT_FAILED if d.needs_restart else EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from orchestrator.render import render_all, write_tree

    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    out = Path(args.out)
    written = write_tree(render_all(plan), out)
    if args.json:
        print(json.dumps({"ok": True, "out": str(out), "files": [str(p.relative_to(out)) for p in written]}, indent=2))
    else:
        cfgs = sum(1 for p in written if p.parent.name == "pxelinux.cfg")
        keys = sum(1 for p in written if p.parent.name == "hostkeys")
        extra = f", {keys} host-key archives (owner-only: serve each only to its node, see docs/plan.md)" if keys else ""
        print(f"wrote {len(written)} files to {out}: dhcpd.conf, dnsmasq.conf, {cfgs} pxelinux.cfg files, iPXE scripts{extra}")
    return EXIT_OK


def add_commands(plan_cmd) -> None:
    v = plan_cmd("validate", "check a plan: exit 0, or 1 with file:line: what to fix for every problem", cmd_validate)
    v.add_argument("--against-running", action="store_true",
                   help="also show what a reload (SIGHUP, systemctl reload) of the running serve would change; "
                        "exit 1 when it would refuse the plan")
    r = plan_cmd("render", "write dhcpd.conf, dnsmasq.conf and pxelinux.cfg/ files for sites that keep their own servers", cmd_render)
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files are replaced atomically)")
