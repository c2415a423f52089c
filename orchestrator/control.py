"""The control API: how ``bootorch wake|reboot|slurm`` reach a running orchestrator.

A running ``rollout``, ``serve`` or on-call command owns the boot server and
the scheduler; a second process must not power-cycle nodes behind its back. So
whoever runs holds the **orchestrator lock** (``flock`` on
``<state_dir>/control/orchestrator.lock``, with its PID inside) and answers
requests on a **Unix socket** (``control.socket``, mode 0600 in a 0700
directory: only its owner can talk to it) and, when the plan asks, on TCP with
a shared token. The CLI tries the socket first; when nobody answers it takes
the lock and becomes the orchestrator itself for the duration of the request
(:mod:`orchestrator.oncall`).

Protocol: newline-delimited JSON over one stream connection. The client sends
one request object; the server streams objects back and closes:

* ``{"op": "ping"}`` -> ``{"event": "pong", "pid": ..., "mode": "rollout" | "serve" | "oncall"}``
* ``{"op": "wake" | "reboot" | "power_off", "nodes": [names], "reason": str, "actor": str,
  "hard": bool, "wait": bool}`` -> ``{"event": "accepted", "acting": [...], "busy": {name: why}}``,
  then with ``wait`` one ``{"event": "transition", ...}`` per stage change of those nodes and
  finally ``{"event": "done", "results": {name: {"result", "reason", "path"}}}``.
* errors: ``{"event": "error", "error": "..."}``.

A JSON-lines protocol rather than HTTP: there is one client (our CLI), no
browser, and a request's progress is naturally a stream. The framing is
bounded (one request line of at most 64 KiB), so a bad client costs nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import json
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

#: Longest request line accepted.
MAX_REQUEST = 65536
OPS = ("ping", "wake", "reboot", "power_off")


def control_dir(lp) -> Path:
    return socket_path(lp).parent


def socket_path(lp) -> Path:
    p = lp.model.control.socket
    return p if p.is_absolute() else lp.state_dir / p


def lock_path(lp) -> Path:
    return control_dir(lp) / "orchestrator.lock"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


# --------------------------------------------------------------------------- the lock


class Busy(RuntimeError):
    """Another orchestrator holds the lock for this state directory."""


class OrchestratorLock:
    """One orchestrator per state directory: ``flock``, released by the kernel when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        _private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another bootorch (pid {holder or '?'}) is running for this plan's state directory") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OrchestratorLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- server


def _transition_json(t) -> dict[str, Any]:
    return {"event": "transition", "node": t.node, "from": t.from_stage.value, "to": t.to_stage.value,
            "time": t.time, "attempt": t.attempt, "evidence": t.evidence}


class ControlServer:
    """Answers requests with a :class:`~orchestrator.scheduler.Scheduler`."""

    def __init__(self, lp, scheduler, *, mode: str, token: str | None = None, log: Callable[[str], None] = lambda s: None) -> None:
        self.lp, self.sched, self.mode, self.token, self.log = lp, scheduler, mode, token, log
        self.bad_requests = 0
        #: Seconds a client has to send its request line.
        self.request_timeout = 10.0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the Unix socket (and TCP when configured) until cancelled; the socket file is removed after."""
        path = socket_path(self.lp)
        _private_dir(path.parent)
        try:
            path.unlink()  # we hold the orchestrator lock: a socket file left here is stale
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        listeners: list[trio.SocketListener] = [trio.SocketListener(sock)]
        tcp = None
        if self.lp.model.control.listen:
            host, _, port = self.lp.model.control.listen.rpartition(":")
            tcp = await trio.open_tcp_listeners(int(port), host=host.strip("[]") or None)
            listeners += tcp
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, partial(self._handle, need_token=False), listeners[:1])
                if len(listeners) > 1:
                    nursery.start_soon(trio.serve_listeners, partial(self._handle, need_token=True), listeners[1:])
                task_status.started((path, [tl.socket.getsockname() for tl in listeners[1:]]))
        finally:
            try:
                path.unlink()
            except OSError:
                pass

    async def _handle(self, stream: trio.SocketStream, *, need_token: bool) -> None:
        async def send(obj: dict[str, Any]) -> None:
            await stream.send_all(json.dumps(obj).encode() + b"\n")

        try:
            async with stream:
                with trio.move_on_after(self.request_timeout) as scope:
                    line = await _read_line(stream)
                if scope.cancelled_caught or line is None:
                    self.bad_requests += 1
                    await send({"event": "error", "error": f"no request line within {self.request_timeout:g} s (or longer than 64 KiB)"})
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                except ValueError as e:
                    self.bad_requests += 1
                    await send({"event": "error", "error": f"bad request: {e}"})
                    return
                if need_token and not (self.token and isinstance(req.get("token"), str)
                                       and hmac.compare_digest(req["token"].encode(), self.token.encode())):
                    self.bad_requests += 1
                    await send({"event": "error", "error": "a TCP request needs the right token (control.token)"})
                    return
                await self._request(req, send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; its operation carries on

    async def _request(self, req: dict[str, Any], send) -> None:
        op = req.get("op")
        if op not in OPS:
            await send({"event": "error", "error": f"unknown op {op!r}; one of {', '.join(OPS)}"})
            return
        if op == "ping":
            await send({"event": "pong", "pid": os.getpid(), "mode": self.mode, "plan": str(self.lp.path)})
            return
        names = req.get("nodes")
        known = {n.name for n in self.lp.nodes}
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in known for n in names):
            await send({"event": "error", "error": "nodes: a non-empty list of node names of this plan"})
            return
        reason = str(req.get("reason") or "no reason given")[:500]
        actor = str(req.get("actor") or "unknown")[:200]
        operation, busy = self.sched.submit(op, names, reason=reason, actor=actor, hard=bool(req.get("hard")))
        if operation is None:
            await send({"event": "accepted", "acting": [], "busy": busy})
            await send({"event": "done", "results": {}})
            return
        send_ch, recv_ch = trio.open_memory_channel(4096)
        if req.get("wait", True):
            operation.listeners.append(send_ch)
        else:
            send_ch.close()
        await send({"event": "accepted", "acting": operation.names, "busy": busy})
        if not req.get("wait", True):
            return
        async for t in recv_ch:
            await send(_transition_json(t))
        await operation.done.wait()
        await send({"event": "done", "results": operation.results})


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return buf or None
        buf += chunk
        if len(buf) > MAX_REQUEST:
            return None
    return buf.split(b"\n", 1)[0]


# --------------------------------------------------------------------------- client (blocking: the CLI)


class NoOrchestrator(RuntimeError):
    pass


def request(path: Path, req: dict[str, Any], *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Send one request on the Unix socket and yield the answers; NoOrchestrator when nobody listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoOrchestrator(str(e)) from None
        s.settimeout(timeout)
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            if line.strip():
                yield json.loads(line)
    finally:
        s.close()


def ping(path: Path) -> dict[str, Any] | None:
    try:
        for msg in request(path, {"op": "ping"}, timeout=5):
            return msg
    except (NoOrchestrator, OSError, ValueError):
        return None
    return None
