"""The simulator's I/O: trio sockets around the sans-IO :class:`~orchestrator.sim.machine.NodeMachine`.

Runs inside the clients' network namespace, on the client end of the veth:

* one UDP socket on port 68 (``SO_BINDTODEVICE``, ``SO_BROADCAST``) shared by
  every node; replies are demultiplexed by ``chaddr`` (and the machine checks
  the ``xid``);
* one task per node: it owns the node's current TFTP socket (bound to the
  node's leased address, a fresh port -- a new TID -- per transfer) and its
  timer, and feeds both to the machine;
* leased addresses are added to the interface as ``/32`` over netlink (no
  ``ip`` process per node: a storm of 1 000 nodes adds 1 000 addresses in
  well under a second);
* the SSH answer: a listener on ``<node ip>:22`` per node that is up; each
  connection is a real SSH server (paramiko, in a worker thread) that accepts
  any public key and answers a few commands (``uname -r``, ``true``,
  ``pidof sshd|dropbear``, anything else exits 127), so ``rollout``'s
  unchanged readiness (port probe, then paramiko with host-key TOFU) works;
* power: magic packets through :class:`~orchestrator.lab.wol_listener.WolListener`
  on the interface (raw 0x0842 and UDP 9/7), and a control socket (Unix,
  line-delimited JSON: ``{"action": "on|off|cycle|status|stats", "mac": ...}``)
  for the ``sim`` BMC driver.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio

from orchestrator.protocols import dhcp
from orchestrator.sim import machine as m

log = logging.getLogger("bootorch.sim")

_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


# --------------------------------------------------------------------------- netlink addresses


class Netlink:
    """RTM_NEWADDR / RTM_DELADDR for /32 addresses on one interface, synchronously acknowledged."""

    RTM_NEWADDR, RTM_DELADDR = 20, 21
    NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
    IFA_ADDRESS, IFA_LOCAL = 1, 2

    def __init__(self, ifname: str) -> None:
        self.index = socket.if_nametoindex(ifname)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.bind((0, 0))
        self.seq = 0
        self.added: set[str] = set()

    def _request(self, kind: int, ip: str, flags: int) -> int:
        self.seq += 1
        addr = socket.inet_aton(ip)
        body = struct.pack("BBBBI", socket.AF_INET, 32, 0, 0, self.index)
        for t in (self.IFA_LOCAL, self.IFA_ADDRESS):
            body += struct.pack("HH", 8, t) + addr
        msg = struct.pack("IHHII", 16 + len(body), kind, self.NLM_F_REQUEST | self.NLM_F_ACK | flags, self.seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if mtype == 2 and seq == self.seq:  # NLMSG_ERROR (0 = ACK)
                    return -struct.unpack_from("i", data, off + 16)[0]
                off += max(16, (length + 3) & ~3)

    def add(self, ip: str) -> None:
        err = self._request(self.RTM_NEWADDR, ip, self.NLM_F_CREATE | self.NLM_F_EXCL)
        if err not in (0, errno.EEXIST):
            raise OSError(err, f"adding {ip}/32: {os.strerror(err)}")
        self.added.add(ip)

    def remove(self, ip: str) -> None:
        err = self._request(self.RTM_DELADDR, ip, 0)
        if err not in (0, errno.EADDRNOTAVAIL, errno.ENODEV):
            raise OSError(err, f"removing {ip}/32: {os.strerror(err)}")
        self.added.discard(ip)

    def close(self) -> None:
        for ip in list(self.added):
            try:
                self.remove(ip)
            except OSError:
                pass
        self.sock.close()


# --------------------------------------------------------------------------- SSH answer


SIM_KERNEL = "6.1.0-bootorch-sim"


def answer_command(command: str) -> tuple[bytes, int]:
    """What a simulated node's shell says to a readiness check (honestly little)."""
    cmd = command.strip()
    if cmd == "uname -r":
        return (SIM_KERNEL + "\n").encode(), 0
    if cmd in ("true", ":"):
        return b"", 0
    if cmd.startswith("pidof "):
        return (b"1\n", 0) if cmd.split()[1].strip("'\"") in ("sshd", "dropbear") else (b"", 1)
    return f"sim: {cmd.split()[0] if cmd else ''}: not simulated\n".encode(), 127


