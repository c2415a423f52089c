"""Throw-away network namespaces for tests, benchmarks and the lab.

Everything here exists so that test traffic never leaves the machine and never
touches an interface we did not create:

* :class:`NetLab` is a context manager. It creates uniquely named namespaces
  (``bt-<role>-<token>``), links between them, and processes inside them; on
  exit -- normal, exception, ``KeyboardInterrupt`` or interpreter exit -- it
  kills the processes *it* started (by PID, then their process group, which is
  theirs because we start each one in a new session), and deletes the
  namespaces and any root-side link it made. Nothing is looked up by name to be
  killed.
* Addresses come from ``10.213.0.0/16``, one ``/30`` per link, and live only on
  interfaces inside our namespaces. The one exception, a veth into the root
  namespace (:meth:`NetLab.veth` with ``a=None``), refuses a subnet that
  overlaps anything already configured on the host.
* All commands are argv lists (no shell). Failures raise :class:`NetnsError`
  with the command and its stderr.

Link impairment
---------------

``tc qdisc ... netem`` is the usual way to add loss and delay on a veth, and
:meth:`NetLab.netem` does exactly that. Some kernels are built without
``sch_netem`` (``CONFIG_NET_SCH_NETEM`` unset -- e.g. the Firecracker guest our
CI runs in); there ``tc`` answers "Specified qdisc kind is unknown" and we raise
:class:`NetemUnavailable`. For that case :meth:`NetLab.impaired_link` falls back
to a *user-space link emulator*: two point-to-point TUN devices, one in each
namespace, joined by a small relay process (``python -m orchestrator.lab.netns
linkemu``) that forwards IP packets between them after a fixed one-way delay
and drops a configured fraction at random, independently per packet and per
direction -- netem's ``delay D loss P%`` on both ends, with netem's default
1000-packet queue limit. Its precision is that of ``select()`` with a 1 ns
timer slack (tens of microseconds); callers that care should measure the round
trip (:meth:`NetLab.ping_rtt_ms`) and report it. :class:`ImpairedLink.kind`
says which mechanism was used.

Example::

    with NetLab() as lab:
        srv, cli = lab.namespace("srv"), lab.namespace("cli")
        link = lab.impaired_link(srv, cli, delay_ms=0.25, loss_pct=5)
        server = lab.popen(srv, [sys.executable, "-m", "some.server", link.a_ip])
        lab.run(cli, ["curl", f"tftp://{link.a_ip}/f", "-o", "/dev/null"], timeout=60)

Needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN`` for ``ip netns``);
:func:`require_root` raises :class:`NotRootError` with a plain explanation.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

#: Our private test range. /30s are carved from it per link.
TEST_RANGE = ipaddress.IPv4Network("10.213.0.0/16")

#: Prefix of every namespace and interface this module creates.
PREFIX = "bt"


class NetnsError(RuntimeError):
    """A namespace/link operation failed; the message carries argv and stderr."""


class NotRootError(NetnsError):
    """Network namespaces and qdiscs need root."""


class NetemUnavailable(NetnsError):
    """The running kernel has no ``sch_netem`` qdisc."""


def require_root() -> None:
    """Raise :class:`NotRootError` unless we are root and ``ip`` is installed."""
    if os.geteuid() != 0:
        raise NotRootError(
            "network namespaces, veth links and tc qdiscs need root "
            "(run as root, or skip the namespace scenarios)"
        )
    if shutil.which("ip") is None:
        raise NetnsError("iproute2 ('ip') is not installed")


def run_checked(argv: Sequence[str], *, timeout: float = 30, check: bool = True,
                error: type[Exception] = NetnsError) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell); a timeout or, with ``check``, a non-zero exit raises ``error``."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise error(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise error(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
    return cp


_run = run_checked


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 subnet configured or routed in the root namespace (not the default route)."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole", "throw"):
            # 'local'/'broadcast' entries repeat addresses already seen above.
            continue
        try:
            nets.append(ipaddress.IPv4Network(first, strict=False))
        except ValueError:
            continue
    return nets


def netem_supported() -> bool:
    """True when the kernel accepts a netem qdisc (probed on a veth in a scratch namespace)."""
    require_root()
    with NetLab(prefix=f"{PREFIX}p") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.veth(a, b)
        try:
            lab.netem(a, link.a_dev, delay_ms=0.1)
        except NetemUnavailable:
            return False
        return True


@dataclass(frozen=True)
class Namespace:
    """A namespace we created. ``None`` in APIs that take one means the root namespace."""

    name: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass(frozen=True)
class Link:
    """Two ends of a point-to-point link: device and address in each namespace."""

    a: Namespace | None
    b: Namespace
    a_dev: str
    b_dev: str
    a_ip: str
    b_ip: str
    prefixlen: int


@dataclass(frozen=True)
class ImpairedLink(Link):
    """A link with delay/loss applied; ``kind`` is ``"netem"`` or ``"tun-emulator"``."""

    kind: str = "netem"
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    emulator_pid: int | None = None


@dataclass
class NetLab:
    """Owner of every namespace, link and process made for one test or benchmark run.

    Use as a context manager. ``prefix`` names everything (keep it short: Linux
    interface names are limited to 15 characters).
    """

    prefix: str = PREFIX
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Namespace] = field(default_factory=list)
    root_devices: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    _subnets: int = 0
    _closed: bool = False

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> "NetLab":
        require_root()
        atexit.register(self.close)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill our processes, delete our namespaces and root-side devices. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Keep cleaning even if a second Ctrl-C arrives in the middle.
        old = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            old = None
        try:
            for p in list(reversed(self.procs)):
                self.kill(p)
            for dev in self.root_devices:
                _run(["ip", "link", "del", dev], check=False)
            for ns in reversed(self.namespaces):
                _run(["ip", "netns", "del", ns.name], check=False)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            atexit.unregister(self.close)

    # -- namespaces and links ------------------------------------------------------

    def namespace(self, role: str) -> Namespace:
        """Create ``<prefix>-<role>-<token>`` with loopback up."""
        ns = Namespace(f"{self.prefix}-{role}-{self.token}")
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def _next_subnet(self, *, avoid_host: bool) -> ipaddress.IPv4Network:
        # Spread runs over the /16 by token so concurrent runs rarely collide
        # (and collisions inside private namespaces are harmless anyway).
        base = int(self.token, 16) % (2**14)
        taken = _host_networks() if avoid_host else []
        for i in range(2**14):
            idx = (base + self._subnets + i) % (2**14)
            net = ipaddress.IPv4Network((int(TEST_RANGE.network_address) + idx * 4, 30))
            if not any(net.overlaps(t) for t in taken):
                self._subnets += 1 + i
                return net
        raise NetnsError(f"no free /30 in {TEST_RANGE} on this host")

    def _dev(self, tag: str) -> str:
        name = f"{self.prefix}{tag}{self.token}{self._subnets}"
        if len(name) > 15:
            raise NetnsError(f"interface name {name!r} too long; use a shorter prefix")
        return name

    def veth(self, a: Namespace | None, b: Namespace, *, mtu: int = 1500) -> Link:
        """A veth pair from ``a`` (``None``: root namespace) to ``b``, addressed from a fresh /30."""
        net = self._next_subnet(avoid_host=a is None)
        a_dev, b_dev = self._dev("a"), self._dev("b")
        a_ip, b_ip = (str(h) for h in net.hosts())
        cmd = ["ip", "link", "add", a_dev]
        if a is not None:
            cmd += ["netns", a.name]
        _run([*cmd, "mtu", str(mtu), "type", "veth", "peer", "name", b_dev, "netns", b.name, "mtu", str(mtu)])
        if a is None:
            self.root_devices.append(a_dev)
        for ns, dev, ip in ((a, a_dev, a_ip), (b, b_dev, b_ip)):
            pre = ["ip"] if ns is None else ["ip", "-n", ns.name]
            _run([*pre, "addr", "add", f"{ip}/30", "dev", dev])
            _run([*pre, "link", "set", dev, "up"])
        return Link(a, b, a_dev, b_dev, a_ip, b_ip, 30)

    # -- qdiscs --------------------------------------------------------------------

    def tc(self, ns: Namespace | None, args: Sequence[str]) -> None:
        """Run ``tc ARGS`` in ``ns``."""
        argv = ["tc", *args]
        try:
            _run(argv if ns is None else ns.exec_argv(argv))
        except NetnsError as e:
            if "qdisc kind is unknown" in str(e) and "netem" in args:
                raise NetemUnavailable(
                    "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM unset); "
                    "use NetLab.impaired_link(), which falls back to the TUN link emulator"
                ) from e
            raise

    def netem(self, ns: Namespace | None, dev: str, *, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """``tc qdisc replace dev DEV root netem [delay D] [loss P%]`` (egress of ``dev``)."""
        args = ["qdisc", "replace", "dev", dev, "root", "netem"]
        if delay_ms:
            args += ["delay", f"{delay_ms}ms"]
        if loss_pct:
            args += ["loss", f"{loss_pct}%"]
        self.tc(ns, args)

    def tbf(self, ns: Namespace | None, dev: str, *, rate: str, burst: str = "32kbit", latency: str = "50ms") -> None:
        """``tc qdisc replace dev DEV root tbf rate R burst B latency L`` (egress rate limit)."""
        self.tc(ns, ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", latency])

    def impaired_link(
        self, a: Namespace, b: Namespace, *, delay_ms: float = 0.0, loss_pct: float = 0.0,
        mechanism: str = "auto", seed: int | None = None, mtu: int = 1500,
    ) -> ImpairedLink:
        """A link between two of our namespaces with ``delay_ms`` one-way delay and
        ``loss_pct`` random loss *in each direction*.

        ``mechanism``: ``"netem"`` (veth + tc netem on both ends), ``"tun"`` (the
        user-space emulator) or ``"auto"`` (netem when the kernel has it). Loss
        applies per packet on the wire, so a datagram larger than ``mtu`` is lost
        when any of its fragments is.
        """
        if mechanism in ("auto", "netem"):
            link = self.veth(a, b, mtu=mtu)
            try:
                if delay_ms or loss_pct:
                    self.netem(a, link.a_dev, delay_ms=delay_ms, loss_pct=loss_pct)
                    self.netem(b, link.b_dev, delay_ms=delay_ms, loss_pct=loss_pct)
                return ImpairedLink(**vars(link), kind="netem", delay_ms=delay_ms, loss_pct=loss_pct)
            except NetemUnavailable:
                if mechanism == "netem":
                    raise
                # The veth stays (harmless, unused); the emulator gets its own /30.
        return self._tun_link(a, b, delay_ms=delay_ms, loss_pct=loss_pct, seed=seed, mtu=mtu)

    def _tun_link(self, a: Namespace, b: Namespace, *, delay_ms: float, loss_pct: float, seed: int | None,
                  mtu: int) -> ImpairedLink:
        net = self._next_subnet(avoid_host=False)
        a_dev, b_dev = self._dev("t"), self._dev("u")
        a_ip, b_ip = (str(h) for h in net.hosts())
        argv = [sys.executable, "-m", "orchestrator.lab.netns", "linkemu", a_dev, b_dev,
                "--delay-ms", str(delay_ms), "--loss-pct", str(loss_pct)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        # The relay creates both TUN devices in the root namespace (holding their
        # fds), says "ready", and we move each device into its namespace: a TUN
        # fd stays attached to its device across the move.
        emu = self.popen(None, argv, stdout=subprocess.PIPE, stderr=None)
        assert emu.stdout is not None
        line = emu.stdout.readline()
        if line.strip() != b"ready":
            raise NetnsError(f"link emulator did not start (said {line!r}, exit {emu.poll()})")
        self.root_devices.extend([a_dev, b_dev])  # until moved; deleting a moved one just fails quietly
        for ns, dev, ip, peer in ((a, a_dev, a_ip, b_ip), (b, b_dev, b_ip, a_ip)):
            _run(["ip", "link", "set", dev, "netns", ns.name])
            _run(["ip", "-n", ns.name, "link", "set", dev, "mtu", str(mtu), "up"])
            _run(["ip", "-n", ns.name, "addr", "add", ip, "peer", f"{peer}/32", "dev", dev])
        return ImpairedLink(a, b, a_dev, b_dev, a_ip, b_ip, 32, kind="tun-emulator",
                            delay_ms=delay_ms, loss_pct=loss_pct, emulator_pid=emu.pid)

    def drop_link(self, link: Link) -> None:
        """Remove a link before :meth:`close` (stops its emulator, deletes its veth)."""
        if isinstance(link, ImpairedLink) and link.emulator_pid is not None:
            for p in list(self.procs):
                if p.pid == link.emulator_pid:
                    self.kill(p)  # non-persistent TUN devices vanish with their fds
            return
        pre = ["ip"] if link.a is None else ["ip", "-n", link.a.name]
        _run([*pre, "link", "del", link.a_dev], check=False)
        if link.a_dev in self.root_devices:
            self.root_devices.remove(link.a_dev)

    # -- processes -----------------------------------------------------------------

    def popen(self, ns: Namespace | None, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` (``ip netns exec`` execs, so ``.pid`` is the program itself).

        The process gets its own session, so :meth:`kill` can also reach children
        it forks (tftpd-hpa forks one per transfer). Use ``sys.executable`` (the
        venv's python) for Python programs so ``orchestrator`` imports.
        """
        full = list(argv) if ns is None else ns.exec_argv(argv)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(full, env=dict(env) if env is not None else None, start_new_session=True, **kwargs)
        self.procs.append(p)
        return p

    def run(self, ns: Namespace | None, argv: Sequence[str], *, timeout: float, check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``ns`` to completion; killed (by PID) after ``timeout`` seconds."""
        p = self.popen(ns, argv, **kwargs)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            raise NetnsError(f"timed out after {timeout}s: {' '.join(argv)}") from None
        finally:
            if p in self.procs and p.returncode is not None:
                self.procs.remove(p)
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} exited {p.returncode}: {err!r}")
        return cp

    def kill(self, p: subprocess.Popen, *, grace: float = 3.0) -> None:
        """SIGTERM then SIGKILL ``p`` and its process group (which we created for it)."""
        if p.poll() is None:
            self._signal(p, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.wait(timeout=10)
        # Reap forked children left in the group (e.g. tftpd-hpa transfer processes).
        self._signal(p, signal.SIGKILL, group_only=True)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
        if p in self.procs:
            self.procs.remove(p)

    @staticmethod
    def _signal(p: subprocess.Popen, sig: int, *, group_only: bool = False) -> None:
        # The group id is p.pid because popen() started a new session for it.
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if not group_only and p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    # -- measuring -----------------------------------------------------------------

    def rtt_ms(self, server_ns: Namespace, client_ns: Namespace, addr: str, *, count: int = 200) -> float:
        """Median UDP round trip (ms) from ``client_ns`` to ``addr`` in ``server_ns``.

        Measured with a tiny Python echo pair (``ping`` is not always installed), so
        it includes a few tens of microseconds of interpreter time.
        """
        port = 40000 + secrets.randbelow(20000)
        echo = self.popen(server_ns, [sys.executable, "-m", "orchestrator.lab.netns", "udpecho", addr, str(port)],
                          stdout=subprocess.PIPE)
        try:
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != b"ready":
                raise NetnsError("udp echo did not start")
            cp = self.run(client_ns, [sys.executable, "-m", "orchestrator.lab.netns", "udpping", addr, str(port),
                                      "--count", str(count)], timeout=30, stdout=subprocess.PIPE, text=True)
            return float(cp.stdout.strip())
        finally:
            self.kill(echo)


# ---------------------------------------------------------------------------------
# The user-space link emulator (netem stand-in for kernels without sch_netem).
# ---------------------------------------------------------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_NETEM_LIMIT = 1000  # netem's default queue limit, in packets


def _open_tun(name: str) -> int:
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _set_timer_slack_ns(ns: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
    except Exception:  # noqa: BLE001 -- best effort; only precision suffers
        pass


def linkemu(dev_a: str, dev_b: str, *, delay_ms: float, loss_pct: float, seed: int | None = None,
            limit: int = _NETEM_LIMIT) -> dict[str, int]:
    """Relay IP packets between TUN devices ``dev_a`` and ``dev_b`` with delay and loss.

    Runs until SIGTERM/SIGINT; returns counters. Constant delay keeps each
    direction FIFO, so a deque per direction is the whole scheduler.
    """
    import random
    import select
    from collections import deque

    rng = random.Random(seed)
    loss = loss_pct / 100.0
    delay = delay_ms / 1000.0
    fa, fb = _open_tun(dev_a), _open_tun(dev_b)
    _set_timer_slack_ns(1)
    stats = {"forwarded": 0, "lost": 0, "overflow": 0}
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    queues = {fa: deque(), fb: deque()}  # packets read from fd, waiting to go out the other one
    other = {fa: fb, fb: fa}
    mono, read, write, rand, sel = time.monotonic, os.read, os.write, rng.random, select.select
    fds = [fa, fb]
    while running:
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - mono()) if heads else 0.5
        try:
            ready, _, _ = sel(fds, [], [], timeout)
        except InterruptedError:
            continue
        now = mono()
        for fd in ready:
            q = queues[fd]
            for _ in range(256):
                try:
                    pkt = read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                if loss and rand() < loss:
                    stats["lost"] += 1
                elif len(q) >= limit:
                    stats["overflow"] += 1
                else:
                    q.append((now + delay, pkt))
        now = mono()
        for fd, q in queues.items():
            out = other[fd]
            while q and q[0][0] <= now:
                try:
                    write(out, q.popleft()[1])
                    stats["forwarded"] += 1
                except OSError:  # device down/being deleted: count as lost
                    stats["lost"] += 1
    return stats


def _udpecho(addr: str, port: int) -> None:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print("ready", flush=True)
    s.settimeout(60)  # bounded: exits after a minute of silence
    while True:
        try:
            data, peer = s.recvfrom(2048)
        except TimeoutError:
            return
        s.sendto(data, peer)


def _udpping(addr: str, port: int, count: int) -> float:
    import socket
    import statistics

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    rtts = []
    for i in range(count):
        t0 = time.perf_counter()
        s.sendto(i.to_bytes(4, "big"), (addr, port))
        try:
            while s.recv(2048) != i.to_bytes(4, "big"):
                pass
        except TimeoutError:
            continue
        rtts.append((time.perf_counter() - t0) * 1000)
    if not rtts:
        raise NetnsError(f"no UDP echo replies from {addr}:{port}")
    return statistics.median(rtts)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m orchestrator.lab.netns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    le = sub.add_parser("linkemu", help="user-space netem stand-in between two TUN devices")
    le.add_argument("dev_a")
    le.add_argument("dev_b")
    le.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    le.add_argument("--loss-pct", type=float, default=0.0, help="random loss, each direction")
    le.add_argument("--seed", type=int)
    sub.add_parser("netem-supported", help="exit 0 if the kernel has sch_netem")
    for name in ("udpecho", "udpping"):
        sp = sub.add_parser(name, help="RTT measurement helper (see NetLab.rtt_ms)")
        sp.add_argument("addr")
        sp.add_argument("port", type=int)
        sp.add_argument("--count", type=int, default=200)
    args = ap.parse_args(argv)
    if args.cmd == "udpecho":
        _udpecho(args.addr, args.port)
        return 0
    if args.cmd == "udpping":
        print(f"{_udpping(args.addr, args.port, args.count):.4f}")
        return 0
    if args.cmd == "netem-supported":
        return 0 if netem_supported() else 1
    stats = linkemu(args.dev_a, args.dev_b, delay_ms=args.delay_ms, loss_pct=args.loss_pct, seed=args.seed)
    print(f"linkemu {args.dev_a}<->{args.dev_b}: {stats}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
