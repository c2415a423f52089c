"""``bootorch validate`` and ``bootorch render``: a plan checked, and turned into configs for a site's own servers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, load, plan_summary, problem_json


def cmd_validate(args: argparse.Namespace) -> int:
    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    if args.json:
        out = {"ok": True, **plan_summary(plan), "problems": [problem_json(p) for p in plan.warnings]}
        print(json.dumps(out, indent=2))
    else:
        waves = ", ".join(f"{w} ({len(ns)})" for w, ns in plan.waves())
        print(f"{args.plan}: OK: {len(plan.nodes)} nodes, {len(plan.model.profiles)} profile(s), waves: {waves}")
    return EXIT_OK


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
    plan_cmd("validate", "check a plan: exit 0, or 1 with file:line: what to fix for every problem", cmd_validate)
    r = plan_cmd("render", "write dhcpd.conf, dnsmasq.conf and pxelinux.cfg/ files for sites that keep their own servers", cmd_render)
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files are replaced atomically)")
