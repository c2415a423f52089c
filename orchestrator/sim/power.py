"""The ``sim`` BMC driver: power on/off/cycle/status of simulated nodes over the simulator's control socket.

Protocol: one JSON object per line each way on a Unix stream socket;
request ``{"action": "on|off|cycle|status|stats", "mac": "52:54:..."}``,
answer ``{"ok": bool, "detail": str, "state": "on"|"off"|null}``. The socket
is a file-system path, so it is reachable from any network namespace (the
rollout runs in the boot server's, the simulator in the clients').
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from orchestrator.power import ActionDriver, PowerResult, Target


async def control_request(path: str | Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request/answer on the control socket; raises OSError (or trio.TooSlowError) on failure."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(json.dumps(request).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise OSError(f"simulator control socket {path} closed without an answer")
                buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


class SimPowerDriver(ActionDriver):
    """Power actions on the simulator (``power.bmc: {driver: sim, address: /path/sim.sock}``; a node's own
    ``bmc:`` names its simulator's socket instead, when several simulators run behind one orchestrator)."""

    name = "sim"

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _path(self, t: Target) -> Path:
        """The node's own simulator (its ``bmc:``, several simulators behind one orchestrator), else the plan's."""
        return Path(t.bmc) if t.bmc else self.path

    async def _act(self, t: Target, action: str) -> PowerResult:
        path = self._path(t)
        try:
            r = await control_request(path, {"action": action, "mac": t.mac}, self.timeout)
        except (OSError, ValueError, trio.TooSlowError) as e:
            return PowerResult(False, f"sim {action} via {path}: {type(e).__name__}: {e}")
        return PowerResult(bool(r.get("ok")), f"sim {action}: {r.get('detail', '')}")

    async def status(self, t: Target) -> str | None:
        try:
            r = await control_request(self._path(t), {"action": "status", "mac": t.mac}, self.timeout)
        except (OSError, ValueError, trio.TooSlowError):
            return None
        return r.get("state") if r.get("ok") else None


def from_plan(plan) -> SimPowerDriver:
    """The ``sim`` driver of a plan (``power.bmc: {driver: sim, address: /path/sim.sock}``): the
    ``bootorch.power_drivers`` entry point this package declares."""
    return SimPowerDriver(plan.resolve_path(plan.model.power.bmc.address or ""))
