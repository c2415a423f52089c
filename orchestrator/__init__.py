"""bootorch: a cluster-wide boot orchestrator.

See README.md for the picture and docs/ for the details.
"""

__version__ = "0.1.0"

#: Exit codes of every bootorch command (stable, documented in the README): success; the job failed
#: (plan errors, nodes failed beyond the budget, a refused request); a usage error.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
