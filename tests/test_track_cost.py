"""The tracking-cost bench (bench/track_cost.py) and the indexes that made 10 000 nodes cheap.

Correctness only, never timing: the bench runs at 200 nodes and every node's
journal must hold its whole boot; the tracker's stage counts and deadline heap,
the scheduler's in-flight and failed counters, and _consume's batching must
answer exactly what the plain passes over every node answered.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys

import trio

from orchestrator.events import BootEvent, EventKind
from orchestrator.scheduler import IN_FLIGHT, ONCALL_WAVE, Scheduler
from orchestrator.store import Store
from orchestrator.tracker import TERMINAL, BootFilesOf, NodeInfo, Stage, Tracker, plan_nodes, plan_timeouts
from tests.conftest import REPO
from tests.sim_cluster import SimCluster, SimReadiness
from tests.test_scheduler import make_plan


def _bench():
    spec = importlib.util.spec_from_file_location("track_cost", REPO / "bench" / "track_cost.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["track_cost"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_200_nodes_journals_every_boot(tmp_path):
    tc = _bench()
    work = tmp_path / "work"
    rep = tc.run(tc.Config(nodes=200, window=50, power_on_rate=50, scrape_every=5.0, max_seconds=120, work=work))
    run, check = rep["run"], rep["check"]
    assert run["completed"] and run["ready"] == 200 and run["failed"] == 0 and run["dropped"] == 0
    assert check["nodes_in_journal"] == 200 and check["nodes_with_full_boot"] == 200
    assert check["nodes_ready_in_status"] == 200 and check["journal_matches_on_change"]
    assert rep["restore"]["transitions"] == 200 * len(tc.FULL_BOOT) and rep["restore"]["mismatched_nodes"] == 0
    assert run["scrapes"] > 0 and run["scrape_bytes"] > 0
    assert run["events"] >= 200 * 22 and run["wakes"] == 200
    assert not work.exists()  # the work directory is removed
    assert "200 nodes" in tc.table(rep)


# --------------------------------------------------------------------------- the tracker's indexes


def _ref_counts(tr: Tracker) -> dict[Stage, int]:
    out = {s: 0 for s in Stage}
    for st in tr.nodes.values():
        out[st.stage] += 1
    return out


def _first_report(since: float, limit: float) -> float:
    """since + limit, or the next float up where now - since >= limit first holds."""
    d = since + limit
    while d - since < limit:
        d = math.nextafter(d, math.inf)
    return d


def _ref_next_deadline(tr: Tracker) -> float | None:
    times = [_first_report(st.since, tr.timeouts[st.stage]) for st in tr.nodes.values()
             if st.stage in tr.timeouts and st.stage not in TERMINAL and not st.stuck_reported]
    return min(times) if times else None


def _ref_stuck(tr: Tracker, now: float) -> list[tuple]:
    out = []
    for st in tr.nodes.values():
        if st.stage in TERMINAL or st.stage == Stage.PENDING or st.stuck_reported:
            continue
        limit = tr.timeouts.get(st.stage)
        if limit is not None and now - st.since >= limit:
            out.append((st.mac, st.stage, st.since, limit, st.attempt))
    return out


def _check(tr: Tracker) -> None:
    assert tr.counts() == _ref_counts(tr)
    assert tr.count(IN_FLIGHT) == sum(1 for st in tr.nodes.values() if st.stage in IN_FLIGHT)
    assert tr.downloading() == sum(1 for st in tr.nodes.values() if st.stage in (Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD))
    assert tr.next_deadline() == _ref_next_deadline(tr)


def test_tracker_indexes_match_a_full_pass_under_random_evidence():
    rng = random.Random(7)
    files = BootFilesOf(kernels=frozenset({"vmlinuz"}), initrds=frozenset({"rootfs.gz"}))
    macs = [f"52:54:00:00:01:{i:02x}" for i in range(40)]
    nodes = {m: NodeInfo(f"n{i}", f"10.0.0.{i + 10}", files) for i, m in enumerate(macs)}
    timeouts = {Stage.WAKING: 30.0, Stage.PXE_DHCP: 7.5, Stage.LOADER: 5.0, Stage.KERNEL: 40.0, Stage.INITRD: 0.1, Stage.SSH: 60.0}
    tr = Tracker(nodes, timeouts=timeouts, track_unknown=True)
    names = ["pxelinux.0", "pxelinux.cfg/default", "vmlinuz", "rootfs.gz"]
    now = 1_700_000_000.0
    for step in range(6000):
        now += rng.choice((0.0, 0.01, 0.1, 1.0, 3.3))
        mac = rng.choice(macs)
        ip = nodes[mac].ip
        op = rng.random()
        if op < 0.1:
            tr.wake(mac, now)
        elif op < 0.3:
            pxe = rng.random() < 0.6
            tr.feed(BootEvent(time=now, wall=now, source="dhcp", kind=EventKind.DHCP, mac=mac,
                              detail={"msg": "DISCOVER", "direction": "in", "pxe": pxe}))
        elif op < 0.32:  # an unknown MAC: tracked, added behind the plan's nodes
            tr.feed(BootEvent(time=now, wall=now, source="dhcp", kind=EventKind.DHCP, mac=f"02:00:00:00:{step % 7:02x}:01",
                              detail={"msg": "DISCOVER", "direction": "in", "pxe": True}))
        elif op < 0.6:
            kind = rng.choice((EventKind.FILE_REQUEST, EventKind.FILE_DONE))
            tr.feed(BootEvent(time=now, wall=now, source="tftp", kind=kind, client_ip=ip, filename=rng.choice(names)))
        elif op < 0.66:
            tr.ssh_up(mac, now)
        elif op < 0.7:
            tr.ready(mac, now)
        elif op < 0.73:
            tr.fail(mac, now, "stuck in kernel for 40s")
        elif op < 0.78:
            tr.restart_stage(mac, now, "re-wake")
        elif op < 0.8 and hasattr(tr, "powered_off"):
            tr.powered_off(mac, now, "powered off")
        else:
            expected = _ref_stuck(tr, now)
            got = [(s.mac, s.stage, s.since, s.timeout, s.attempt) for s in tr.check_timeouts(now)]
            assert got == expected, step
        if step % 500 == 499:  # a restart: the same journal replayed into a fresh tracker
            history = [t for st in tr.nodes.values() for t in st.history]
            history.sort(key=lambda t: t.time)
            fresh = Tracker(nodes, timeouts=timeouts)
            fresh.restore(history)
            _check(fresh)
        if step == 3000:
            tr.timeouts[Stage.CONFIG] = 2.0  # changed in place: the index is rebuilt
        _check(tr)


def test_deadline_boundary_is_judged_exactly():
    """since + timeout and now - since can round differently: check_timeouts follows now - since >= timeout."""
    nodes = {"52:54:00:00:00:01": NodeInfo("a", "10.0.0.1")}
    for since, limit in ((0.1, 0.2), (1_700_000_000.1, 0.3), (12345.678, 90.0), (1e9 + 0.7, 0.1), (12.05, 20.0), (531.0, 60.0)):
        tr = Tracker(nodes, timeouts={Stage.WAKING: limit})
        tr.wake("52:54:00:00:00:01", since)
        d = tr.next_deadline()
        assert d == since + limit or (since + limit < d <= math.nextafter(math.nextafter(since + limit, math.inf), math.inf))
        assert d - since >= limit  # a loop that sleeps until d and checks finds the node: it cannot spin
        if since == 12.05:
            assert d > since + limit  # 12.05 + 20.0 rounds below: 32.05 - 12.05 < 20.0
        if since == 531.0:
            assert d == 591.0
        stuck = tr.check_timeouts(d)
        assert [s.mac for s in stuck] == ["52:54:00:00:00:01"]
        tr = Tracker(nodes, timeouts={Stage.WAKING: limit})
        tr.wake("52:54:00:00:00:01", since)
        for now in (d - 2e-9, d - 1e-12, d, d + 1e-12, since + limit * (1 + 1e-15)):
            expected = _ref_stuck(tr, now)
            got = [(s.mac, s.stage, s.since, s.timeout, s.attempt) for s in tr.check_timeouts(now)]
            assert got == expected, (since, limit, now)


# --------------------------------------------------------------------------- the scheduler's counters


async def test_scheduler_counters_match_a_full_pass(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=24, max_downloading=5, rate=20, budget=30, wake=1, cycles=0)
    send, recv = trio.open_memory_channel(10_000)
    cluster = SimCluster(send)
    for i, node in enumerate(plan.nodes):
        cluster.add(node.mac, str(node.ip), deaf=(i % 5 == 0), hang_in="vmlinuz" if i % 7 == 0 else None)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    sched = None
    checks = {"n": 0}

    def brute():
        flying = sum(1 for st in tracker.nodes.values() if st.stage in IN_FLIGHT and st.mac in sched.jobs)
        failed = sum(1 for j in sched.jobs.values() if j.result == "failed" and j.wave != ONCALL_WAVE)
        return flying, failed

    def on_change(ts):
        checks["n"] += 1
        assert (sched.in_flight(), sched.failed_count()) == brute()

    sched = Scheduler(plan, tracker, Store(tmp_path / "state.db"), wake=cluster, bmc=None, readiness=SimReadiness(cluster),
                      clock=trio.current_time, on_change=on_change, probe_every=1.0)
    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        with trio.fail_after(10_000):
            summary = await sched.run(recv)
        nursery.cancel_scope.cancel()
    assert checks["n"] > 100 and summary.failed and summary.ready
    assert sched.failed_count() == len(summary.failed) == brute()[1]
    # results set from outside the scheduler's own paths (on-call code, tests) are counted too; on-call jobs are not
    jobs = list(sched.jobs.values())
    sched.set_result(jobs[0], None)
    sched.set_result(jobs[1], "failed")
    assert sched.failed_count() == brute()[1]
    jobs[2].wave = ONCALL_WAVE
    sched.set_result(jobs[2], jobs[2].result)
    assert sched.failed_count() == brute()[1]
    assert sched.in_flight() == brute()[0]


async def test_consume_batches_journal_the_same_transitions_in_order(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=30)
    events = []
    for i, node in enumerate(plan.nodes):
        mac, ip = node.mac, str(node.ip)
        events.append(BootEvent(time=i, wall=i, source="dhcp", kind=EventKind.DHCP, mac=mac,
                                detail={"msg": "DISCOVER", "direction": "in", "pxe": True}))
        for name in ("pxelinux.0", "pxelinux.cfg/default", "vmlinuz", "rootfs.gz"):
            for kind in (EventKind.FILE_REQUEST, EventKind.FILE_DONE):
                events.append(BootEvent(time=i, wall=i, source="tftp", kind=kind, client_ip=ip, filename=name))
    random.Random(3).shuffle(events)
    one_by_one = Tracker(plan_nodes(plan))
    expected = [t for ev in events for t in one_by_one.feed(ev)]

    tracker = Tracker(plan_nodes(plan))
    store = Store(tmp_path / "state.db")
    records = []
    sched = Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, clock=trio.current_time,
                      on_change=lambda ts: records.append(len(ts)))
    send, recv = trio.open_memory_channel(len(events))
    for ev in events:
        send.send_nowait(ev)
    send.close()
    await sched._consume(recv)
    assert store.transitions() == expected
    assert sum(records) == len(expected) and len(records) < len(expected)  # batched: fewer journal transactions
