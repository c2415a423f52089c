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
* ``{"op": "plan"}`` -> ``{"event": "plan", "fingerprint": {...}}``: what the running
  orchestrator serves (:func:`orchestrator.plan.diff.fingerprint`), for
  ``bootorch validate --against-running``
* ``{"op": "events", "epoch": E, "after": N}`` -> a satellite's evidence and load, from the
  record after ``N`` on, and on as they come (:meth:`orchestrator.satellite.EventTap.stream`);
  kept only with ``control.listen`` (the orchestrator of a satellite follows it over TCP)
* ``{"op": "wake" | "reboot" | "power_off", "nodes": [names], "reason": str, "actor": str,
  "hard": bool, "wait": bool}`` -> ``{"event": "accepted", "acting": [...], "busy": {name: why}}``,
  then with ``wait`` one ``{"event": "transition", ...}`` (:func:`~orchestrator.present.transition_dict`) per stage change of those nodes and
  finally ``{"event": "done", "results": {name: {"result", "reason", "path"}}}``.
* errors: ``{"event": "error", "error": "..."}``.

A JSON-lines protocol rather than HTTP: there is one client (our CLI), no
browser, and a request's progress is naturally a stream. With ``control.tls``
the TCP listener speaks TLS (the handshake counts against the request timeout).

Every TCP client is untrusted until its token matched, and the Unix socket's
clients are trusted only as far as the socket's permissions go, so the server
bounds what any client can hold or cost:

* **framing**: one request line of at most :data:`MAX_REQUEST` bytes, sent
  within ``request_timeout`` seconds; JSON nested deeper than
  :data:`MAX_DEPTH` is refused before it is parsed (Python's parser recurses);
* **connections**: at most ``max_connections`` per listener at once (further
  clients wait in the kernel's listen backlog, which costs this process no
  descriptor), and on TCP at most ``max_per_client`` per client address (one
  more gets an error line and is closed);
* **errors**: each connection runs inside its own error boundary: whatever a
  client sends ends at most its own connection, never the listener or the
  orchestrator (the error is counted in ``errors`` and logged);
* **text**: ``reason`` and ``actor`` are made safe
  (:func:`~orchestrator.safetext.safe_text`) where the request is read; node
  names must be the plan's, each at most once.

The socket's directory: bootorch creates it mode 0700 when it does not exist
and then owns it; an existing directory (``/run``) is used as it is, never
chmod'ed, but refused when other users could write to it without the sticky
bit (they could replace the socket). The socket itself is created mode 0600,
or 0660 when its directory lets its group in and nobody else (``g+x`` without
``o+x``, as the systemd unit's ``RuntimeDirectoryMode=0750`` does): then the directory's group may
connect, and the peer's credentials (``SO_PEERCRED``) decide what it may ask.
Our own user and root may ask anything; anyone else only the read-only
operations (:data:`READ_ONLY_OPS`), so an operator in the group can check what
runs and never power-cycle a node. The orchestrator lock always lives in
``<state_dir>/control/``.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import json
import logging
import os
import socket
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

from orchestrator.present import transition_dict
from orchestrator.safetext import safe_text

log = logging.getLogger(__name__)

#: Longest request line accepted.
MAX_REQUEST = 65536
#: Deepest JSON nesting accepted in a request (a real request nests 2 levels).
MAX_DEPTH = 16
OPS = ("ping", "plan", "events", "wake", "reboot", "power_off")
#: What a client that is neither our user nor root may ask on a group-accessible socket.
READ_ONLY_OPS = ("ping", "plan")


def socket_path(plan) -> Path:
    p = plan.model.control.socket
    return p if p.is_absolute() else plan.state_dir / p


def lock_path(plan) -> Path:
    return plan.state_dir / "control" / "orchestrator.lock"


class UnsafeDirectory(RuntimeError):
    """A directory bootorch would put its control socket or lock in lets others replace them."""


def private_dir(path: Path) -> Path:
    """Make sure ``path`` is a directory only we (and root) can change; create it 0700 if missing.

    A directory bootorch creates is its own: it is made mode 0700 through a
    descriptor opened with ``O_NOFOLLOW``, so a symlink planted in its place
    is never followed. An existing directory is never chmod'ed (``/run`` or a
    site's ``/var/lib/bootorch`` stay as they are), but it must be owned by us
    or root and not writable by others unless sticky, else
    :class:`UnsafeDirectory`.
    """
    try:
        path.mkdir(mode=0o700)
        created = True
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(path)
    except FileExistsError:
        created = False
    if created:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)  # mkdir's mode was filtered by the umask
        finally:
            os.close(fd)
        return path
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeDirectory(f"{path} belongs to uid {st.st_uid}, not to this user or root: pick a directory of ours")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}) without the "
                              "sticky bit: others could replace the control socket; use a directory only its owner can write")
    return path


