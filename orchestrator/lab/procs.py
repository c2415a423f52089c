"""The processes the lab starts: PID files, identity checks, stopping them.

Every daemon the lab starts (QEMU, the lab daemon, nfs-ganesha, dhcrelay, the site's
servers, the BMCs, Slurm's) has a PID file. A PID is acted on only when
:func:`is_ours` holds: the process is alive, not a zombie, and its command line names
something of ours (a state directory, a config file): a PID file that outlived its
process must never send a signal to whatever reused the number.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def cmdline(pid: int) -> list[str]:
    """``/proc/PID/cmdline`` as a list ([] when the process is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def state(pid: int) -> str:
    """The one-letter state of ``/proc/PID/stat`` (``Z``: zombie), "" when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_ours(pid: int | None, marker: str) -> bool:
    """The process is alive, not a zombie, and its command line contains ``marker`` (guards against PID reuse)."""
    if pid is None or pid <= 0:
        return False
    return any(marker in a for a in cmdline(pid)) and state(pid) != "Z"


def ours(path: Path, marker: str) -> int | None:
    """The PID in the file ``path`` when :func:`is_ours` holds for it, else None."""
    pid = read_pid(path)
    return pid if is_ours(pid, marker) else None


def kill(pid: int, *, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reaps it when it is our child. Only for PIDs checked by :func:`is_ours`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not cmdline(pid) or state(pid) == "Z":
                return
            time.sleep(0.05)
