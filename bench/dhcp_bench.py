#!/usr/bin/env python3
"""DHCP benchmark: Kea's perfdhcp against dnsmasq, kea-dhcp4, ISC dhcpd and ours, in one run.

Run it through ``bench/dhcp.sh`` (which adds a shell trap as a second line of
cleanup); this file does the work.

Setup (identical for every server): a server namespace with 10.66.0.1/16 and
a client namespace with 10.66.0.2/16, joined by one veth
(``tests/dhcp_lab.py``). Each server gets the same config from
``tests.dhcp_servers.ServerConfig``: subnet 10.66.0.0/16, pool
10.66.1.0-10.66.127.254 (32 510 addresses), lease time 1 h, PXE clients get
next-server, ``pxelinux.0``, option 60 and option 43; no per-packet logging;
ping-before-offer off (dnsmasq ``--no-ping``, dhcpd ``ping-check false``; Kea
and ours never ping). Lease storage is each server's own default durable
store: dnsmasq's lease file (rewritten whole on every change), Kea's memfile
CSV (appended, no fsync), dhcpd's lease file (fsync per commit), ours (journal,
one fsync per received batch).

perfdhcp runs in the client namespace as a *relay* (its default for DHCPv4:
it binds port 67 on 10.66.0.2 and sets giaddr to it), so each server sees
relayed traffic from a relay inside the served /16 and answers unicast to
10.66.0.2:67 -- no server needs an extra subnet for it. Every DISCOVER carries
``-o 60,505845436c69656e74`` (vendor class ``PXEClient``) so the PXE paths run.

Scenarios:

* **sweep** -- for each rate (``-r``), for each server (interleaved, so machine
  noise hits them alike), a *fresh* server (no leases) gets ``-p PERIOD``
  seconds of DORA exchanges from ``-R rate*period`` distinct clients (every
  exchange a new lease, as in a cold cluster boot), ``-d 1`` (an exchange not
  answered within 1 s is a drop), ``-W 1000000`` (wait 1 s after the period so
  the last exchanges are not miscounted). Achieved DORA/s = ACKs received /
  PERIOD; unanswered % = 1 - ACKs / DISCOVERs sent. perfdhcp exits 3 on any
  drop, so its report text is parsed and its exit code only recorded.
* **knee** -- the lowest tested rate where unanswered passes 2.5 % (ISC's
  criterion for its Kea performance reports); ``max ok`` is the highest tested
  rate below it.
* **burst** -- a fresh server gets N (1 000) DISCOVERs from N clients sent back
  to back (``-r 1000000 -n N``, a few milliseconds); how many full DORA
  exchanges completed with each leg answered within 1 s (a PXE ROM retries
  after 4 s). Then the same N clients spread over one second (``-r N -n N``,
  "ramp"). Then perfdhcp's ``--scenario avalanche`` (N clients at once,
  perfdhcp retransmits until all are served): seconds until all N hold a lease.

* **overload** (``--overload``: rates 4 000 to 48 000, no burst) -- the sweep
  to about 4x ours' clean capacity (~12 000). ``plateau``: the worst achieved DORA/s at any
  rate above the one of the best clean run, as % of that best clean rate
  (target >= 90 %); and ours / Kea at 16 000/s offered.

Also recorded per run: what ours shed under overload, by reason (from its
log's last ``shed unanswered so far`` line), how many OFFERs and ACKs ours
sent (its stop line: ``server_offers``, ``server_acks``), server CPU seconds (``/proc/PID/stat``), machine busy
cores (``/proc/stat``), and UDP receive-buffer overflows in each namespace
(``/proc/net/snmp`` ``RcvbufErrors``: in the client namespace they are
perfdhcp's own losses -- a limit of the load generator, not of the server).

Safety: root only; all traffic is inside the two namespaces this run creates;
every perfdhcp run has ``-p``/``-n`` and a timeout; servers and clients are
killed by PID; the namespaces are removed on exit, error or Ctrl-C (NetLab),
and by ``bench/dhcp.sh``'s trap if this process itself is killed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.lab.netns import Namespace, NetLab, NetnsError  # noqa: E402
from tests.dhcp_lab import DhcpPair, dhcp_pair, tool  # noqa: E402
from tests.dhcp_servers import SERVER_KINDS, ServerConfig, ServerHandle, server_missing, start_server, stop_server  # noqa: E402

SUBNET = "10.66.0.0/16"
CLIENT_IP = "10.66.0.2"
POOL = ("10.66.1.0", "10.66.127.254")
PXE_OPTION = "60,505845436c69656e74"  # vendor class "PXEClient"
KNEE_PCT = 2.5
FULL_RATES = (125, 250, 500, 1000, 2000, 4000)
QUICK_RATES = (500, 2000)
#: --overload: from below ours' clean capacity to past 4x it (issue 19's plateau check).
OVERLOAD_RATES = (4000, 8000, 12000, 16000, 24000, 32000, 48000)
PLATEAU_PCT = 90.0
EXIT_WAIT_US = 1_000_000
DROP_TIME_S = 1


def log(msg: str) -> None:
    print(f"[dhcp-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# perfdhcp and /proc readers
# ---------------------------------------------------------------------------------

_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_perfdhcp(text: str) -> dict:
    """perfdhcp's final report (Kea 2.2 format) as numbers.

    ``{"rate": float|None, "DO": {...}, "RA": {...}, "provision_s": float|None}``
    with ``sent received drops orphans min_ms avg_ms max_ms`` per exchange.
    """
    out: dict = {"rate": None, "DO": {}, "RA": {}, "provision_s": None}
    m = re.search(rf"Rate: {_NUM} 4-way exchanges/second", text)
    if m:
        out["rate"] = float(m.group(1))
    parts = re.split(r"\*\*\*Statistics for: (DISCOVER-OFFER|REQUEST-ACK)\*\*\*", text)
    for name, body in zip(parts[1::2], parts[2::2]):
        key = "DO" if name == "DISCOVER-OFFER" else "RA"
        stats: dict = {}
        for field, pat in (("sent", "sent packets"), ("received", "received packets"), ("drops", "drops"),
                           ("orphans", "orphans")):
            m = re.search(rf"^{pat}: ([0-9]+)", body, re.M)
            if m:
                stats[field] = int(m.group(1))
        for field, pat in (("min_ms", "min delay"), ("avg_ms", "avg delay"), ("max_ms", "max delay")):
            m = re.search(rf"^{pat}: {_NUM} ms", body, re.M)
            if m:
                stats[field] = float(m.group(1))
        out[key] = stats
    m = re.search(r"It took ([0-9]+):([0-9]+):([0-9.]+) to provision ([0-9]+) clients", text)
    if m:
        out["provision_s"] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return out


def udp_counters(ns: Namespace) -> dict[str, int]:
    """The ``Udp:`` line of ``/proc/net/snmp`` as seen from inside ``ns``."""
    cp = subprocess.run(ns.exec_argv(["cat", "/proc/net/snmp"]), capture_output=True, text=True, timeout=15)
    rows = [line.split()[1:] for line in cp.stdout.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (seconds); 0.0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def run_perfdhcp(lab: NetLab, pair: DhcpPair, perfdhcp: str, args: list[str], *, timeout: float) -> tuple[int | None, str]:
    argv = [perfdhcp, "-4", "-g", "single", *args, "-o", PXE_OPTION, pair.server_ip]
    try:
        cp = lab.run(pair.client_ns, argv, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True)
    except NetnsError as e:
        return None, f"{' '.join(argv)}\nTIMEOUT: {e}"
    return cp.returncode, f"{' '.join(argv)}\n{cp.stdout}"


class Measured:
    """Server CPU, machine busy time and UDP overflow counters around one perfdhcp run."""

    def __init__(self, pair: DhcpPair, srv: ServerHandle) -> None:
        self.pair, self.srv = pair, srv

    def __enter__(self) -> "Measured":
        self.t0 = time.monotonic()
        self.cpu0 = proc_cpu_s(self.srv.pid)
        self.m0 = machine_ticks()
        self.s0, self.c0 = udp_counters(self.pair.server_ns), udp_counters(self.pair.client_ns)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        self.server_cpu_s = proc_cpu_s(self.srv.pid) - self.cpu0
        m1 = machine_ticks()
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        self.busy_cores = (os.cpu_count() or 1) * busy / total if total else 0.0
        s1, c1 = udp_counters(self.pair.server_ns), udp_counters(self.pair.client_ns)
        self.rcvbuf_server = s1.get("RcvbufErrors", 0) - self.s0.get("RcvbufErrors", 0)
        self.rcvbuf_client = c1.get("RcvbufErrors", 0) - self.c0.get("RcvbufErrors", 0)

    def fields(self) -> dict:
        return {"wall_s": round(self.wall, 2), "server_cpu_s": round(self.server_cpu_s, 2),
                "busy_cores": round(self.busy_cores, 2), "rcvbuf_errors_server": self.rcvbuf_server,
                "rcvbuf_errors_client": self.rcvbuf_client}


# ---------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------

def server_config() -> ServerConfig:
    return ServerConfig(subnet=SUBNET, pool=POOL, lease_time=3600, fast=True)


def sweep_run(lab: NetLab, pair: DhcpPair, perfdhcp: str, kind: str, rate: int, period: int, tag: str,
              raw_dir: Path) -> dict:
    clients = min(rate * period, server_config().pool_size)
    srv = start_server(pair, kind, server_config(), tag=tag)
    try:
        with Measured(pair, srv) as m:
            rc, text = run_perfdhcp(lab, pair, perfdhcp,
                                    ["-r", str(rate), "-p", str(period), "-R", str(clients), "-d", str(DROP_TIME_S),
                                     "-W", str(EXIT_WAIT_US)], timeout=period + 30)
        alive = srv.alive()
    finally:
        stop_server(pair, srv)
    server_log = srv.log_text(20_000)
    (raw_dir / f"{tag}-{kind}.txt").write_text(text + "\n--- server log ---\n" + server_log)
    rep = parse_perfdhcp(text)
    # ours logs what it shed under overload (1, 2, 4, ... datagrams); the last line has the totals.
    shed = re.findall(r"shed unanswered so far \(([^)]*)\)", server_log)
    shed_counts = {k: int(v) for k, v in (item.rsplit(" ", 1) for item in shed[-1].split(", "))} if shed else {}
    # ours' stop line says how many OFFERs and ACKs it sent: the rest of what perfdhcp missed was lost on the way
    # (mostly in perfdhcp's own receive buffer: rcvbuf_errors_client).
    stop = re.search(r"dhcp: stopped;.* offers (\d+) acks (\d+)", server_log)
    do, ra = rep["DO"], rep["RA"]
    sent, acks = do.get("sent", 0), ra.get("received", 0)
    return {
        "server": kind, "rate": rate, "period_s": period, "clients": clients, "perfdhcp_rc": rc,
        "server_survived": alive,
        "discovers": sent, "offers": do.get("received", 0), "requests": ra.get("sent", 0), "acks": acks,
        "achieved": round(acks / period, 1),
        "unanswered": max(0, sent - acks),
        "unanswered_pct": round(100.0 * (sent - acks) / sent, 2) if sent else 100.0,
        "orphans": do.get("orphans", 0) + ra.get("orphans", 0),
        "offer_avg_ms": do.get("avg_ms"), "offer_max_ms": do.get("max_ms"),
        "ack_avg_ms": ra.get("avg_ms"), "ack_max_ms": ra.get("max_ms"),
        "perfdhcp_rate": rep["rate"],
        "shed": shed_counts,
        "server_offers": int(stop.group(1)) if stop else None, "server_acks": int(stop.group(2)) if stop else None,
        **m.fields(),
    }


def burst_run(lab: NetLab, pair: DhcpPair, perfdhcp: str, kind: str, n: int, raw_dir: Path,
              avalanche_timeout: float) -> dict:
    out: dict = {"server": kind, "clients": n}
    srv = start_server(pair, kind, server_config(), tag=f"burst-{n}")
    try:
        with Measured(pair, srv) as m:
            rc, text = run_perfdhcp(lab, pair, perfdhcp,
                                    ["-r", "1000000", "-n", str(n), "-R", str(n), "-d", str(DROP_TIME_S),
                                     "-W", str(2 * EXIT_WAIT_US)], timeout=60)
        rep = parse_perfdhcp(text)
        out.update({
            "perfdhcp_rc": rc, "discovers": rep["DO"].get("sent", 0),
            "offers_1s": rep["DO"].get("received", 0), "acks_1s": rep["RA"].get("received", 0),
            "offer_max_ms": rep["DO"].get("max_ms"), "ack_max_ms": rep["RA"].get("max_ms"),
            **{f"burst_{k}": v for k, v in m.fields().items()},
        })
        (raw_dir / f"burst-{kind}.txt").write_text(text)
    finally:
        stop_server(pair, srv)
    # The same N clients spread over one second (-r N -n N): a cluster powered on by a sequencer.
    srv = start_server(pair, kind, server_config(), tag=f"ramp-{n}")
    try:
        rc, text = run_perfdhcp(lab, pair, perfdhcp,
                                ["-r", str(n), "-n", str(n), "-R", str(n), "-d", str(DROP_TIME_S),
                                 "-W", str(2 * EXIT_WAIT_US)], timeout=60)
        rep = parse_perfdhcp(text)
        out.update({"ramp_rc": rc, "ramp_discovers": rep["DO"].get("sent", 0),
                    "ramp_acks_1s": rep["RA"].get("received", 0)})
        (raw_dir / f"ramp-{kind}.txt").write_text(text)
    finally:
        stop_server(pair, srv)
    srv = start_server(pair, kind, server_config(), tag=f"avalanche-{n}")
    try:
        rc, text = run_perfdhcp(lab, pair, perfdhcp, ["--scenario", "avalanche", "-R", str(n)],
                                timeout=avalanche_timeout)
        rep = parse_perfdhcp(text)
        out.update({"avalanche_rc": rc, "avalanche_s": rep["provision_s"],
                    "avalanche_acks": rep["RA"].get("received")})
        (raw_dir / f"avalanche-{kind}.txt").write_text(text)
    finally:
        stop_server(pair, srv)
    return out


def summarize(results: list[dict], servers: list[str], rates: list[int]) -> dict:
    summary: dict = {}
    for kind in servers:
        runs = sorted((r for r in results if r["server"] == kind), key=lambda r: r["rate"])
        knee = next((r["rate"] for r in runs if r["unanswered_pct"] > KNEE_PCT), None)
        below = [r for r in runs if knee is None or r["rate"] < knee]
        ok_runs = [r for r in runs if r["unanswered_pct"] <= KNEE_PCT]
        summary[kind] = {
            "knee_rate": knee,  # None: no tested rate passed 2.5 %
            "max_ok_rate": below[-1]["rate"] if below else None,
            "peak_achieved": max((r["achieved"] for r in ok_runs), default=0.0),
            "best_achieved": max((r["achieved"] for r in runs), default=0.0),
            "unanswered_below_knee": sum(r["unanswered"] for r in below),
            "tested_up_to": rates[-1] if rates else None,
        }
        # Plateau (issue 19): at every rate past the best clean one, completed DORA/s as a share of it.
        peak = summary[kind]["peak_achieved"]
        peak_rate = max((r["rate"] for r in ok_runs if r["achieved"] == peak), default=None)
        past = [r["achieved"] for r in runs if peak_rate is not None and r["rate"] > peak_rate]
        summary[kind]["plateau_pct"] = round(100.0 * min(past) / peak, 1) if past and peak else None
    return summary


def fsync_ms(directory: Path, n: int = 100) -> float:
    """Mean latency of append + fsync of 100 bytes in ``directory`` (the lease files' disk)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 100)
            os.fsync(fd)
        return round((time.perf_counter() - t0) / n * 1000, 3)
    finally:
        os.close(fd)
        path.unlink()


def machine_info() -> dict:
    info: dict = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    for key in ("rmem_default", "rmem_max"):
        try:
            info[key] = int(Path(f"/proc/sys/net/core/{key}").read_text())
        except OSError:
            pass
    if shutil.which("lscpu"):
        cp = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=15)
        info["lscpu"] = cp.stdout.splitlines()[:15]
        m = re.search(r"Model name:\s*(.+)", cp.stdout)
        info["cpu"] = m.group(1).strip() if m else None
    for name, argv in (("perfdhcp", ["perfdhcp", "-v"]), ("dnsmasq", ["dnsmasq", "--version"]),
                       ("kea-dhcp4", ["kea-dhcp4", "-v"]), ("dhcpd", ["dhcpd", "--version"])):
        if shutil.which(argv[0]) or os.path.exists(f"/usr/sbin/{argv[0]}"):
            try:
                cp = subprocess.run(argv, capture_output=True, text=True, timeout=15)
                info[f"{name}_version"] = (cp.stdout + cp.stderr).strip().splitlines()[0]
            except (OSError, subprocess.TimeoutExpired, IndexError):
                pass
    return info


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------

