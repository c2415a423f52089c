"""``bootorch``: the command line.

Exit codes (stable, documented in README): 0 success; 1 the job failed (plan
errors, nodes failed beyond the budget); 2 usage errors. Results go to stdout
(``--json`` prints one JSON object), diagnostics and progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from orchestrator import __version__
from orchestrator.plan import LoadedPlan, PlanError, Problem, load_plan

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SLURM_ACTIONS = ("resume", "suspend", "fail")


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "line": p.line, "severity": p.severity, "message": p.message}


def _load(path: str, as_json: bool) -> LoadedPlan | None:
    """Load a plan, printing problems; None when it has errors."""
    try:
        lp = load_plan(path)
    except PlanError as e:
        if as_json:
            print(json.dumps({"ok": False, "plan": path, "problems": [_problem_json(p) for p in e.problems]}, indent=2))
        else:
            for p in e.problems:
                print(p, file=sys.stderr)
            n = len(e.errors)
            print(f"{path}: {n} error{'s' if n != 1 else ''}; nothing was changed", file=sys.stderr)
        return None
    if not as_json:
        for w in lp.warnings:
            print(w, file=sys.stderr)
    return lp


def _summary(lp: LoadedPlan) -> dict[str, Any]:
    return {
        "plan": str(lp.path),
        "name": lp.model.name,
        "nodes": len(lp.nodes),
        "profiles": sorted(lp.model.profiles),
        "dhcp_mode": lp.model.dhcp.mode,
        "boot_root": str(lp.boot_root),
        "waves": [{"name": w, "nodes": [n.name for n in ns]} for w, ns in lp.waves()],
    }


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    lp = _load(args.plan, args.json)
    if lp is None:
        return EXIT_FAILED
    if args.json:
        out = {"ok": True, **_summary(lp), "problems": [_problem_json(p) for p in lp.warnings]}
        print(json.dumps(out, indent=2))
    else:
        waves = ", ".join(f"{w} ({len(ns)})" for w, ns in lp.waves())
        print(f"{args.plan}: OK: {len(lp.nodes)} nodes, {len(lp.model.profiles)} profile(s), waves: {waves}")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from orchestrator.render import render_all, write_tree

    lp = _load(args.plan, args.json)
    if lp is None:
        return EXIT_FAILED
    out = Path(args.out)
    written = write_tree(render_all(lp), out)
    if args.json:
        print(json.dumps({"ok": True, "out": str(out), "files": [str(p.relative_to(out)) for p in written]}, indent=2))
    else:
        cfgs = sum(1 for p in written if p.parent.name == "pxelinux.cfg")
        keys = sum(1 for p in written if p.parent.name == "hostkeys")
        extra = f", {keys} host-key archives (owner-only: serve each only to its node, see docs/plan.md)" if keys else ""
        print(f"wrote {len(written)} files to {out}: dhcpd.conf, dnsmasq.conf, {cfgs} pxelinux.cfg files, iPXE scripts{extra}")
    return EXIT_OK


def dry_run_schedule(lp: LoadedPlan) -> list[dict[str, Any]]:
    """When each node would be powered on if every earlier one booted instantly.

    A lower bound on timing: power-on rate (global and per rack) is the only
    limit modelled; the download window adds to it at run time.
    """
    adm = lp.model.rollout.admission
    t = 0.0
    rack_next: dict[str, float] = {}
    rows = []
    for wave, nodes in lp.waves():
        for n in nodes:
            start = t
            if n.rack and adm.rack_power_on_rate:
                start = max(start, rack_next.get(n.rack, 0.0))
                rack_next[n.rack] = start + 1.0 / adm.rack_power_on_rate
            rows.append({"wave": wave, "node": n.name, "mac": n.mac, "ip": str(n.ip), "profile": n.profile, "power_on_at": round(start, 3)})
            t = start + 1.0 / adm.power_on_rate
    return rows


def cmd_rollout(args: argparse.Namespace) -> int:
    lp = _load(args.plan, args.json)
    if lp is None:
        return EXIT_FAILED
    if args.dry_run:
        schedule = dry_run_schedule(lp)
        adm = lp.model.rollout.admission
        if args.json:
            print(json.dumps({"ok": True, "dry_run": True, **_summary(lp), "schedule": schedule}, indent=2))
        else:
            print(f"plan {lp.model.name}: {len(lp.nodes)} nodes in {len(lp.waves())} wave(s); "
                  f"at most {adm.max_downloading} downloading, {adm.power_on_rate:g} power-on/s"
                  f"{', adaptive' if adm.adaptive else ''}")
            print(f"{'t+s':>8}  {'wave':<10} {'node':<16} {'mac':<17}  {'ip':<15} profile")
            for r in schedule:
                print(f"{r['power_on_at']:>8.2f}  {r['wave']:<10} {r['node']:<16} {r['mac']:<17}  {r['ip']:<15} {r['profile']}")
        return EXIT_OK
    from orchestrator import netns_exec
    from orchestrator.power import SecretError

    if netns_exec.needs_reexec(lp):
        return netns_exec.rollout_in_namespace(lp, args)
    from orchestrator.control import Busy
    from orchestrator.rollout import main_rollout

    try:
        return main_rollout(lp, as_json=args.json)
    except (SecretError, Busy) as e:
        print(f"bootorch rollout: {e}", file=sys.stderr)
        return EXIT_FAILED


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from orchestrator.bootserver.dhcp import DhcpPrivilegeError
    from orchestrator.bootserver.serve import Ports, run_serve

    lp = _load(args.plan, False)
    if lp is None:
        return EXIT_FAILED
    ports = Ports(host=args.listen, dhcp=args.dhcp_port, pxe=args.pxe_port, tftp=args.tftp_port,
                  http=args.http_port, interface=args.interface)
    try:
        metrics_port = None if args.metrics_port is None else (False if args.metrics_port < 0 else args.metrics_port)
        trio.run(lambda: run_serve(lp, ports, dhcp=not args.no_dhcp, as_json=args.json, events_too=args.events,
                                   metrics_port=metrics_port))
    except BaseException as e:  # trio wraps start-up failures in exception groups
        leaf = _single_leaf(e)
        from orchestrator.control import Busy
        from orchestrator.power import SecretError

        if isinstance(leaf, (DhcpPrivilegeError, Busy, SecretError)):
            print(f"bootorch serve: {leaf}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(leaf, OSError):
            import errno

            hint = ""
            if leaf.errno == errno.EADDRNOTAVAIL:
                where = args.listen or lp.model.bootserver.listen or lp.model.network.server
                hint = f" ({where} is not an address of this machine; --listen overrides the plan)"
            print(f"bootorch serve: cannot listen: {leaf.strerror or leaf}{hint}", file=sys.stderr)
            return EXIT_FAILED
        raise
    return EXIT_OK


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.oncall import run_history, run_status

    lp = _load(args.plan, True)
    if lp is None:
        return EXIT_FAILED
    return (run_status if args.command == "status" else run_history)(lp, args)


def cmd_action(args: argparse.Namespace) -> int:
    from orchestrator.oncall import run_action
    from orchestrator.power import SecretError

    lp = _load(args.plan, args.json)
    if lp is None:
        return EXIT_FAILED
    try:
        return run_action(lp, args, "wake" if args.command == "wake" else "reboot")
    except SecretError as e:
        print(f"bootorch {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED


def cmd_slurm(args: argparse.Namespace) -> int:
    from orchestrator.oncall import run_slurm
    from orchestrator.power import SecretError

    try:
        return run_slurm(args)
    except SecretError as e:
        print(f"bootorch slurm: {e}", file=sys.stderr)
        return EXIT_FAILED


def cmd_replay(args: argparse.Namespace) -> int:
    from orchestrator import replay

    return replay.run(args)


def cmd_tftpd(args: argparse.Namespace) -> int:
    from orchestrator.bootserver import tftpd_cli

    return tftpd_cli.run(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bootorch",
        description=(
            "Cluster-wide boot orchestrator: powers nodes up in a controlled sequence, serves "
            "their PXE boot (DHCP, TFTP, HTTP), follows each node through its boot stages and "
            "checks it over SSH."
        ),
        epilog="Exit codes: 0 success, 1 the job failed (plan errors, failed nodes), 2 usage error.",
    )
    p.add_argument("--version", action="version", version=f"bootorch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def plan_cmd(name: str, help: str, func: Any, json_help: str = "print one JSON object on stdout") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("plan", metavar="PLAN", help="plan file (YAML); see docs/plan.md")
        sp.add_argument("--json", action="store_true", help=json_help)
        sp.set_defaults(func=func)
        return sp

    plan_cmd("validate", "check a plan: exit 0, or 1 with file:line: what to fix for every problem", cmd_validate)
    r = plan_cmd("render", "write dhcpd.conf, dnsmasq.conf and pxelinux.cfg/ files for sites that keep their own servers", cmd_render)
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files are replaced atomically)")
    ro = plan_cmd("rollout", "power up and boot the nodes of PLAN", cmd_rollout)
    ro.add_argument("--dry-run", action="store_true", help="print the schedule the plan implies; touch nothing")
    ro.add_argument("--keep-lab", action="store_true", help="with a managed lab (lab.manage): leave it up afterwards")

    sv = plan_cmd("serve", "run the embedded boot server (DHCP, TFTP, HTTP) for PLAN and print every request; no power sequencing",
                  cmd_serve, json_help="print stage changes (and with --events, requests) as JSON lines")
    sv.add_argument("--listen", metavar="ADDR", help="address for TFTP/HTTP (default: bootserver.listen or network.server)")
    sv.add_argument("--interface", help="interface for DHCP (default: network.interface; '' = none, loopback tests)")
    sv.add_argument("--no-dhcp", action="store_true", help="serve files only (the site runs its own DHCP)")
    sv.add_argument("--events", action="store_true", help="print every request, not only stage changes")
    for name, what in (("tftp", "TFTP"), ("http", "HTTP"), ("dhcp", "DHCP"), ("pxe", "PXE boot server (4011)"),
                       ("metrics", "Prometheus metrics (on metrics.listen's host)")):
        sv.add_argument(f"--{name}-port", type=int, metavar="N", help=f"{what} port (default from the plan; 0 = any free port; -1 = off)")

    st = plan_cmd("status", "each node's stage, time in stage, attempts, last evidence and action; the worst first", cmd_status)
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

    lb = sub.add_parser("lab", help="the virtual lab cluster: up|down|status PLAN (QEMU VMs in a network namespace)",
                        description="Bring the plan's virtual lab up (namespace, bridge, one paused QEMU VM per node, WoL "
                                    "listener, Redfish BMC), show it, or take it down.")
    from orchestrator.lab import lab as _lab

    _lab.add_arguments(lb)
    lb.set_defaults(func=_lab.run)

    im = sub.add_parser("image", help="build a plan's boot files: kernel, RAM-disk root (busybox + dropbear), pxelinux",
                        description="Build each profile's kernel and RAM-disk root and place pxelinux into the plan's boot root.")
    from orchestrator import image as _image

    _image.add_arguments(im)
    im.set_defaults(func=_image.run)

    sm = sub.add_parser("sim", help="the boot-storm simulator: N simulated PXE clients (DHCP, TFTP, pxelinux lookups, OS DHCP, SSH banner)",
                        description="Simulated PXE clients that power on at a magic packet (or the sim power driver) and boot "
                                    "from the plan's boot server over a bandwidth-limited link, like ROMs that time out and give up.")
    from orchestrator.sim import cli as _sim_cli

    _sim_cli.add_arguments(sm)
    sm.set_defaults(func=_sim_cli.run)

    rp = sub.add_parser("replay", help="a boot's post-mortem from dnsmasq / ISC dhcpd / tftp-hpa / Kea logs: each node's stage timeline",
                        description="Parse daemon logs and print each node's (MAC's) stage timeline with the time spent in every stage.")
    from orchestrator import replay as _replay

    _replay.add_arguments(rp)
    rp.set_defaults(func=cmd_replay)

    t = sub.add_parser(
        "tftpd",
        help="run the TFTP server alone (a drop-in for in.tftpd -L -s DIR)",
        description="Serve DIR read-only over TFTP (RFC 1350 with tsize, blksize, timeout and windowsize options).",
    )
    try:
        from orchestrator.bootserver import tftpd_cli
    except ImportError:  # pragma: no cover - only while the server is being built
        tftpd_cli = None  # type: ignore[assignment]
    if tftpd_cli is not None:
        tftpd_cli.add_arguments(t)
    t.set_defaults(func=cmd_tftpd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-execute inside a plan's namespace
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
