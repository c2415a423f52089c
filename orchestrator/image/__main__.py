"""``python -m orchestrator.image build PLAN``: the same as ``bootorch image build PLAN``."""

from __future__ import annotations

import sys

from orchestrator.image.cli import main

if __name__ == "__main__":
    sys.exit(main())
