#!/usr/bin/env python3
"""The cost of tracking N nodes (issue 10, item 3): tracker + journal + metrics.

A generated plan of ``--nodes`` nodes (10 000 by default; one range entry, so
the plan's own loader expands it, and loading it is timed) is rolled out by
the real :class:`~orchestrator.scheduler.Scheduler` (``run``: admission
window, power-on rate, timeout watcher, ``_consume``/``_record``) against a
simulated site:

* the **wake driver** stub starts a node's simulated boot and returns at once;
* every booting node puts on a trio memory channel (65 536 deep, as
  ``rollout`` opens it; ``send_nowait``, a full channel drops and counts, as
  the boot servers do) the BootEvents our DHCP, TFTP and HTTP servers emit for
  a pxelinux boot, with their ``detail`` payloads:

  =====  ==============================================================
  DHCP   DISCOVER in (PXEClient vendor class, arch, xid), OFFER out
         (yiaddr, boot file), REQUEST in, ACK out; 10 % of ROMs
         retransmit their DISCOVER
  TFTP   ``pxelinux.0`` and ``ldlinux.c32`` read + sent; the
         ``pxelinux.cfg`` lookup: the UUID and ``01-<mac>`` names not
         found, the hex-IP name read + sent; ``vmlinuz`` and
         ``rootfs.gz`` read + sent (storm-length downloads)
  DHCP   the kernel's ``ip=dhcp``: DISCOVER/OFFER/REQUEST/ACK without
         the PXE class
  =====  ==============================================================

  22.1 events per node on average; then SSH answers and the checks pass
  (the readiness task's two ``_record`` calls, made by the simulator: no
  probe tasks, no paramiko);
* the **metrics** are the rollout's: ``Metrics.observe_transitions`` as the
  scheduler's ``on_change``, the collector attached to the tracker and
  scheduler, and a scrape (``exposition()``, the full text Prometheus would
  fetch) every ``--scrape-every`` seconds of stream time.

Time is trio's MockClock and the scheduler's clock is ``trio.current_time``:

* **max** (default): the clock jumps whenever every task waits, so the stream
  runs as fast as the process can consume it: sustained events/s;
* ``--rate R``: the clock runs at a fixed multiple of real time, chosen so the
  model's steady-state event rate is R events/s of real time: CPU per event and
  headroom (CPU busy fraction) at a given rate. ``--max-seconds`` bounds it.

The producer's own CPU (building events, the heap of pending boot steps) and
the scrapes are timed apart (``time.process_time``) and reported separately,
so "CPU per event" is the orchestrator's side. Afterwards: journal size on
disk (``state.db`` + ``-wal``), ``bootorch status``'s ``node_rows`` over the
journal, and a restart's ``Tracker.restore(store.transitions())``, which is
checked against the live tracker.

Everything lives in a temporary directory removed at the end (``--keep`` to
keep it). ``--json`` prints JSON; otherwise a table.

    .venv/bin/python bench/track_cost.py                   # 10 000 nodes, max throughput
    .venv/bin/python bench/track_cost.py --rate 2000       # paced
    .venv/bin/python bench/track_cost.py --nodes 200 --json
"""

from __future__ import annotations

import argparse
import gc
import heapq
import io
import json
import math
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
import trio.testing

from orchestrator.events import BootEvent, EventKind
from orchestrator.metrics import Metrics
from orchestrator.oncall import node_rows
from orchestrator.present import print_status
from orchestrator.plan import load_plan
from orchestrator.power import PowerResult, Target
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from orchestrator.tracker import Stage, Tracker, plan_nodes, plan_timeouts

# --------------------------------------------------------------------------- the model

