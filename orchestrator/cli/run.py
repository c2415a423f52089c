"""``bootorch rollout`` and ``bootorch serve``: an orchestrator with a job, and how each prints.

Both build the same :class:`~orchestrator.app.Orchestrator`; ``rollout`` gives
it the plan's waves and prints progress (a live table on a terminal) and a
result, ``serve`` runs the boot servers for on-call requests until SIGINT or
SIGTERM and prints every stage change (and, with ``--events``, every request).

Both follow the plan's ``logs:`` (the site's own dnsmasq, dhcpd, tftp-hpa,
Kea, nginx) in every ``dhcp.mode``: with ``dhcp.mode: external`` bootorch runs
no boot server and those logs are all its evidence; otherwise they add to what
its own servers see.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
from typing import Any

import trio

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, load, plan_summary, single_leaf
from orchestrator.plan import LoadedPlan


def dry_run_schedule(plan: LoadedPlan) -> list[dict[str, Any]]:
    """When each node would be powered on if every earlier one booted instantly.

    A lower bound on timing: power-on rate (global and per rack) is the only
    limit modelled; the download window adds to it at run time.
    """
    adm = plan.model.rollout.admission
    t = 0.0
    rack_next: dict[str, float] = {}
    rows = []
    for wave, nodes in plan.waves():
        for n in nodes:
            start = t
            if n.rack and adm.rack_power_on_rate:
                start = max(start, rack_next.get(n.rack, 0.0))
                rack_next[n.rack] = start + 1.0 / adm.rack_power_on_rate
            rows.append({"wave": wave, "node": n.name, "mac": n.mac, "ip": str(n.ip), "profile": n.profile, "power_on_at": round(start, 3)})
            t = start + 1.0 / adm.power_on_rate
    return rows


def _print_dry_run(plan: LoadedPlan, as_json: bool) -> None:
    schedule = dry_run_schedule(plan)
    adm = plan.model.rollout.admission
    if as_json:
        print(json.dumps({"ok": True, "dry_run": True, **plan_summary(plan), "schedule": schedule}, indent=2))
        return
    print(f"plan {plan.model.name}: {len(plan.nodes)} nodes in {len(plan.waves())} wave(s); "
          f"at most {adm.max_downloading} downloading, {adm.power_on_rate:g} power-on/s"
          f"{', adaptive' if adm.adaptive else ''}")
    print(f"{'t+s':>8}  {'wave':<10} {'node':<16} {'mac':<17}  {'ip':<15} profile")
    for r in schedule:
        print(f"{r['power_on_at']:>8.2f}  {r['wave']:<10} {r['node']:<16} {r['mac']:<17}  {r['ip']:<15} {r['profile']}")


def rollout(plan: LoadedPlan, *, as_json: bool) -> int:
    """The rollout in this process: progress on stderr, the result on stdout. Exit 0 when it succeeded.

    The plan's ``logs:`` are followed for evidence (:mod:`orchestrator.logwatch.watch`).
    """
    from orchestrator.app import Mode, Orchestrator
    from orchestrator.present import LiveProgress, Progress, print_rollout, rollout_json

    progress = LiveProgress() if sys.stderr.isatty() else Progress()
    orch = Orchestrator.assemble(plan, Mode.ROLLOUT, log=progress.line, show=progress.transitions)

    async def go():
        async with trio.open_nursery() as nursery:
            if isinstance(progress, LiveProgress):
                progress.tracker = orch.tracker
                nursery.start_soon(progress.refresher)
            summary = await orch.run(follow_logs=True)
            nursery.cancel_scope.cancel()
        return summary

    try:
        summary = trio.run(go)
    except BaseExceptionGroup as e:
        raise single_leaf(e) from None
    if as_json:
        print(json.dumps(rollout_json(plan, summary, orch.tracker), indent=2))
    else:
        print_rollout(summary, orch.tracker)
    return EXIT_OK if summary.ok else EXIT_FAILED


def cmd_rollout(args: argparse.Namespace) -> int:
    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    if args.dry_run:
        _print_dry_run(plan, args.json)
        return EXIT_OK
    from orchestrator import netns_exec
    from orchestrator.control import Busy
    from orchestrator.power import SecretError

    if netns_exec.needs_reexec(plan):
        return netns_exec.rollout_in_namespace(plan, args)
    try:
        return rollout(plan, as_json=args.json)
    except (SecretError, Busy) as e:
        print(f"bootorch rollout: {e}", file=sys.stderr)
        return EXIT_FAILED


def cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.app import Mode, Orchestrator
    from orchestrator.bootserver.dhcp import DhcpPrivilegeError
    from orchestrator.bootserver.serve import Ports
    from orchestrator.control import Busy
    from orchestrator.power import SecretError
    from orchestrator.present import event_dict, event_line, transition_dict, transition_line

    plan = load(args.plan, False)
    if plan is None:
        return EXIT_FAILED
    ports = Ports(host=args.listen, dhcp=args.dhcp_port, pxe=args.pxe_port, tftp=args.tftp_port,
                  http=args.http_port, interface=args.interface)
    metrics_port = None if args.metrics_port is None else (False if args.metrics_port < 0 else args.metrics_port)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def show(ts) -> None:
        for t in ts:
            print(json.dumps({"type": "transition", **transition_dict(t)}) if args.json else transition_line(t), flush=True)

    def on_event(ev) -> None:
        if args.json:
            print(json.dumps({"type": "event", **event_dict(ev)}, default=str), flush=True)
        else:
            print(event_line(ev), flush=True)

    async def serve_until_signalled() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop)
                await orch.run(ports=ports, dhcp=not args.no_dhcp, metrics_port=metrics_port, follow_logs=True)

    try:
        orch = Orchestrator.assemble(plan, Mode.SERVE, log=log, show=show, on_event=on_event if args.events else None)
        trio.run(serve_until_signalled)
    except BaseException as e:  # trio wraps start-up failures in exception groups
        leaf = single_leaf(e)
        if isinstance(leaf, (DhcpPrivilegeError, Busy, SecretError)):
            print(f"bootorch serve: {leaf}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(leaf, OSError):
            hint = ""
            if leaf.errno == errno.EADDRNOTAVAIL:
                where = args.listen or plan.model.bootserver.listen or plan.model.network.server
                hint = f" ({where} is not an address of this machine; --listen overrides the plan)"
            print(f"bootorch serve: cannot listen: {leaf.strerror or leaf}{hint}", file=sys.stderr)
            return EXIT_FAILED
        raise
    return EXIT_OK


def add_commands(plan_cmd) -> None:
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
