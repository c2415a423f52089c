"""Fuzzing and abuse of every input surface of a running ``bootorch serve``.

One real ``bootorch serve PLAN --events`` process per module (the CLI, as an
operator starts it), on loopback test ports, with a plan written to a temporary
directory: 20 nodes on 127.0.0.0/9, the boot server on 127.0.0.1, the control
API on its Unix socket and on TCP with a token file, Prometheus metrics on a free
port, power drivers that cannot act (``bmc.driver: none``, WoL by UDP to a
loopback broadcast), and one followed log file per daemon kind. Its stdout and
stderr go to files.

The surfaces, each fed by a generator of :mod:`tests.fuzz_inputs` that is
deterministic from ``BOOTORCH_FUZZ_SEED`` (default 15) -- a failure prints the
input that caused it; ``BOOTORCH_FUZZ_KEEP=1`` keeps the directory (plan,
journal, serve's output) for a post-mortem:

* **DHCP**, the server port and the ProxyDHCP port: mutated BOOTREQUESTs.
  The real client is Kea's ``perfdhcp`` speaking as a relay from 127.0.0.1
  (giaddr 127.0.0.1 lies in the plan's subnet) for a reserved node's MAC: it
  must complete a DISCOVER-OFFER and a REQUEST-ACK (perfdhcp listens on port
  67; without root a DISCOVER and a REQUEST built by scapy, whose OFFER and
  ACK scapy decodes, stand in). The ProxyDHCP port is checked with a PXE
  REQUEST built by scapy whose ACK scapy decodes.
* **TFTP**: requests to the listening port, each from a new port, and garbage
  to live transfers' ports (from the right TID and a wrong one). They come
  from the fuzz nodes' own addresses (127.77.0.11-18: hostile file names
  become those nodes' evidence, transitions and journal rows) and from
  127.0.1.x, never from 127.0.0.1, whose per-client limits the real clients
  need: tftp-hpa's ``tftp`` and ``curl tftp://`` must download a file
  byte-identical.
* **HTTP**: pipelined requests -- well framed with hostile content, then often
  one that breaks the framing -- from the fuzz nodes' addresses and 127.0.3.x;
  ``curl`` must download files byte-identical. During the TFTP and HTTP tests a
  fuzz node's PXE DISCOVER now and then starts a new boot attempt, so that
  file reads keep being evidence (:class:`NodeReset`).
* **Control API** on the Unix socket and on TCP (with the right token, a wrong
  one, none), N requests on each: every request must get an answer, a
  ``ping`` must get ``pong`` and ``bootorch status PLAN`` must exit 0. No
  request that could power a node is ever sent:
  :func:`tests.fuzz_inputs.control_may_act` filters them (so ``actions`` rows,
  which only an accepted power request writes, stay out of reach).
* **Log parsers**: hostile mutations of the real dnsmasq / ISC dhcpd /
  tftp-hpa / Kea log lines appended to the followed files; after each round a
  well-formed line for a reserved node must move that node's stage (serve
  prints it; ``bootorch status PLAN --json`` shows it at the end).

After every surface: the process is still running; no raw control character
(C0 but tab and newline, DEL, C1) is in what serve printed during the test, in
``bootorch status``/``history`` (text and ``--json``, the JSON's decoded strings
too), in the journal rows the test added (``transitions``, ``actions``; and
they are valid UTF-8), on the metrics endpoint, in the control API's answers
or in TFTP ERROR texts.

"Processed" counts what the server reports having handled (metrics counters, or
answers received), not what was sent: the senders pace themselves with a probe
round trip every few hundred datagrams, and loop until ``N`` inputs were
processed. A crash is recorded with its input (found again by replaying the
last window into a fresh process where needed), serve is restarted and the
fuzzing goes on (at most three crashes per test); the test then fails listing
everything it found. With ``BOOTORCH_FUZZ_REPORT=FILE`` each test appends one
JSON line with its counts.

Tiers: ``[fast]`` sends ~1 500 inputs per surface, ``[slow]`` (marked slow)
100 000 (the control API: on each transport).

One targeted abuse test sits beside the fuzzing: a DHCPINFORM claiming
another node's address must not take that node's evidence.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from orchestrator.plan import load_plan
from tests import fuzz_inputs as fz
from tests.conftest import REPO, require_tool

EXE = str(REPO / ".venv" / "bin" / "bootorch")
SEED = int(os.environ.get("BOOTORCH_FUZZ_SEED", "15"))
FAST, SLOW = 1_500, 100_000
TIERS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
#: Wall-clock budget of one surface's fuzzing (the checks come on top).
BUDGET = {FAST: 25.0, SLOW: 240.0}
#: Inputs between two checks with a real client (the fast tier checks once, at the end).
BATCH = {FAST: 10**9, SLOW: 10_000}
#: Crashes recorded before a test stops fuzzing.
MAX_CRASHES = 3
TOKEN = "fuzz-token-0123456789abcdef"
PXE_VENDOR_HEX = "505845436c69656e74"  # "PXEClient", perfdhcp's -o 60,...

PLAN = """\
version: 1
name: fuzz
state_dir: state
network:
  interface: ""
  subnet: 127.0.0.0/9
  server: 127.0.0.1
  gateway: 127.0.0.1
dhcp:
  mode: full
  lease_time: 1h
  pool: {{start: 127.77.0.100, end: 127.77.0.150}}
boot:
  root: root
  config_names: [mac, ip]
  ipxe: loader
bootserver:
  listen: 127.0.0.1
  dhcp_port: 0
  proxy_port: 0
  tftp_port: 0
  http_port: 0
profiles:
  ramdisk:
    kernel: vmlinuz
    initrd: rootfs.gz
    root: initramfs
    ip: dhcp
    append: console=ttyS0
nodes:
  - name: node[01-20]
    mac: 52:54:00:77:00:01
    ip: 127.77.0.11
power:
  wol: {{method: udp, broadcast: 127.127.255.255}}
  bmc: {{driver: none}}
metrics:
  listen: 127.0.0.1:0
control:
  listen: 127.0.0.1:{control_port}
  token: {{file: token}}