#: Seconds after the wake (plus per-node jitter) for each step of a boot.
POST = 15.0          # firmware POST until the PXE ROM's first DISCOVER
DORA_GAP = 1.0       # DISCOVER ... REQUEST (the ROM waits for offers)
DISCOVER_RETRY = 0.1  # share of ROMs that send their DISCOVER twice
LOADER = 0.3         # pxelinux.0 transfer
LDLINUX = 0.2
CFG_MISS = 0.02      # each not-found pxelinux.cfg name
KERNEL = 8.0         # vmlinuz during a boot storm
INITRD = 20.0        # rootfs.gz during a boot storm
KERNEL_BOOT = 5.0    # initrd done -> the kernel's ip=dhcp DISCOVER
SSH_UP = 4.0         # OS DHCP -> sshd answers
CHECKS = 1.0         # sshd answers -> readiness checks pass

KERNEL_SIZE = 8_388_608
INITRD_SIZE = 33_554_432
LOADER_SIZE = 46_468
LDLINUX_SIZE = 122_308
CFG_SIZE = 212
STEPS_PER_NODE = 2 * 4 + 2 * 5 + 2 * 2 + 0.1 + 2  # DHCP x2, 5 reads, 2 misses, 10 % DISCOVER retries; ssh + ready: 24.1


def in_flight_seconds() -> float:
    """Wake to initrd done: how long a node holds a place in the admission window."""
    return POST + DORA_GAP + LOADER + LDLINUX + 2 * CFG_MISS + 0.02 + KERNEL + INITRD


def model_event_rate(window: int, power_on_rate: float) -> float:
    """Steady-state events/s of stream time: Little's law over the window, capped by the power-on rate."""
    nodes_per_s = min(power_on_rate, window / in_flight_seconds())
    return nodes_per_s * STEPS_PER_NODE


PLAN = """\
version: 1
name: trackcost
state_dir: {state}
network: {{subnet: 10.64.0.0/16, server: 10.64.0.1}}
boot: {{root: {root}, config_names: [ip]}}
profiles:
  compute: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp, root: initramfs}}
nodes:
  - name: node[{first}-{last}]
    mac: 02:00:0a:40:00:01
    ip: 10.64.1.1
    group: compute
rollout:
  admission: {{max_downloading: {window}, power_on_rate: {power_on_rate}, adaptive: false}}
  timeouts: {{waking: 120, pxe_dhcp: 120, loader: 120, config: 120, kernel: 600, initrd: 600, os_dhcp: 300, ssh: 600}}
  retries: {{wake: 2, power_cycle: 1}}
  failure_budget: 1%
power:
  bmc: {{driver: none}}
"""


def write_plan(work: Path, n: int, window: int, power_on_rate: float) -> Path:
    width = max(5, len(str(n)))
    p = work / "plan.yaml"
    p.write_text(PLAN.format(state=work / "state", root=work / "tftpboot", first="1".zfill(width), last=str(n).zfill(width),
                             window=window, power_on_rate=power_on_rate))
    return p


def _hex_ip(ip: str) -> str:
    return "".join(f"{int(x):02X}" for x in ip.split("."))


def boot_steps(mac: str, ip: str, rng: random.Random) -> list[tuple[float, str, tuple]]:
    """One node's boot as (seconds after the wake, kind, args), in time order."""
    j = lambda s: s * rng.uniform(0.8, 1.25)  # noqa: E731 - per-node jitter
    out: list[tuple[float, str, tuple]] = []
    t = j(POST)
    xid = rng.getrandbits(32)
    out.append((t, "dhcp", ("DISCOVER", "in", True, xid)))
    if rng.random() < DISCOVER_RETRY:
        t += 4.0  # the ROM's retransmission timer
        out.append((t, "dhcp", ("DISCOVER", "in", True, xid)))
    out.append((t + 0.002, "dhcp", ("OFFER", "out", True, xid)))
    t += DORA_GAP
    out.append((t, "dhcp", ("REQUEST", "in", True, xid)))
    out.append((t + 0.002, "dhcp", ("ACK", "out", True, xid)))
    t += 0.05

    def read(name: str, size: int | None, seconds: float) -> None:
        nonlocal t
        port = rng.randrange(1024, 65535)
        out.append((t, "req", (name, port)))
        if size is None:
            t += seconds
            out.append((t, "miss", (name, port, seconds)))
        else:
            t += seconds
            out.append((t, "done", (name, port, size, seconds)))
        t += 0.005

    read("pxelinux.0", LOADER_SIZE, j(LOADER))
    read("ldlinux.c32", LDLINUX_SIZE, j(LDLINUX))
    read(f"pxelinux.cfg/{rng.getrandbits(64):016x}-0000-0000-0000-000000000000", None, CFG_MISS)
    read("pxelinux.cfg/01-" + mac.replace(":", "-"), None, CFG_MISS)
    read("pxelinux.cfg/" + _hex_ip(ip), CFG_SIZE, 0.02)
    read("vmlinuz", KERNEL_SIZE, j(KERNEL))
    read("rootfs.gz", INITRD_SIZE, j(INITRD))
    t += j(KERNEL_BOOT)
    xid = rng.getrandbits(32)
    out.append((t, "dhcp", ("DISCOVER", "in", False, xid)))
    out.append((t + 0.002, "dhcp", ("OFFER", "out", False, xid)))
    out.append((t + 0.01, "dhcp", ("REQUEST", "in", False, xid)))
    out.append((t + 0.012, "dhcp", ("ACK", "out", False, xid)))
    t += j(SSH_UP)
    out.append((t, "ssh", ()))
    t += j(CHECKS)
    out.append((t, "ready", ()))
    return out