def _fmt(v: object, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def render_table(doc: dict) -> str:
    servers = doc["servers"]
    m = doc["machine"]
    lines = [f"DHCP benchmark {doc['date']}  (perfdhcp relay mode, PXEClient vendor class, fresh server per run, "
             f"-p {doc['period_s']} s, -d {DROP_TIME_S} s)",
             f"machine: {m.get('nproc')} CPUs {m.get('cpu') or ''}, kernel {m.get('kernel')}, fsync {m.get('fsync_ms')} ms, "
             f"rmem_default {m.get('rmem_default')}, load average {m.get('loadavg_start', 0):.1f} at start, "
             f"{m.get('loadavg_end', 0):.1f} at end", ""]
    lines.append("Sweep: achieved DORA/s (unanswered %) at offered rate")
    head = f"{'server':<9}" + "".join(f"{'r=' + str(r):>19}" for r in doc["rates"])
    lines.append(head)
    for kind in servers:
        row = f"{kind:<9}"
        for rate in doc["rates"]:
            r = next((x for x in doc["sweep"] if x["server"] == kind and x["rate"] == rate), None)
            row += f"{'-':>19}" if r is None else f"{r['achieved']:>10.0f} ({r['unanswered_pct']:>5.1f}%)"
        lines.append(row)
    lines += ["", "Server CPU seconds per run / UDP rcvbuf overflows server,client"]
    for kind in servers:
        row = f"{kind:<9}"
        for rate in doc["rates"]:
            r = next((x for x in doc["sweep"] if x["server"] == kind and x["rate"] == rate), None)
            row += f"{'-':>19}" if r is None else \
                f"{r['server_cpu_s']:>8.2f}s {r['rcvbuf_errors_server']:>4},{r['rcvbuf_errors_client']:<4}"
        lines.append(row)
    lines += ["", "Datagrams shed by ours (reason: count) / plateau: worst completed DORA/s past the best clean rate, "
              f"as % of it (target >= {PLATEAU_PCT:.0f} %)"]
    for kind in servers:
        s = doc["summary"][kind]
        shed = [f"r={x['rate']}: " + ", ".join(f"{k} {v}" for k, v in sorted(x.get("shed", {}).items()))
                for x in doc["sweep"] if x["server"] == kind and x.get("shed")]
        lines.append(f"{kind:<9} plateau {_fmt(s.get('plateau_pct'))} %" + ("; " + "; ".join(shed) if shed else ""))
    kea16 = next((x for x in doc["sweep"] if x["server"] == "kea" and x["rate"] == 16000), None)
    ours16 = next((x for x in doc["sweep"] if x["server"] == "ours" and x["rate"] == 16000), None)
    if kea16 and ours16 and kea16["achieved"]:
        lines.append(f"ours / kea at 16000/s offered: {100.0 * ours16['achieved'] / kea16['achieved']:.1f} % (target >= 90 %)")
    lines += ["", f"{'server':<9}{'knee':>7}{'max ok':>8}{'peak':>7}{'best':>7}{'unans<knee':>11}"
              f"{'burst':>11}{'ramp 1s':>11}{'avalanche':>10}{'peak/dnsm':>10}{'best/dnsm':>10}"]
    base = doc["summary"].get("dnsmasq", {})
    for kind in servers:
        s = doc["summary"][kind]
        b = next((x for x in doc["burst"] if x["server"] == kind), {})
        if s["knee_rate"] is None:
            knee = f">{s['tested_up_to']}"
        elif s["max_ok_rate"] is None:
            knee = f"<={s['knee_rate']}"
        else:
            knee = str(s["knee_rate"])
        burst = f"{b.get('acks_1s', '-')}/{b.get('discovers', '-')}" if b else "-"
        ramp = f"{b.get('ramp_acks_1s', '-')}/{b.get('ramp_discovers', '-')}" if b else "-"
        av = f"{b['avalanche_s']:.2f}s" if b.get("avalanche_s") is not None else "-"
        rp = f"{s['peak_achieved'] / base['peak_achieved']:.2f}x" if base.get("peak_achieved") else "-"
        rb = f"{s['best_achieved'] / base['best_achieved']:.2f}x" if base.get("best_achieved") else "-"
        lines.append(f"{kind:<9}{knee:>7}{_fmt(s['max_ok_rate']):>8}{s['peak_achieved']:>7.0f}{s['best_achieved']:>7.0f}"
                     f"{s['unanswered_below_knee']:>11}{burst:>11}{ramp:>11}{av:>10}{rp:>10}{rb:>10}")
    lines += ["", "knee: lowest tested rate with > 2.5 % of DISCOVERs never ACKed within 1 s (<=R: already the "
              "lowest tested rate); max ok: highest tested rate below the knee; peak: best achieved DORA/s at <= 2.5 % "
              "unanswered; best: best achieved DORA/s at any rate; unans<knee: DISCOVERs never ACKed at rates below "
              "the knee; burst: DORAs complete within 1 s per leg of N sent back to back; ramp 1s: the same N over "
              "one second; avalanche: seconds until all N hold a lease (perfdhcp retransmits)."]
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/dhcp.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default=",".join(SERVER_KINDS), help="comma list (default: all four)")
    ap.add_argument("--rates", help="comma list of offered DORA/s (default 125,250,500,1000,2000,4000)")
    ap.add_argument("--period", type=int, help="seconds per sweep run (default 5; --quick 2)")
    ap.add_argument("--burst", type=int, default=1000, help="clients in the burst (0 = skip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: rates 500,2000, 2 s each")
    ap.add_argument("--overload", action="store_true",
                    help="rates 4000..48000 (to about 4x ours' clean capacity), no burst: the plateau check")
    ap.add_argument("--json", action="store_true", help="JSON document on stdout (table on stderr)")
    ap.add_argument("--token", help="namespace token (bench/dhcp.sh passes one for its trap)")
    ap.add_argument("--run-dir", help="where configs, leases, logs and raw perfdhcp reports go")
    ap.add_argument("--deadline-min", type=float, default=20.0, help="stop starting new runs after this")
    args = ap.parse_args(argv)
    # Ctrl-C and SIGTERM (bench/dhcp.sh's trap, `timeout`) end the run through the
    # normal exit path, so NetLab kills our processes and removes the namespaces.
    # (A background job of a non-interactive shell starts with SIGINT ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if os.geteuid() != 0:
        print("dhcp bench: needs root (network namespaces; DHCP is broadcast and must stay inside them)",
              file=sys.stderr)
        return 2
    perfdhcp = tool("perfdhcp", "/usr/sbin/perfdhcp")
    if not perfdhcp:
        print("dhcp bench: perfdhcp not installed (Debian package kea-admin)", file=sys.stderr)
        return 2
    default_rates = OVERLOAD_RATES if args.overload else QUICK_RATES if args.quick else FULL_RATES
    rates = [int(x) for x in args.rates.split(",")] if args.rates else list(default_rates)
    if args.overload:
        args.burst = 0
    rates.sort()
    period = args.period or (2 if args.quick else 5)
    if not 1 <= period <= 60 or any(not 1 <= r <= 50_000 for r in rates) or not 0 <= args.burst <= 10_000:
        print("dhcp bench: period 1..60 s, rates 1..50000/s, burst 0..10000", file=sys.stderr)
        return 2
    notes: list[str] = []
    servers = []
    for kind in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if kind not in SERVER_KINDS:
            print(f"dhcp bench: unknown server {kind!r}", file=sys.stderr)
            return 2
        why = server_missing(kind)
        if why:
            notes.append(f"{kind} skipped: {why}")
            log(f"skipping {kind}: {why}")
        else:
            servers.append(kind)
    if not servers:
        print("dhcp bench: no server to run", file=sys.stderr)
        return 2

    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="bootorch-dhcp-bench-"))
    raw_dir = run_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline_min * 60
    machine = machine_info()
    machine["fsync_ms"] = fsync_ms(raw_dir)
    machine["loadavg_start"] = os.getloadavg()[0]  # other work on the machine skews every figure
    doc: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
                 "servers": servers, "rates": rates, "period_s": period, "subnet": SUBNET, "pool": list(POOL),
                 "knee_pct": KNEE_PCT, "sweep": [], "burst": [], "notes": notes, "run_dir": str(run_dir)}
    lab_kwargs = {"prefix": "bd"}
    if args.token:
        lab_kwargs["token"] = args.token
    with NetLab(**lab_kwargs) as lab:
        pair = dhcp_pair(lab, run_dir / "work", subnet=SUBNET, client_ip=CLIENT_IP)
        log(f"namespaces {pair.server_ns.name} / {pair.client_ns.name}; run dir {run_dir}")
        for rate in rates:
            for kind in servers:
                if time.monotonic() > deadline:
                    notes.append(f"deadline reached: sweep stopped before {kind} r={rate}")
                    break
                r = sweep_run(lab, pair, perfdhcp, kind, rate, period, f"r{rate}", raw_dir)
                doc["sweep"].append(r)
                log(f"{kind:8} r={rate:<5} achieved {r['achieved']:>7.1f}/s unanswered {r['unanswered_pct']:5.1f}% "
                    f"cpu {r['server_cpu_s']:.2f}s rcvbuf {r['rcvbuf_errors_server']},{r['rcvbuf_errors_client']} "
                    f"rc={r['perfdhcp_rc']}")
        if args.burst:
            for kind in servers:
                if time.monotonic() > deadline:
                    notes.append(f"deadline reached: burst skipped for {kind}")
                    continue
                b = burst_run(lab, pair, perfdhcp, kind, args.burst, raw_dir, avalanche_timeout=60)
                doc["burst"].append(b)
                log(f"{kind:8} burst {b.get('acks_1s')}/{b.get('discovers')} within 1 s; "
                    f"avalanche {b.get('avalanche_s')} s")
    doc["machine"]["loadavg_end"] = os.getloadavg()[0]
    doc["summary"] = summarize(doc["sweep"], servers, rates)
    base = doc["summary"].get("dnsmasq")
    if base:
        for kind, s in doc["summary"].items():
            for key in ("peak_achieved", "best_achieved"):
                s[f"{key}_vs_dnsmasq"] = round(s[key] / base[key], 2) if base[key] else None
    table = render_table(doc)
    (run_dir / "result.json").write_text(json.dumps(doc, indent=2))
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(doc, indent=2))
    else:
        print(table)
    log(f"raw reports and logs in {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