def _ssh_serve_blocking(sock: socket.socket, host_key: Any, stop: threading.Event) -> None:
    import paramiko

    class _Server(paramiko.ServerInterface):
        def __init__(self) -> None:
            self.execs: queue.Queue = queue.Queue()

        def get_allowed_auths(self, username: str) -> str:
            return "publickey"

        def check_auth_publickey(self, username: str, key: Any) -> int:
            return paramiko.AUTH_SUCCESSFUL

        def check_channel_request(self, kind: str, chanid: int) -> int:
            return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

        def check_channel_exec_request(self, channel: Any, command: bytes) -> bool:
            self.execs.put((channel, command.decode(errors="replace")))
            return True

    sock.settimeout(10)
    t = paramiko.Transport(sock)
    try:
        t.add_server_key(host_key)
        srv = _Server()
        try:
            t.start_server(server=srv)
        except (paramiko.SSHException, EOFError, OSError):
            return  # a port probe (connect + close) or a broken client
        deadline = time.monotonic() + 60
        while t.is_active() and time.monotonic() < deadline and not stop.is_set():
            try:
                chan, cmd = srv.execs.get(timeout=0.2)
            except queue.Empty:
                continue
            out, code = answer_command(cmd)
            try:
                chan.sendall(out)
                chan.send_exit_status(code)
                chan.close()
            except (OSError, EOFError, paramiko.SSHException):
                break
    finally:
        t.close()
        sock.close()


def make_host_key() -> Any:
    """One Ed25519 host key for every simulated node (known_hosts is per address anyway)."""
    import io

    import paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption())
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


# --------------------------------------------------------------------------- one node's I/O


