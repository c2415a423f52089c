"""The commands that bring their own argument parsers: ``lab``, ``image``, ``sim``, ``replay``, ``tftpd``."""

from __future__ import annotations

import argparse


def cmd_replay(args: argparse.Namespace) -> int:
    import json
    import sys
    from datetime import datetime
    from pathlib import Path

    from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from orchestrator.present import print_timelines
    from orchestrator.replay import SOURCES, read_events, replay, timelines

    sources = [s.strip() for s in args.source.split(",") if s.strip()]
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        print(f"bootorch replay: unknown --source {', '.join(bad)} (choose from {', '.join(SOURCES)})", file=sys.stderr)
        return EXIT_USAGE
    files = [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"bootorch replay: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_FAILED
    plan = None
    if args.plan:
        from orchestrator.plan import PlanError, load_plan

        try:
            plan = load_plan(args.plan)
        except PlanError as e:
            print(e, file=sys.stderr)
            return EXIT_FAILED
    year = args.year or datetime.fromtimestamp(files[0].stat().st_mtime).year
    events = read_events(files, sources, year_hint=year)
    nodes = timelines(replay(events, plan))
    if args.json:
        print(json.dumps({"events": len(events), "nodes": nodes}, indent=2))
    else:
        print_timelines(nodes)
    return EXIT_OK


def cmd_tftpd(args: argparse.Namespace) -> int:
    from orchestrator.bootserver import tftpd_cli

    return tftpd_cli.run(args)


def add_commands(sub) -> None:
    lb = sub.add_parser("lab", help="the virtual lab cluster: up|down|status PLAN (QEMU VMs in a network namespace)",
                        description="Bring the plan's virtual lab up (namespace, bridge, one paused QEMU VM per node, WoL "
                                    "listener, Redfish BMC), show it, or take it down.")
    from orchestrator.lab import lab as _lab

    _lab.add_arguments(lb)
    lb.set_defaults(func=_lab.run)

    im = sub.add_parser("image", help="build a plan's boot files: kernel, RAM-disk root (busybox + dropbear), loaders, NFS roots",
                        description="Build each profile's kernel and RAM-disk root, place the BIOS and UEFI loaders (pxelinux.0, "
                                    "syslinux.efi, ipxe.efi) into the plan's boot root, and write each NFS-root profile's "
                                    "root tree to <state_dir>/nfsroot/<profile>.")
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
    from orchestrator.replay import SOURCES

    rp.add_argument("files", nargs="+", metavar="FILE", help="log files (plain text, or journalctl -o json)")
    rp.add_argument("--source", required=True,
                    help=f"which daemon wrote them: {', '.join(SOURCES)}; 'syslog' routes each line of a shared "
                         "syslog file to its daemon's parser by tag (ISC dhcpd + tftp-hpa in one /var/log/syslog)")
    rp.add_argument("--plan", help="name nodes and their boot files from this plan")
    rp.add_argument("--year", type=int, help="year for syslog timestamps that carry none (default: the file's mtime year)")
    rp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    rp.set_defaults(func=cmd_replay)

    t = sub.add_parser(
        "tftpd",
        help="run the TFTP server alone (a drop-in for in.tftpd -L -s DIR -u nobody)",
        description="Serve DIR read-only over TFTP (RFC 1350 with tsize, blksize, timeout and windowsize options).",
    )
    from orchestrator.bootserver import tftpd_cli

    tftpd_cli.add_arguments(t)
    t.set_defaults(func=cmd_tftpd)
