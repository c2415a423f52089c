"""The HTTP boot server under more clients than slots and connections, against nginx.

```sh
sudo .venv/bin/python bench/http_overload.py                       # ours and nginx, 16/64/256/1024 clients (~3 min)
.venv/bin/python bench/http_overload.py --levels 16,256 --servers ours,ours-pread,nginx
.venv/bin/python bench/http_overload.py --quick                    # small files, 8/32 clients (< 1 min)
```

Each *level* is N simulated nodes that all ask at once, each for one file from
its own source address (``127.77.x.y``: every address in 127/8 is local on
Linux, and a boot server sees one address per node): a quarter fetch the iPXE
script (``boot.ipxe``, ~300 B), half the kernel (``vmlinuz``, 8 MiB), a
quarter the initrd (``initrd.img``, 24 MiB). The load generator is curl (not
ours): ``curl --parallel --parallel-immediate`` with one ``--interface`` per
transfer (``--next`` groups in a config file), at most 256 transfers per curl
process (curl caps ``--parallel-max`` at 300), so 1024 nodes are 4 curl
processes. Every transfer's ``--write-out`` line gives its status, bytes, time
to first byte, total time and curl exit code: a refusal is exit 7, a reset 56,
an empty reply 52, a timeout 28.

Servers, one after the other in the same run, each started fresh per level on
127.0.0.1 of the current namespace (so its RSS is that level's):

* ``ours``: ``serve_http`` as ``bootorch serve`` runs it (the default caps: 256
  connections, 16 per address, 4 transfers per address, ``Admission(max_active=200)``
  like ``bootserver.max_transfers``, the ``min_rate`` watchdog), disk files by ``sendfile``;
* ``ours-pread``: the same with ``sendfile=False`` (``pread`` + ``send_all``);
* ``ours-base``: ``orchestrator`` imported from ``--ours-src DIR`` instead of this
  checkout, to measure another version side by side (e.g. ``mkdir /tmp/base &&
  git archive HEAD orchestrator | tar -x -C /tmp/base``);
* ``nginx``: nginx-light, ``worker_processes 2`` (this machine's cores),
  ``sendfile on``, ``worker_connections 4096``, listen backlog 4096, no access log;
* ``nginx-1w``: the same with one worker (one core, like ours).

Per level and server: completed downloads (200 and the full size), errors by
curl exit code / HTTP status, aggregate MB/s (bytes over the wall time of the
level), time to first byte and total time percentiles (all files, and the
kernel alone), the server's peak RSS (sampled every 50 ms; nginx: master +
workers) and CPU seconds. Markdown on stdout, JSON and every curl output line in
``var/bench/http-overload-TIME/`` (``--out``).

Safety: loopback only; every transfer has curl's ``--max-time`` and the run
``--deadline-min``; servers and curl processes are ended by PID (process
groups of our own making) on any exit, the work directory
(``/dev/shm/bt-bench-http-*``) removed. Root is not needed; as root nginx's
workers run as ``nobody`` (the work directory is world-readable for them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("ours", "ours-pread", "ours-base", "nginx", "nginx-1w")
PER_CURL = 256
WRITE_OUT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total} %{exitcode} %{local_ip}\\n"


@dataclass
class Files:
    root: Path
    sizes: dict[str, int]

    def pick(self, i: int) -> str:
        """The file node ``i`` asks for: 1/4 script, 1/2 kernel, 1/4 initrd."""
        return ("boot.ipxe", "vmlinuz", "vmlinuz", "initrd.img")[i % 4]


def make_files(root: Path, quick: bool) -> Files:
    root.mkdir(mode=0o755)
    script = b"#!ipxe\nkernel http://${next-server}/vmlinuz console=ttyS0 ip=dhcp\ninitrd http://${next-server}/initrd.img\nboot\n"
    script = script + b"#" * (300 - len(script)) + b"\n"
    sizes = {"boot.ipxe": len(script), "vmlinuz": (1 if quick else 8) << 20, "initrd.img": (3 if quick else 24) << 20}
    (root / "boot.ipxe").write_bytes(script)
    for name in ("vmlinuz", "initrd.img"):
        with open(root / name, "wb") as f:
            left = sizes[name]
            while left:  # bounded by the size
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
    for p in root.iterdir():
        p.chmod(0o644)
    return Files(root, sizes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by the deadline
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


# -- servers --------------------------------------------------------------------------


def serve_ours(root: str, port: int, sendfile: bool, src: Path) -> None:
    """The child process for ``ours``: serve_http with bootorch serve's settings; stats as JSON on SIGTERM."""
    import inspect

    import trio

    sys.path.insert(0, str(src))
    from orchestrator.bootserver.admission import Admission
    from orchestrator.bootserver.files import BootFiles
    from orchestrator.bootserver.http import HttpStats, serve_http

    stats = HttpStats()
    kw = {"sendfile": sendfile} if "sendfile" in inspect.signature(serve_http).parameters else {}

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as n:
                await n.start(lambda task_status: serve_http(
                    BootFiles(root), "127.0.0.1", port, admission=Admission(max_active=200), stats=stats,
                    task_status=task_status, **kw))
                async for _ in signals:
                    n.cancel_scope.cancel()
                    break

    trio.run(main)
    d = asdict(stats)
    d["by_status"] = {str(k): v for k, v in stats.by_status.items()}
    print(json.dumps(d), flush=True)


