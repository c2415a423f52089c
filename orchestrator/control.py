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
* ``{"op": "admission"}`` -> ``{"event": "admission", ...}``: each boot server's admission window,
  nodes in flight and waiting, and newest load (:func:`admission_answer`), for ``bootorch status``
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
import math
import os
import socket
import stat
import struct
import time
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
OPS = ("ping", "plan", "admission", "events", "wake", "reboot", "power_off")
#: What a client that is neither our user nor root may ask on a group-accessible socket. ``admission``
#: is among them: names, racks, counts and rates, no secret, and what an operator in the group needs
#: for ``bootorch status``; ``events`` (a satellite's evidence stream) is not.
READ_ONLY_OPS = ("ping", "plan", "admission")


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
                 events: Any = None, satellites: list[Any] | None = None) -> None:
        self.plan, self.sched, self.mode, self.token, self.log = plan, scheduler, mode, token, log
        #: The satellite event tap (:class:`orchestrator.satellite.EventTap`) answering ``events``; None: not kept.
        self.events = events
        #: The satellites followed (:class:`orchestrator.satellite.SatelliteLink`), for ``admission``.
        self.satellites = satellites
        self._layout: tuple[Any, Any] | None = None
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
        if op == "admission":
            if self._layout is None or self._layout[0] is not self.plan:  # computed once per plan (a reload brings a new one)
                self._layout = (self.plan, server_layout(self.plan, self.sched))
            await send(admission_answer(self.plan, self.sched, {link.name: link for link in self.satellites or ()}, mode=self.mode,
                                        layout=self._layout[1]))
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


# --------------------------------------------------------------------------- the admission answer


def server_layout(plan, sched) -> tuple[dict[str, list[str]], Counter[str]]:
    """Per server, the racks of the plan's nodes it carries (sorted) and how many nodes: what changes only with the plan."""
    from orchestrator.plan.resolve import MAIN_SERVER

    racks: dict[str, set[str]] = {name: set() for name in sched.windows}
    nodes: Counter[str] = Counter()
    server_of = sched.server_of
    for n in plan.nodes:
        server = server_of.get(n.mac, MAIN_SERVER)
        nodes[server] += 1
        if n.rack:
            racks.setdefault(server, set()).add(n.rack)
    return {name: sorted(r) for name, r in racks.items()}, nodes


def admission_answer(plan, sched, links: dict[str, Any], *, mode: str,
                     layout: tuple[dict[str, list[str]], Counter[str]] | None = None) -> dict[str, Any]:
    """The ``admission`` answer: per boot server (``main`` first, then ``servers:`` in plan order) its window and load.

    Each entry: ``name``; ``kind`` (``embedded``: bootorch's own servers, ``site``:
    the site's, followed through their logs, ``http cache``, ``satellite``);
    ``racks`` whose nodes it carries (for ``main``: the racks no ``servers:``
    entry lists; left out when it carries no node and has none in flight or waiting)
    and ``nodes`` (how many); ``window`` (nodes it admits in flight
    now), ``max_downloading``, ``adaptive`` (whether the window follows a load);
    ``in_flight`` (woken, not yet past initrd), ``downloading`` (loader to
    initrd) and ``waiting`` (queued to be woken: a rollout's pending nodes and
    queued on-call wakes and reboots); ``window_since``: seconds since its size
    last changed (or since the scheduler started); ``load``: the newest load
    (:func:`orchestrator.satellite.load_to_wire`), None when nothing reports one; ``link`` for a
    satellite: ``connected``, ``load_age`` (seconds since its load line, None
    when unknown), ``connects`` and ``errors``, else None.

    Computed from the scheduler's attributes at the time of asking: a pass over
    its jobs, no I/O (about 7 ms at 10 000 nodes, 10 servers; ``layout``, :func:`server_layout`
    of the same plan, saves the pass over the plan's nodes).
    """
    from orchestrator.plan.resolve import MAIN_SERVER
    from orchestrator.satellite import load_to_wire

    model = plan.model
    entries = {srv.name: srv for srv in model.servers}
    racks, nodes = layout if layout is not None else server_layout(plan, sched)
    waiting = sched.waiting()
    now = sched.clock()
    many = len(sched.windows) > 1
    servers = []
    for name, window in sched.windows.items():
        if many and name == MAIN_SERVER and name not in sched.serving and not waiting[name] and not sched.in_flight_on(name):
            continue  # every rack is on another server: the plan's own server carries nothing
        srv = entries.get(name)
        link = links.get(name)
        if name == MAIN_SERVER:
            kind = "site" if model.dhcp.mode == "external" else "embedded"
            max_dl = model.rollout.admission.max_downloading
        else:
            kind = "satellite" if srv is not None and srv.satellite is not None else "http cache" if srv is not None and srv.http else "site"
            max_dl = srv.admission.max_downloading if srv is not None else window.max_window
        reader = sched.server_loads.get(name)
        link_info = None
        if link is not None:
            load = link.load  # the newest it sent, also while the link is down (its reader then gives none)
            load_at = link.load_at  # trio time of the newest load line
            link_info = {"connected": bool(link.connected), "connects": link.connects, "errors": link.errors,
                         "load_age": (max(0.0, trio.current_time() - load_at) if load is not None and load_at is not None else None)}
        else:
            try:
                load = reader() if reader is not None else None
            except Exception:  # a load that cannot be read now is shown as none; the answer still goes out
                log.exception("control: reading the load of server %s failed", name)
                load = None
        # With one server every entry of window_history is its change; with more, its own (the start when none).
        history = (sched.server_window_history.get(name) or sched.window_history[:1]) if many else sched.window_history
        servers.append({
            "name": name, "kind": kind, "racks": racks.get(name, []), "nodes": nodes[name],
            "window": window.size, "max_downloading": max_dl, "adaptive": bool(window.adaptive),
            "in_flight": sched.in_flight_on(name), "downloading": sched.downloading_on(name), "waiting": waiting[name],
            "window_since": max(0.0, now - history[-1][0]) if history else None,
            "load": None if load is None else load_to_wire(load), "link": link_info,
        })
    return {"event": "admission", "pid": os.getpid(), "mode": mode, "aborted": bool(sched.aborted),
            "window": sched.window, "max_window": sched.max_window, "servers": servers}


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