#: Every node's journal, in order, after a clean boot.
FULL_BOOT = [Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD, Stage.OS_DHCP, Stage.SSH, Stage.READY]

_PXE_VC = "PXEClient:Arch:00000:UNDI:002001"
_OS_VC = "Linux ipconfig"


@dataclass
class Counters:
    channel_events: int = 0     # BootEvents put on the channel (what the boot server emits)
    dropped: int = 0            # channel full
    readiness_calls: int = 0    # ssh_up + ready, as the readiness task calls them
    wakes: int = 0
    producer_cpu: float = 0.0   # the simulator's own CPU: not the orchestrator's
    scrapes: int = 0
    scrape_cpu: float = 0.0
    scrape_max_s: float = 0.0
    scrape_bytes: int = 0
    peak_channel: int = 0


class SimSite:
    """The wake driver stub and the event producer: nodes boot on the trio clock."""

    name = "sim"

    def __init__(self, send: trio.MemorySendChannel, counters: Counters, seed: int = 1) -> None:
        self.send = send
        self.c = counters
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, str, str, int, list]] = []
        self.seq = 0
        self.more = trio.Event()
        self.sched: Scheduler | None = None
        self.deadline = math.inf  # wall clock (perf_counter): the bench's bound
        self.on_deadline = lambda: None

    # -- the wake driver (Scheduler.wake_driver) --------------------------------------
    async def on(self, t: Target) -> PowerResult:
        c0 = time.process_time()
        self.c.wakes += 1
        now = trio.current_time()
        steps = boot_steps(t.mac, t.ip, self.rng)
        self._push(now + steps[0][0], t.mac, t.ip, 0, steps, now)
        self.more.set()
        self.c.producer_cpu += time.process_time() - c0
        return PowerResult(True, "sim: woken")

    async def cycle(self, t: Target) -> PowerResult:
        return PowerResult(False, "sim: no BMC")

    async def off(self, t: Target) -> PowerResult:
        return PowerResult(True)

    async def status(self, t: Target) -> str | None:
        return None

    def _push(self, when: float, mac: str, ip: str, i: int, steps: list, t0: float) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, mac, ip, i, (steps, t0)))

    # -- the producer --------------------------------------------------------------------
    async def produce(self) -> None:
        sched = self.sched
        assert sched is not None
        tracker = sched.tracker
        send = self.send
        while True:
            if not self.heap:
                self.more = trio.Event()
                await self.more.wait()
                continue
            when = self.heap[0][0]
            if when > trio.current_time():
                self.more = trio.Event()
                with trio.move_on_at(when):
                    await self.more.wait()
                continue
            c0 = time.process_time()
            now = trio.current_time()
            while self.heap and self.heap[0][0] <= now:
                _, _, mac, ip, i, (steps, t0) = heapq.heappop(self.heap)
                _, kind, args = steps[i]
                if kind in ("ssh", "ready"):
                    self.c.producer_cpu += time.process_time() - c0
                    # What the readiness task does (Scheduler._probe), without the probe.
                    if kind == "ssh":
                        sched._record(tracker.ssh_up(mac, now))
                    else:
                        sched._record(tracker.ready(mac, now, "checks passed: kernel, sshd"))
                    self.c.readiness_calls += 1
                    c0 = time.process_time()
                else:
                    ev = self._event(kind, args, mac, ip, now)
                    try:
                        send.send_nowait(ev)
                        self.c.channel_events += 1
                    except trio.WouldBlock:
                        self.c.dropped += 1
                if i + 1 < len(steps):
                    self._push(t0 + steps[i + 1][0], mac, ip, i + 1, steps, t0)
            stats = send.statistics()
            self.c.peak_channel = max(self.c.peak_channel, stats.current_buffer_used)
            self.c.producer_cpu += time.process_time() - c0
            if time.perf_counter() > self.deadline:
                self.on_deadline()
            await trio.lowlevel.checkpoint()

    @staticmethod
    def _event(kind: str, args: tuple, mac: str, ip: str, now: float) -> BootEvent:
        wall = now
        if kind == "dhcp":
            msg, direction, pxe, xid = args
            detail: dict[str, Any] = {"msg": msg, "direction": direction, "xid": xid, "pxe": pxe, "ipxe": False,
                                      "kind": "pxe_bios" if pxe else "other", "port": 67}
            if pxe:
                detail["vendor_class"] = _PXE_VC
                detail["arch"] = 0
            else:
                detail["vendor_class"] = _OS_VC
            if direction == "out" and pxe:
                detail["boot_file"] = "pxelinux.0"
            return BootEvent(time=now, source="dhcp", kind=EventKind.DHCP, client_ip=ip if direction == "out" else None,
                             mac=mac, wall=wall, result=msg.lower(), detail=detail)
        if kind == "req":
            name, port = args
            return BootEvent(time=now, source="tftp", kind=EventKind.FILE_REQUEST, client_ip=ip, client_port=port,
                             filename=name, wall=wall, detail={"mode": "octet", "options": {"tsize": "0", "blksize": "1468"}})
        if kind == "miss":
            name, port, seconds = args
            return BootEvent(time=now, source="tftp", kind=EventKind.FILE_FAILED, client_ip=ip, client_port=port,
                             filename=name, wall=wall, result="not_found", duration=seconds)
        name, port, size, seconds = args
        return BootEvent(time=now, source="tftp", kind=EventKind.FILE_DONE, client_ip=ip, client_port=port, filename=name,
                         bytes=size, size=size, duration=seconds, result="ok", wall=wall,
                         detail={"blksize": 1468, "windowsize": 1, "mode": "octet"})