logs:
{logs}
"""

# Node roles: the fuzzers may name 01-08; the others are reserved so that their
# stages move only by the checks.
FUZZ_NODES = [f"node{i:02d}" for i in range(1, 9)]
DHCP_CLIENT_NODE = "node10"
LOG_SENTINEL_NODE = {"dnsmasq": "node11", "iscdhcpd": "node12", "kea": "node13", "syslog": "node14"}
TFTP_SENTINEL_NODES = [f"node{i:02d}" for i in range(15, 21)]


def short(value: Any, limit: int = 700) -> str:
    """``repr`` of a reproducer, cut to ``limit`` characters (its length said when cut)."""
    r = value if isinstance(value, str) else repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters of repr)"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the process


class Serve:
    """One ``bootorch serve`` process and its directory; restartable after a crash."""

    def __init__(self, base: Path) -> None:
        self.base = base
        root = base / "root"
        (root / "pxelinux.cfg").mkdir(parents=True)
        rng = random.Random(SEED)
        (root / "pxelinux.0").write_bytes(rng.randbytes(4096))
        (root / "vmlinuz").write_bytes(rng.randbytes(65536 + 123))
        (root / "rootfs.gz").write_bytes(b"\x1f\x8b" + rng.randbytes(20000))
        (root / "small.bin").write_bytes(rng.randbytes(512))
        (base / "logs").mkdir()
        self.logs = {kind: base / "logs" / f"{kind}.log" for kind in fz.LOG_KINDS}
        for p in self.logs.values():
            p.write_bytes(b"")
        token = base / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        self.control_port = _free_port()
        logs = "\n".join(f"  - {{source: {kind}, path: logs/{kind}.log}}" for kind in fz.LOG_KINDS)
        self.plan_path = base / "plan.yaml"
        self.plan_path.write_text(PLAN.format(control_port=self.control_port, logs=logs))
        self.plan = load_plan(self.plan_path)
        self.node = {n.name: n for n in self.plan.nodes}
        self.out_path, self.err_path = base / "serve.out", base / "serve.err"
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.exits: list[str] = []
        self.ports: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        err_at = self.err_path.stat().st_size if self.err_path.exists() else 0
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen([EXE, "serve", str(self.plan_path), "--events"], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.generation += 1
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            text = self.err_path.read_bytes()[err_at:].decode(errors="replace")
            m = re.search(r"serving tftp 127\.0\.0\.1:(\d+), http 127\.0\.0\.1:(\d+), dhcp :(\d+), pxe :(\d+)", text)
            mm = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", text)
            if m and mm and "following" in text:
                self.ports = dict(zip(("tftp", "http", "dhcp", "pxe"), map(int, m.groups())), metrics=int(mm.group(1)))
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"bootorch serve exited {self.proc.returncode} at start:\n{text}")
            time.sleep(0.02)
        else:
            raise AssertionError(f"bootorch serve did not start within 30 s:\n{text}")
        if ping(self.socket_path) is None:
            raise AssertionError("the control socket does not answer a ping after start")

    def alive(self, grace: float = 0.0) -> bool:
        """Running; with ``grace``, still running after that many seconds (a dying process is not yet reaped at once)."""
        if self.proc is None:
            return False
        if grace:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll() is None

    def died(self) -> bool:
        """Not running, or dying: no pong on the control socket and gone a moment later."""
        if not self.alive():
            return True
        return ping(self.socket_path, timeout=2) is None and not self.alive(grace=1.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def ensure(self) -> str | None:
        """Restart after a crash; returns how the previous process ended (None when it runs)."""
        if self.alive():
            return None
        assert self.proc is not None
        how = f"exit status {self.proc.returncode}; stderr ends:\n{self.err_tail()}"
        self.exits.append(how)
        self.start()
        return how

    # -- views -------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.base / "state" / "control" / "control.sock"

    @property
    def db_path(self) -> Path:
        return self.base / "state" / "state.db"

    def err_tail(self, n: int = 3000) -> str:
        return self.err_path.read_bytes()[-n:].decode(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if m:
                labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
                out[(m.group(1), labels)] = float(m.group(3))
        return out


def ping(path: Path, timeout: float = 5.0) -> dict | None:
    try:
        lines = control_exchange(("unix", str(path)), b'{"op": "ping"}\n', timeout=timeout)
    except OSError:
        return None
    for ln in lines:
        try:
            msg = json.loads(ln)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("event") == "pong":
            return msg
    return None


def control_exchange(where: tuple[str, Any], data: bytes, *, timeout: float = 15.0) -> list[bytes]:
    """Send one request on a new connection, half-close, return the answer's lines.

    A server that closes the connection before it has read the whole request
    (a line over the limit) makes the send fail: the answer it wrote first is
    still read; with nothing to read, the result is ``[b"<closed while sending>"]``.
    """
    cut = False
    fam = socket.AF_UNIX if where[0] == "unix" else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(where[1])
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, or ENOTCONN from shutdown
            cut = True  # the server refused a long line before reading it all: its answer may still be there
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except ConnectionResetError:
            pass
    lines = [ln for ln in b"".join(chunks).split(b"\n") if ln.strip()]
    return lines or ([CLOSED_WHILE_SENDING] if cut else [])


CLOSED_WHILE_SENDING = b"<closed while sending>"


@pytest.fixture(scope="module")
def serve() -> Iterator[Serve]:
    base = Path(tempfile.mkdtemp(prefix="bootorch-fuzz-"))
    s = Serve(base)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        if os.environ.get("BOOTORCH_FUZZ_KEEP"):
            print(f"kept {base} (BOOTORCH_FUZZ_KEEP)")
        else:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- outcome and output checks


@dataclass
class Outcome:
    """What one surface test found; asserted (and reported) at the end."""

    surface: str
    n: int
    inputs: int = 0
    processed: int = 0
    crashes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def crash(self, serve: Serve, what: str, how: str | None = None) -> None:
        """Record a crash and restart serve; ``how`` it ended when an earlier restart already took it over."""
        again = serve.ensure()
        self.crashes.append(f"{what}\n    serve: {how or again or 'it was running again'}")

    def report(self) -> None:
        path = os.environ.get("BOOTORCH_FUZZ_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"surface": self.surface, "inputs": self.inputs, "processed": self.processed,
                                    "crashes": len(self.crashes), "raw_escapes": len(self.raw),
                                    "seconds": round(time.monotonic() - self.t0, 1), "seed": SEED}) + "\n")

    def verdict(self) -> None:
        lines = [f"{self.surface} (seed {SEED}): {self.inputs} inputs sent, {self.processed} processed"]
        if self.processed < self.n:
            lines.append(f"  only {self.processed} of {self.n} inputs were processed")
        for title, items in (("crashes", self.crashes), ("failed checks", self.problems), ("raw control characters", self.raw)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"  - {x}" for x in items[:20]]
        ok = self.processed >= self.n and not (self.crashes or self.problems or self.raw)
        assert ok, "\n".join(lines)


@dataclass
class Marks:
    """Where the shared outputs stood when a test began."""

    out: int
    err: int
    transition: int
    action: int


def _journal_max_ids(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        t = con.execute("SELECT COALESCE(MAX(id), 0) FROM transitions").fetchone()[0]
        a = con.execute("SELECT COALESCE(MAX(id), 0) FROM actions").fetchone()[0]
    return t, a


def mark(serve: Serve) -> Marks:
    t, a = _journal_max_ids(serve.db_path)
    return Marks(serve.out_path.stat().st_size, serve.err_path.stat().st_size, t, a)


#: Raw-control findings already reported from the CLI views, so that each test reports only what it added.
_CLI_SEEN: set[str] = set()


def run_cli(serve: Serve) -> dict[str, subprocess.CompletedProcess]:
    """``bootorch status`` / ``history``, text and --json, run side by side."""
    cmds = {"status": ["status"], "status --json": ["status", "--json"],
            "history": ["history"], "history --json": ["history", "--json"]}
    procs = {k: subprocess.Popen([EXE, *v[:1], str(serve.plan_path), *v[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, v in cmds.items()}
    out = {}
    for k, p in procs.items():
        so, se = p.communicate(timeout=60)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, so, se)
    return out


def check_outputs(serve: Serve, outcome: Outcome, m: Marks) -> dict[str, subprocess.CompletedProcess]:
    """The checks every surface ends with: alive, and no raw control character anywhere an operator looks."""
    if not serve.alive():
        outcome.crash(serve, "the process was not running at the end of the test")
    for name, path, at in (("serve stdout", serve.out_path, m.out), ("serve stderr", serve.err_path, m.err)):
        for hit in fz.raw_controls(path.read_bytes()[at:]):
            outcome.raw.append(f"{name}: {hit}")
    if serve.alive():
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.ports['metrics']}/metrics", timeout=10) as r:
            outcome.raw += [f"metrics endpoint: {h}" for h in fz.raw_controls(r.read())]
    cli = run_cli(serve)
    for name, cp in cli.items():
        if cp.returncode != 0:
            outcome.problems.append(f"bootorch {name} exited {cp.returncode}: {cp.stderr.decode(errors='replace')[-500:]}")
        hits = [f"bootorch {name} {stream}: {h}" for stream, data in (("stdout", cp.stdout), ("stderr", cp.stderr))
                for h in fz.raw_controls(data)]
        if name.endswith("--json") and cp.returncode == 0:
            try:
                hits += [f"bootorch {name}, a decoded JSON string: {h}" for s in fz.json_strings(json.loads(cp.stdout))
                         for h in fz.raw_controls(s)]
            except ValueError as e:
                outcome.problems.append(f"bootorch {name} printed invalid JSON: {e}")
        for h in hits:
            if h not in _CLI_SEEN:
                _CLI_SEEN.add(h)
                outcome.raw.append(h)
    with sqlite3.connect(f"file:{serve.db_path}?mode=ro", uri=True, timeout=10) as con:
        con.text_factory = bytes
        rows = [("transitions", r[0], r[1:]) for r in con.execute(
            "SELECT id, node, evidence, source, flags FROM transitions WHERE id > ?", (m.transition,))]
        rows += [("actions", r[0], r[1:]) for r in con.execute(
            "SELECT id, node, action, reason, result, actor, detail FROM actions WHERE id > ?", (m.action,))]
    for table, rid, values in rows:
        for v in values:
            if isinstance(v, bytes):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    outcome.raw.append(f"journal {table} row {rid}: not valid UTF-8: {v[:200]!r}")
                for h in fz.raw_controls(v):
                    outcome.raw.append(f"journal {table} row {rid}: {h}")
    return cli


class Counted:
    """A server counter summed across restarts (a restart starts the counters at zero), less
    what the test's own probes and real clients made it count."""

    def __init__(self, serve: Serve, read: Callable[[dict], float]) -> None:
        self.serve, self.read = serve, read
        self.done = 0.0  # counted by earlier processes
        self.gen = serve.generation
        self.base = read(serve.metrics())
        self.last = self.base
        #: Counted for the probes and the real clients, not for fuzz inputs.
        self.own = 0

    def value(self) -> int:
        if self.serve.alive():
            if self.serve.generation != self.gen:
                self.done += self.last - self.base
                self.gen, self.base = self.serve.generation, 0.0
            self.last = self.read(self.serve.metrics())
        return int(self.done + self.last - self.base) - self.own

    def around(self, check: Callable[[], str | None]) -> str | None:
        """Run a real-client check; what it made the counter count is not fuzz input."""
        before = self.value()
        try:
            return check()
        finally:
            self.own += self.value() - before


