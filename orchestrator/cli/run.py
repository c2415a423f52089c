"""``bootorch rollout`` and ``bootorch serve``: an orchestrator with a job, and how each prints.

Both build the same :class:`~orchestrator.app.Orchestrator`; ``rollout`` gives
it the plan's waves and prints progress (a live table on a terminal) and a
result, ``serve`` runs the boot servers for on-call requests until SIGINT or
SIGTERM and prints every stage change (and, with ``--events``, every request).

``serve`` also runs as a systemd service (``systemd/bootorch@.service``):
SIGHUP reloads the plan, readiness goes to ``$NOTIFY_SOCKET`` and, with stderr
on the journal, lines become journal entries with fields
(:mod:`orchestrator.service`, docs/service.md).

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

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, plan_summary, single_leaf
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
    """``bootorch serve``: the boot servers until SIGINT/SIGTERM; SIGHUP reloads the plan.

    Under systemd (:mod:`orchestrator.service`): readiness and reloads are
    reported on ``$NOTIFY_SOCKET``, and with stderr on the journal
    (``$JOURNAL_STREAM``, or ``--log-format journal``) every line is a journal
    entry with ``NODE``, ``MAC``, ``STAGE`` fields. On a terminal it prints as
    it always did: stage changes (and ``--events`` requests) on stdout,
    diagnostics on stderr.
    """
    from orchestrator.app import Mode, Orchestrator
    from orchestrator.bootserver.dhcp import DhcpPrivilegeError
    from orchestrator.bootserver.serve import Ports
    from orchestrator.control import Busy
    from orchestrator.power import SecretError
    from orchestrator.present import event_dict, event_line, transition_dict, transition_line
    from orchestrator.service import ERR, INFO, NOTICE, WARNING, JournalLog, Notifier, log_target

    plan = load(args.plan, False)
    if plan is None:
        return EXIT_FAILED
    ports = Ports(host=args.listen, dhcp=args.dhcp_port, pxe=args.pxe_port, tftp=args.tftp_port,
                  http=args.http_port, interface=args.interface)
    metrics_port = None if args.metrics_port is None else (False if args.metrics_port < 0 else args.metrics_port)
    logger = log_target(args.log_format, extra={"PLAN": plan.model.name})
    journal = isinstance(logger, JournalLog)
    notifier = Notifier()

    def log(text: str, priority: int = INFO) -> None:
        logger(text, priority)

    def node_of(mac: str | None) -> str | None:
        n = orch.plan.by_mac.get(mac) if mac else None
        return n.name if n else None

    def show(ts) -> None:
        for t in ts:
            if journal and not args.json:
                pri = WARNING if t.to_stage.value == "failed" else (NOTICE if t.to_stage.value == "ready" else INFO)
                logger(transition_line(t), pri, NODE=t.node, MAC=t.mac, STAGE=t.to_stage.value, FROM_STAGE=t.from_stage.value,
                       ATTEMPT=t.attempt, EVENT="transition", SOURCE=t.source)
            else:
                print(json.dumps({"type": "transition", **transition_dict(t)}) if args.json else transition_line(t), flush=True)

    def on_event(ev) -> None:
        if journal and not args.json:
            logger(event_line(ev), 7, NODE=node_of(ev.mac), MAC=ev.mac, EVENT=ev.kind.value, SOURCE=ev.source,
                   CLIENT_IP=ev.client_ip, FILE=ev.filename)
        elif args.json:
            print(json.dumps({"type": "event", **event_dict(ev)}, default=str), flush=True)
        else:
            print(event_line(ev), flush=True)

    async def reload() -> None:
        notifier.reloading()
        log(f"SIGHUP: reloading {orch.plan.path}")
        result = await orch.reload()
        if result.ok:
            for line in result.diff.lines():
                log(f"reload: {line}", NOTICE)
            if result.leases_dropped:
                log(f"reload: dropped {result.leases_dropped} lease(s) of removed nodes", NOTICE)
        else:
            for line in result.problems:
                log(line, ERR)
            log("reload refused: still serving the previous plan", ERR)
        notifier.notify(READY=1, STATUS=f"{result.summary()[:200]}; {len(orch.plan.nodes)} nodes")

    def started() -> None:
        notifier.ready(f"serving {len(orch.plan.nodes)} nodes of {orch.plan.model.name}")

    async def serve_until_signalled() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            await reload()  # one at a time: a SIGHUP during a reload is taken after it
                            continue
                        notifier.stopping(f"stopping ({signal.Signals(signum).name})")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signals)
                await orch.run(ports=ports, dhcp=not args.no_dhcp, metrics_port=metrics_port, follow_logs=True,
                               started=started)

    _route_python_logging(logger)
    try:
        orch = Orchestrator.assemble(plan, Mode.SERVE, log=log, show=show, on_event=on_event if args.events else None)
        trio.run(serve_until_signalled)
    except BaseException as e:  # trio wraps start-up failures in exception groups
        leaf = single_leaf(e)
        if isinstance(leaf, (DhcpPrivilegeError, Busy, SecretError)):
            log(f"bootorch serve: {leaf}", ERR)
            notifier.status(f"failed: {leaf}")
            return EXIT_FAILED
        if isinstance(leaf, OSError):
            hint = ""
            if leaf.errno == errno.EADDRNOTAVAIL:
                where = args.listen or plan.model.bootserver.listen or plan.model.network.server
                hint = f" ({where} is not an address of this machine; --listen overrides the plan)"
            log(f"bootorch serve: cannot listen: {leaf.strerror or leaf}{hint}", ERR)
            notifier.status(f"failed: cannot listen: {leaf.strerror or leaf}")
            return EXIT_FAILED
        raise
    finally:
        notifier.close()
    return EXIT_OK


def _route_python_logging(logger) -> None:
    """Warnings and errors of the servers' ``logging`` calls go where ``serve``'s own lines go, with a priority."""
    import logging

    from orchestrator.service import ERR, INFO, WARNING

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                text = record.getMessage()
                if record.exc_info:
                    text += "\n" + logging.Formatter().formatException(record.exc_info)
                logger(f"{record.name}: {text}", ERR if record.levelno >= logging.ERROR else
                       WARNING if record.levelno >= logging.WARNING else INFO, LOGGER=record.name)
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    if not any(isinstance(h, Handler) for h in root.handlers):
        handler = Handler(logging.WARNING)
        root.addHandler(handler)


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
    sv.add_argument("--log-format", choices=("auto", "plain", "journal"), default="auto",
                    help="journal: entries with NODE/MAC/STAGE fields to the systemd journal; plain: stderr lines; "
                         "auto (default): journal when $JOURNAL_STREAM says stderr goes there")
    for name, what in (("tftp", "TFTP"), ("http", "HTTP"), ("dhcp", "DHCP"), ("pxe", "PXE boot server (4011)"),
                       ("metrics", "Prometheus metrics (on metrics.listen's host)")):
        sv.add_argument(f"--{name}-port", type=int, metavar="N", help=f"{what} port (default from the plan; 0 = any free port; -1 = off)")


def cmd_service_install(args: argparse.Namespace) -> int:
    """``bootorch service install PLAN``: the unit, sysusers.d and sysctl.d files, and this plan as an instance."""
    from pathlib import Path

    from orchestrator.service import install, plan_problems

    plan = load(args.plan, args.json)
    if plan is None:
        return EXIT_FAILED
    instance = args.instance or plan.model.name
    if not instance.replace("-", "").replace("_", "").replace(".", "").isalnum():
        print(f"bootorch service install: instance name {instance!r}: letters, digits, '-', '_', '.' only", file=sys.stderr)
        return EXIT_USAGE
    problems = plan_problems(plan, instance)
    if problems and not args.force:
        for p in problems:
            print(f"{args.plan}: {p}", file=sys.stderr)
        print("bootorch service install: nothing was written (--force writes the units anyway)", file=sys.stderr)
        return EXIT_FAILED
    root = Path(args.root)
    written = install(root, executable=args.executable, plan_path=Path(args.plan), instance=instance)
    unit = f"bootorch@{instance}.service"
    if args.json:
        print(json.dumps({"ok": True, "unit": unit, "files": [str(p) for p in written], "problems": problems}, indent=2))
        return EXIT_OK
    for p in written:
        print(f"wrote {p}")
    on_host = root.resolve() == Path("/")
    print("next:" if on_host else f"next, on the host whose root is {root}:")
    print(f"  systemd-sysusers && sysctl --system && systemctl daemon-reload\n  systemctl enable --now {unit}\n"
          f"  journalctl -u {unit} -f")
    return EXIT_OK


def add_service_commands(sub) -> None:
    """``bootorch service install``: registered by :func:`orchestrator.cli.build_parser`."""
    svc = sub.add_parser("service", help="run bootorch serve as a systemd service", description="run bootorch serve as a systemd service")
    ssub = svc.add_subparsers(dest="service_command", metavar="SUBCOMMAND")
    ssub.required = True
    ins = ssub.add_parser("install", help="install the systemd units and make PLAN an instance (bootorch@NAME.service)",
                          description="Write bootorch@.service, sysusers.d/bootorch.conf and sysctl.d/60-bootorch.conf "
                                      "under --root, and, when PLAN is not /etc/bootorch/NAME.yaml, a drop-in that "
                                      "points the instance at PLAN. Starts nothing. See docs/service.md.")
    ins.add_argument("plan", metavar="PLAN", help="plan file (YAML); its state_dir must be /var/lib/bootorch/NAME")
    ins.add_argument("--instance", metavar="NAME", help="instance name (default: the plan's name)")
    ins.add_argument("--root", default="/", metavar="DIR", help="install under DIR instead of / (packaging, tests)")
    ins.add_argument("--executable", metavar="PATH", help="bootorch for ExecStart (default: this installation's)")
    ins.add_argument("--force", action="store_true", help="write the units even when the plan's directories do not fit the unit")
    ins.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ins.set_defaults(func=cmd_service_install)