# --------------------------------------------------------------------------- measurement helpers


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


@dataclass
class Config:
    nodes: int = 10_000
    window: int = 1000
    power_on_rate: float = 50.0
    rate: float | None = None          # None: max throughput
    max_seconds: float = 600.0         # wall-clock bound of the rollout phase
    scrape_every: float = 5.0          # stream seconds between scrapes (0: none)
    seed: int = 1
    tracemalloc: bool = False
    keep: bool = False
    work: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def _rollout(plan, tracker: Tracker, store: Store, metrics: Metrics, cfg: Config, c: Counters) -> dict[str, Any]:
    send, recv = trio.open_memory_channel(65536)
    site = SimSite(send, c, cfg.seed)
    transitions = {"n": 0}

    def on_change(ts) -> None:
        transitions["n"] += len(ts)
        metrics.observe_transitions(ts)

    sched = Scheduler(plan, tracker, store, wake=site, bmc=None, readiness=None, load=None, clock=trio.current_time,
                      on_change=on_change)
    metrics.attach(scheduler=sched, wake=site)
    site.sched = sched
    out: dict[str, Any] = {"scheduler": sched, "transitions": transitions}

    async def scraper() -> None:
        while cfg.scrape_every > 0:
            await trio.sleep(cfg.scrape_every)
            t0, c0 = time.perf_counter(), time.process_time()
            body = metrics.exposition()
            c.scrape_cpu += time.process_time() - c0
            c.scrape_max_s = max(c.scrape_max_s, time.perf_counter() - t0)
            c.scrapes += 1
            c.scrape_bytes = len(body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(site.produce)
        nursery.start_soon(scraper)
        with trio.CancelScope() as cs:
            site.deadline, site.on_deadline = time.perf_counter() + cfg.max_seconds, cs.cancel
            out["summary"] = await sched.run(recv)
        out["timed_out"] = cs.cancelled_caught
        out["stream_seconds"] = trio.current_time()
        nursery.cancel_scope.cancel()
    return out


def run(cfg: Config) -> dict[str, Any]:
    """Run the bench; returns the report (a JSON-able dict)."""
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="bt-trackcost-"))
    work.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items() if k not in ("work", "extra")},
                           "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}}
    try:
        gc.collect()
        rss0 = rss_now_mb()
        if cfg.tracemalloc:
            tracemalloc.start()
        # -- the plan -------------------------------------------------------------------------
        plan_path = write_plan(work, cfg.nodes, cfg.window, cfg.power_on_rate)
        t0 = time.perf_counter()
        plan = load_plan(plan_path)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
        t_tracker = time.perf_counter() - t0
        rss_plan = rss_now_mb()
        store = Store(plan.state_dir / "state.db")
        metrics = Metrics().attach(tracker=tracker, timeouts=plan_timeouts(plan))
        c = Counters()

        # -- the rollout ---------------------------------------------------------------------
        natural = model_event_rate(cfg.window, cfg.power_on_rate)
        if cfg.rate:
            speed = cfg.rate / natural
            clock = trio.testing.MockClock(rate=speed)
        else:
            speed = None
            clock = trio.testing.MockClock(autojump_threshold=0)
        cpu0, wall0 = cpu_s(), time.perf_counter()
        res = trio.run(_rollout, plan, tracker, store, metrics, cfg, c, clock=clock)
        wall = time.perf_counter() - wall0
        cpu = cpu_s() - cpu0
        rss_peak_run = rss_peak_mb()
        rss_end_run = rss_now_mb()
        tm_peak = None
        if cfg.tracemalloc:
            tm_peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        sched: Scheduler = res["scheduler"]
        summary = res.get("summary")
        n_tr = res["transitions"]["n"]
        events = c.channel_events + c.readiness_calls
        orch_cpu = cpu - c.producer_cpu - c.scrape_cpu
        db = plan.state_dir / "state.db"
        wal = Path(str(db) + "-wal")
        db_bytes, wal_bytes = _size(db), _size(wal)
        rep["plan"] = {"nodes": len(plan.nodes), "load_s": round(t_load, 3), "tracker_init_s": round(t_tracker, 3),
                       "plan_yaml_bytes": plan_path.stat().st_size}
        rep["run"] = {
            "mode": "max" if speed is None else f"rate {cfg.rate:g}/s",
            "completed": bool(summary is not None and not res["timed_out"]),
            "ready": len(summary.ready) if summary else sum(1 for r in sched.jobs.values() if r.result == "ready"),
            "failed": len(summary.failed) if summary else sum(1 for r in sched.jobs.values() if r.result == "failed"),
            "stream_seconds": round(res["stream_seconds"], 1),
            "clock_speed": None if speed is None else round(speed, 3),
            "model_events_per_s": round(natural, 1),
            "wall_s": round(wall, 2),
            "events": events, "channel_events": c.channel_events, "dropped": c.dropped,
            "events_per_node": round(events / max(1, cfg.nodes), 2),
            "transitions": n_tr, "wakes": c.wakes, "peak_channel_backlog": c.peak_channel,
            "events_per_s": round(events / wall, 1),
            "transitions_per_s": round(n_tr / wall, 1),
            "cpu_s": round(cpu, 2), "cpu_busy": round(cpu / wall, 3),
            "producer_cpu_s": round(c.producer_cpu, 2), "scrape_cpu_s": round(c.scrape_cpu, 2),
            "orchestrator_cpu_s": round(orch_cpu, 2),
            "cpu_us_per_event": round(orch_cpu / max(1, events) * 1e6, 1),
            "cpu_us_per_event_with_scrapes": round((orch_cpu + c.scrape_cpu) / max(1, events) * 1e6, 1),
            "orchestrator_events_per_cpu_s": round(events / orch_cpu, 1) if orch_cpu > 0 else None,
            "scrapes": c.scrapes, "scrape_ms_avg": round(c.scrape_cpu / c.scrapes * 1e3, 1) if c.scrapes else None,
            "scrape_ms_max": round(c.scrape_max_s * 1e3, 1), "scrape_bytes": c.scrape_bytes,
        }
        if speed is not None:
            achieved = events / wall
            busy = (orch_cpu + c.scrape_cpu) / wall
            rep["run"]["achieved_rate"] = round(achieved, 1)
            rep["run"]["orchestrator_busy"] = round(busy, 3)
            rep["run"]["headroom_x"] = round(1 / busy, 1) if busy > 0 else None
        rep["memory"] = {"rss_start_mb": round(rss0, 1), "rss_after_plan_mb": round(rss_plan, 1),
                         "rss_peak_mb": round(rss_peak_run, 1), "rss_end_mb": round(rss_end_run, 1),
                         "tracemalloc_peak_mb": None if tm_peak is None else round(tm_peak, 1)}
        rep["journal"] = {"db_bytes": db_bytes, "wal_bytes": wal_bytes, "bytes": db_bytes + wal_bytes,
                          "bytes_per_node": round((db_bytes + wal_bytes) / max(1, cfg.nodes)),
                          "bytes_per_transition": round((db_bytes + wal_bytes) / max(1, n_tr))}

        # -- after the run: status and restart read the journal ------------------------------------
        live = {mac: (st.stage, st.attempt, st.since, len(st.history)) for mac, st in tracker.nodes.items()}
        del res, sched, summary
        metrics.attach()  # keep the object; drop our references below
        del metrics
        store.close()
        gc.collect()
        store = Store(db)
        t0 = time.perf_counter()
        rows = node_rows(plan, store, time.time())
        t_rows = time.perf_counter() - t0
        buf = io.StringIO()
        t0 = time.perf_counter()
        print_status(rows, out=buf)
        t_print = time.perf_counter() - t0
        t0 = time.perf_counter()
        trs = store.transitions()
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
        restored.restore(trs)
        t_restore = time.perf_counter() - t0
        per_node: dict[str, int] = {}
        paths: dict[str, list[str]] = {}
        for t in trs:
            per_node[t.mac] = per_node.get(t.mac, 0) + 1
            paths.setdefault(t.mac, []).append(t.to_stage.value)
        full = [s.value for s in FULL_BOOT]
        mismatched = sum(1 for mac, st in restored.nodes.items()
                         if live.get(mac) != (st.stage, st.attempt, st.since, len(st.history)))
        store.close()
        db_closed = _size(db)
        rep["journal"]["db_bytes_after_close"] = db_closed
        rep["status"] = {"node_rows_s": round(t_rows, 3), "print_s": round(t_print, 3), "rows": len(rows)}
        rep["restore"] = {"read_s": round(t_read, 3), "rebuild_s": round(t_restore, 3), "total_s": round(t_read + t_restore, 3),
                          "transitions": len(trs), "mismatched_nodes": mismatched}
        rep["check"] = {
            "nodes_in_journal": len(per_node),
            "nodes_ready_in_status": sum(1 for r in rows if r["stage"] == "ready"),
            "transitions_per_node_min": min(per_node.values(), default=0),
            "transitions_per_node_max": max(per_node.values(), default=0),
            "journal_matches_on_change": len(trs) == n_tr,
            # waking, pxe_dhcp, loader, config, kernel, initrd, os_dhcp, ssh, ready: in this order, once each
            "nodes_with_full_boot": sum(1 for p in paths.values() if p == full),
        }
        rep["memory"]["rss_peak_overall_mb"] = round(rss_peak_mb(), 1)
        del tracker, restored, trs, rows
        return rep
    finally:
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            rep["work"] = str(work)