def metric_sum(name: str, **want: str) -> Callable[[dict], float]:
    def read(ms: dict) -> float:
        return sum(v for (n, labels), v in ms.items() if n == name and all(dict(labels).get(k) == x for k, x in want.items()))
    return read


def _finish(serve: Serve, outcome: Outcome, m: Marks) -> dict[str, subprocess.CompletedProcess]:
    try:
        return check_outputs(serve, outcome, m)
    finally:
        outcome.report()


# --------------------------------------------------------------------------- DHCP


def _dhcp_targets(serve: Serve) -> fz.DhcpTargets:
    macs = tuple(bytes.fromhex(serve.node[n].mac.replace(":", "")) for n in FUZZ_NODES)
    # Loopback only (see DhcpTargets); 127.200.0.5 and 127.255.255.254 lie outside the plan's
    # subnet (off-subnet INFORMs); the reserved nodes' addresses are left out, so that no
    # hostile request can lend its MAC the address of a node whose stage a check watches.
    addrs = [int(serve.node[n].ip) for n in FUZZ_NODES] + [fz._ip(a) for a in (
        "127.77.0.100", "127.77.0.120", "127.77.0.150", "127.77.0.200", "127.0.0.1", "127.200.0.5", "127.255.255.254")]
    return fz.DhcpTargets(macs=macs, addresses=tuple(addrs), server=fz._ip("127.0.0.1"))


def _dhcp_probe(sock: socket.socket, port: int, mac: bytes, xid: int, *, pxe_port: bool, ciaddr: int,
                timeout: float = 2.0, tries: int = 3) -> bytes | None:
    """A well-formed request gets its answer: the server has read everything sent before (retransmitted like a client's)."""
    for _ in range(tries):
        sock.sendto(fz.dhcp_probe(mac, xid, pxe_port=pxe_port, ciaddr=ciaddr), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(4096)
            except TimeoutError:
                break
            if len(data) >= 8 and data[0] == 2 and struct.unpack("!I", data[4:8])[0] == xid:
                return data
    return None


def _drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(65536))
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:
            continue  # ICMP errors surfacing


def _dhcp_client(serve: Serve) -> str | None:
    """A real DHCP client for the reserved node completes a DORA; None when it was served.

    Kea's perfdhcp as a relay from 127.0.0.1 (it listens on port 67: root); without
    root, a DISCOVER and a REQUEST built by scapy whose OFFER and ACK scapy decodes.
    """
    if os.geteuid() != 0:
        return _scapy_dora(serve)
    perfdhcp = require_tool("perfdhcp", "/usr/sbin/perfdhcp")
    mac = serve.node[DHCP_CLIENT_NODE].mac
    cp = subprocess.run([perfdhcp, "-4", "-l", "127.0.0.1", "-L", "67", "-N", str(serve.ports["dhcp"]), "-b", f"mac={mac}",
                         "-R", "1", "-n", "3", "-r", "20", "-W", "200000", "-o", f"60,{PXE_VENDOR_HEX}", "127.0.0.1"],
                        capture_output=True, text=True, timeout=60)
    got = dict(re.findall(r"Statistics for: ([A-Z-]+)\*+\s+sent packets: \d+\s+received packets: (\d+)", cp.stdout))
    if int(got.get("DISCOVER-OFFER", 0)) >= 1 and int(got.get("REQUEST-ACK", 0)) >= 1:
        return None
    return f"perfdhcp (exit {cp.returncode}) completed no DORA: {cp.stdout[-1500:]} {cp.stderr[-500:]}"


def _scapy_exchange(port: int, packet, xid: int):
    from scapy.layers.dhcp import BOOTP

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(bytes(packet), ("127.0.0.1", port))
        try:
            while True:
                data, _ = s.recvfrom(4096)
                reply = BOOTP(data)
                if reply.xid == xid:
                    return reply
        except TimeoutError:
            return None


def _dhcp_options(reply) -> dict:
    from scapy.layers.dhcp import DHCP

    return {o[0]: o[1] for o in reply[DHCP].options if isinstance(o, tuple)} if DHCP in reply else {}