# --------------------------------------------------------------------------- the lock


class Busy(RuntimeError):
    """Another orchestrator holds the lock for this state directory."""


class OrchestratorLock:
    """One orchestrator per state directory: ``flock``, released by the kernel when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        private_dir(self.path.parent)
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


class ControlServer:
    """Answers requests with a :class:`~orchestrator.scheduler.Scheduler` (limits: the module docstring)."""

    def __init__(self, plan, scheduler, *, mode: str, token: str | None = None, log: Callable[[str], None] = lambda s: None,
                 max_connections: int = 64, max_per_client: int = 4, request_timeout: float = 10.0,
                 events: Any = None) -> None:
        self.plan, self.sched, self.mode, self.token, self.log = plan, scheduler, mode, token, log
        #: The satellite event tap (:class:`orchestrator.satellite.EventTap`) answering ``events``; None: not kept.
        self.events = events
        #: Requests that never became one: malformed, too deep, too slow, too many from one address, wrong token.
        self.bad_requests = 0
        #: Connections that ended with an unexpected error (contained; see the log).
        self.errors = 0
        self.max_connections, self.max_per_client = max_connections, max_per_client
        #: Seconds a client has to send its request line.
        self.request_timeout = request_timeout
        self._per_client: Counter[str] = Counter()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the Unix socket (and TCP when configured) until cancelled; the socket file is removed after."""
        path = socket_path(self.plan)
        private_dir(path.parent)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()  # we hold the orchestrator lock: a socket file left here is stale
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket is born 0600 (or 0660 for a directory the group may enter): no chmod that could follow a symlink.
        old = os.umask(0o117 if group_may_enter(path.parent) else 0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
        listeners: list[trio.SocketListener] = [trio.SocketListener(sock)]
        if self.plan.model.control.listen:
            host, _, port = self.plan.model.control.listen.rpartition(":")
            listeners += await trio.open_tcp_listeners(int(port), host=host.strip("[]") or None)
        tls = self._tls_context()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, listeners[:1], False, nursery)
                if len(listeners) > 1:
                    tcp: list[Any] = listeners[1:]
                    if tls is not None:  # the handshake happens on the first read, inside the request timeout
                        tcp = [trio.SSLListener(tl, tls, https_compatible=False) for tl in listeners[1:]]
                    nursery.start_soon(self._accept, tcp, True, nursery)
                task_status.started((path, [tl.socket.getsockname() for tl in listeners[1:]]))
        finally:
            try:
                path.unlink()
            except OSError:
                pass
            for listener in listeners:  # synchronously: this runs while cancelled
                listener.socket.close()

    def _tls_context(self):
        """The server TLS context for ``control.tls`` (None without it); certificate problems raise at start."""
        cfg = self.plan.model.control.tls
        if cfg is None or not self.plan.model.control.listen:
            return None
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.plan.resolve_path(cfg.cert), self.plan.resolve_path(cfg.key))
        return ctx

    async def _accept(self, listeners: list[Any], need_token: bool, nursery: trio.Nursery) -> None:
        """Accept on ``listeners`` (one kind) while fewer than ``max_connections`` of that kind are open."""
        slots = trio.Semaphore(self.max_connections)

        async def one(listener: trio.SocketListener) -> None:
            while True:
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE and friends: back off, never die
                    slots.release()
                    log.warning("control: accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(self._connection, stream, need_token, slots)

        async with trio.open_nursery() as inner:
            for listener in listeners:
                inner.start_soon(one, listener)

    async def _connection(self, stream: trio.SocketStream, need_token: bool, slots: trio.Semaphore) -> None:
        """One client's connection, inside its own error boundary."""
        peer = ""
        try:
            raw = getattr(stream, "transport_stream", stream)  # under TLS: the TCP stream below
            read_only = not need_token and not peer_may_act(raw.socket)
            if need_token:
                try:
                    peer = str(raw.socket.getpeername()[0])
                except OSError:
                    peer = "?"
                self._per_client[peer] += 1
                if self._per_client[peer] > self.max_per_client:
                    self.bad_requests += 1
                    with trio.move_on_after(1):
                        await stream.send_all(json.dumps({"event": "error", "error": f"more than {self.max_per_client} "
                                                          "connections from your address"}).encode() + b"\n")
                    return
            await self._handle(stream, need_token=need_token, read_only=read_only)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away or stopped reading (or failed its TLS handshake); its operation carries on
        except Exception:
            self.errors += 1
            log.exception("control: a connection failed")
            self.log("control: a request failed with an internal error (contained; see the log)")
        finally:
            if need_token:
                self._per_client[peer] -= 1
                if self._per_client[peer] <= 0:
                    del self._per_client[peer]
            slots.release()
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream, *, need_token: bool, read_only: bool = False) -> None:
        async def send(obj: dict[str, Any]) -> None:
            with trio.fail_after(self.request_timeout):  # a client that stops reading holds nothing for long
                await stream.send_all(json.dumps(obj).encode() + b"\n")

        with trio.move_on_after(self.request_timeout) as scope:
            line = await _read_line(stream)
        if scope.cancelled_caught or line is None:
            self.bad_requests += 1
            await send({"event": "error", "error": f"no request line within {self.request_timeout:g} s (or longer than 64 KiB)"})
            return
        try:
            req = parse_request(line)
        except ValueError as e:
            self.bad_requests += 1
            await send({"event": "error", "error": f"bad request: {e}"})
            return
        if need_token and not (self.token and isinstance(req.get("token"), str)
                               # surrogatepass: JSON can carry a lone surrogate (\ud800), which is just a wrong token
                               and hmac.compare_digest(req["token"].encode("utf-8", "surrogatepass"), self.token.encode())):
            self.bad_requests += 1
            await send({"event": "error", "error": "a TCP request needs the right token (control.token)"})
            return
        if read_only and req.get("op") in OPS and req.get("op") not in READ_ONLY_OPS:
            self.bad_requests += 1
            await send({"event": "error", "error": f"{req['op']} needs the orchestrator's own user or root; "
                                                   f"this socket answers you read-only ({', '.join(READ_ONLY_OPS)})"})
            return
        await self._request(req, send)

    async def _request(self, req: dict[str, Any], send) -> None:
        op = req.get("op")
        if op not in OPS:
            await send({"event": "error", "error": f"unknown op {safe_text(op, 40)!r}; one of {', '.join(OPS)}"})
            return
        if op == "ping":
            await send({"event": "pong", "pid": os.getpid(), "mode": self.mode, "plan": str(self.plan.path)})
            return
        if op == "plan":
            from orchestrator.plan.diff import fingerprint

            await send({"event": "plan", "fingerprint": fingerprint(self.plan)})
            return
        if op == "events":
            if self.events is None:
                await send({"event": "error", "error": "this orchestrator keeps no event log (a satellite needs control.listen)"})
                return
            await self.events.stream(req, send)  # until the follower goes away: the satellite's evidence and load
            return
        names = req.get("nodes")
        known = {n.name for n in self.plan.nodes}
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in known for n in names):
            await send({"event": "error", "error": "nodes: a non-empty list of node names of this plan"})
            return
        names = list(dict.fromkeys(names))  # a node named twice is one node, acted on once
        reason = safe_text(req.get("reason") or "no reason given", 500)
        actor = safe_text(req.get("actor") or "unknown", 200)
        operation, busy = self.sched.submit(op, names, reason=reason, actor=actor, hard=bool(req.get("hard")))
        if operation is None:
            await send({"event": "accepted", "acting": [], "busy": busy})
            await send({"event": "done", "results": {}})
            return
        wait = bool(req.get("wait", True))
        send_ch, recv_ch = trio.open_memory_channel(4096)
        if wait:
            operation.listeners.append(send_ch)
        else:
            send_ch.close()
        await send({"event": "accepted", "acting": operation.names, "busy": busy})
        if not wait:
            return
        async for t in recv_ch:
            await send({"event": "transition", **transition_dict(t)})
        await operation.done.wait()
        await send({"event": "done", "results": operation.results})


