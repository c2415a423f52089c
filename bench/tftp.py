#!/usr/bin/env python3
"""TFTP benchmark: our server side by side with tftpd-hpa, dnsmasq and atftpd.

One run starts every server, then interleaves them case by case (same clients,
same files, same moment) so machine noise hits them alike:

* ``lockstep``   -- one curl client, 32 MiB, ``--tftp-blksize`` 512 / 1468 / 8192.
* ``window``     -- one atftp client (Debian's atftp 0.8 speaks RFC 7440:
                    ``--option "windowsize N"``), 32 MiB, blksize 1468, windowsize
                    1 / 16 / 64. tftpd-hpa and dnsmasq ignore the option and
                    answer lock-step, which is the point of comparison.
* ``concurrent`` -- 50 curl clients at once, 16 MiB each, blksize 1468:
                    aggregate MB/s, slowest client, failures.
* ``rtt``        -- ``lockstep`` and ``window`` again across a link with 0.5 ms
                    round trip between two namespaces (server in one, client in
                    the other). See ``orchestrator/lab/netns.py`` for how the
                    delay is made when the kernel has no netem.

Every download is checked byte for byte (sha256). For every run the server's
CPU time (user+sys, its own and reaped children's, from ``/proc/PID/stat``) is
recorded, so packets per CPU-second -- and the share of a core that 81 000
packets/s (1 GbE of 1468-byte blocks) would cost -- can be judged.

Safety: as root, everything runs inside network namespaces this script creates
(loopback of a private namespace; a private link between two more), which are
deleted at the end, also on failure or Ctrl-C; servers and clients are killed by
PID. Without root it runs on 127.0.0.1 in the current namespace and skips
dnsmasq (which can only listen on port 69) and the RTT scenario. Every transfer
has a timeout and the whole run a deadline (``--deadline-min``).

Usage::

    sudo .venv/bin/python bench/tftp.py                 # full run, table
    sudo .venv/bin/python bench/tftp.py --quick --json  # smoke run, JSON on stdout
    bench/tftp.py --only lockstep,window --servers tftpd-hpa,ours
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.peers import SERVERS  # noqa: E402
from orchestrator.lab.netns import Namespace, NetLab, NetnsError  # noqa: E402

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("lockstep", "window", "concurrent", "rtt")
TARGET_PPS = 81_000  # 1 GbE line rate in 1468-byte blocks
LOOPBACK_PORTS = {"tftpd-hpa": 6901, "atftpd": 6902, "ours": 6903}


# ---------------------------------------------------------------------------------
# Plan of cases
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    single: int
    concurrent: int
    clients: int
    rtt: int
    repeat: int
    rtt_repeat: int


FULL = Sizes(single=32 * MiB, concurrent=16 * MiB, clients=50, rtt=32 * MiB, repeat=3, rtt_repeat=1)
QUICK = Sizes(single=1 * MiB, concurrent=1 * MiB, clients=5, rtt=256 * 1024, repeat=1, rtt_repeat=1)


@dataclass(frozen=True)
class Case:
    scenario: str
    label: str
    client: str  # curl | atftp
    size: int
    blksize: int
    windowsize: int = 1
    clients: int = 1
    topology: str = "lo"  # lo | rtt


def plan(sizes: Sizes, only: set[str]) -> list[Case]:
    """The cases of the selected scenarios, in run order."""

    def singles(topo: str, size: int) -> list[Case]:
        pre = "rtt " if topo == "rtt" else ""
        out = [Case("lockstep" if topo == "lo" else "rtt", f"{pre}curl blksize {bs}", "curl", size, bs, topology=topo)
               for bs in (512, 1468, 8192)]
        out += [Case("window" if topo == "lo" else "rtt", f"{pre}atftp bs 1468 windowsize {ws}", "atftp", size, 1468,
                     ws, topology=topo) for ws in (1, 16, 64)]
        return out

    cases = [c for c in singles("lo", sizes.single) if c.scenario in only]
    if "concurrent" in only:
        cases.append(Case("concurrent", f"{sizes.clients} x curl blksize 1468", "curl", sizes.concurrent, 1468,
                          clients=sizes.clients))
    if "rtt" in only:
        cases += singles("rtt", sizes.rtt)
    return cases


# ---------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime+stime+cutime+cstime of ``pid`` in seconds (threads included, reaped children too)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11].
    return sum(int(x) for x in rest[11:15]) / CLK_TCK


class CpuMeter:
    """CPU seconds of a server *and everything it forks*.

    tftpd-hpa forks a process per transfer and lets the kernel reap it, so its
    children's time never reaches the parent's ``cutime``; a cgroup of our own
    (cgroup v1 ``cpuacct`` or v2 ``cpu.stat``) counts them. Without one (not
    root, no cgroupfs) we fall back to ``/proc/PID/stat``.
    """

    def __init__(self, pid: int, tag: str) -> None:
        self.pid = pid
        self.dir: Path | None = None
        self.kind = "proc"
        for base, kind in ((Path("/sys/fs/cgroup/cpuacct"), "v1"), (Path("/sys/fs/cgroup"), "v2")):
            if kind == "v2" and not (base / "cgroup.controllers").exists():
                continue
            if not base.is_dir() or not os.access(base, os.W_OK):
                continue
            d = base / tag
            try:
                d.mkdir()
                (d / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                with contextlib.suppress(OSError):
                    d.rmdir()
                continue
            self.dir, self.kind = d, kind
            break

    def read(self) -> float:
        if self.dir is not None:
            if self.kind == "v1":
                return int((self.dir / "cpuacct.usage").read_text()) / 1e9
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        return proc_cpu_s(self.pid)

    def close(self) -> None:
        """Remove the cgroup (call after the server's processes are gone)."""
        if self.dir is not None:
            for _ in range(50):
                try:
                    self.dir.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            self.dir = None


def blocks(size: int, blksize: int) -> int:
    return size // blksize + 1  # the last block is short (possibly empty)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Result:
    scenario: str
    label: str
    server: str
    client: str
    topology: str
    size: int
    blksize: int
    windowsize: int
    clients: int
    runs: int = 0
    seconds: float | None = None  # median single-client transfer time, or wall time of the batch
    mb_s: float | None = None  # MB/s (10^6), aggregate for concurrent
    slowest_s: float | None = None
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    server_cpu_s: float | None = None
    server_cores: float | None = None  # cpu seconds / wall seconds
    packets: int = 0
    pps: float | None = None
    pkts_per_cpu_s: float | None = None
    rtt_ms: float | None = None
    emulator_cpu_s: float | None = None
    loadavg_1m: float | None = None  # machine load when the case started (other work skews results)


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, lab: NetLab | None, workdir: Path) -> None:
        self.args = args
        self.lab = lab
        self.sizes = QUICK if args.quick else FULL
        if args.size_mib:
            self.sizes = Sizes(args.size_mib * MiB, args.size_mib * MiB // 2 or MiB, self.sizes.clients,
                               args.size_mib * MiB, self.sizes.repeat, self.sizes.rtt_repeat)
        if args.clients:
            self.sizes = Sizes(**{**asdict(self.sizes), "clients": args.clients})
        if args.repeat:
            self.sizes = Sizes(**{**asdict(self.sizes), "repeat": args.repeat})
        self.work = workdir
        self.root = workdir / "root"
        self.out = workdir / "out"
        self.logs = workdir / "logs"
        self.deadline = time.monotonic() + args.deadline_min * 60
        self.files: dict[int, tuple[str, str]] = {}  # size -> (name, sha256)
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.servers: dict[str, tuple[subprocess.Popen, str, int]] = {}  # name -> (proc, host, port)
        self.meters: dict[str, CpuMeter] = {}
        self.rtt_info: dict[str, object] = {}
        self.emulator_pid: int | None = None

    # -- setup -------------------------------------------------------------------------

    def make_files(self, sizes: set[int]) -> None:
        for d in (self.root, self.out, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        os.chmod(self.root, 0o755)  # tftpd-hpa, dnsmasq and atftpd drop to nobody
        for size in sorted(sizes | {1024}):
            name = "probe.bin" if size == 1024 else f"f{size}.bin"
            path = self.root / name
            h = hashlib.sha256()
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 4 * MiB))
                    f.write(chunk)
                    h.update(chunk)
                    left -= len(chunk)
            os.chmod(path, 0o644)
            self.files[size] = (name, h.hexdigest())

    def run_proc(self, ns: Namespace | None, argv: list[str], **kw) -> subprocess.Popen:
        if self.lab is not None:
            return self.lab.popen(ns, argv, **kw)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def kill(self, p: subprocess.Popen) -> None:
        if self.lab is not None:
            self.lab.kill(p)
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p.poll() is not None:
                break
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def start_servers(self, names: list[str], ns: Namespace | None, host: str, *, tag: str) -> None:
        for name in names:
            spec = SERVERS[name]
            if name in self.unavailable:
                continue
            why = spec.unavailable()
            if why is None and spec.needs_root and self.lab is None:
                why = "needs root (listens on port 69 only; runs in the benchmark's own namespace)"
            if why:
                self.unavailable[name] = why
                continue
            port = spec.fixed_port or (LOOPBACK_PORTS.get(name, 6909) if self.lab is not None else free_port())
            log = open(self.logs / f"{name}-{tag}.log", "wb")
            try:
                proc = self.run_proc(ns, spec.argv(str(self.root), host, port, str(self.work)),
                                     stdout=log, stderr=subprocess.STDOUT)
            finally:
                log.close()
            self.meters[name] = CpuMeter(proc.pid, f"{self.work.name}-{name}-{tag}")
            if not self.wait_ready(ns, host, port, proc):
                tail = (self.logs / f"{name}-{tag}.log").read_text(errors="replace")[-800:]
                self.kill(proc)
                self.meters.pop(name).close()
                self.unavailable[name] = f"did not answer a probe download within 15 s; log: {tail.strip()}"
                continue
            self.servers[name] = (proc, host, port)

    def stop_servers(self) -> None:
        for proc, _, _ in self.servers.values():
            self.kill(proc)
        self.servers.clear()
        for m in self.meters.values():
            m.close()
        self.meters.clear()

    def wait_ready(self, ns: Namespace | None, host: str, port: int, proc: subprocess.Popen) -> bool:
        name, _ = self.files[1024]
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if proc.poll() is not None:
                return False
            out = self.out / "probe.out"
            cp = self.client(ns, ["curl", "-sS", "--max-time", "2", "-o", str(out), f"tftp://{host}:{port}/{name}"], 5)
            if cp[0] == 0 and out.exists() and out.stat().st_size == 1024:
                out.unlink()
                return True
            time.sleep(0.2)
        return False

    def client(self, ns: Namespace | None, argv: list[str], timeout: float) -> tuple[int, str, float, float]:
        """Run one client; returns (exit code, stderr tail, start, end) in perf_counter time."""
        is_curl = argv[0] == "curl"
        if self.args.client_nice:
            argv = ["nice", "-n", str(self.args.client_nice), *argv]
        t0 = time.perf_counter()
        p = self.run_proc(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            return -1, f"timed out after {timeout:.0f}s", t0, time.perf_counter()
        t1 = time.perf_counter()
        if self.lab is not None and p in self.lab.procs:
            self.lab.procs.remove(p)
        msg = (err or b"").decode(errors="replace").strip()[-300:]
        # curl -w prints its own transfer time; prefer it (excludes process start-up).
        if is_curl and out:
            try:
                t0 = t1 - float(out.decode().strip().split()[-1])
            except ValueError:
                pass
        return p.returncode, msg, t0, t1

    def client_argv(self, case: Case, host: str, port: int, out: str) -> list[str]:
        name, _ = self.files[case.size]
        if case.client == "curl":
            return ["curl", "-sS", "--max-time", str(int(self.args.transfer_timeout)), "--tftp-blksize",
                    str(case.blksize), "-o", out, "-w", "%{time_total}", f"tftp://{host}:{port}/{name}"]
        return ["atftp", "--get", "-r", name, "-l", out, "--option", f"blksize {case.blksize}",
                "--option", f"windowsize {case.windowsize}", host, str(port)]

    def verify(self, case: Case, out: str) -> str | None:
        _, digest = self.files[case.size]
        try:
            got = sha256_file(out)
        except FileNotFoundError:
            return "no output file"
        os.unlink(out)
        return None if got == digest else "sha256 mismatch"

    # -- one case ----------------------------------------------------------------------

    def run_case(self, case: Case, server: str, ns_cli: Namespace | None) -> Result:
        proc, host, port = self.servers[server]
        r = Result(case.scenario, case.label, server, case.client, case.topology, case.size, case.blksize,
                   case.windowsize, case.clients)
        if case.topology == "rtt":
            r.rtt_ms = self.rtt_info.get("link_rtt_ms")  # type: ignore[assignment]
        with contextlib.suppress(OSError, ValueError):
            r.loadavg_1m = float(Path("/proc/loadavg").read_text().split()[0])
        reps = 1 if case.clients > 1 else (self.sizes.rtt_repeat if case.topology == "rtt" else self.sizes.repeat)
        times, cpus, emus = [], [], []
        for rep in range(reps):
            if time.monotonic() > self.deadline:
                r.errors.append("benchmark deadline reached")
                break
            meter = self.meters[server]
            cpu0 = meter.read()
            emu0 = proc_cpu_s(self.emulator_pid) if case.topology == "rtt" and self.emulator_pid else 0.0
            outs = [str(self.out / f"{server}-{i}.out") for i in range(case.clients)]
            results: list[tuple[int, str, float, float] | None] = [None] * case.clients

            def one(i: int) -> None:
                results[i] = self.client(ns_cli, self.client_argv(case, host, port, outs[i]),
                                         self.args.transfer_timeout + 10)

            if case.clients == 1:
                one(0)
            else:
                threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(case.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(self.args.transfer_timeout + 30)
            time.sleep(0.05)  # let tftpd-hpa's per-transfer children exit
            cpu = meter.read() - cpu0 if proc.poll() is None else None
            if case.topology == "rtt" and self.emulator_pid:
                emus.append(proc_cpu_s(self.emulator_pid) - emu0)
            ok_t = []
            for i, res in enumerate(results):
                if res is None:
                    r.failures += 1
                    r.errors.append("client thread did not finish")
                    continue
                rc, msg, t0, t1 = res
                bad = f"exit {rc}: {msg}" if rc != 0 else self.verify(case, outs[i])
                if bad:
                    r.failures += 1
                    if len(r.errors) < 5:
                        r.errors.append(bad)
                    with contextlib.suppress(OSError):
                        os.unlink(outs[i])
                else:
                    ok_t.append((t0, t1))
            if proc.poll() is not None:
                r.errors.append(f"server exited with {proc.returncode}")
                break
            if not ok_t:
                continue
            if case.clients == 1:
                times.append(ok_t[0][1] - ok_t[0][0])
                cpus.append(cpu)
            else:
                wall = max(t1 for _, t1 in ok_t) - min(t0 for t0, _ in ok_t)
                r.seconds = wall
                r.mb_s = len(ok_t) * case.size / wall / 1e6
                r.slowest_s = max(t1 - t0 for t0, t1 in ok_t)
                r.server_cpu_s = cpu
                r.packets = len(ok_t) * blocks(case.size, case.blksize)
        r.runs = len(times) if case.clients == 1 else 1
        if times:
            med = statistics.median(times)
            k = times.index(min(times, key=lambda t: abs(t - med)))
            r.seconds = times[k]
            r.mb_s = case.size / r.seconds / 1e6
            r.server_cpu_s = cpus[k]
            r.packets = blocks(case.size, case.blksize)
        if emus:
            r.emulator_cpu_s = statistics.median(emus)
        if r.seconds and r.server_cpu_s is not None:
            r.server_cores = r.server_cpu_s / r.seconds
            r.pps = r.packets / r.seconds
            r.pkts_per_cpu_s = r.packets / r.server_cpu_s if r.server_cpu_s > 0 else None
        return r

    # -- topologies --------------------------------------------------------------------

    def run_all(self, cases: list[Case], names: list[str]) -> list[Result]:
        self.make_files({c.size for c in cases})
        results: list[Result] = []
        lo_cases = [c for c in cases if c.topology == "lo"]
        rtt_cases = [c for c in cases if c.topology == "rtt"]
        if lo_cases:
            ns = None
            if self.lab is not None:
                ns = self.lab.namespace("bench")
                # glibc's getaddrinfo(AI_ADDRCONFIG) -- which tftpd-hpa uses for -a --
                # refuses even "127.0.0.1" in a namespace whose only IPv4 address is
                # on loopback. A veth to a spare namespace gives it one (10.213/16).
                self.lab.veth(ns, self.lab.namespace("spare"))
            try:
                self.start_servers(names, ns, "127.0.0.1", tag="lo")
                results += self.run_cases(lo_cases, names, ns)
            finally:
                self.stop_servers()
        if rtt_cases:
            if self.lab is None:
                self.notes.append("rtt scenario skipped: needs root for network namespaces")
            else:
                srv, cli = self.lab.namespace("srv"), self.lab.namespace("cli")
                host = self.setup_rtt_link(srv, cli)
                try:
                    self.start_servers(names, srv, host, tag="rtt")
                    results += self.run_cases(rtt_cases, names, cli)
                finally:
                    self.stop_servers()
        return results

    def run_cases(self, cases: list[Case], names: list[str], ns_cli: Namespace | None) -> list[Result]:
        out = []
        for case in cases:
            for name in names:
                if name not in self.servers:
                    continue
                if time.monotonic() > self.deadline:
                    self.notes.append(f"deadline reached: skipped {case.label} on {name}")
                    continue
                res = self.run_case(case, name, ns_cli)
                out.append(res)
                progress(res)
        return out

    def setup_rtt_link(self, srv: Namespace, cli: Namespace) -> str:
        """A link of ~0.5 ms round trip; returns the server's address.

        With netem: ``delay 0.25ms`` on both veth ends. Without (user-space
        emulator): the emulator's own forwarding latency adds to its delay, so we
        calibrate -- try a few one-way delays and keep the one whose measured round
        trip, minus that of a plain veth measured the same way, is closest to 0.5 ms.
        """
        assert self.lab is not None
        target = self.args.rtt_ms
        veth = self.lab.veth(srv, cli)
        base = statistics.median(self.lab.rtt_ms(srv, cli, veth.a_ip) for _ in range(3))
        self.lab.drop_link(veth)
        link = self.lab.impaired_link(srv, cli, delay_ms=target / 2)
        if link.kind == "netem":
            measured = self.lab.rtt_ms(srv, cli, link.a_ip)
        else:
            best = None
            for d in (target * 0.3, target * 0.4, target * 0.5):
                cand = link if abs(d - target / 2) < 1e-9 else self.lab.impaired_link(srv, cli, delay_ms=d)
                m = statistics.median(self.lab.rtt_ms(srv, cli, cand.a_ip) for _ in range(3))
                if best is None or abs(m - base - target) < abs(best[1] - base - target):
                    if best is not None and best[0] is not link:
                        self.lab.drop_link(best[0])
                    best = (cand, m)
                elif cand is not link:
                    self.lab.drop_link(cand)
            assert best is not None
            if best[0] is not link:
                self.lab.drop_link(link)
            link, measured = best
            self.emulator_pid = link.emulator_pid
        self.rtt_info = {
            "mechanism": link.kind, "one_way_delay_ms": link.delay_ms, "measured_rtt_ms": round(measured, 3),
            "veth_baseline_rtt_ms": round(base, 3), "link_rtt_ms": round(measured - base, 3),
            "note": "RTTs measured with a Python UDP echo; link_rtt = measured - veth baseline",
        }
        return link.a_ip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(r: Result) -> None:
    mbs = f"{r.mb_s:8.1f} MB/s" if r.mb_s else "   failed   "
    cpu = f" cpu {r.server_cpu_s:.2f}s" if r.server_cpu_s is not None else ""
    fail = f" FAILURES {r.failures}: {r.errors[:2]}" if r.failures or r.errors else ""
    print(f"  {r.label:<40} {r.server:<10} {mbs}{cpu}{fail}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------


def ratios(results: list[Result]) -> dict[str, dict[str, float | None]]:
    by = {(r.label, r.server): r for r in results}
    out: dict[str, dict[str, float | None]] = {}
    for label in dict.fromkeys(r.label for r in results):
        ours = by.get((label, "ours"))
        row: dict[str, float | None] = {}
        for peer in ("tftpd-hpa", "dnsmasq", "atftpd"):
            p = by.get((label, peer))
            row[f"ours/{peer}"] = (ours.mb_s / p.mb_s) if ours and p and ours.mb_s and p.mb_s else None
        out[label] = row
    return out


def targets(results: list[Result], rat: dict[str, dict[str, float | None]]) -> list[dict[str, object]]:
    ours = [r for r in results if r.server == "ours"]
    t: list[dict[str, object]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    lock = {lbl: v["ours/tftpd-hpa"] for lbl, v in rat.items() if lbl.startswith("curl blksize")}
    vals = [v for v in lock.values() if v is not None]
    t.append({"target": ">= 1.0x tftpd-hpa lock-step with curl (loopback)", "values": lock,
              "verdict": verdict(min(vals) >= 1.0 if vals else None)})
    ws16 = rat.get("rtt atftp bs 1468 windowsize 16", {}).get("ours/tftpd-hpa")
    t.append({"target": ">= 3x tftpd-hpa with windowsize 16 at 0.5 ms RTT", "values": {"rtt ws16": ws16},
              "verdict": verdict(ws16 >= 3.0 if ws16 is not None else None)})
    eq = {lbl: v["ours/atftpd"] for lbl, v in rat.items() if "windowsize" in lbl}
    vals = [v for v in eq.values() if v is not None]
    t.append({"target": ">= 0.9x atftpd at equal windowsize", "values": eq,
              "verdict": verdict(min(vals) >= 0.9 if vals else None)})
    conc = [r for r in ours if r.scenario == "concurrent"]
    t.append({"target": "zero failures at 50 concurrent clients",
              "values": {r.label: r.failures for r in conc},
              "verdict": verdict(all(r.failures == 0 and r.mb_s for r in conc) if conc else None)})
    eff = [r for r in ours if r.pkts_per_cpu_s]
    if eff:
        best = max(eff, key=lambda r: r.pkts_per_cpu_s or 0)
        fastest = max(eff, key=lambda r: r.pps or 0)
        cores = TARGET_PPS / (best.pkts_per_cpu_s or 1)
        t.append({"target": "81 000 packets/s at < 0.5 core",
                  "values": {"best packets per CPU-second": round(best.pkts_per_cpu_s or 0),
                             "in case": f"{best.label}",
                             "cores needed for 81k pkt/s (extrapolated)": round(cores, 3),
                             "highest packets/s reached": round(fastest.pps or 0),
                             "cores at that rate": round(fastest.server_cores or 0, 3),
                             "in case ": fastest.label},
                  "verdict": verdict(cores < 0.5)})
    return t


def machine() -> dict[str, object]:
    def sh(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "lscpu": "\n".join(sh(["lscpu"]).splitlines()[:10]),
        "kernel": platform.release(),
        "loadavg_at_end": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "",
        "python": platform.python_version(),
        "curl": sh(["curl", "--version"]).splitlines()[0] if sh(["curl", "--version"]) else "",
        "atftp": sh(["dpkg-query", "-W", "-f", "${Version}", "atftp"]),
        "tftpd-hpa": sh(["dpkg-query", "-W", "-f", "${Version}", "tftpd-hpa"]),
        "dnsmasq": sh(["dpkg-query", "-W", "-f", "${Version}", "dnsmasq-base"]),
    }


def table(results: list[Result], names: list[str], rat: dict[str, dict[str, float | None]]) -> str:
    lines = []
    cols = [n for n in names if any(r.server == n for r in results)]
    hdr = f"{'case':<38}" + "".join(f"{n:>11}" for n in cols) + f"{'ours/hpa':>10}{'ours/atftpd':>12}"
    lines += ["Throughput, MB/s (10^6 B/s); concurrent: aggregate", hdr, "-" * len(hdr)]
    by = {(r.label, r.server): r for r in results}
    for label in dict.fromkeys(r.label for r in results):
        cells = []
        for n in cols:
            r = by.get((label, n))
            cells.append(f"{'FAIL' if r is None or not r.mb_s else f'{r.mb_s:.1f}':>11}")
        rr = rat.get(label, {})
        f = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        lines.append(f"{label:<38}" + "".join(cells) + f"{f(rr.get('ours/tftpd-hpa')):>10}{f(rr.get('ours/atftpd')):>12}")
    conc = [r for r in results if r.scenario == "concurrent"]
    if conc:
        lines += ["", "Concurrent clients: slowest client (s), failures", f"{'server':<12}{'agg MB/s':>10}{'slowest s':>11}{'failures':>10}"]
        for r in conc:
            lines.append(f"{r.server:<12}{(r.mb_s or 0):>10.1f}{(r.slowest_s or 0):>11.2f}{r.failures:>10}")
    lines += ["", "Server CPU (user+sys): cores = CPU s / wall s; pkt/CPU-s = DATA blocks per CPU second",
              f"{'case':<38}{'server':<11}{'wall s':>8}{'cpu s':>8}{'cores':>7}{'kpkt/s':>8}{'kpkt/cpu-s':>11}"]
    for r in results:
        if r.server_cpu_s is None or not r.seconds:
            continue
        kpc = f"{r.pkts_per_cpu_s / 1000:.0f}" if r.pkts_per_cpu_s else "-"
        lines.append(f"{r.label:<38}{r.server:<11}{r.seconds:>8.2f}{r.server_cpu_s:>8.2f}"
                     f"{r.server_cores or 0:>7.2f}{(r.pps or 0) / 1000:>8.1f}{kpc:>11}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and 5 clients: a smoke run of a minute or less")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {', '.join(SERVERS)}")
    ap.add_argument("--json", action="store_true", help="JSON object on stdout (table goes to stderr)")
    ap.add_argument("--size-mib", type=int, help="override the single-client file size")
    ap.add_argument("--clients", type=int, help="override the concurrent client count")
    ap.add_argument("--repeat", type=int, help="runs per single-client case on loopback (median kept)")
    ap.add_argument("--rtt-ms", type=float, default=0.5, help="round trip of the rtt scenario's link")
    ap.add_argument("--transfer-timeout", type=float, default=300, help="seconds per client")
    ap.add_argument("--deadline-min", type=float, default=60, help="stop starting new cases after this")
    ap.add_argument("--client-nice", type=int, default=0, choices=range(0, 20), metavar="N",
                    help="run clients at nice N, so a server is not starved by its own load generators on a small box "
                         "(a single-process server gets one CPU share against 50 clients; tftpd-hpa forks 50)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) for inspection")
    a = ap.parse_args(argv)
    a.only = [s for s in a.only.split(",") if s]
    a.servers = [s for s in a.servers.split(",") if s]
    for s in a.only:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")
    if a.clients is not None and not 1 <= a.clients <= 200:
        ap.error("--clients must be 1..200")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("curl", "atftp"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="bt-bench-", dir=base))
    results: list[Result] = []
    root = os.geteuid() == 0
    lab = NetLab(prefix="btb") if root else None
    bench: Bench | None = None
    try:
        if lab is not None:
            lab.__enter__()
        bench = Bench(args, lab, work)
        if not root:
            bench.notes.append("not root: loopback of the current namespace, no dnsmasq, no rtt scenario")
        cases = plan(bench.sizes, set(args.only))
        results = bench.run_all(cases, args.servers)
    except NetnsError as e:
        print(f"bench: {e}", file=sys.stderr)
        if bench is not None:
            bench.notes.append(f"aborted: {e}")
    finally:
        if bench is not None:
            bench.stop_servers()
        if lab is not None:
            lab.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    assert bench is not None
    rat = ratios(results)
    report = {
        "machine": machine(),
        "config": {"quick": args.quick, "sizes": asdict(bench.sizes), "client_nice": args.client_nice, "servers": args.servers,
                   "scenarios": args.only, "rtt_link": bench.rtt_info,
                   "namespaces": [ns.name for ns in lab.namespaces] if lab is not None else [],
                   "clients": {"lockstep": "curl --tftp-blksize", "window": "atftp --option 'windowsize N'"}},
        "unavailable": bench.unavailable,
        "notes": bench.notes,
        "results": [asdict(r) for r in results],
        "ratios": rat,
        "targets": targets(results, rat),
    }
    text = table(results, args.servers, rat)
    text += "\n\nTargets (issue 3)\n" + "\n".join(
        f"  [{t['verdict']}] {t['target']}: {json.dumps(t['values'], default=str)}" for t in report["targets"])
    if bench.rtt_info:
        text += f"\n\nRTT link: {json.dumps(bench.rtt_info)}"
    for name, why in bench.unavailable.items():
        text += f"\nUNAVAILABLE {name}: {why}"
    for n in bench.notes:
        text += f"\nnote: {n}"
    if args.keep:
        text += f"\nwork directory kept: {work}"
    if args.json:
        print(text, file=sys.stderr)
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(text)
    return 1 if bench.unavailable else 0


if __name__ == "__main__":
    raise SystemExit(main())