def _scapy_dora(serve: Serve) -> str | None:
    from scapy.layers.dhcp import BOOTP, DHCP

    node = serve.node[DHCP_CLIENT_NODE]
    mac = bytes.fromhex(node.mac.replace(":", ""))
    xid = random.Random().getrandbits(32)
    pxe = [("vendor_class_id", fz.PXE_VENDOR)]
    offer = _scapy_exchange(serve.ports["dhcp"], BOOTP(op=1, chaddr=mac, xid=xid) / DHCP(
        options=[("message-type", "discover"), *pxe, "end"]), xid)
    if offer is None or _dhcp_options(offer).get("message-type") != 2 or offer.yiaddr != str(node.ip):
        return f"no OFFER of {node.ip} to a scapy DISCOVER: {offer.summary() if offer else None}"
    ack = _scapy_exchange(serve.ports["dhcp"], BOOTP(op=1, chaddr=mac, xid=xid) / DHCP(
        options=[("message-type", "request"), ("requested_addr", str(node.ip)),
                 ("server_id", _dhcp_options(offer).get("server_id")), *pxe, "end"]), xid)
    if ack is None or _dhcp_options(ack).get("message-type") != 5 or ack.yiaddr != str(node.ip):
        return f"no ACK of {node.ip} to a scapy REQUEST: {ack.summary() if ack else None}"
    return None