# --------------------------------------------------------------------------- output


def table(rep: dict[str, Any]) -> str:
    r, m, j, p = rep["run"], rep["memory"], rep["journal"], rep["plan"]
    lines = [
        f"tracking cost: {p['nodes']} nodes, window {rep['config']['window']}, {r['mode']}",
        f"  plan load                 {p['load_s']:.3f} s   tracker init {p['tracker_init_s']:.3f} s",
        f"  rollout                   {'complete' if r['completed'] else 'INCOMPLETE'}: {r['ready']} ready, {r['failed']} failed, "
        f"{r['stream_seconds']:.0f} s of stream time in {r['wall_s']:.1f} s",
        f"  events                    {r['events']} ({r['events_per_node']}/node), dropped {r['dropped']}, transitions {r['transitions']}",
        f"  events/s (wall)           {r['events_per_s']:.0f}    transitions/s {r['transitions_per_s']:.0f}",
        f"  CPU/event (orchestrator)  {r['cpu_us_per_event']:.1f} us   with scrapes {r['cpu_us_per_event_with_scrapes']:.1f} us"
        f"   ({r['orchestrator_events_per_cpu_s']:.0f} events per CPU-second)",
        f"  CPU split                 total {r['cpu_s']:.1f} s = orchestrator {r['orchestrator_cpu_s']:.1f} + scrapes {r['scrape_cpu_s']:.1f}"
        f" + simulator {r['producer_cpu_s']:.1f}",
        f"  scrapes                   {r['scrapes']} x {r['scrape_ms_avg']} ms avg (max {r['scrape_ms_max']} ms), {r['scrape_bytes']} bytes",
    ]
    if "headroom_x" in r:
        lines.append(f"  paced                     achieved {r['achieved_rate']:.0f} events/s, orchestrator busy {r['orchestrator_busy']:.1%}, "
                     f"headroom x{r['headroom_x']}")
    lines += [
        f"  RSS                       peak {m['rss_peak_mb']:.1f} MB (start {m['rss_start_mb']:.1f}, after plan {m['rss_after_plan_mb']:.1f}, "
        f"end of run {m['rss_end_mb']:.1f})" + (f", tracemalloc peak {m['tracemalloc_peak_mb']} MB" if m["tracemalloc_peak_mb"] else ""),
        f"  journal                   {j['bytes'] / 2**20:.1f} MB (db {j['db_bytes'] / 2**20:.1f} + wal {j['wal_bytes'] / 2**20:.1f}), "
        f"{j['bytes_per_node']} B/node, {j['bytes_per_transition']} B/transition; {j['db_bytes_after_close'] / 2**20:.1f} MB after close",
        f"  bootorch status           node_rows {rep['status']['node_rows_s']:.3f} s, printing {rep['status']['print_s']:.3f} s",
        f"  restart                   read {rep['restore']['read_s']:.3f} s + rebuild {rep['restore']['rebuild_s']:.3f} s, "
        f"{rep['restore']['mismatched_nodes']} node(s) differ from the live tracker",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=1000, help="rollout.admission.max_downloading")
    ap.add_argument("--power-on-rate", type=float, default=50.0, help="rollout.admission.power_on_rate (nodes/s)")
    ap.add_argument("--rate", type=float, default=None, help="pace the stream at R events/s of real time (default: max throughput)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock bound of the rollout (default 600)")
    ap.add_argument("--scrape-every", type=float, default=5.0, help="stream seconds between metric scrapes (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slow)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="JSON on stdout")
    a = ap.parse_args(argv)
    cfg = Config(nodes=a.nodes, window=a.window, power_on_rate=a.power_on_rate, rate=a.rate, max_seconds=a.max_seconds,
                 scrape_every=a.scrape_every, seed=a.seed, tracemalloc=a.tracemalloc, keep=a.keep)
    rep = run(cfg)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        print(table(rep))
    ok = rep["run"]["completed"] and rep["restore"]["mismatched_nodes"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
