"""A minimal, blocking QMP client (QEMU Machine Protocol) for the lab.

One short connection per operation: connect to the VM's ``-qmp unix:...``
socket, read the greeting, ``qmp_capabilities``, run the commands, close.
QEMU's QMP socket serves one client at a time, so nothing here holds it open;
every step is bounded by ``timeout``. Asynchronous events QEMU sends in between
are skipped.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the socket failed / timed out."""


class Qmp:
    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._deadline = 0.0

    def __enter__(self) -> "Qmp":
        self._deadline = time.monotonic() + self.timeout
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise QmpError(f"cannot connect to {self.path}: {e}") from None
        self._sock = s
        greeting = self._read()
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"{self.path}: no answer within {self.timeout}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QmpError(f"{self.path}: {e}") from None
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or :class:`QmpError`."""
        assert self._sock is not None, "use Qmp as a context manager"
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            if "return" in reply:
                return reply["return"]


def qmp(path: str, command: str, *, timeout: float = 5.0, **arguments: Any) -> Any:
    """One command on a fresh connection."""
    with Qmp(path, timeout=timeout) as q:
        return q.execute(command, **arguments)


def status(path: str, *, timeout: float = 5.0) -> str:
    """QEMU's run state: ``running``, ``paused``, ``prelaunch``, ``shutdown``, ..."""
    return qmp(path, "query-status", timeout=timeout)["status"]


# ------------------------------------------------------------------- the lab's power model
#
# A lab VM is never powered off by quitting QEMU: "off" is a paused QEMU
# (``-S`` at start, ``stop`` later), so the process, its QMP socket, its tap and
# its serial log survive, and "on" is ``cont``. ForceOff also does
# ``system_reset`` while stopped, so the next ``cont`` starts from the firmware
# (a cold boot: PXE again), not where the guest was frozen. A guest that powers
# itself off stays in QEMU's ``shutdown`` state (the lab starts QEMU with
# ``-no-shutdown``); "on" resets it first.

#: QEMU run states that count as powered on.
ON_STATES = frozenset({"running", "debug", "suspended", "finish-migrate", "inmigrate"})
#: States from which ``cont`` alone does not restart the guest: reset first.
_NEEDS_RESET = frozenset({"shutdown", "guest-panicked", "internal-error", "io-error"})


def power_state(path: str, *, timeout: float = 5.0) -> str:
    """``"On"`` or ``"Off"`` (Redfish's PowerState values)."""
    return "On" if status(path, timeout=timeout) in ON_STATES else "Off"


def power_on(path: str, *, timeout: float = 5.0) -> bool:
    """Resume the VM if it is off; ``True`` when it was off (and is now running)."""
    with Qmp(path, timeout=timeout) as q:
        st = q.execute("query-status")["status"]
        if st in ON_STATES:
            return False
        if st in _NEEDS_RESET:
            q.execute("system_reset")
        q.execute("cont")
        return True


def force_off(path: str, *, timeout: float = 5.0) -> None:
    """Freeze the VM and reset it, so that the next power-on is a cold boot."""
    with Qmp(path, timeout=timeout) as q:
        q.execute("stop")
        q.execute("system_reset")


def force_restart(path: str, *, timeout: float = 5.0) -> None:
    """Hard reset (the reset button); a VM that was off is powered on too."""
    with Qmp(path, timeout=timeout) as q:
        st = q.execute("query-status")["status"]
        q.execute("system_reset")
        if st not in ON_STATES:
            q.execute("cont")


def power_cycle(path: str, *, timeout: float = 5.0, off_seconds: float = 0.5) -> None:
    """ForceOff, a short pause, On."""
    force_off(path, timeout=timeout)
    time.sleep(off_seconds)
    power_on(path, timeout=timeout)