@dataclass(eq=False)
class SimNode:
    machine: m.NodeMachine
    name: str
    sock: socket.socket | None = None
    server: str | None = None
    peer: tuple[str, int] | None = None
    scope: trio.CancelScope | None = None
    ssh_scope: trio.CancelScope | None = None
    tftp_sent: int = 0

    def kick(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


@dataclass
class SimOptions:
    interface: str
    control: Path | None = None
    timing: m.Timing = field(default_factory=m.Timing)
    seed: int = 1
    ssh_port: int = 22
    ssh_threads: int = 32
    wol: bool = True


class Simulator:
    """All simulated nodes of one namespace. ``await run(task_status=...)`` until cancelled."""

    def __init__(self, nodes: list[tuple[str, str, m.Faults]], opts: SimOptions) -> None:
        import random

        self.opts = opts
        rng = random.Random(opts.seed)
        self.nodes: dict[str, SimNode] = {}
        self.by_chaddr: dict[bytes, SimNode] = {}
        for name, mac, faults in nodes:
            mach = m.NodeMachine(mac, timing=opts.timing, faults=faults, rng=random.Random(rng.getrandbits(64)), name=name)
            node = SimNode(mach, name)
            self.nodes[mach.mac] = node
            self.by_chaddr[mach.chaddr] = node
        self.dhcp_sock: socket.socket | None = None
        self.netlink: Netlink | None = None
        self.host_key: Any = None
        self.nursery: trio.Nursery | None = None
        self.ssh_limiter = trio.CapacityLimiter(opts.ssh_threads)
        self.ssh_stop = threading.Event()
        self.counts = {"dhcp_in": 0, "dhcp_out": 0, "dhcp_unknown": 0, "tftp_out": 0, "wrong_tid": 0,
                       "ssh_connections": 0, "magic": 0, "magic_unknown": 0}
        self.t0 = 0.0

    # -- effects ----------------------------------------------------------------------

    def apply(self, node: SimNode, effects: list[m.Effect]) -> None:
        for e in effects:
            t = type(e)
            if t is m.TftpSend:
                sock = node.sock
                if sock is not None:
                    try:
                        sock.sendto(e.data, node.peer or (node.server, m.TFTP_PORT))
                        self.counts["tftp_out"] += 1
                    except OSError:
                        pass  # a lost packet: the timers cope
            elif t is m.DhcpSend:
                try:
                    self.dhcp_sock.sendto(e.data, ("255.255.255.255", dhcp.SERVER_PORT))
                    self.counts["dhcp_out"] += 1
                except OSError as err:
                    log.debug("dhcp send failed: %s", err)
            elif t is m.TftpOpen:
                self._close_tftp(node)
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                s.bind((e.src, 0))
                node.sock, node.server, node.peer = s, e.server, None
                try:
                    s.sendto(e.data, (e.server, m.TFTP_PORT))
                    self.counts["tftp_out"] += 1
                except OSError:
                    pass
                node.kick()
            elif t is m.TftpClose:
                self._close_tftp(node)
            elif t is m.AddAddress:
                self.netlink.add(e.ip)
            elif t is m.RemoveAddress:
                self.netlink.remove(e.ip)
            elif t is m.SshUp:
                self._ssh_up(node, e.ip)
            elif t is m.SshDown:
                if node.ssh_scope is not None:
                    node.ssh_scope.cancel()
                    node.ssh_scope = None

    def _close_tftp(self, node: SimNode) -> None:
        s = node.sock
        if s is not None:
            node.sock = None
            trio.lowlevel.notify_closing(s)
            s.close()
            node.kick()

    # -- power (from the control socket and the WoL listener) ---------------------------

    def power(self, mac: str, action: str) -> tuple[bool, str]:
        node = self.nodes.get(mac.lower())
        if node is None:
            return False, f"no simulated node with MAC {mac}"
        now = trio.current_time()
        mach = node.machine
        if action == "on":
            self.apply(node, mach.power_on(now))
        elif action == "off":
            self.apply(node, mach.power_off(now))
        elif action == "cycle":
            self.apply(node, mach.cycle(now))
        elif action == "magic":
            self.counts["magic"] += 1
            self.apply(node, mach.magic(now))
        elif action != "status":
            return False, f"unknown action {action!r}"
        node.kick()
        return True, mach.phase.value

    def _on_magic(self, token: trio.lowlevel.TrioToken) -> Callable[[str, str, str, bytes], None]:
        def on_magic(mac: str, how: str, peer: str, password: bytes) -> None:
            try:
                token.run_sync_soon(self._magic_soon, mac)
            except trio.RunFinishedError:
                pass
        return on_magic

    def _magic_soon(self, mac: str) -> None:
        if mac.lower() in self.nodes:
            self.power(mac, "magic")
        else:
            self.counts["magic_unknown"] += 1

    # -- the tasks ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.t0 = trio.current_time()
        # Port probes (connect, close) make paramiko's server log a traceback each: not news here.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        self.host_key = await trio.to_thread.run_sync(make_host_key)
        self.netlink = Netlink(self.opts.interface)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.opts.interface.encode() + b"\0")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("0.0.0.0", dhcp.CLIENT_PORT))
        s.setblocking(False)
        self.dhcp_sock = s
        wol = None
        try:
            if self.opts.wol:
                from orchestrator.lab.wol_listener import WolListener

                wol = WolListener(self.opts.interface, self._on_magic(trio.lowlevel.current_trio_token()))
                wol.start()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._dhcp_reader)
                for node in self.nodes.values():
                    nursery.start_soon(self._node_loop, node)
                if self.opts.control is not None:
                    await nursery.start(self._control_server, self.opts.control)
                task_status.started(self)
        finally:
            self.ssh_stop.set()
            if wol is not None:
                wol.stop()
            for node in self.nodes.values():
                if node.sock is not None:
                    node.sock.close()
            s.close()
            self.netlink.close()

    async def _dhcp_reader(self) -> None:
        s = self.dhcp_sock
        assert s is not None
        while True:
            await trio.lowlevel.wait_readable(s)
            while True:
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                except OSError:
                    break
                self.counts["dhcp_in"] += 1
                try:
                    pkt = dhcp.parse(data)
                except dhcp.MalformedPacket:
                    continue
                node = self.by_chaddr.get(pkt.chaddr[:6])
                if node is None or pkt.op != dhcp.BOOTREPLY:
                    self.counts["dhcp_unknown"] += pkt.op == dhcp.BOOTREPLY
                    continue
                self.apply(node, node.machine.dhcp_in(pkt, trio.current_time()))
                node.kick()

    async def _node_loop(self, node: SimNode) -> None:
        mach = node.machine
        apply = self.apply
        while True:
            deadline = mach.next_deadline if mach.next_deadline is not None else math.inf
            sock = node.sock
            with trio.CancelScope(deadline=deadline) as scope:
                node.scope = scope
                if sock is None:
                    await trio.sleep_forever()
                else:
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    except trio.ClosedResourceError:
                        continue
                    now = trio.current_time()
                    for _ in range(64):
                        if node.sock is not sock:
                            break
                        try:
                            data, src = sock.recvfrom(2048)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # ECONNREFUSED from an earlier ICMP error
                            continue
                        peer = node.peer
                        if peer is None:
                            if src[0] != node.server:
                                continue
                            node.peer = peer = src
                        elif src != peer:
                            self.counts["wrong_tid"] += 1
                            continue
                        apply(node, mach.tftp_in(data, now))
            node.scope = None
            now = trio.current_time()
            if mach.next_deadline is not None and now >= mach.next_deadline:
                apply(node, mach.timer(now))

    # -- SSH ----------------------------------------------------------------------------

    def _ssh_up(self, node: SimNode, ip: str) -> None:
        if node.ssh_scope is not None:
            node.ssh_scope.cancel()
        scope = trio.CancelScope()
        node.ssh_scope = scope
        assert self.nursery is not None
        self.nursery.start_soon(self._ssh_listen, node, ip, scope)

    async def _ssh_listen(self, node: SimNode, ip: str, scope: trio.CancelScope) -> None:
        with scope:
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                lsock.bind((ip, self.opts.ssh_port))
            except OSError as e:
                log.warning("%s: cannot listen on %s:%d: %s", node.name, ip, self.opts.ssh_port, e)
                lsock.close()
                return
            lsock.listen(64)
            lsock.setblocking(False)
            try:
                async with trio.open_nursery() as conns:
                    while True:
                        await trio.lowlevel.wait_readable(lsock)
                        try:
                            conn, _ = lsock.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(True)
                        self.counts["ssh_connections"] += 1
                        conns.start_soon(self._ssh_conn, conn)
            finally:
                trio.lowlevel.notify_closing(lsock)
                lsock.close()

    async def _ssh_conn(self, conn: socket.socket) -> None:
        await trio.to_thread.run_sync(_ssh_serve_blocking, conn, self.host_key, self.ssh_stop,
                                      limiter=self.ssh_limiter, abandon_on_cancel=True)

    # -- control socket -------------------------------------------------------------------

    async def _control_server(self, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = Path(path)
        if path.exists() or path.is_socket():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._control_conn, [listener], handler_nursery=nursery)
        finally:
            try:
                path.unlink()
            except OSError:
                pass

    async def _control_conn(self, stream: trio.SocketStream) -> None:
        buf = b""
        with trio.move_on_after(30):
            async with stream:
                while True:
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        reply = self.control(line)
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    if len(buf) > 65536:
                        return

    def control(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            action = req["action"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "detail": "expected a JSON object with an 'action'"}
        if action == "stats":
            return {"ok": True, **self.stats()}
        if action not in ("on", "off", "cycle", "status"):
            return {"ok": False, "detail": f"unknown action {action!r}"}
        ok, detail = self.power(str(req.get("mac", "")), action)
        state = None
        if ok:
            state = "off" if detail == "off" else "on"
        return {"ok": ok, "detail": detail, "state": state}

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        phases: dict[str, int] = {}
        gave_up = []
        for node in self.nodes.values():
            st = asdict(node.machine.stats)
            for k, v in st.items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
            phases[node.machine.phase.value] = phases.get(node.machine.phase.value, 0) + 1
            if node.machine.stats.gave_up:
                gave_up.append({"name": node.name, "mac": node.machine.mac, "reasons": node.machine.stats.gave_up_reasons})
        try:
            uptime = trio.current_time() - self.t0
        except RuntimeError:  # outside trio.run
            uptime = None
        return {"nodes": len(self.nodes), "phases": phases, "totals": total, "io": dict(self.counts), "gave_up": gave_up,
                "uptime": uptime}
