"""Boot storm: N simulated PXE nodes behind one rate-limited link, three admission policies.

    sudo .venv/bin/python bench/storm.py                    # 200 nodes, ~10 min, table on stdout
    sudo .venv/bin/python bench/storm.py --nodes 1000 --json out.json --png docs/storm.png

Each policy runs in fresh namespaces: ``bootorch sim up`` (the clients, tbf on
the boot server's end of the veth) and ``bootorch rollout`` (the boot server
and the scheduler, inside the server's namespace) as subprocesses, killed by
PID and cleaned up on any exit. Policies:

* ``storm``: everything woken at once (``max_downloading: N``, not adaptive,
  ``power_on_rate: 1000``);
* ``fixed``: a fixed batch (``max_downloading: --batch``, not adaptive);
* ``adaptive``: bootorch's admission (``max_downloading: N``, the adaptive
  window: slow start gated on real downloads, halved on retransmits or client
  re-sends, a quarter off when the round trip shows too many blocks queued).

Figures per policy: makespan (first wake to the last node ready or failed),
the wire lower bound N x bytes-per-node / link rate, their ratio, TFTP
retransmits (server, from its metrics), client timeouts and give-ups (the
simulator's counters), tbf drops, failed nodes, p50/p99 per-node boot time
(wake to ready), and the server's TFTP requests that waited for a slot or were
dropped unanswered (``tftp_waited``/``tftp_refused`` in the JSON), its finished
transfers by result (``tftp_results``, from ``bootorch_file_transfers_total``),
and from its TFTP log (the rollout runs with that logger at DEBUG; the log is
``rollout.err`` in the work directory): failed transfers by reason, split by
whether the client had ACKed (``server_tftp_failures``), and how long the
transfers that needed resends went without progress (``longest_stall_s``,
``stalls_over_10s``/``_30s``: how close a client came to the server's 60 s
``max_stall``). Stage counts over time go to a PNG (matplotlib, the ``bench``
extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.sim.plan import SimPlan, write_sim_plan  # noqa: E402

STAGES = ["pending", "waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready", "failed"]
RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def rate_bits(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?bit)", rate.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{rate!r}: write e.g. 100mbit")
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


def size(v: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", v)
    if not m:
        raise argparse.ArgumentTypeError(f"{v!r}: write bytes, or e.g. 700k, 3.8M (10^3, 10^6)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[m.group(2)])


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline and b"\n" not in buf:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


SCRAPER = r"""
import sys, time, urllib.request, json
url, out, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.time(); rows = []
while time.time() - t0 < limit:
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        time.sleep(0.5); continue
    row = {"t": time.time()}
    for line in text.splitlines():
        for name in ("bootorch_tftp_retransmits_total", "bootorch_tftp_refused_requests_total",
                     "bootorch_tftp_waited_requests_total",
                     "bootorch_tftp_bytes_sent_total", "bootorch_admission_window"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                row[name] = row.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if line.startswith('bootorch_file_transfers_total{') and 'protocol="tftp"' in line:
            result = line.split('result="', 1)[1].split('"', 1)[0] if 'result="' in line else "?"
            row["tftp_" + result] = float(line.rsplit(" ", 1)[1])
    rows.append(row)
    with open(out, "w") as f: json.dump(rows, f)
    time.sleep(1.0)
"""


#: ``bootorch rollout`` with the boot server's TFTP log at DEBUG on stderr: each failed transfer (also one
#: before any ACK) and each finished one that needed resends, with its longest stall (parsed below). Run
#: inside the server's namespace with BOOTORCH_NETNS set, so the rollout does not re-execute itself there.
ROLLOUT = r"""
import logging, sys
h = logging.StreamHandler(sys.stderr)
h.setFormatter(logging.Formatter("%(message)s"))
lg = logging.getLogger("orchestrator.bootserver.tftp")
lg.setLevel(logging.DEBUG); lg.addHandler(h); lg.propagate = False
from orchestrator.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
SERVER_LOG = re.compile(r"^tftp: .* to [^ ]+ (?:failed \((\w+)(, before any ACK)?\)|(\w+)) after [0-9.]+s: .*longest stall ([0-9.]+)s$", re.M)


def server_log(text: str) -> dict:
    """The TFTP lines of the rollout's stderr: failures by result, and stalls of the transfers that needed resends."""
    failed: Counter[str] = Counter()
    stalls = []
    for m in SERVER_LOG.finditer(text):
        if m.group(1):
            failed[m.group(1) + (" (before any ACK)" if m.group(2) else "")] += 1
        stalls.append(float(m.group(4)))
    return {"server_tftp_failures": dict(sorted(failed.items())), "resent_transfers": len(stalls),
            "longest_stall_s": max(stalls, default=0.0), "stalls_over_10s": sum(s > 10 for s in stalls),
            "stalls_over_30s": sum(s > 30 for s in stalls)}


def run_policy(policy: str, args: argparse.Namespace, index: int) -> dict:
    pid = os.getpid()
    n = args.nodes
    work = Path(tempfile.mkdtemp(prefix=f"bt-storm-{policy}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    server_ns, client_ns = f"bt-sims-{pid}-{index}", f"bt-simc-{pid}-{index}"
    port = 19800 + index
    adm = {"storm": dict(max_downloading=n, adaptive=False, power_on_rate=1000.0),
           "fixed": dict(max_downloading=args.batch, adaptive=False, power_on_rate=args.power_on_rate),
           "adaptive": dict(max_downloading=n, adaptive=True, power_on_rate=args.power_on_rate)}[policy]
    sp = SimPlan(nodes=n, namespace=server_ns, interface=f"bts{pid}{index}"[-15:], control=str(work / "sim.sock"),
                 loader_size=args.loader, kernel_size=args.kernel, initrd_size=args.initrd,
                 max_transfers=args.max_transfers, metrics_listen=f"127.0.0.1:{port}",
                 retries={"wake": 2, "power_cycle": 1}, failure_budget="100%", **adm)
    plan = write_sim_plan(work, sp)
    sim_cmd = [sys.executable, "-m", "orchestrator.sim.cli", "up", str(plan), "--rate", args.rate, "--burst", args.burst,
               "--client-ns", client_ns, "--client-dev", f"btc{pid}{index}"[-15:], "--post-delay", str(args.post),
               "--post-jitter", str(args.post_jitter), "--kernel-delay", str(args.kernel_delay),
               "--stats-out", str(work / "sim-stats.json")]
    sim_cmd += ["--limit", args.limit] if args.limit else ["--latency", args.latency]
    print(f"[{policy}] {n} nodes, {sp.bytes_per_node / 1e6:.2f} MB/node, link {args.rate}: starting", file=sys.stderr, flush=True)
    sim = subprocess.Popen(sim_cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(work / "sim.err", "wb"),
                           start_new_session=True)
    scraper = rollout = None
    result: dict = {"policy": policy, "admission": adm}
    try:
        line = _read_line(sim, 60)
        if not line.startswith("sim ready"):
            raise RuntimeError(f"simulator did not start: {line!r}; see {work / 'sim.err'}")
        scraper = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", SCRAPER,
                                    f"http://127.0.0.1:{port}/metrics", str(work / "metrics.json"), str(args.time_limit)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        rollout = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", ROLLOUT, "rollout", str(plan), "--json"],
                                   cwd=REPO, env={**os.environ, "BOOTORCH_NETNS": server_ns},
                                   stdout=open(work / "rollout.json", "wb"), stderr=open(work / "rollout.err", "wb"),
                                   start_new_session=True)
        try:
            rollout.wait(timeout=args.time_limit)
            result["timed_out"] = False
        except subprocess.TimeoutExpired:
            result["timed_out"] = True
            _stop(rollout)
        result["wall"] = time.time() - t0
    finally:
        for p in (scraper, rollout):
            if p is not None:
                _stop(p, grace=10)
        _stop(sim)
    try:
        out = json.loads((work / "rollout.json").read_text())
    except ValueError:
        raise RuntimeError(f"rollout gave no JSON (timed out: {result.get('timed_out')}); see {work / 'rollout.err'}")
    stats = json.loads((work / "sim-stats.json").read_text()) if (work / "sim-stats.json").exists() else {}
    metrics = json.loads((work / "metrics.json").read_text()) if (work / "metrics.json").exists() else []
    result.update(analyse(out, stats, metrics, sp, args))
    result.update(server_log((work / "rollout.err").read_text(errors="replace") if (work / "rollout.err").exists() else ""))
    if args.keep:
        result["workdir"] = str(work)
    else:  # the logs stay only with --keep (or when the rollout gave no JSON, above)
        shutil.rmtree(work, ignore_errors=True)
        result["workdir"] = None
    return result


def analyse(out: dict, stats: dict, metrics: list, sp: SimPlan, args: argparse.Namespace) -> dict:
    nodes = out["nodes"]
    wakes = [t["time"] for nd in nodes for t in nd["timeline"] if t["to"] == "waking"]
    start = min(wakes) if wakes else 0.0
    ends = [nd["timeline"][-1]["time"] for nd in nodes if nd["result"] in ("ready", "failed") and nd["timeline"]]
    per_node = []
    for nd in nodes:
        if nd["result"] != "ready":
            continue
        first = next(t["time"] for t in nd["timeline"] if t["to"] == "waking")
        per_node.append(nd["timeline"][-1]["time"] - first)
    per_node.sort()
    link = rate_bits(args.rate) / 8
    lower = sp.nodes * sp.bytes_per_node / link
    makespan = (max(ends) - start) if ends else None
    qdisc = stats.get("qdisc", "")
    dropped = re.search(r"dropped (\d+)", qdisc)
    last = metrics[-1] if metrics else {}
    curves = {s: [] for s in STAGES}
    times = []
    events = sorted((t["time"] - start, nd["name"], t["to"]) for nd in nodes for t in nd["timeline"])
    where = {nd["name"]: "pending" for nd in nodes}
    horizon = (makespan or (events[-1][0] if events else 0)) + 2
    step = max(0.25, horizon / 400)
    i = 0
    tt = 0.0
    while tt <= horizon:
        while i < len(events) and events[i][0] <= tt:
            where[events[i][1]] = events[i][2]
            i += 1
        times.append(round(tt, 3))
        counts = {s: 0 for s in STAGES}
        for s in where.values():
            counts[s] += 1
        for s in STAGES:
            curves[s].append(counts[s])
        tt += step
    q = lambda p: per_node[min(len(per_node) - 1, int(p * len(per_node)))] if per_node else None  # noqa: E731
    totals = stats.get("totals", {})
    return {
        "nodes": sp.nodes, "bytes_per_node": sp.bytes_per_node, "link_bytes_per_s": link,
        "lower_bound_s": lower, "makespan_s": makespan, "ratio": (makespan / lower) if makespan else None,
        "ready": out["ready"], "failed": out["failed"], "unfinished": sp.nodes - out["ready"] - out["failed"],
        "p50_s": statistics.median(per_node) if per_node else None, "p99_s": q(0.99),
        "tftp_retransmits": last.get("bootorch_tftp_retransmits_total"),
        "tftp_refused": last.get("bootorch_tftp_refused_requests_total"),
        "tftp_waited": last.get("bootorch_tftp_waited_requests_total"),
        "tftp_results": {k[len("tftp_"):]: v for k, v in last.items() if k.startswith("tftp_")},
        "client_tftp_timeouts": totals.get("tftp_timeouts"), "client_dhcp_timeouts": totals.get("dhcp_timeouts"),
        "client_gave_up": totals.get("gave_up"), "boots": totals.get("boots"),
        "gave_up_reasons": sorted({r.split(" on ")[0].split(" after ")[0] for g in stats.get("gave_up", []) for r in g["reasons"]}),
        "power_cycles": sum(1 for nd in nodes for a in nd["actions"] if a["action"] == "power_cycle"),
        "rewakes": sum(1 for nd in nodes for a in nd["actions"] if a["action"] == "wake") - sp.nodes,
        "qdisc_dropped": int(dropped.group(1)) if dropped else None,
        "window_history": [(w["time"] - start, w["window"]) for w in out.get("window_history", [])],
        "curves": {"t": times, **curves},
        "failed_reasons": sorted({nd["reason"].split(";")[0][:100] for nd in nodes if nd["result"] == "failed"})[:5],
    }


def table(results: list[dict]) -> str:
    rows = ["| policy | makespan | lower bound | ratio | ready | failed | p50 | p99 | TFTP retransmits | client timeouts (TFTP/DHCP) | gave up | power cycles | tbf drops |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt="{:.1f}": "–" if v is None else fmt.format(v)  # noqa: E731
    for r in results:
        rows.append(f"| {r['policy']} | {f(r['makespan_s'])} s | {f(r['lower_bound_s'])} s | {f(r['ratio'], '{:.2f}')}× | "
                    f"{r['ready']} | {r['failed']}{' (+' + str(r['unfinished']) + ' unfinished)' if r['unfinished'] else ''} | "
                    f"{f(r['p50_s'])} s | {f(r['p99_s'])} s | {f(r['tftp_retransmits'], '{:.0f}')} | "
                    f"{r['client_tftp_timeouts']}/{r['client_dhcp_timeouts']} | {r['client_gave_up']} | {r['power_cycles']} | "
                    f"{f(r['qdisc_dropped'], '{:d}')} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("waiting (pending)", ["pending"], "#bbbbbb"), ("powering on (waking, pxe_dhcp)", ["waking", "pxe_dhcp"], "#f0c05a"),
              ("downloading (loader..initrd)", ["loader", "config", "kernel", "initrd"], "#4f8fd6"),
              ("kernel up (os_dhcp, ssh)", ["os_dhcp", "ssh"], "#9b6fd1"), ("ready", ["ready"], "#3aa65a"),
              ("failed", ["failed"], "#d64f4f")]
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), sharex=True)
    axes = axes if len(results) > 1 else [axes]
    for ax, r in zip(axes, results):
        c = r["curves"]
        for label, stages, color in groups:
            ax.plot(c["t"], [sum(c[s][i] for s in stages) for i in range(len(c["t"]))], label=label, color=color, lw=1.8)
        ax.axvline(r["lower_bound_s"], color="k", ls="--", lw=1)
        ax.text(r["lower_bound_s"], r["nodes"] * 0.9, " wire lower bound", fontsize=8)
        ms = f"{r['makespan_s']:.0f} s ({r['ratio']:.2f}× bound)" if r["makespan_s"] else "unfinished"
        ax.set_title(f"{r['policy']}: makespan {ms}, {r['failed']} failed", fontsize=10, loc="left")
        ax.set_ylabel("nodes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.45))
    axes[-1].set_xlabel("seconds since the first wake")
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=200, help="simulated nodes (up to 1000)")
    ap.add_argument("--policies", default="storm,fixed,adaptive")
    ap.add_argument("--batch", type=int, default=10, help="the fixed policy's max_downloading")
    ap.add_argument("--rate", default="50mbit", help="the boot server's link (tbf rate)")
    ap.add_argument("--burst", default="64kb")
    ap.add_argument("--limit", default="256kb", help="tbf queue in bytes (the NIC/switch buffer); '' uses --latency")
    ap.add_argument("--latency", default="50ms")
    # A 1 GbE site with 45 MB of kernel + initrd per node, scaled by 1/20 in rate and size
    # (docs/benchmarks.md says why: at 1/10 the two Python processes of the rig ran out of CPU first).
    ap.add_argument("--loader", type=size, default=size("21k"))
    ap.add_argument("--kernel", type=size, default=size("350k"))
    ap.add_argument("--initrd", type=size, default=size("1.9M"))
    ap.add_argument("--max-transfers", type=int, default=200, help="bootserver.max_transfers")
    ap.add_argument("--power-on-rate", type=float, default=20.0, help="nodes/s for fixed and adaptive")
    ap.add_argument("--post", type=float, default=1.0, help="simulated POST seconds")
    ap.add_argument("--post-jitter", type=float, default=1.0)
    ap.add_argument("--kernel-delay", type=float, default=1.0)
    ap.add_argument("--time-limit", type=float, default=0, help="seconds per policy (default 8x the lower bound, >= 300)")
    ap.add_argument("--json", default=None, help="write the results (with curves) here")
    ap.add_argument("--keep", action="store_true", help="keep each policy's work directory (logs, rollout JSON) in /dev/shm")
    ap.add_argument("--png", default=None, help="stage-count plot (e.g. docs/storm.png)")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 1000:
        ap.error("--nodes must be 1..1000")
    rate_bits(args.rate)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    lower = args.nodes * (args.loader + args.kernel + args.initrd) / (rate_bits(args.rate) / 8)
    if not args.time_limit:
        args.time_limit = max(300.0, 8 * lower)
    results = []
    for i, policy in enumerate(p for p in args.policies.split(",") if p):
        r = run_policy(policy, args, i)
        results.append(r)
        print(f"[{policy}] makespan {r['makespan_s']} s, ratio {r['ratio']}, failed {r['failed']}, "
              f"retransmits {r['tftp_retransmits']}, waited {r['tftp_waited']}, refused {r['tftp_refused']}, "
              f"gave up {r['client_gave_up']} {r['gave_up_reasons']}, power cycles {r['power_cycles']}, "
              f"TFTP results {r['tftp_results']}, server-side failures {r['server_tftp_failures']}, "
              f"{r['resent_transfers']} transfers resent (longest stall {r['longest_stall_s']} s, "
              f"{r['stalls_over_10s']} over 10 s, {r['stalls_over_30s']} over 30 s)", file=sys.stderr, flush=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uname_r": os.uname().release,
           "cpus": os.cpu_count(), "args": {k: v for k, v in vars(args).items()}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.png:
        title = (f"{args.nodes} simulated nodes, {(args.loader + args.kernel + args.initrd) / 1e6:.2f} MB each, "
                 f"boot server link {args.rate} (tbf, queue {args.limit or args.latency})")
        plot(results, Path(args.png), title)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
