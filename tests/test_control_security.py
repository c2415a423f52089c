"""The control API under hostile clients: no request can stop it, exhaust it, or act twice.

The wire tests run the real ``bootorch serve`` (a subprocess, loopback only) with
a TCP control port; the in-process ones drive :class:`ControlServer` with the
scheduler and simulated cluster of tests/test_oncall_ops.py on MockClock.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import stat
import subprocess
import textwrap
import time

import pytest
import trio

from orchestrator import control
from orchestrator.plan import load_plan
from tests.conftest import REPO, require_tool
from tests.test_oncall_ops import Harness
from tests.test_scheduler import make_plan

EXE = str(REPO / ".venv" / "bin" / "bootorch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_plan_file(tmp_path, *, extra: str = "") -> tuple:
    """A plan whose nodes live on loopback (127.77.0.0/24), with a TCP control port and a token file (0600)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    (root / "pxelinux.0").write_bytes(b"\x90" * 4096)
    (root / "vmlinuz").write_bytes(bytes(range(256)) * 400)
    (root / "rootfs.gz").write_bytes(b"\x1f\x8b" + bytes(7000))
    for f in root.iterdir():
        f.chmod(0o644)
    port = _free_port()
    text = textwrap.dedent(f"""\
    version: 1
    state_dir: {tmp_path / 'state'}
    network: {{subnet: 127.77.0.0/24, server: 127.77.0.1, interface: ""}}
    boot: {{root: {root}}}
    bootserver: {{listen: 127.0.0.1, dhcp_port: 0, proxy_port: 0, tftp_port: 0, http_port: 0}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - {{name: "n[1-2]", mac: "52:54:00:00:00:01", ip: 127.77.0.11}}
    power:
      wol: {{method: udp, broadcast: 127.255.255.255, udp_port: 9}}
      bmc: {{driver: command, command: "true"}}
    readiness: {{ssh: {{port: 1}}}}
    metrics: {{listen: ""}}
    control: {{listen: "127.0.0.1:{port}", token: {{file: {token}}}}}
    """) + extra
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p), port