#: Longest answer line :func:`ask` reads (an ``admission`` answer of a plan with hundreds of servers fits).
MAX_ANSWER = 1 << 20
#: Most servers, and racks per server, :func:`admission_from_wire` keeps of an answer.
MAX_SERVERS, MAX_RACKS = 256, 1024


def ask(path: Path, req: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """One request on the Unix socket and its first answer line, within ``timeout`` seconds in all.

    Raises NoOrchestrator when nobody listens, PermissionError when the socket
    is not ours to use, TimeoutError when no whole line came in time, ValueError
    for an answer that is not one JSON object of at most :data:`MAX_ANSWER` bytes.
    """
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoOrchestrator(str(e)) from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_ANSWER:
                raise ValueError(f"an answer longer than {MAX_ANSWER} bytes")
        line = buf.split(b"\n", 1)[0]
        if not line.strip():
            raise ValueError("the connection closed without an answer")
        return parse_request(line)  # the same checks: depth, UTF-8, one object
    finally:
        s.close()


def _count(v: Any) -> int | None:
    return v if type(v) is int and 0 <= v < 1 << 31 else None


def _rate(v: Any) -> float | None:
    return float(v) if type(v) in (int, float) and math.isfinite(v) and v >= 0 else None


def admission_from_wire(msg: dict[str, Any]) -> dict[str, Any]:
    """An ``admission`` answer with every value checked: text made safe and bounded, counts integers >= 0,
    rates finite and >= 0 (a value that is not becomes None); at most :data:`MAX_SERVERS` servers
    and :data:`MAX_RACKS` racks each. ValueError when its shape is not an answer's."""
    servers = msg.get("servers")
    if not isinstance(servers, list):
        raise ValueError("an admission answer without a list of servers")
    out_servers = []
    for srv in servers[:MAX_SERVERS]:
        if not isinstance(srv, dict):
            raise ValueError("a server that is not an object")
        racks = srv.get("racks") if isinstance(srv.get("racks"), list) else []
        load, link = srv.get("load"), srv.get("link")
        out_servers.append({
            "name": safe_text(srv.get("name", "?"), 32), "kind": safe_text(srv.get("kind", "?"), 16),
            "racks": [safe_text(r, 64) for r in racks[:MAX_RACKS]], "racks_total": len(racks),
            **{k: _count(srv.get(k)) for k in ("nodes", "window", "max_downloading", "in_flight", "downloading", "waiting")},
            "adaptive": srv.get("adaptive") if isinstance(srv.get("adaptive"), bool) else None,
            "window_since": _rate(srv.get("window_since")),
            "load": None if not isinstance(load, dict) else {
                **{k: _count(load.get(k)) for k in ("active", "queued")},
                **{k: _rate(load.get(k)) for k in ("bytes_per_s", "retransmit_rate", "client_retry_rate", "rtt")}},
            "link": None if not isinstance(link, dict) else {
                "connected": link.get("connected") if isinstance(link.get("connected"), bool) else None,
                "connects": _count(link.get("connects")), "errors": _count(link.get("errors")),
                "load_age": _rate(link.get("load_age"))},
        })
    return {"pid": _count(msg.get("pid")), "mode": safe_text(msg.get("mode", "?"), 16),
            "aborted": msg.get("aborted") is True, "window": _count(msg.get("window")),
            "max_window": _count(msg.get("max_window")), "servers": out_servers}


def admission_view(path: Path, *, timeout: float = 2.0) -> dict[str, Any]:
    """What ``bootorch status`` shows of the running orchestrator: ``{"answered": True, "socket", ...}`` with
    :func:`admission_from_wire`'s fields, or ``{"answered": False, "socket", "why": text}``. Never raises for
    a missing, silent, refusing or garbled orchestrator."""
    base = {"socket": str(path)}
    try:
        msg = ask(path, {"op": "admission"}, timeout=timeout)
    except NoOrchestrator:
        return {**base, "answered": False, "why": "no orchestrator answers on the control socket"}
    except PermissionError:
        return {**base, "answered": False, "why": "the control socket is not open to this user (permission denied)"}
    except TimeoutError:
        return {**base, "answered": False, "why": f"the orchestrator did not answer within {timeout:g} s"}
    except (OSError, ValueError) as e:
        return {**base, "answered": False, "why": f"no usable answer: {safe_text(e, 200)}"}
    if msg.get("event") == "error":
        return {**base, "answered": False, "why": f"the orchestrator refused: {safe_text(msg.get('error'), 300)}"}
    if msg.get("event") != "admission":
        return {**base, "answered": False, "why": "the orchestrator answered something other than its admission"}
    try:
        return {**base, "answered": True, **admission_from_wire(msg)}
    except ValueError as e:
        return {**base, "answered": False, "why": f"a malformed answer: {e}"}
