"""Command line entry point (placeholder until the plan/CLI work lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("bootorch: under construction", file=sys.stderr)
    return 2