class Serve:
    """``bootorch serve PLAN`` as a child process; stdout/stderr go to files; ended by PID."""

    def __init__(self, plan, tmp_path, *, nofile: int | None = None) -> None:
        self.out, self.err = tmp_path / "serve.out", tmp_path / "serve.err"
        self.nofile = nofile

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([EXE, "serve", str(plan.path), "--events"], stdout=self.out.open("wb"),
                                     stderr=self.err.open("wb"), preexec_fn=limits)
        self.ports: dict[str, int] = {}
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:
            text = self.err.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("serving "):
                    for part in line[len("serving "):].split(", "):
                        kind, _, addr = part.partition(" ")
                        self.ports[kind] = int(addr.rsplit(":", 1)[1])
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        raise AssertionError("serve did not start: " + self.err.read_text(errors="replace"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> bytes:
        return self.out.read_bytes() + self.err.read_bytes()


def _backlog(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the listener on ``port`` (``ss``'s Recv-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    return int(out[1]) if len(out) > 1 else 0


def settle(srv: "Serve", port: int, timeout: float = 10.0) -> None:
    """Until serve has accepted every waiting connection or has run out of descriptors trying."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        if _backlog(port) == 0 or fds >= min(limit, srv.nofile or limit) - 4:
            return
        time.sleep(0.01)
    raise AssertionError(f"serve neither drained its control backlog nor filled its descriptors in {timeout} s")


def tcp_ask(port: int, payload: bytes, timeout: float = 10) -> list[dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return [json.loads(line) for line in s.makefile("rb")]


def test_deeply_nested_json_does_not_stop_serve(tmp_path):
    """Finding 1: ``[[[[...]]]]`` parsed before the token check raised RecursionError and ended serve."""
    plan, port = serve_plan_file(tmp_path)
    srv = Serve(plan, tmp_path)
    try:
        deep = b"[" * 30000 + b"]" * 30000 + b"\n"
        for payload in (deep, b'{"op": "ping", "x": ' + b"{\"a\": " * 5000 + b"1" + b"}" * 5000 + b"}\n"):
            answer = tcp_ask(port, payload)
            assert answer[0]["event"] == "error" and "nested" in answer[0]["error"]
            with socket.socket(socket.AF_UNIX) as s:  # the local socket too
                s.connect(str(control.socket_path(plan)))
                s.sendall(payload)
                assert "nested" in json.loads(s.makefile("rb").readline())["error"]
        assert srv.alive()
        assert tcp_ask(port, b'{"op": "ping", "token": "s3cret"}\n')[0]["event"] == "pong"
    finally:
        assert srv.stop() == 0, srv.err.read_text()


def test_idle_control_connections_cannot_starve_the_boot_servers(tmp_path):
    """Finding 7: ~1 100 idle TCP control connections used every descriptor; TFTP and HTTP then failed.

    serve runs with a 256-descriptor limit here, so the test needs a few hundred connections, not thousands.
    """
    curl = require_tool("curl")
    plan, port = serve_plan_file(tmp_path)
    srv = Serve(plan, tmp_path, nofile=256)
    idle: list[socket.socket] = []
    try:
        for _ in range(400):  # no token, no byte: each may wait its 10 s request timeout; the downloads come before that
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            idle.append(s)
        settle(srv, port)
        tftp = subprocess.run([curl, "-sS", "--max-time", "5", f"tftp://127.0.0.1:{srv.ports['tftp']}/vmlinuz"],
                              capture_output=True, timeout=30)
        assert tftp.returncode == 0 and tftp.stdout == (tmp_path / "root" / "vmlinuz").read_bytes(), tftp.stderr
        http = subprocess.run([curl, "-sS", "--max-time", "3", f"http://127.0.0.1:{srv.ports['http']}/vmlinuz"],
                              capture_output=True, timeout=30)
        assert http.returncode == 0 and http.stdout == (tmp_path / "root" / "vmlinuz").read_bytes(), http.stderr
        with socket.socket(socket.AF_UNIX) as s:  # the operator's local socket still answers
            s.settimeout(1)
            s.connect(str(control.socket_path(plan)))
            s.sendall(b'{"op": "ping"}\n')
            assert json.loads(s.makefile("rb").readline())["event"] == "pong"
        assert srv.alive()
    finally:
        for s in idle:
            s.close()
        assert srv.stop() == 0, srv.err.read_text()


async def test_a_node_named_twice_is_acted_on_once_and_the_request_finishes(tmp_path, autojump_clock):
    """Finding 5: ``["n1", "n1"]`` queued n1 twice (an SSH reboot, then a BMC cycle) and no ``done`` ever came."""
    plan = make_plan(tmp_path, n=2)
    h = Harness(plan, tmp_path)
    path = control.socket_path(plan)

    def ask(req):
        return list(control.request(path, req, timeout=60))

    async with trio.open_nursery() as nursery:
        h.cluster.nursery = nursery
        h.sched.standing = True
        nursery.start_soon(h.sched.run, h.recv)
        server = control.ControlServer(plan, h.sched, mode="serve")
        server.request_timeout = math.inf  # MockClock would jump to any deadline while the client thread connects
        await nursery.start(server.serve)
        await h.boot_all(nursery)
        cycles_before = len(h.cluster.cycles)
        msgs = await trio.to_thread.run_sync(ask, {"op": "reboot", "nodes": ["n1", "n1"], "reason": "twice", "actor": "t"})
        assert msgs[0] == {"event": "accepted", "acting": ["n1"], "busy": {}}
        assert msgs[-1]["event"] == "done" and msgs[-1]["results"]["n1"]["result"] == "ready"
        assert h.ssh.calls == [("reboot", "n1")] and len(h.cluster.cycles) == cycles_before  # one action, the gentlest
        nursery.cancel_scope.cancel()


async def _serve_control(plan, h, nursery):
    h.cluster.nursery = nursery
    server = control.ControlServer(plan, h.sched, mode="serve")
    return await nursery.start(server.serve)


async def test_an_existing_socket_directory_is_used_as_it_is(tmp_path, autojump_clock):
    """Finding 6: with ``control.socket: /run/bootorch.sock`` bootorch chmod'ed /run to 0700 (following symlinks)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    (tmp_path / "link").symlink_to(elsewhere)
    for sock in (run_dir / "bootorch.sock", tmp_path / "link" / "b.sock"):
        plan = make_plan(tmp_path, n=1, extra=f"control: {{socket: {sock}}}")
        h = Harness(plan, tmp_path)
        async with trio.open_nursery() as nursery:
            path, _ = await _serve_control(plan, h, nursery)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            nursery.cancel_scope.cancel()
        h.store.close()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755
    # The lock stays with the plan's state, not beside a socket in a shared directory.
    assert control.lock_path(plan) == plan.state_dir / "control" / "orchestrator.lock"
    assert not (run_dir / "orchestrator.lock").exists()


async def test_a_directory_others_can_write_is_refused(tmp_path, autojump_clock):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone could swap the socket for their own
    with pytest.raises(control.UnsafeDirectory, match="writable by group or others"):
        control.private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # /tmp-like: allowed, the socket itself is 0600
    plan = make_plan(tmp_path, n=1, extra=f"control: {{socket: {sticky / 'c.sock'}}}")
    async with trio.open_nursery() as nursery:
        path, _ = await _serve_control(plan, Harness(plan, tmp_path), nursery)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        nursery.cancel_scope.cancel()


def test_json_depth_scan():
    assert control.json_depth_ok(b'{"op": "ping", "nodes": ["a", "b"]}')
    assert control.json_depth_ok(b'{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # brackets inside a string
    assert control.json_depth_ok(b'{"s": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # an escaped quote stays inside
    assert not control.json_depth_ok(b"[" * (control.MAX_DEPTH + 1))
    with pytest.raises(ValueError, match="nested"):
        control.parse_request(b"[" * 100000)


def test_a_token_with_a_lone_surrogate_is_a_wrong_token(tmp_path):
    """JSON can carry ``\\ud800``: encoding it for the comparison raised, and the client got no answer."""
    plan, port = serve_plan_file(tmp_path)
    srv = Serve(plan, tmp_path)
    try:
        answer = tcp_ask(port, b'{"op": "ping", "token": "\\ud800"}\n')
        assert answer and answer[0]["event"] == "error" and "token" in answer[0]["error"]
        conns = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(6)]
        try:  # beyond four connections from one address, each is told why it is closed (the rest wait, silent)
            import select

            told: list[bytes] = []
            t_end = time.monotonic() + 3
            while len(told) < 2 and time.monotonic() < t_end:  # the refused are told at once; the others wait 10 s
                ready, _, _ = select.select([c for c in conns if c.fileno() >= 0], [], [], 0.2)
                for c in ready:
                    told.append(c.makefile("rb").readline())
                    c.close()
            assert len(told) == 2 and all(b"connections from your address" in line for line in told), told
        finally:
            for c in conns:
                c.close()
        t_end = time.monotonic() + 10
        while True:  # until serve has seen those four close: then this address is welcome again
            try:
                answer = tcp_ask(port, b'{"op": "ping", "token": "s3cret"}\n')
            except ConnectionResetError:  # refused with our request unread
                answer = []
            if answer and answer[0]["event"] == "pong":
                break
            assert time.monotonic() < t_end, answer
            time.sleep(0.05)
    finally:
        assert srv.stop() == 0, srv.err.read_text()