def nginx_conf(work: Path, root: Path, port: int, workers: int) -> str:
    tmp = work / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    return f"""# bench/http_overload.py
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
    }}
}}
"""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def pids(self) -> list[int]:
        """The server's process and its children (nginx's workers)."""
        pids = [self.proc.pid]
        try:
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                kids = Path(f"/proc/{self.proc.pid}/task/{task}/children").read_text().split()
                pids += [int(k) for k in kids]
        except OSError:
            pass
        return pids


def start_server(name: str, work: Path, files: Files, ours_src: Path) -> Server:
    port = free_port()
    if name.startswith("ours"):
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-ours", str(files.root), str(port),
                "pread" if name == "ours-pread" else "sendfile",
                str(ours_src if name == "ours-base" else REPO)]
    else:
        conf = work / f"{name}.conf"
        conf.write_text(nginx_conf(work, files.root, port, 1 if name == "nginx-1w" else 2))
        argv = ["nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "nginx-error.log")]
    with open(work / f"{name}.stderr", "ab") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    try:
        wait_port(port, proc, 20)
    except BaseException:
        stop(proc)
        raise
    return Server(name, proc, port)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> bytes:
    """SIGTERM (nginx: fast shutdown) the process by PID, SIGKILL its group after ``timeout``; its stdout."""
    out = b""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
        out, _ = proc.communicate()
    return out or b""


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Sampler(threading.Thread):
    """Peak RSS (KiB, summed over the server's processes) every 50 ms until stopped."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = 0
        self.done = threading.Event()

    def sample(self) -> None:
        self.peak = max(self.peak, sum(rss_kib(p) for p in self.server.pids()))

    def run(self) -> None:
        self.sample()
        while not self.done.wait(0.05):  # until stop(); one sample per 50 ms
            self.sample()

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


# -- load -----------------------------------------------------------------------------


def address(i: int) -> str:
    return f"127.77.{i // 250}.{i % 250 + 1}"


def curl_configs(work: Path, level: int, port: int, files: Files, max_time: float) -> list[Path]:
    paths = []
    for c in range(math.ceil(level / PER_CURL)):
        lines = []
        for i in range(c * PER_CURL, min(level, (c + 1) * PER_CURL)):
            lines += [f'url = "http://127.0.0.1:{port}/{files.pick(i)}"', f'interface = "{address(i)}"',
                      'output = "/dev/null"', f'write-out = "{files.pick(i)} {WRITE_OUT}"',
                      f"max-time = {max_time:g}", "connect-timeout = 120", "next"]
        p = work / f"curl-{level}-{c}.cfg"
        p.write_text("\n".join(lines[:-1]) + "\n")
        paths.append(p)
    return paths


@dataclass
class Result:
    server: str
    level: int
    wall_s: float
    completed: int
    errors: dict[str, int]
    mb_s: float
    ttfb: dict[str, float]
    total: dict[str, float]
    kernel_total: dict[str, float]
    rss_idle_kib: int
    rss_peak_kib: int
    cpu_s: float
    server_stats: dict[str, object] = field(default_factory=dict)


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, math.ceil(p * len(s)) - 1)], 3)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(s[-1], 3)}


def run_level(name: str, level: int, work: Path, out: Path, files: Files, max_time: float, ours_src: Path) -> Result:
    server = start_server(name, work, files, ours_src)
    sampler = Sampler(server)
    curls: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(0.3)
        idle = sum(rss_kib(p) for p in server.pids())
        cpu0 = sum(cpu_s(p) for p in server.pids())
        sampler.start()
        cfgs = curl_configs(work, level, server.port, files, max_time)
        t0 = time.monotonic()
        for cfg in cfgs:
            curls.append(subprocess.Popen(
                ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", str(PER_CURL), "-K", str(cfg)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True))
        outputs = [c.communicate(timeout=max_time + 60)[0].decode() for c in curls]
        wall = time.monotonic() - t0
        peak = sampler.stop()
        cpu = sum(cpu_s(p) for p in server.pids()) - cpu0
    finally:
        if sampler.is_alive():
            sampler.stop()
        for c in curls:
            if c.poll() is None:
                with _suppress():
                    os.killpg(c.pid, signal.SIGKILL)
                c.wait()
        stats_out = stop(server.proc)
    raw = "".join(outputs)
    (out / f"{name}-{level}.txt").write_text(raw)
    errors: dict[str, int] = {}
    completed = 0
    nbytes = 0
    ttfb, total, ktotal = [], [], []
    lines = raw.splitlines()
    for line in lines:
        fname, code, size, tfb, tt, exitcode, _ip = (line.split() + [""] * 7)[:7]
        nbytes += int(size or 0)
        if exitcode != "0":
            errors[f"curl_exit_{exitcode}"] = errors.get(f"curl_exit_{exitcode}", 0) + 1
        elif code != "200":
            errors[f"http_{code}"] = errors.get(f"http_{code}", 0) + 1
        elif int(size) != files.sizes[fname]:
            errors["short"] = errors.get("short", 0) + 1
        else:
            completed += 1
            ttfb.append(float(tfb))
            total.append(float(tt))
            if fname == "vmlinuz":
                ktotal.append(float(tt))
    if len(lines) < level:
        errors["missing"] = level - len(lines)
    stats: dict[str, object] = {}
    if name.startswith("ours"):
        try:
            stats = json.loads(stats_out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            stats = {}
    return Result(name, level, round(wall, 3), completed, errors, round(nbytes / wall / 1e6, 1), pct(ttfb), pct(total),
                  pct(ktotal), idle, peak, round(cpu, 2), stats)


def table(results: list[Result], files: Files) -> str:
    head = ("| server | nodes | completed | errors | MB/s | first byte p50 / p99 / max (s) | kernel total p50 / p99 / max (s) "
            "| RSS idle → peak (MiB) | server CPU (s) |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        err = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
        t, k = r.ttfb, r.kernel_total
        rows.append(
            f"| {r.server} | {r.level} | {r.completed}/{r.level} | {err} | {r.mb_s:,.0f} "
            f"| {t.get('p50', '-')} / {t.get('p99', '-')} / {t.get('max', '-')} "
            f"| {k.get('p50', '-')} / {k.get('p99', '-')} / {k.get('max', '-')} "
            f"| {r.rss_idle_kib / 1024:.0f} → {r.rss_peak_kib / 1024:.0f} | {r.cpu_s:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="16,64,256,1024", help="nodes per level, comma-separated")
    ap.add_argument("--servers", default="ours,nginx", help=f"comma-separated, from {','.join(SERVERS)}")
    ap.add_argument("--quick", action="store_true", help="small files (1 MiB kernel, 3 MiB initrd), levels 8,32")
    ap.add_argument("--max-time", type=float, default=300.0, help="curl --max-time per transfer (s)")
    ap.add_argument("--deadline-min", type=float, default=30.0, help="stop starting levels after this many minutes")
    ap.add_argument("--out", type=Path, default=None, help="raw output directory (default var/bench/http-overload-TIME)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    ap.add_argument("--ours-src", type=Path, default=None, help="where ours-base imports orchestrator from")
    ap.add_argument("--serve-ours", nargs=4, metavar=("ROOT", "PORT", "MODE", "SRC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_ours:
        root, port, mode, src = args.serve_ours
        serve_ours(root, int(port), mode == "sendfile", Path(src))
        return 0
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")
    if "ours-base" in servers and not (args.ours_src and (args.ours_src / "orchestrator").is_dir()):
        ap.error("ours-base needs --ours-src DIR with DIR/orchestrator")
    levels = [8, 32] if args.quick and args.levels == ap.get_default("levels") else [int(x) for x in args.levels.split(",")]
    for tool in ("curl", *(["nginx"] if any(s.startswith("nginx") for s in servers) else [])):
        if not shutil.which(tool):
            print(f"{tool} not found", file=sys.stderr)
            return 2
    out = args.out or REPO / "var" / "bench" / time.strftime("http-overload-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bt-bench-http-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    work.chmod(0o755)
    results: list[Result] = []
    deadline = time.monotonic() + args.deadline_min * 60
    try:
        files = make_files(work / "boot", args.quick)
        for level in levels:
            for name in servers:  # side by side: each level runs every server before the next level
                if time.monotonic() > deadline:
                    print(f"deadline passed: skipping {name} at {level}", file=sys.stderr)
                    continue
                r = run_level(name, level, work, out, files, args.max_time, args.ours_src or REPO)
                results.append(r)
                print(f"{name:10} {level:5} nodes: {r.completed}/{level} ok, errors {r.errors or 0}, {r.mb_s:,.0f} MB/s, "
                      f"rss peak {r.rss_peak_kib / 1024:.0f} MiB, cpu {r.cpu_s:.1f} s, wall {r.wall_s:.1f} s",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "config": {"levels": levels, "servers": servers, "files": files.sizes, "per_curl": PER_CURL,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": " ".join(os.uname()), "cpu": cpu_model(),
                   "cpus": os.cpu_count(), "curl": subprocess.run(["curl", "--version"], capture_output=True, text=True,
                                                                   check=False).stdout.splitlines()[0]},
        "results": [asdict(r) for r in results],
    }
    (out / "http-overload.json").write_text(json.dumps(doc, indent=1))
    md = table(results, files)
    if args.json:
        print(json.dumps(doc, indent=1))
        print(md, file=sys.stderr)
    else:
        print(md)
    print(f"raw output in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