def group_may_enter(directory: Path) -> bool:
    """True when ``directory`` is shared with its group only (``g+x``, no ``o+x``: the unit's 0750):
    the socket is then made 0660. A directory everyone may enter (``/run``, 0755) keeps it 0600."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXGRP) and not mode & stat.S_IXOTH


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_may_act(sock: Any) -> bool:
    """True when the Unix-socket peer is our own user or root (``SO_PEERCRED``); False when unknown."""
    try:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError, struct.error):
        return False
    return uid in (0, os.geteuid())


def json_depth_ok(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when the JSON text ``data`` nests arrays/objects at most ``limit`` deep.

    A linear scan that skips strings (with their escapes), run before
    :func:`json.loads`, whose recursive parser would raise ``RecursionError``
    (or exhaust the C stack) on ``[[[[...]]]]`` a hundred thousand deep.
    """
    depth = 0
    in_str = esc = False
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b == 0x5B or b == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return False
        elif b == 0x5D or b == 0x7D:
            depth -= 1
    return True


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object, or ValueError saying what is wrong."""
    if not json_depth_ok(line):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        req = json.loads(line)
    except RecursionError:  # unreachable after the depth check; kept as the parser's own boundary
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not isinstance(req, dict):
        raise ValueError("a request is a JSON object")
    return req


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
