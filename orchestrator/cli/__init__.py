"""``bootorch``: the command line.

One module per command group, each adding its commands to the parser:
:mod:`~orchestrator.cli.plan` (``validate``, ``render``),
:mod:`~orchestrator.cli.run` (``rollout``, ``serve``, ``service install``),
:mod:`~orchestrator.cli.oncall` (``status``, ``history``, ``wake``, ``reboot``, ``slurm``),
:mod:`~orchestrator.cli.tools` (``lab``, ``image``, ``sim``, ``replay``, ``tftpd``);
:mod:`~orchestrator.cli.common` holds what they share. The library never
imports this package: commands parse, call the library and print.

Exit codes (stable, documented in the README): 0 success; 1 the job failed
(plan errors, nodes failed beyond the budget); 2 usage errors. Results go to
stdout (``--json`` prints one JSON object), diagnostics and progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from orchestrator import __version__
from orchestrator.cli import oncall, plan, run, tools
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


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

    plan.add_commands(plan_cmd)
    run.add_commands(plan_cmd)
    run.add_service_commands(sub)
    oncall.add_commands(sub, plan_cmd)
    tools.add_commands(sub)
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
