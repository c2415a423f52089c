"""``python -m orchestrator`` is ``bootorch``."""

from orchestrator.cli import main

raise SystemExit(main())