def _proxy_client(serve: Serve) -> str | None:
    """A PXE REQUEST to the ProxyDHCP port built by scapy; its ACK decoded by scapy."""
    from scapy.layers.dhcp import BOOTP, DHCP

    node = serve.node[DHCP_CLIENT_NODE]
    xid = random.Random().getrandbits(32)
    req = BOOTP(op=1, chaddr=bytes.fromhex(node.mac.replace(":", "")), xid=xid, ciaddr=str(node.ip)) / DHCP(
        options=[("message-type", "request"), ("vendor_class_id", fz.PXE_VENDOR), "end"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(bytes(req), ("127.0.0.1", serve.ports["pxe"]))
        try:
            while True:
                data, _ = s.recvfrom(4096)
                ack = BOOTP(data)
                if ack.xid == xid:
                    break
        except TimeoutError:
            return "no answer to a PXE REQUEST on the ProxyDHCP port"
    opts = {o[0]: o[1] for o in ack[DHCP].options if isinstance(o, tuple)}
    if ack.op != 2 or opts.get("message-type") != 5 or not ack.file.rstrip(b"\0"):
        return f"the ProxyDHCP answer is not an ACK with a boot file: {ack.summary()} {opts}"
    return None


def _replay_datagrams(serve: Serve, window: list[tuple[str, bytes]], probe: Callable[[socket.socket, str], bool]) -> str:
    """Send each datagram of ``window`` to a fresh process, a probe after each: which one kills it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as p:
        s.bind(("127.0.2.9", 0))
        p.bind(("127.0.0.1", 0))
        for i, (where, pkt) in enumerate(window):
            s.sendto(pkt, ("127.0.0.1", serve.ports[where]))
            if not probe(p, where) and not serve.alive():
                return f"reproduced alone in a fresh process: input {i} of the window, to the {where} port: {short(pkt)}"
    return f"not reproduced datagram by datagram; the {len(window)} inputs since the last good probe were: " + \
        short([(w, pkt) for w, pkt in window[-5:]], 2500)


@pytest.mark.parametrize("n", TIERS)
def test_fuzz_dhcp(serve, n):
    """DHCP server and ProxyDHCP ports: N mutated requests processed, a real client served after each batch."""
    serve.ensure()
    m, out = mark(serve), Outcome("dhcp", n)
    rng = random.Random(f"{SEED}-dhcp-{n}")
    targets = _dhcp_targets(serve)
    node = serve.node[DHCP_CLIENT_NODE]
    probe_mac, probe_ip = bytes.fromhex(node.mac.replace(":", "")), int(node.ip)

    def probe(sock: socket.socket, where: str) -> bool:
        # ciaddr only on the PXE port: on the server port a set ciaddr sends the answer there, not back to us
        ok = _dhcp_probe(sock, serve.ports[where], probe_mac, rng.getrandbits(32), pxe_port=where == "pxe",
                         ciaddr=probe_ip if where == "pxe" else 0) is not None
        processed.own += ok
        return ok

    processed = Counted(serve, lambda ms: metric_sum("bootorch_dhcp_packets_total", direction="in")(ms) + sum(
        metric_sum("bootorch_dhcp_events_total", event=e)(ms) for e in ("malformed", "dropped_not_request", "dropped_no_type")))
    fuzz = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fuzz.bind(("127.0.2.1", 0))
    fuzz.setblocking(False)
    prober = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    prober.bind(("127.0.0.1", 0))
    try:
        pace, next_check, refresh_at = 200, BATCH[n], 2_000
        deadline = time.monotonic() + BUDGET[n]
        while out.processed < n and len(out.crashes) < MAX_CRASHES:
            if time.monotonic() > deadline:
                out.problems.append(f"time budget of {BUDGET[n]:g} s spent")
                break
            window = []
            for _ in range(pace):
                where = "pxe" if rng.random() < 0.2 else "dhcp"
                pkt = fz.dhcp_packet(rng, targets, pxe_port=where == "pxe")
                try:
                    fuzz.sendto(pkt, ("127.0.0.1", serve.ports[where]))
                except BlockingIOError:
                    _drain(fuzz)
                    fuzz.sendto(pkt, ("127.0.0.1", serve.ports[where]))
                except OSError:
                    pass  # EMSGSIZE for the rare oversized one
                window.append((where, pkt))
                out.inputs += 1
            _drain(fuzz)
            if not (probe(prober, "dhcp") and probe(prober, "pxe")):
                if serve.alive():
                    out.problems.append(f"the DHCP server stopped answering (alive) after: {short(window[-3:])}")
                    break
                how = serve.ensure()
                culprit = _replay_datagrams(serve, window, probe)
                out.crash(serve, f"DHCP: {culprit}", how)
                continue
            if out.inputs >= n or out.inputs >= refresh_at:  # enough yet? (not all that is sent is processed)
                refresh_at = out.inputs + 2_000  # often: the count since the last read is lost in a crash
                out.processed = processed.value()
            if out.inputs >= next_check:
                next_check += BATCH[n]
                out.processed = processed.value()
                for problem in (processed.around(lambda: _dhcp_client(serve)), processed.around(lambda: _proxy_client(serve))):
                    if problem:
                        out.problems.append(f"after {out.inputs} inputs: {problem}")
                if out.problems:
                    break
        if serve.alive():
            out.processed = processed.value()
            for problem in (processed.around(lambda: _dhcp_client(serve)), processed.around(lambda: _proxy_client(serve))):
                if problem:
                    out.problems.append(f"at the end: {problem}")
    finally:
        fuzz.close()
        prober.close()
        _finish(serve, out, m)
    out.verdict()


# --------------------------------------------------------------------------- TFTP

#: Where TFTP fuzz comes from: the fuzz nodes' own addresses (so that file names become those
#: nodes' evidence: events, transitions, the journal) and eight others. 16 addresses at the
#: server's 8 transfers per client stay under its 200 transfer slots, which the real clients share.
TFTP_SOURCES = [f"127.77.0.{i}" for i in range(11, 19)] + [f"127.0.1.{i}" for i in range(1, 9)]


def _tftp_names(serve: Serve) -> tuple[bytes, ...]:
    mac = serve.node[FUZZ_NODES[0]].mac.replace(":", "-")
    return (b"pxelinux.0", b"vmlinuz", b"rootfs.gz", b"small.bin", f"pxelinux.cfg/01-{mac}".encode(), b"missing.bin")


def _tftp_clients(serve: Serve) -> str | None:
    """curl and tftp-hpa's tftp download vmlinuz byte-identical; None when both did."""
    want = hashlib.sha256((serve.base / "root" / "vmlinuz").read_bytes()).hexdigest()
    port = serve.ports["tftp"]
    curl = require_tool("curl")
    cp = subprocess.run([curl, "-sS", "--max-time", "20", f"tftp://127.0.0.1:{port}/vmlinuz"], capture_output=True, timeout=60)
    if cp.returncode != 0 or hashlib.sha256(cp.stdout).hexdigest() != want:
        return f"curl tftp:// did not get vmlinuz (exit {cp.returncode}, {len(cp.stdout)} bytes): {cp.stderr[-300:]!r}"
    tftp = require_tool("tftp")
    dest = serve.base / "tftp-hpa.out"
    dest.unlink(missing_ok=True)
    cp = subprocess.run([tftp, "-m", "binary", "127.0.0.1", str(port), "-c", "get", "vmlinuz", str(dest)],
                        capture_output=True, timeout=60, cwd=serve.base)
    got = hashlib.sha256(dest.read_bytes()).hexdigest() if dest.exists() else None
    if got != want:
        return f"tftp-hpa did not get vmlinuz (exit {cp.returncode}): {cp.stdout[-300:]!r} {cp.stderr[-300:]!r}"
    return None


def _tftp_probe(sock: socket.socket, port: int, k: int, timeout: float = 2.0, tries: int = 3) -> bool:
    """An RRQ for a missing file gets its ERROR: the listening socket has read everything sent before.

    Sent again like a client's retransmission (``tries`` times): right after a
    burst the listening socket's receive buffer may be full and drop it.
    """
    for _ in range(tries):
        sock.sendto(b"\x00\x01fuzz-probe-%d\x00octet\x00" % k, ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65536)
            except TimeoutError:
                break
            if data[:2] == b"\x00\x05":
                return True
    return False


@pytest.mark.parametrize("n", TIERS)
def test_fuzz_tftp(serve, n):
    """TFTP listen port and live transfers' ports: N datagrams processed, curl and tftp-hpa still served."""
    serve.ensure()
    m, out = mark(serve), Outcome("tftp", n)
    rng = random.Random(f"{SEED}-tftp-{n}")
    names = _tftp_names(serve)
    real = [nm for nm in names if nm != b"missing.bin"]
    processed = Counted(serve, metric_sum("bootorch_tftp_packets_total", direction="in"))

    def udp(ip: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.setblocking(False)
        return s

    # Each request comes from a new port, as a client's would (a request from the port of a
    # running transfer is that transfer's retransmission); the port stays open while the
    # server runs a transfer to it. One more socket per address is the "wrong TID".
    wrong = {ip: udp(ip) for ip in TFTP_SOURCES}
    fresh: list[socket.socket] = []  # asked, no answer read yet
    live: dict[tuple[socket.socket, tuple], float] = {}  # (client socket, server TID) -> first seen
    prober = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    prober.bind(("127.0.0.1", 0))
    k = 0
    reset = NodeReset(serve, rng)

    def end(sock: socket.socket, addr: tuple) -> None:
        try:
            sock.sendto(fz.tftp_error(), addr)  # as a client gives up: an ERROR from its TID
        except OSError:
            pass
        if not any(s is sock for s, _ in live):
            sock.close()

    def harvest() -> None:
        keep = []
        for s in fresh:
            got = False
            for data, addr in _drain(s):
                if data[:2] == b"\x00\x05":  # an ERROR's text is shown to whoever runs the client
                    for h in fz.raw_controls(data[4:].rstrip(b"\x00")):
                        out.raw.append(f"TFTP ERROR message: {h}")
                if addr[1] != serve.ports["tftp"] and data[:2] in (b"\x00\x03", b"\x00\x06"):
                    live.setdefault((s, addr), time.monotonic())
                    got = True
            if got:
                continue
            keep.append(s) if len(keep) < 64 else s.close()
        fresh[:] = keep
        for s in {s for s, _ in live}:
            _drain(s)
        while len(live) > 48:  # the oldest transfers end
            (s, addr), _ = next(iter(live.items()))
            del live[(s, addr)]
            end(s, addr)

    try:
        deadline = time.monotonic() + BUDGET[n]
        next_check = BATCH[n]
        refresh_at = 2_000
        while out.processed < n and len(out.crashes) < MAX_CRASHES:
            if time.monotonic() > deadline:
                out.problems.append(f"time budget of {BUDGET[n]:g} s spent")
                break
            window: list[tuple[str, bytes]] = []
            for j in range(128):
                if rng.random() < 0.5 or not live:
                    sock = udp(rng.choice(TFTP_SOURCES))
                    fresh.append(sock)
                    pkt = fz.tftp_request(rng, names) if live and rng.random() < 0.8 else \
                        b"\x00\x01" + rng.choice(real) + b"\x00octet\x00" + (b"timeout\x00255\x00" if rng.random() < 0.1 else b"")
                    dest = ("127.0.0.1", serve.ports["tftp"])
                    window.append(("tftp", pkt))
                else:
                    (sock, dest) = rng.choice(list(live))
                    if rng.random() < 0.2:
                        sock = wrong[sock.getsockname()[0]]
                    pkt = fz.tftp_transfer_packet(rng)
                    window.append(("transfer", pkt))
                try:
                    sock.sendto(pkt, dest)
                except OSError:
                    pass  # a full buffer or an oversized datagram: not counted by the server either
                out.inputs += 1
                if j % 32 == 31:
                    harvest()
            harvest()
            reset()
            k += 1
            if _tftp_probe(prober, serve.ports["tftp"], k):
                processed.own += 1
            else:
                if serve.alive():
                    out.problems.append(f"the TFTP server stopped answering requests (alive) after: {short(window[-3:])}")
                    break
                how = serve.ensure()
                for s, _ in live:
                    s.close()
                live.clear()
                listen_only = [(w, p) for w, p in window if w == "tftp"]
                culprit = _replay_datagrams(serve, listen_only, lambda s, w: _tftp_probe(s, serve.ports["tftp"], rng.randrange(10**9)))
                out.crash(serve, f"TFTP: {culprit} (transfer-port inputs of the window: "
                                 f"{short([p for w, p in window if w == 'transfer'][-5:])})", how)
                continue
            if out.inputs >= n or out.inputs >= refresh_at:  # enough yet? (not all that is sent is processed)
                refresh_at = out.inputs + 2_000  # often: the count since the last read is lost in a crash
                out.processed = processed.value()
            if out.inputs >= next_check:
                next_check += BATCH[n]
                out.processed = processed.value()
                problem = processed.around(lambda: _tftp_clients(serve))
                if problem:
                    out.problems.append(f"after {out.inputs} inputs: {problem}")
                    break
        for (s, addr) in list(live):
            del live[(s, addr)]
            end(s, addr)
        if serve.alive():
            out.processed = processed.value()
            problem = processed.around(lambda: _tftp_clients(serve))
            if problem:
                out.problems.append(f"at the end: {problem}")
    finally:
        for s in [*wrong.values(), *fresh, *(s for s, _ in live)]:
            s.close()
        prober.close()
        reset.close()
        _finish(serve, out, m)
    out.verdict()


# --------------------------------------------------------------------------- HTTP

HTTP_SOURCES = [f"127.77.0.{i}" for i in range(11, 19)] + [f"127.0.3.{i}" for i in range(1, 5)]


class NodeReset:
    """Sends a fuzz node's PXE DISCOVER now and then, so that its next file read is evidence again.

    The tracker only moves forward within a boot attempt; a PXE DHCP seen at
    ``kernel`` or later starts a new one. Without this, a fuzz node reaches
    ``initrd`` after a few reads and no later file name it reads is journaled.
    """

    def __init__(self, serve: Serve, rng: random.Random) -> None:
        self.serve, self.rng = serve, rng
        self.macs = [bytes.fromhex(serve.node[n].mac.replace(":", "")) for n in FUZZ_NODES]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    def __call__(self) -> None:
        _drain(self.sock)
        try:
            discover = fz.dhcp_probe(self.rng.choice(self.macs), self.rng.getrandbits(32))
            self.sock.sendto(discover, ("127.0.0.1", self.serve.ports["dhcp"]))
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _http_names(serve: Serve) -> tuple[bytes, ...]:
    mac = serve.node[FUZZ_NODES[0]].mac.replace(":", "-")
    small = (b"pxelinux.0", b"small.bin", f"ipxe/{mac}.ipxe".encode(), f"pxelinux.cfg/01-{mac}".encode(), b"missing", b"")
    return small * 3 + (b"vmlinuz",)


def _http_client(serve: Serve) -> str | None:
    curl = require_tool("curl")
    port = serve.ports["http"]
    for name in ("pxelinux.0", "vmlinuz"):
        cp = subprocess.run([curl, "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/{name}"], capture_output=True, timeout=60)
        if cp.returncode != 0 or cp.stdout != (serve.base / "root" / name).read_bytes():
            return f"curl http:// did not get {name} (exit {cp.returncode}, {len(cp.stdout)} bytes): {cp.stderr[-300:]!r}"
    return None


def _http_connection(src: str, port: int, reqs: list[bytes], *, hold: list[socket.socket] | None = None) -> str | None:
    """Send pipelined requests on one connection, half-close, read to EOF; a problem or None."""
    s = socket.socket()
    try:
        s.bind((src, 0))
        s.settimeout(20)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            return f"cannot connect: {e}"
        try:
            s.sendall(b"".join(reqs))
        except (BrokenPipeError, ConnectionResetError):
            return None  # closed on an early request: allowed
        if hold is not None:
            hold.append(s)  # a half request left open, like a slowloris
            s = None
            return None
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # ENOTCONN: the server already closed (after an error answer); read what it sent
        try:
            while s.recv(262144):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return f"the server neither answered nor closed within 20 s after: {short(reqs)}"
        return None
    finally:
        if s is not None:
            s.close()


@pytest.mark.parametrize("n", TIERS)
def test_fuzz_http(serve, n):
    """HTTP: N hostile requests (pipelined) answered, curl still served byte-identical files after each batch."""
    serve.ensure()
    m, out = mark(serve), Outcome("http", n)
    rng = random.Random(f"{SEED}-http-{n}")
    names = _http_names(serve)
    host = b"127.0.0.1:%d" % serve.ports["http"]
    processed = Counted(serve, metric_sum("bootorch_http_responses_total"))
    internal = Counted(serve, metric_sum("bootorch_http_internal_errors_total"))
    internal_seen = 0
    held: list[socket.socket] = []
    reset = NodeReset(serve, rng)
    conns = 0
    try:
        deadline = time.monotonic() + BUDGET[n]
        next_check = BATCH[n]
        refresh_at = 2_000
        batch: list[tuple[str, list[bytes]]] = []
        while out.processed < n and len(out.crashes) < MAX_CRASHES:
            if time.monotonic() > deadline:
                out.problems.append(f"time budget of {BUDGET[n]:g} s spent")
                break
            reqs = fz.http_connection(rng, names, host)
            conns += 1
            if conns % 16 == 0:
                reset()
            src = rng.choice(HTTP_SOURCES)
            hold = held if rng.random() < 0.005 and len(held) < 16 else None
            problem = _http_connection(src, serve.ports["http"], reqs, hold=hold)
            out.inputs += len(reqs)
            batch.append((src, reqs))
            if problem:
                if serve.died():
                    out.crash(serve, f"HTTP: the connection being served when it died: {short(reqs)}")
                    continue
                out.problems.append(problem)
                break
            if out.inputs >= n or out.inputs >= refresh_at:  # enough yet? (not all that is sent is processed)
                refresh_at = out.inputs + 2_000  # often: the count since the last read is lost in a crash
                out.processed = processed.value()
            if out.inputs >= next_check:
                next_check += BATCH[n]
                for s in held:
                    s.close()
                held.clear()
                if not serve.alive():
                    out.crash(serve, f"HTTP: died during the last batch; its last connection: {short(reqs)}")
                    batch.clear()
                    continue
                out.processed = processed.value()
                if internal.value() > internal_seen:
                    internal_seen = internal.value()
                    out.problems.append(_find_internal_error(serve, batch))
                batch.clear()
                problem = processed.around(lambda: _http_client(serve))
                if problem:
                    out.problems.append(f"after {out.inputs} inputs: {problem}")
                    break
        for s in held:
            s.close()
        if serve.alive():
            out.processed = processed.value()
            problem = processed.around(lambda: _http_client(serve))
            if problem:
                out.problems.append(f"at the end: {problem}")
    finally:
        reset.close()
        _finish(serve, out, m)
    out.verdict()


def _find_internal_error(serve: Serve, batch: list[tuple[str, list[bytes]]]) -> str:
    """Replay a batch connection by connection until the internal-error counter moves: that connection."""
    read = metric_sum("bootorch_http_internal_errors_total")
    before = read(serve.metrics())
    for src, reqs in batch:
        _http_connection(src, serve.ports["http"], reqs)
        if read(serve.metrics()) > before:
            return f"HTTP internal error (a contained bug) on: {short(reqs)}"
    return "HTTP internal errors during a batch, not reproduced connection by connection"


# --------------------------------------------------------------------------- control API


def _control_where(serve: Serve, transport: str) -> tuple[str, Any]:
    return ("unix", str(serve.socket_path)) if transport == "unix" else ("tcp", ("127.0.0.1", serve.control_port))


#: Requests in flight at once on the control API (the generator and the server overlap). On
#: TCP not more than the server's per-client cap (4): it closes a fifth connection unanswered.
CONTROL_INFLIGHT = {"unix": 6, "tcp": 4}


def _control_send(where: tuple[str, Any], wire: bytes) -> tuple[list[bytes], OSError | None]:
    try:
        return control_exchange(where, wire), None
    except OSError as e:
        return [], e


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("n", TIERS)
def test_fuzz_control(serve, n, transport):
    """Control API: N hostile requests per transport, each answered with JSON lines; ping and `bootorch status` work after each batch.

    Never a request that could act: every input passes :func:`fz.control_may_act`
    first (an acting one gets an unknown node name added). On TCP most requests
    carry the right token, so the requests get past the token check.
    """
    serve.ensure()
    m, out = mark(serve), Outcome(f"control-{transport}", n)
    rng = random.Random(f"{SEED}-control-{transport}-{n}")
    names = [nd.name for nd in serve.plan.nodes]
    token = TOKEN if transport == "tcp" else (TOKEN if rng.random() < 0.1 else None)
    unanswered = 0
    inflight: deque[tuple[Future, bytes]] = deque()

    def settle(fut: Future, wire: bytes) -> None:
        nonlocal unanswered
        lines, err = fut.result()
        if lines == [CLOSED_WHILE_SENDING] and serve.alive():
            out.processed += 1  # refused the framing (a line over the limit) and closed: an answer too
            return
        answers = []
        for ln in lines:
            try:
                answers.append(json.loads(ln))
            except ValueError:
                out.problems.append(f"an answer line is not JSON: {short(ln)} (request {short(wire)})")
        if answers and all(isinstance(a, dict) and "event" in a for a in answers):
            out.processed += 1
            for a in answers:
                if a.get("event") == "accepted" and a.get("acting"):
                    out.problems.append(f"a fuzz request was ACCEPTED and acts on {a['acting']}: {short(wire)}")
            for ln in lines:
                for h in fz.raw_controls(ln):
                    out.raw.append(f"control answer: {h}")
        elif serve.died():
            others = [w for _, w in inflight]
            for f, _ in inflight:  # answered or not, they raced the crash
                f.result()
            inflight.clear()
            out.crash(serve, f"control/{transport}: the request being answered when it died ({len(wire)} bytes): {short(wire)}"
                             + (f"; also in flight: {short(others, 1500)}" if others else ""))
        else:
            unanswered += 1
            if unanswered <= 5:
                out.problems.append(f"control/{transport}: no answer ({err!r}) to ({len(wire)} bytes): {short(wire)}")

    try:
        deadline = time.monotonic() + BUDGET[n]
        next_check = BATCH[n]
        with ThreadPoolExecutor(CONTROL_INFLIGHT[transport]) as pool:
            while out.processed + len(inflight) < out.n and len(out.crashes) < MAX_CRASHES:
                if time.monotonic() > deadline:
                    out.problems.append(f"time budget of {BUDGET[n]:g} s spent")
                    break
                data, newline = fz.control_request(rng, names, token)
                if fz.control_may_act(data, newline, names):
                    data = fz.make_harmless(data, newline, names)
                    newline = True
                    assert not fz.control_may_act(data, newline, names)
                wire = data + (b"\n" if newline else b"")
                out.inputs += 1
                inflight.append((pool.submit(_control_send, _control_where(serve, transport), wire), wire))
                while len(inflight) >= CONTROL_INFLIGHT[transport]:
                    settle(*inflight.popleft())
                if out.inputs >= next_check:
                    next_check += BATCH[n]
                    while inflight:
                        settle(*inflight.popleft())
                    problem = _control_checks(serve) if serve.alive() else None
                    if problem:
                        out.problems.append(f"after {out.inputs} inputs: {problem}")
                        break
            while inflight:
                settle(*inflight.popleft())
        if unanswered > 5:
            out.problems.append(f"control/{transport}: {unanswered} requests in all got no answer (the first 5 are above)")
        if serve.alive():
            problem = _control_checks(serve)
            if problem:
                out.problems.append(f"at the end: {problem}")
    finally:
        _finish(serve, out, m)
    out.verdict()


def _control_checks(serve: Serve) -> str | None:
    pong = ping(serve.socket_path)
    if pong is None or pong.get("pid") != serve.proc.pid:
        return f"no pong from serve on the control socket: {pong!r}"
    tcp = control_exchange(("tcp", ("127.0.0.1", serve.control_port)), json.dumps({"op": "ping", "token": TOKEN}).encode() + b"\n")
    if not any(b'"pong"' in ln for ln in tcp):
        return f"no pong on TCP with the token: {tcp!r}"
    cp = subprocess.run([EXE, "status", str(serve.plan_path)], capture_output=True, timeout=60)
    if cp.returncode != 0:
        return f"bootorch status exited {cp.returncode}: {cp.stderr[-500:]!r}"
    return None


# --------------------------------------------------------------------------- logs

FILLER = b"\n" + b"#" * 1100 + b"\n"  # ends a partial line, and any multi-line Kea value still being read


def _ts_syslog(t: float) -> str:
    lt = time.localtime(t)
    return time.strftime("%b ", lt) + f"{lt.tm_mday:2d}" + time.strftime(" %H:%M:%S", lt)


def _ts_kea(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _isc_mac(mac: str) -> str:
    return ":".join(f"{int(p, 16):x}" for p in mac.split(":"))


def sentinel(kind: str, node, stage: str, k: int) -> tuple[list[str], str]:
    """Well-formed lines for ``node`` that move it out of ``stage``, and the stage they move it to."""
    t = time.time()
    sy, ke, mac, ip = _ts_syslog(t), _ts_kea(t), node.mac, str(node.ip)
    if kind == "tftp-hpa":
        files = {"pending": "pxelinux.0", "loader": f"pxelinux.cfg/01-{mac.replace(':', '-')}", "config": "vmlinuz",
                 "kernel": "rootfs.gz"}
        nxt = {"pending": "loader", "loader": "config", "config": "kernel", "kernel": "initrd"}
        return [f"{sy} bootsrv daemon.notice in.tftpd[{7000 + k}]: RRQ from {ip} filename {files[stage]}"], nxt[stage]
    pxe = stage != "pxe_dhcp"  # pxe_dhcp -> os_dhcp (an OS DHCP); anything else -> pxe_dhcp (new attempt after os_dhcp)
    to = "pxe_dhcp" if pxe else "os_dhcp"
    xid = 770000 + k
    if kind == "dnsmasq":
        lines = ([f"{sy} dnsmasq-dhcp[4690]: {xid} vendor class: PXEClient:Arch:00000:UNDI:002001"] if pxe else []) + \
            [f"{sy} dnsmasq-dhcp[4690]: {xid} DHCPDISCOVER(eth0) {mac} "]
    elif kind in ("iscdhcpd", "syslog"):
        info = "arch 0 user-class - vendor-class PXEClient:Arch:00000:UNDI:002001" if pxe else "arch - user-class - vendor-class -"
        lines = [f"{sy} bootsrv daemon.info dhcpd[4954]: bootorch-pxe mac {_isc_mac(mac)} {info}",
                 f"{sy} bootsrv daemon.info dhcpd[4954]: DHCPDISCOVER from {mac} via eth0"]
    else:  # kea
        head = f"[hwtype=1 {mac}], cid=[01:{mac}], tid=0x{xid:x}"
        classes = "ALL, VENDOR_CLASS_PXEClient:Arch:00000:UNDI:002001, KNOWN" if pxe else "ALL, KNOWN"
        lines = [f"{ke} DEBUG [kea-dhcp4.packets/5117.1] DHCP4_PACKET_RECEIVED {head}: DHCPDISCOVER (type 1) received from "
                 "0.0.0.0 to 255.255.255.255 on interface eth0",
                 f"{ke} DEBUG [kea-dhcp4.dhcp4/5117.1] DHCP4_CLASS_ASSIGNED {head}: client packet has been assigned to the "
                 f"following class(es): {classes}",
                 f"{ke} INFO  [kea-dhcp4.leases/5117.1] DHCP4_LEASE_ADVERT {head}: lease {ip} will be advertised"]
    return lines, to


def _stages(serve: Serve) -> dict[str, str]:
    """Each node's stage from the journal (its last transition)."""
    out = {nd.name: "pending" for nd in serve.plan.nodes}
    if serve.db_path.exists():
        with sqlite3.connect(f"file:{serve.db_path}?mode=ro", uri=True, timeout=10) as con:
            for node, stage in con.execute("SELECT node, to_stage FROM transitions t "
                                           "WHERE id = (SELECT MAX(id) FROM transitions WHERE mac = t.mac)"):
                out[node] = stage
    return out


@pytest.mark.parametrize("n", TIERS)
def test_fuzz_logs(serve, n):
    """Followed daemon logs: N hostile lines parsed; a well-formed line after each round still moves its node's stage."""
    serve.ensure()
    m, out = mark(serve), Outcome("logs", n)
    rng = random.Random(f"{SEED}-logs-{n}")
    macs = [serve.node[x].mac for x in FUZZ_NODES]
    ips = [str(serve.node[x].ip) for x in FUZZ_NODES] + ["10.88.0.5"]
    stages = _stages(serve)
    per_round = max(1, min(2_000, n // (2 * len(fz.LOG_KINDS))))
    k = 0
    expect: dict[str, str] = {}
    try:
        deadline = time.monotonic() + BUDGET[n]
        while out.processed < n and len(out.crashes) < MAX_CRASHES:
            if time.monotonic() > deadline:
                out.problems.append(f"time budget of {BUDGET[n]:g} s spent")
                break
            rounds: dict[str, list[bytes]] = {}
            waits: list[tuple[str, str, str]] = []  # (kind, node, to)
            at = serve.out_path.stat().st_size
            for kind in fz.LOG_KINDS:
                lines = [fz.log_line(rng, kind, macs, ips) for _ in range(per_round)]
                rounds[kind] = lines
                if kind == "tftp-hpa":
                    node = next((x for x in TFTP_SENTINEL_NODES if stages[x] in ("pending", "loader", "config", "kernel")), None)
                    if node is None:
                        pytest.fail("all tftp-hpa sentinel nodes are used up: add nodes to the plan")
                else:
                    node = LOG_SENTINEL_NODE[kind]
                k += 1
                good, to = sentinel(kind, serve.node[node], stages[node], k)
                with open(serve.logs[kind], "ab") as f:
                    f.write(b"".join(lines) + FILLER + "".join(x + "\n" for x in good).encode())
                waits.append((kind, node, to))
                out.inputs += per_round
            missing = _wait_transitions(serve, at, [(node, to) for _, node, to in waits], timeout=30)
            for kind, node, to in waits:
                if (node, to) in missing:
                    continue
                stages[node] = to
                expect[node] = to
                out.processed += len(rounds[kind])
            if missing:
                if not serve.alive():
                    suspects = [kind for kind, node, to in waits if (node, to) in missing]
                    out.crash(serve, "logs: " + _log_culprit(serve, rounds, suspects))
                    stages = _stages(serve)
                    continue
                out.problems.append(f"a well-formed line did not move its node within 30 s after a round of hostile lines: "
                                    f"{sorted(missing)}; the round's last lines: " +
                                    "; ".join(f"{kind}: {short(rounds[kind][-3:])}"
                                              for kind, node, to in waits if (node, to) in missing))
                break
    finally:
        cli = _finish(serve, out, m)
    if "status --json" in cli and cli["status --json"].returncode == 0:
        shown = {r["node"]: r["stage"] for r in json.loads(cli["status --json"].stdout)["nodes"]}
        for node, to in expect.items():
            if shown.get(node) != to:
                out.problems.append(f"bootorch status --json shows {node} at {shown.get(node)!r}, "
                                    f"its last log line moved it to {to!r}")
    out.verdict()


def _wait_transitions(serve: Serve, at: int, want: list[tuple[str, str]], timeout: float) -> set[tuple[str, str]]:
    """Wait until serve printed ``NODE FROM -> TO`` for each (node, to); the ones still missing."""
    missing = set(want)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline and serve.alive():
        text = serve.out_path.read_bytes()[at:].decode(errors="replace")
        for node, to in list(missing):
            if re.search(rf"^{node} \w+ -> {to} ", text, re.M):
                missing.discard((node, to))
        if missing:
            time.sleep(0.05)
    return missing


def _log_culprit(serve: Serve, rounds: dict[str, list[bytes]], kinds: list[str]) -> str:
    """The first line that kills a fresh process, by bisection over each suspect log's round."""
    for kind in kinds:
        lines = rounds[kind]
        if not _log_kills(lines, kind):
            continue
        lo, hi = 1, len(lines)  # the shortest prefix that kills it
        while lo < hi:
            mid = (lo + hi) // 2
            if _log_kills(lines[:mid], kind):
                hi = mid
            else:
                lo = mid + 1
        alone = _log_kills(lines[lo - 1:lo], kind)
        return (f"{kind} log line {lo - 1} of the round kills a fresh serve"
                f"{' on its own' if alone else ' (after the lines before it)'}: {short(lines[lo - 1], 3000)}")
    return "the round's lines, written again to a fresh serve, do not kill it; stderr: " + serve.err_tail(1500)


def _log_kills(lines: list[bytes], kind: str) -> bool:
    base = Path(tempfile.mkdtemp(prefix="bootorch-fuzz-bisect-"))
    s = Serve(base)
    try:
        s.start()
        node = s.node[LOG_SENTINEL_NODE.get(kind, TFTP_SENTINEL_NODES[0])]
        good, to = sentinel(kind, node, "pending", 1)
        at = s.out_path.stat().st_size
        with open(s.logs[kind], "ab") as f:
            f.write(b"".join(lines) + FILLER + "".join(x + "\n" for x in good).encode())
        _wait_transitions(s, at, [(node.name, to)], timeout=15)
        return not s.alive()
    finally:
        s.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- targeted abuse

VICTIM_NODE = "node09"  # no fuzzer and no check names it: pending until this test


def test_abuse_inform_with_another_nodes_address_does_not_take_its_file_reads(serve):
    """A DHCPINFORM from one plan node's MAC claiming another node's reserved address (ciaddr) must not
    make that node's TFTP reads the claimer's evidence: the plan's reservations say whose address it is.

    Otherwise a hostile client moves the wrong node, and the node that really boots looks stuck to the
    scheduler's escalation ladder (which power-cycles stuck nodes).
    """
    serve.ensure()
    victim, claimer = serve.node[VICTIM_NODE], serve.node[FUZZ_NODES[-1]]
    hdr = struct.pack("!BBBBIHHIIII16s64s128s", 1, 1, 6, 0, 0x1F0F, 0, 0, int(victim.ip), 0, 0, 0,
                      bytes.fromhex(claimer.mac.replace(":", "")) + bytes(10), bytes(64), bytes(128))
    inform = hdr + b"\x63\x82\x53\x63" + bytes([53, 1, 8, 255])
    at = serve.out_path.stat().st_size
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        u.settimeout(5)
        u.sendto(inform, ("127.0.0.1", serve.ports["dhcp"]))
        # the ACK goes to ciaddr:68 (RFC 2131 4.3.5), not to us; wait for serve to print it
        deadline = time.monotonic() + 10
        while b"-> ACK " + claimer.mac.encode() not in serve.out_path.read_bytes()[at:] and time.monotonic() < deadline:
            time.sleep(0.02)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
        t.bind((str(victim.ip), 0))
        t.settimeout(5)
        t.sendto(b"\x00\x01vmlinuz\x00octet\x00", ("127.0.0.1", serve.ports["tftp"]))
        data, tid = t.recvfrom(65536)
        assert data[:2] == b"\x00\x03", data
        t.sendto(fz.tftp_error(), tid)
    missing = _wait_transitions(serve, at, [(VICTIM_NODE, "kernel")], timeout=5)
    text = serve.out_path.read_bytes()[at:].decode(errors="replace")
    assert not missing, (f"{VICTIM_NODE}'s read of vmlinuz from its own address {victim.ip} did not move it; serve printed:\n"
                         + "\n".join(ln for ln in text.splitlines() if " -> " in ln and "dhcp" not in ln[:5]))
