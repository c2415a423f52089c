"""bootorch: a cluster-wide boot orchestrator.

See README.md for the picture and docs/ for the details.
"""

__version__ = "0.1.0"
