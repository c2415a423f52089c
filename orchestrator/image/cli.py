"""``bootorch image build PLAN``: the boot files a plan's profiles name.

The sub-command's arguments (:func:`add_arguments`, which ``bootorch``'s own
parser plugs in), running it (:func:`run`: a summary, or one JSON object with
``--json``; exit status 1 on a plan or build error) and ``python -m
orchestrator.image`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.hostkeys import host_keys_dir
from orchestrator.image.build import build_images
from orchestrator.image.debs import DEFAULT_CACHE
from orchestrator.image.errors import ImageError
from orchestrator.plan import PlanError, load_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``image build PLAN``: the sub-commands of ``bootorch image``."""
    sub = parser.add_subparsers(dest="image_cmd", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser(
        "build",
        help="build the kernel, image, NFS root and boot loader files of every profile into the boot root",
        description="Build each profile's kernel (Debian's linux-image-amd64) and image "
        "(busybox + dropbear cpio; for root: nfs also the NFS root directory under <state_dir>/nfsroot/), "
        "and place the boot loaders (pxelinux.0 + ldlinux.c32, syslinux.efi + ldlinux.e64, ipxe.efi) "
        "into the plan's boot root. Same cache and plan give byte-identical files.",
    )
    b.add_argument("plan", help="plan file (YAML)")
    b.add_argument("--cache", type=Path, default=None, help=f"Debian package cache (default {DEFAULT_CACHE})")
    b.add_argument("--refresh", action="store_true", help="download the current package versions again")
    b.add_argument("--json", action="store_true", help="print one JSON object (files, sizes, sha256)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "image_cmd", None) != "build":
        print("usage: bootorch image build PLAN", file=sys.stderr)
        return EXIT_USAGE
    try:
        plan = load_plan(args.plan)
    except PlanError as e:
        if args.json:
            print(json.dumps({"ok": False, "plan": args.plan, "problems": [str(p) for p in e.problems]}, indent=2))
        else:
            for p in e.problems:
                print(p, file=sys.stderr)
        return EXIT_FAILED

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        report = build_images(plan, cache_dir=args.cache, log=log, refresh=args.refresh)
    except ImageError as e:
        if args.json:
            print(json.dumps({"ok": False, "plan": args.plan, "error": str(e)}, indent=2))
        else:
            print(f"bootorch image build: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"boot root {report.boot_root} (kernel {report.kernel_release}), built in {report.seconds:.1f} s:")
        for f in report.files:
            print(f"  {f.name:<16} {f.size:>10} bytes  sha256 {f.sha256}  ({f.role}, {f.source})")
        for name, info in report.images.items():
            if "nfs_export" in info:
                state = "written" if info.get("nfs_export_changed") else "unchanged"
                print(f"  NFS root of profile {info['profile']} ({name}): {info['nfs_export']} ({state})")
        if report.host_keys:
            print(f"  host keys: {len(report.host_keys)} nodes, each its own ({host_keys_dir(plan)}), "
                  f"pinned in {report.known_hosts}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.image", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)
