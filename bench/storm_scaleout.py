"""Scale-out storm: one boot server for every node against several satellite boot servers, in one run.

    sudo .venv/bin/python bench/storm_scaleout.py                       # 1 x 600 and 4 x 150, 25 Mbit/s links
    sudo .venv/bin/python bench/storm_scaleout.py --servers 2 --per-server 50 --json out.json

Two layouts, the same nodes, the same link per server, the same file sizes:

* ``single``: :func:`bench.storm.run_policy` with the ``adaptive`` policy:
  ``servers x per-server`` simulated nodes behind one boot server on one
  rate-limited link (``bootorch rollout`` serving DHCP/TFTP itself).
* ``satellites``: ``servers`` boot servers, each ``bootorch serve`` in its
  own namespace on its own rate-limited link (tbf on its end of the veth)
  with its own simulator (``bootorch sim up``: ``per-server`` nodes on its
  own subnet). One orchestrator (``bootorch rollout``, ``dhcp.mode:
  external``, in a namespace of its own) follows every satellite's event
  stream over the control API's TCP port with a token, admits nodes per
  server (``servers:`` with a window each, fed by that satellite's load
  lines), powers nodes on through each simulator's control socket
  (``network.relayed`` with ``wake: bmc``: the racks are routed) and checks
  readiness over SSH through the satellite's namespace, which routes::

      [orchestrator ns] --mgmt veth 10.200.i.0/30--> [server ns i: bootorch serve] ==tbf link==> [clients ns i: sim]
                                                      (ip_forward; route 10.(100+i).0.0/16)

Figures per layout: makespan (first wake to the last node ready or failed),
the bound of the busiest server (its nodes x bytes per node / its link rate),
their ratio, failed and unfinished nodes, client give-ups and power cycles;
for ``satellites`` also each server's own makespan, bound and tbf drops, and
the speed-up (single's makespan / satellites'). Every process is started here
and stopped by PID; namespaces made here are deleted on any exit (the
simulators remove their own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import storm  # noqa: E402
from orchestrator.lab.netns import run_checked  # noqa: E402
from orchestrator.sim.plan import SimPlan, write_client_key, write_sim_plan  # noqa: E402

CONTROL_PORT = 7100


def mgmt(i: int) -> tuple[str, str]:
    """The orchestrator's and satellite ``i``'s addresses on their management /30."""
    return f"10.200.{i}.1", f"10.200.{i}.2"


def boot_net(i: int) -> dict[str, str]:
    return {"subnet": f"10.{100 + i}.0.0/16", "server": f"10.{100 + i}.0.1", "first_node_ip": f"10.{100 + i}.1.1",
            "first_mac": f"52:54:00:6{i:x}:00:01"}


def _wait_tcp(ns: str, host: str, port: int, timeout: float) -> bool:
    """True once ``host:port`` accepts a connection from inside namespace ``ns``."""
    probe = ("import socket,sys,time\n"
             "d=time.time()+float(sys.argv[3])\n"
             "while time.time()<d:\n"
             " try: socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close(); sys.exit(0)\n"
             " except OSError: time.sleep(0.2)\n"
             "sys.exit(1)\n")
    cp = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe, host, str(port), str(timeout)],
                        timeout=timeout + 10)
    return cp.returncode == 0


class Rig:
    """The satellites layout: namespaces, links, simulators, satellites and the orchestrator's plan."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        pid = os.getpid()
        self.pid = pid
        self.orch_ns = f"bt-soo-{pid}"
        self.server_ns = [f"bt-sos-{pid}-{i}" for i in range(args.servers)]
        self.client_ns = [f"bt-soc-{pid}-{i}" for i in range(args.servers)]
        self.procs: list[subprocess.Popen] = []
        self.sims: list[subprocess.Popen] = []
        self.made_orch_ns = False
        self.sps: list[SimPlan] = []

    # ------------------------------------------------------------------ plans
    def satellite_plan(self, i: int) -> Path:
        a = self.args
        d = self.work / f"sat{i}"
        sp = SimPlan(nodes=a.per_server, namespace=self.server_ns[i], interface=f"bts{self.pid}{i}"[-15:],
                     control=str(d / "sim.sock"), loader_size=a.loader, kernel_size=a.kernel, initrd_size=a.initrd,
                     max_transfers=a.max_transfers, metrics_listen=f"127.0.0.1:{19900 + i}", name=f"sat{i}",
                     node_prefix=f"r{i}n", rack=f"rack{i}", **boot_net(i))
        self.sps.append(sp)
        path = write_sim_plan(d, sp)
        doc = yaml.safe_load(path.read_text())
        token = d / "token"
        token.write_text(secrets.token_hex(24) + "\n")
        token.chmod(0o600)
        # The satellite serves and streams; the orchestrator owns admission, power and readiness.
        doc["readiness"]["enabled"] = False
        doc["control"] = {"socket": "control.sock", "listen": f"{mgmt(i)[1]}:{CONTROL_PORT}", "token": {"file": "token"}}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def orchestrator_plan(self) -> Path:
        a = self.args
        d = self.work / "orch"
        write_client_key(d / "ssh" / "id_ed25519")
        width = max(3, len(str(a.per_server)))
        nodes, relayed, servers = [], [], []
        for i, sp in enumerate(self.sps):
            nodes.append({"name": f"r{i}n[{1:0{width}d}-{a.per_server:0{width}d}]", "mac": sp.first_mac,
                          "ip": sp.first_node_ip, "profile": "sim", "rack": f"rack{i}",
                          "bmc": str(self.work / f"sat{i}" / "sim.sock")})
            relayed.append({"subnet": sp.subnet, "gateway": sp.server, "racks": [f"rack{i}"], "wake": "bmc"})
            servers.append({"name": f"sat{i}", "racks": [f"rack{i}"],
                            "admission": {"max_downloading": a.per_server, "adaptive": True},
                            "satellite": {"control": f"{mgmt(i)[1]}:{CONTROL_PORT}",
                                          "token": {"file": str(self.work / f"sat{i}" / "token")}}})
        n = a.servers * a.per_server
        plan = {
            "version": 1, "name": "orch", "state_dir": "state",
            "network": {"namespace": self.orch_ns, "interface": f"boo{self.pid}0"[-15:], "subnet": "10.200.0.0/16",
                        "server": mgmt(0)[0], "relayed": relayed},
            "dhcp": {"mode": "external"},
            # The boot files the satellites serve (the orchestrator serves none: it validates the profiles against them).
            "boot": {"root": str(self.work / "sat0" / "tftpboot"), "config_names": ["mac", "ip"]},
            "profiles": {"sim": {"kernel": "vmlinuz", "initrd": "initrd.img", "root": "initramfs", "ip": "dhcp"}},
            "nodes": nodes,
            "power": {"bmc": {"driver": "sim", "address": str(self.work / "sat0" / "sim.sock")}},
            "servers": servers,
            "rollout": {"admission": {"max_downloading": n, "adaptive": True, "power_on_rate": a.power_on_rate * a.servers,
                                      "rack_power_on_rate": a.power_on_rate},
                        "retries": {"wake": 2, "power_cycle": 1}, "failure_budget": "100%"},
            "readiness": {"ssh": {"user": "root", "key": "ssh/id_ed25519", "host_key_policy": "tofu"},
                          "checks": [{"name": "kernel", "kernel": r"^6\."}]},
            "metrics": {"listen": ""},
        }
        path = d / "plan.yaml"
        path.write_text(yaml.safe_dump(plan, sort_keys=False))
        return path

    # ------------------------------------------------------------------ network
    def link_management(self) -> None:
        """Management veths orchestrator <-> each satellite, and the routes readiness needs."""
        run_checked(["ip", "netns", "add", self.orch_ns])
        self.made_orch_ns = True
        run_checked(["ip", "-n", self.orch_ns, "link", "set", "lo", "up"])
        for i, sp in enumerate(self.sps):
            o_dev, s_dev = f"boo{self.pid}{i}"[-15:], f"bom{self.pid}{i}"[-15:]
            o_ip, s_ip = mgmt(i)
            run_checked(["ip", "-n", self.orch_ns, "link", "add", o_dev, "type", "veth", "peer", "name", s_dev,
                         "netns", self.server_ns[i]])
            run_checked(["ip", "-n", self.orch_ns, "addr", "add", f"{o_ip}/30", "dev", o_dev])
            run_checked(["ip", "-n", self.server_ns[i], "addr", "add", f"{s_ip}/30", "dev", s_dev])
            run_checked(["ip", "-n", self.orch_ns, "link", "set", o_dev, "up"])
            run_checked(["ip", "-n", self.server_ns[i], "link", "set", s_dev, "up"])
            run_checked(["ip", "-n", self.orch_ns, "route", "add", sp.subnet, "via", s_ip])
            run_checked(["ip", "netns", "exec", self.server_ns[i], "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            run_checked(["ip", "-n", self.client_ns[i], "route", "add", "default", "via", sp.server])

    # ------------------------------------------------------------------ processes
    def start_sims(self) -> None:
        a = self.args
        for i, sp in enumerate(self.sps):
            d = self.work / f"sat{i}"
            cmd = [sys.executable, "-m", "orchestrator.sim.cli", "up", str(d / "plan.yaml"), "--rate", a.rate,
                   "--burst", a.burst, "--client-ns", self.client_ns[i], "--client-dev", f"btc{self.pid}{i}"[-15:],
                   "--post-delay", str(a.post), "--post-jitter", str(a.post_jitter), "--kernel-delay",
                   str(a.kernel_delay), "--stats-out", str(d / "sim-stats.json"), "--seed", str(i + 1), "--no-wol"]
            cmd += ["--limit", a.limit] if a.limit else ["--latency", a.latency]
            p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(d / "sim.err", "wb"),
                                 start_new_session=True)
            self.sims.append(p)
        for i, p in enumerate(self.sims):
            line = storm._read_line(p, 60)
            if not line.startswith("sim ready"):
                raise RuntimeError(f"simulator {i} did not start: {line!r}; see {self.work / f'sat{i}' / 'sim.err'}")

    def start_satellites(self) -> None:
        for i in range(self.args.servers):
            d = self.work / f"sat{i}"
            p = subprocess.Popen(["ip", "netns", "exec", self.server_ns[i], sys.executable, "-c", storm.ROLLOUT, "serve",
                                  str(d / "plan.yaml")], cwd=REPO, env={**os.environ, "BOOTORCH_NETNS": self.server_ns[i]},
                                 stdout=open(d / "serve.out", "wb"), stderr=open(d / "serve.err", "wb"),
                                 start_new_session=True)
            self.procs.append(p)
        for i in range(self.args.servers):
            if not _wait_tcp(self.orch_ns, mgmt(i)[1], CONTROL_PORT, 60):
                raise RuntimeError(f"satellite {i} did not listen on {mgmt(i)[1]}:{CONTROL_PORT}; "
                                   f"see {self.work / f'sat{i}' / 'serve.err'}")

    def start_scrapers(self) -> None:
        for i in range(self.args.servers):
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.server_ns[i], sys.executable, "-c", storm.SCRAPER,
                 f"http://127.0.0.1:{19900 + i}/metrics", str(self.work / f"sat{i}" / "metrics.json"),
                 str(self.args.time_limit)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def rollout(self, plan: Path) -> dict:
        d = self.work / "orch"
        t0 = time.time()
        p = subprocess.Popen(["ip", "netns", "exec", self.orch_ns, sys.executable, "-m", "orchestrator", "rollout",
                              str(plan), "--json"], cwd=REPO, env={**os.environ, "BOOTORCH_NETNS": self.orch_ns},
                             stdout=open(d / "rollout.json", "wb"), stderr=open(d / "rollout.err", "wb"),
                             start_new_session=True)
        self.procs.append(p)
        timed_out = False
        status = None
        if self.args.status_at:
            time.sleep(self.args.status_at)
            # What on-call sees mid-rollout: `bootorch status` asks the orchestrator over its control socket.
            cp = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(plan)], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
            (d / "status.txt").write_text(cp.stdout)
            status = cp.stdout[cp.stdout.find("boot servers"):] if "boot servers" in cp.stdout else cp.stdout[-2000:]
        try:
            p.wait(timeout=self.args.time_limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            storm._stop(p)
        return {"wall": time.time() - t0, "timed_out": timed_out, "status": status}

    def stop(self) -> None:
        for p in reversed(self.procs):
            storm._stop(p, grace=10)
        for p in self.sims:  # each simulator removes the namespaces and veth it made
            storm._stop(p)
        if self.made_orch_ns:  # deleting it deletes the management veths (both ends)
            run_checked(["ip", "netns", "del", self.orch_ns], check=False)
            self.made_orch_ns = False


def run_satellites(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bt-scaleout-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    rig = Rig(args, work)
    n = args.servers * args.per_server
    print(f"[satellites] {args.servers} servers x {args.per_server} nodes, link {args.rate} each: starting",
          file=sys.stderr, flush=True)
    try:
        for i in range(args.servers):
            rig.satellite_plan(i)
        plan = rig.orchestrator_plan()
        rig.start_sims()
        rig.link_management()
        rig.start_satellites()
        rig.start_scrapers()
        run = rig.rollout(plan)
    finally:
        rig.stop()
    try:
        out = json.loads((work / "orch" / "rollout.json").read_text())
    except ValueError:
        raise RuntimeError(f"rollout gave no JSON (timed out: {run.get('timed_out')}); see {work / 'orch' / 'rollout.err'}")
    result = {"layout": "satellites", "servers": args.servers, "nodes": n, **run}
    result.update(analyse_satellites(out, rig, args))
    if args.keep:
        result["workdir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def analyse_satellites(out: dict, rig: Rig, args: argparse.Namespace) -> dict:
    nodes = out["nodes"]
    link = storm.rate_bits(args.rate) / 8
    wakes = [t["time"] for nd in nodes for t in nd["timeline"] if t["to"] == "waking"]
    start = min(wakes) if wakes else 0.0
    per_server = []
    for i, sp in enumerate(rig.sps):
        mine = [nd for nd in nodes if nd["name"].startswith(f"r{i}n")]
        ends = [nd["timeline"][-1]["time"] for nd in mine if nd["result"] in ("ready", "failed") and nd["timeline"]]
        stats_path = rig.work / f"sat{i}" / "sim-stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        metrics_path = rig.work / f"sat{i}" / "metrics.json"
        try:
            last = (json.loads(metrics_path.read_text()) or [{}])[-1]
        except (OSError, ValueError):
            last = {}
        dropped = re.search(r"dropped (\d+)", stats.get("qdisc", ""))
        totals = stats.get("totals", {})
        bound = sp.nodes * sp.bytes_per_node / link
        ms = (max(ends) - start) if ends else None
        per_server.append({
            "server": f"sat{i}", "nodes": sp.nodes, "bound_s": bound, "makespan_s": ms,
            "ratio": ms / bound if ms else None,
            "ready": sum(nd["result"] == "ready" for nd in mine), "failed": sum(nd["result"] == "failed" for nd in mine),
            "client_gave_up": totals.get("gave_up"), "client_tftp_timeouts": totals.get("tftp_timeouts"),
            "tftp_retransmits": last.get("bootorch_tftp_retransmits_total"),
            "qdisc_dropped": int(dropped.group(1)) if dropped else None,
        })
    ends = [nd["timeline"][-1]["time"] for nd in nodes if nd["result"] in ("ready", "failed") and nd["timeline"]]
    makespan = (max(ends) - start) if ends else None
    busiest = max(s["bound_s"] for s in per_server)
    return {
        "bytes_per_node": rig.sps[0].bytes_per_node, "link_bytes_per_s": link, "busiest_bound_s": busiest,
        "makespan_s": makespan, "ratio": makespan / busiest if makespan else None,
        "ready": out["ready"], "failed": out["failed"], "unfinished": len(nodes) - out["ready"] - out["failed"],
        "client_gave_up": sum(s["client_gave_up"] or 0 for s in per_server),
        "power_cycles": sum(1 for nd in nodes for a in nd["actions"] if a["action"] == "power_cycle"),
        "failed_reasons": sorted({nd["reason"].split(";")[0][:100] for nd in nodes if nd["result"] == "failed"})[:5],
        "per_server": per_server,
    }


def run_single(args: argparse.Namespace) -> dict:
    sargs = storm.parse_args(["--nodes", str(args.servers * args.per_server), "--rate", args.rate, "--burst", args.burst,
                              "--limit", args.limit, "--latency", args.latency, "--loader", str(args.loader),
                              "--kernel", str(args.kernel), "--initrd", str(args.initrd),
                              "--max-transfers", str(max(args.max_transfers, args.servers * args.per_server)),
                              "--power-on-rate", str(args.power_on_rate), "--post", str(args.post),
                              "--post-jitter", str(args.post_jitter), "--kernel-delay", str(args.kernel_delay),
                              "--time-limit", str(args.time_limit)] + (["--keep"] if args.keep else []))
    r = storm.run_policy("adaptive", sargs, 0)
    r.pop("curves", None)
    return {"layout": "single", "servers": 1, "busiest_bound_s": r["lower_bound_s"], **r}


def table(results: list[dict]) -> str:
    f = lambda v, fmt="{:.1f}": "–" if v is None else fmt.format(v)  # noqa: E731
    rows = ["| layout | nodes | makespan | busiest server's bound | ratio | ready | failed | client give-ups | power cycles |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "1 server" if r["layout"] == "single" else f"{r['servers']} satellites"
        rows.append(f"| {name} | {r['nodes']} | {f(r['makespan_s'])} s | {f(r['busiest_bound_s'])} s | "
                    f"{f(r['ratio'], '{:.2f}')}× | {r['ready']} | {r['failed']}"
                    f"{' (+' + str(r['unfinished']) + ' unfinished)' if r['unfinished'] else ''} | "
                    f"{r['client_gave_up']} | {r['power_cycles']} |")
    sat = next((r for r in results if r["layout"] == "satellites"), None)
    if sat:
        rows += ["", "| server | nodes | makespan | bound | ratio | ready | failed | TFTP retransmits | tbf drops |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for s in sat["per_server"]:
            rows.append(f"| {s['server']} | {s['nodes']} | {f(s['makespan_s'])} s | {f(s['bound_s'])} s | "
                        f"{f(s['ratio'], '{:.2f}')}× | {s['ready']} | {s['failed']} | {f(s['tftp_retransmits'], '{:.0f}')} | "
                        f"{s['qdisc_dropped']} |")
    single = next((r for r in results if r["layout"] == "single"), None)
    if sat and single and sat["makespan_s"] and single["makespan_s"]:
        rows += ["", f"speed-up: {single['makespan_s'] / sat['makespan_s']:.2f}× "
                     f"(wire bound: {single['busiest_bound_s'] / sat['busiest_bound_s']:.2f}×)"]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=4, help="satellite boot servers (1..8)")
    ap.add_argument("--per-server", type=int, default=150, help="simulated nodes per satellite")
    ap.add_argument("--layouts", default="single,satellites", help="which layouts to run, in order")
    ap.add_argument("--rate", default="25mbit", help="each boot server's link (tbf rate)")
    ap.add_argument("--burst", default="64kb")
    ap.add_argument("--limit", default="256kb", help="tbf queue in bytes; '' uses --latency")
    ap.add_argument("--latency", default="50ms")
    ap.add_argument("--loader", type=storm.size, default=storm.size("21k"))
    ap.add_argument("--kernel", type=storm.size, default=storm.size("350k"))
    ap.add_argument("--initrd", type=storm.size, default=storm.size("1.9M"))
    ap.add_argument("--max-transfers", type=int, default=200, help="each satellite's bootserver.max_transfers")
    ap.add_argument("--power-on-rate", type=float, default=20.0, help="power-on rate per rack (one rack per server), nodes/s")
    ap.add_argument("--post", type=float, default=1.0)
    ap.add_argument("--post-jitter", type=float, default=1.0)
    ap.add_argument("--kernel-delay", type=float, default=1.0)
    ap.add_argument("--time-limit", type=float, default=0, help="seconds per layout (default 6x the single bound, >= 300)")
    ap.add_argument("--status-at", type=float, default=0,
                    help="seconds into the satellites' rollout to run `bootorch status` (its boot-server table is kept)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directories (plans, logs) in /dev/shm")
    args = ap.parse_args(argv)
    if not 1 <= args.servers <= 8:
        ap.error("--servers must be 1..8")
    if not 1 <= args.servers * args.per_server <= 1000:
        ap.error("--servers x --per-server must be 1..1000")
    storm.rate_bits(args.rate)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm_scaleout.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    bpn = args.loader + args.kernel + args.initrd
    if not args.time_limit:
        args.time_limit = max(300.0, 6 * args.servers * args.per_server * bpn / (storm.rate_bits(args.rate) / 8))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results = []
    for layout in (x for x in args.layouts.split(",") if x):
        r = run_single(args) if layout == "single" else run_satellites(args)
        results.append(r)
        print(f"[{layout}] makespan {r['makespan_s']} s, ratio {r['ratio']}, ready {r['ready']}, failed {r['failed']}",
              file=sys.stderr, flush=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uname_r": os.uname().release,
           "cpus": os.cpu_count(), "host": socket.gethostname(), "args": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print(table(results))
    for r in results:
        if r.get("status"):
            print(f"\n`bootorch status` {args.status_at:g} s into the {r['layout']} rollout:\n{r['status']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
