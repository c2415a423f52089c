"""Scheduler on trio's MockClock against a simulated cluster (tests/sim_cluster.py): no sleeps, exact times."""

from __future__ import annotations

import dataclasses

import textwrap

import pytest
import trio

from orchestrator.plan import load_plan
from orchestrator.scheduler import IN_FLIGHT, Scheduler
from orchestrator.store import Store
from orchestrator.tracker import Stage, Tracker, plan_nodes, plan_timeouts
from orchestrator.window import WindowTuning
from tests.sim_cluster import SimCluster, SimReadiness


def make_plan(tmp_path, n=8, *, max_downloading=3, rate=10, adaptive=False, budget=0, wake=2, cycles=1, rack_rate=None, extra=""):
    racks = "\n        rack: r1" if rack_rate else ""
    text = textwrap.dedent(f"""\
    version: 1
    network: {{subnet: 10.9.0.0/24, server: 10.9.0.1}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - name: n[1-{n}]
        mac: 52:54:00:00:00:01
        ip: 10.9.0.11{racks}
    rollout:
      admission: {{max_downloading: {max_downloading}, power_on_rate: {rate}, adaptive: {str(adaptive).lower()}{f", rack_power_on_rate: {rack_rate}" if rack_rate else ""}}}
      timeouts: {{waking: 20, pxe_dhcp: 20, loader: 20, config: 20, kernel: 20, initrd: 20, os_dhcp: 20, ssh: 30}}
      retries: {{wake: {wake}, power_cycle: {cycles}}}
      failure_budget: {budget}
    power:
      bmc: {{driver: command, command: "true"}}
    {extra}""")
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p)


async def rollout(plan, tmp_path, configure=lambda cluster: None, *, store=None, cancel_after=None, server_loads=None,
                  server_blind=None, relay=None):
    """``relay(from_cluster, to_scheduler)``: a task between the cluster's evidence and the scheduler (a satellite's stream)."""
    send, recv = trio.open_memory_channel(10_000)
    cluster_send, raw = (send, None) if relay is None else trio.open_memory_channel(10_000)
    cluster = SimCluster(cluster_send)
    for node in plan.nodes:
        cluster.add(node.mac, str(node.ip))
    configure(cluster)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = store or Store(tmp_path / "state.db")
    peak = {"in_flight": 0, "window_violations": 0}
    sched = None

    def on_change(ts):
        flying = sum(1 for st in tracker.nodes.values() if st.stage in IN_FLIGHT)
        peak["in_flight"] = max(peak["in_flight"], flying)
        admitted = any(t.from_stage == Stage.PENDING and t.to_stage == Stage.WAKING for t in ts)
        if admitted and flying > sched.window:
            peak["window_violations"] += 1  # admitted past the window (a shrink may leave more in flight: allowed)

    sched = Scheduler(plan, tracker, store, wake=cluster, bmc=cluster, readiness=SimReadiness(cluster), load=cluster.load,
                      clock=trio.current_time, on_change=on_change, probe_every=1.0, server_loads=server_loads,
                      server_blind=server_blind, window_tuning=WindowTuning(adapt_every=2.0, retransmit_threshold=5.0, initial_window=2))
    summary = None
    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        if relay is not None:
            nursery.start_soon(relay, raw, send)

        async def go():
            nonlocal summary
            summary = await sched.run(recv)
            nursery.cancel_scope.cancel()

        nursery.start_soon(go)
        if cancel_after is not None:
            await trio.sleep(cancel_after)
            nursery.cancel_scope.cancel()
    return summary, cluster, sched, peak, store


async def test_all_ready_and_admission_cap_holds(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=10, max_downloading=3)
    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path)
    assert summary.ok and sorted(summary.ready) == sorted(n.name for n in plan.nodes)
    assert peak["in_flight"] == 3 and peak["window_violations"] == 0
    assert len(cluster.wakes) == 10  # each node woken once
    history = store.transitions(plan.nodes[0].mac)
    assert [t.to_stage for t in history] == [Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL,
                                             Stage.INITRD, Stage.OS_DHCP, Stage.SSH, Stage.READY]


async def test_power_on_rate_and_rack_rate(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=6, max_downloading=6, rate=4, rack_rate=1)
    with trio.fail_after(10_000):
        summary, cluster, *_ = await rollout(plan, tmp_path)
    times = [t for t, _ in cluster.wakes]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert summary.ok and all(g >= 1.0 - 1e-9 for g in gaps)  # one rack at 1/s beats 4/s globally


async def test_adaptive_window_shrinks_under_retransmits_and_grows_back(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=40, max_downloading=8, rate=50, adaptive=True)
    clusters = []
    result = {}
    with trio.fail_after(100_000):
        async with trio.open_nursery() as n:

            async def run():
                result["r"] = await rollout(plan, tmp_path, clusters.append)

            n.start_soon(run)
            await trio.sleep(7)  # between two updates (every 2 s): no tie with one
            clusters[0].retransmit_rate = 50.0  # the boot server starts retransmitting
            await trio.sleep(6)
            clusters[0].retransmit_rate = 0.0
    summary, cluster, sched, peak, _ = result["r"]
    history = summary.window_history
    assert summary.ok and peak["window_violations"] == 0
    before = [w for t, w in history if t < 7]
    during = [w for t, w in history if 7 < t <= 13]
    after = [w for t, w in history if t > 13]
    assert before[0] == 2 and max(before) == 8  # slow start: 2, 4, 8 (capped at max_downloading)
    # Halved once: the nodes admitted before the cut were still in flight (one cut per backlog, window.py).
    assert during and min(during) == max(before) // 2
    assert after and after[-1] > min(during)  # grew back, one step per interval


async def test_escalation_ladder_in_order(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2, wake=2, cycles=1)
    deaf_mac = plan.nodes[1].mac

    def configure(cluster):
        cluster.nodes[deaf_mac].deaf = True  # magic packets are lost; a power cycle starts it

    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure)
    assert summary.ok
    actions = [(a.action, a.reason) for a in store.actions(plan.nodes[1].name)]
    assert [a for a, _ in actions] == ["wake", "wake", "wake", "power_cycle"]
    assert actions[1][1] == "stuck in waking for 20s"
    wakes = [t for t, name in cluster.wakes if name == plan.nodes[1].name]
    assert [round(b - a) for a, b in zip(wakes, wakes[1:])] == [20, 20]
    assert cluster.cycles[0][0] - wakes[-1] == pytest.approx(20)


async def test_stuck_in_initrd_is_power_cycled_and_recovers(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=3, budget=1, cycles=1)
    bad = plan.nodes[0].mac

    def configure(cluster):
        cluster.nodes[bad].hang_in = "rootfs.gz"

    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure)
    assert summary.ok and plan.nodes[0].name in summary.ready
    assert [a.action for a in store.actions(plan.nodes[0].name)] == ["wake", "power_cycle"]
    assert store.current()[bad].attempt == 2


async def test_stuck_after_power_cycles_fails_with_last_evidence(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=3, budget=1, cycles=1)
    bad = plan.nodes[0].mac

    def configure(cluster):
        cluster.nodes[bad].hang_in = "rootfs.gz"
        cluster.nodes[bad].stubborn = True

    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure)
    assert summary.ok and summary.failed == [plan.nodes[0].name]  # within the budget of 1
    reason = summary.nodes[bad].reason
    assert reason.startswith("stuck in kernel for 20s after 1 wake(s) and 1 power cycle(s)")
    assert "vmlinuz" in reason  # the last evidence


async def test_failed_checks_fail_the_node_with_the_check_named(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2, budget=1)
    bad = plan.nodes[1].mac

    def configure(cluster):
        cluster.nodes[bad].bad_checks = True

    with trio.fail_after(10_000):
        summary, *_ , store = await rollout(plan, tmp_path, configure)
    assert summary.ok  # one failure within the budget of 1
    assert summary.failed == [plan.nodes[1].name]
    assert "mount /usr: exit status 1" in summary.nodes[bad].reason


async def test_failure_budget_exceeded_aborts(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=6, max_downloading=1, budget=0, wake=0, cycles=0)
    first = plan.nodes[0].mac

    def configure(cluster):
        cluster.nodes[first].deaf = True

    with trio.fail_after(10_000):
        summary, cluster, *_ = await rollout(plan, tmp_path, configure)
    assert not summary.ok and summary.aborted
    assert summary.failed == [plan.nodes[0].name]
    assert len(cluster.wakes) == 1  # nothing more was woken after the budget blew


async def test_resume_after_crash_wakes_nobody_twice(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=6, max_downloading=2, rate=10)
    with trio.fail_after(10_000):
        _, first_cluster, *_ , store = await rollout(plan, tmp_path, cancel_after=12.0)
    woken_before = {name for _, name in first_cluster.wakes}
    journal_before = store.current()
    assert 0 < len(woken_before) < 6
    in_flight_before = {m for m, c in journal_before.items() if c.stage not in (Stage.READY,)}
    store.close()

    store2 = Store(tmp_path / "state.db")

    def configure(cluster):
        # The real nodes kept booting while bootorch was down: the ones in flight are up now.
        for mac in in_flight_before:
            cluster.nodes[mac].ssh_up = True

    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store2 = await rollout(plan, tmp_path, configure, store=store2)
    assert summary.ok and len(summary.ready) == 6
    rewoken = {name for _, name in cluster.wakes} & woken_before
    assert rewoken == set()  # no node woken twice without reason
    assert {name for _, name in cluster.wakes} == {n.name for n in plan.nodes} - woken_before


async def _adaptive_run(tmp_path, plan, script):
    """Run an adaptive rollout while ``script(cluster)`` changes the boot server's load on the mock clock."""
    clusters, result = [], {}
    async with trio.open_nursery() as n:

        async def run():
            result["r"] = await rollout(plan, tmp_path, clusters.append)

        n.start_soon(run)
        while not clusters:  # the rollout task builds its cluster on its first step
            await trio.sleep(0)
        await script(clusters[0])
    return result["r"]


async def test_adaptive_window_stops_growing_when_the_round_trip_grows(tmp_path, autojump_clock):
    """The delay signal: queueing (rtt well over the unloaded one) takes a quarter off; no retransmits needed."""
    plan = make_plan(tmp_path, n=80, max_downloading=64, rate=50, adaptive=True)

    async def script(cluster):
        cluster.rtt, cluster.active = 0.0005, 80  # unloaded: 0.5 ms
        await trio.sleep(11)
        cluster.rtt = 0.012  # 80 transfers at 12 ms: ~77 of their blocks wait in a queue (> 64)
        await trio.sleep(5)
        cluster.rtt = 0.0006  # ~13 queued: growth resumes (one eighth per interval)

    with trio.fail_after(100_000):
        summary, cluster, sched, peak, _ = await _adaptive_run(tmp_path, plan, script)
    history = summary.window_history
    before = [w for t, w in history if t < 11]
    during = [w for t, w in history if 11 < t <= 16]
    after = [w for t, w in history if t > 16]
    assert summary.ok and peak["window_violations"] == 0
    assert before[0] == 2 and all(b == 2 * a for a, b in zip(before, before[1:])) and before[-1] >= 8  # slow start
    top = before[-1]
    assert during and during[0] == top - top // 4  # a quarter off, not half
    assert after and after[0] > during[-1] and all(b - a == max(1, a // 8) for a, b in zip(after, after[1:]) if b > a)


async def test_adaptive_window_halves_when_clients_resend(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=60, max_downloading=32, rate=50, adaptive=True)

    async def script(cluster):
        await trio.sleep(11)
        cluster.client_retry_rate = 40.0  # pxelinux re-ACKs: its 110 ms timer fires before our data comes
        await trio.sleep(2.5)
        cluster.client_retry_rate = 0.0

    with trio.fail_after(100_000):
        summary, *_ = await _adaptive_run(tmp_path, plan, script)
    history = summary.window_history
    top = [w for t, w in history if t < 11][-1]
    assert top >= 8
    assert [w for t, w in history if 11 < t <= 13.5] == [top // 2]


async def test_slow_start_waits_for_the_admitted_nodes_to_download(tmp_path, autojump_clock):
    """Doubling on nodes still in POST/DHCP would overshoot blind: the window doubles only once half of it loads."""
    plan = make_plan(tmp_path, n=40, max_downloading=32, rate=50, adaptive=True)

    async def script(cluster):
        await trio.sleep(20)

    with trio.fail_after(100_000):
        summary, cluster, sched, peak, _ = await _adaptive_run(tmp_path, plan, script)
    history = summary.window_history
    # The sim's nodes need 3 s from the wake to their first file: no doubling at 2 s.
    assert [w for t, w in history if t <= 2.5] == [2]
    assert summary.ok


def test_the_default_initial_window_is_eight_capped_by_the_plan(tmp_path):
    plan = make_plan(tmp_path, n=4, max_downloading=32, adaptive=True)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = Store(tmp_path / "s.db")
    load = SimCluster(None).load
    assert Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, load=load).window == 8
    # No load to adapt to (the site's servers, followed through their logs): the plan's cap from the start.
    assert Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None).window == 32
    plan = make_plan(tmp_path, n=4, max_downloading=3, adaptive=True)
    assert Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, load=load).window == 3
    store.close()


async def test_a_slow_power_cycle_does_not_hold_back_other_nodes_escalations(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=3, budget=3, cycles=1)
    hung = [n.mac for n in plan.nodes]

    def configure(cluster):
        cluster.cycle_delay = 60.0  # each BMC takes a minute to answer a cycle
        for mac in hung:
            cluster.nodes[mac].hang_in = "rootfs.gz"

    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure)
    assert summary.ok and sorted(summary.ready) == sorted(n.name for n in plan.nodes)
    starts = sorted(t for t, _ in cluster.cycles)
    assert len(starts) == 3
    # Admitted 0.1 s apart, stuck 0.1 s apart: their cycles start together, not a minute apart each.
    assert starts[-1] - starts[0] < 1.0


def two_server_plan(tmp_path, *, main_max=2, b_max=1, adaptive=False, extra_admission=""):
    """Rack rb (listed first in the plan) downloads from server b, rack ra from the plan's own server."""
    text = textwrap.dedent(f"""\
    version: 1
    network: {{subnet: 10.9.0.0/24, server: 10.9.0.1}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - {{name: "b[1-3]", mac: "52:54:00:00:01:01", ip: 10.9.0.21, rack: rb}}
      - {{name: "a[1-4]", mac: "52:54:00:00:00:01", ip: 10.9.0.11, rack: ra}}
    servers:
      - name: b
        racks: [rb]
        admission: {{max_downloading: {b_max}, adaptive: {str(adaptive).lower()}}}
    rollout:
      admission: {{max_downloading: {main_max}, power_on_rate: 10, adaptive: {str(adaptive).lower()}{extra_admission}}}
      timeouts: {{waking: 20, pxe_dhcp: 20, loader: 20, config: 20, kernel: 20, initrd: 20, os_dhcp: 20, ssh: 30}}
      retries: {{wake: 1, power_cycle: 1}}
      failure_budget: 1
    power:
      bmc: {{driver: command, command: "true"}}
    """)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p)


async def test_a_saturated_server_holds_back_only_its_own_racks(tmp_path, autojump_clock):
    plan = two_server_plan(tmp_path)
    hung = plan.by_name["b1"].mac
    b_macs = {plan.by_name[f"b{i}"].mac for i in (1, 2, 3)}
    peak_b = []

    def configure(cluster):
        cluster.nodes[hung].hang_in = "rootfs.gz"  # holds server b's only slot until it fails
        cluster.nodes[hung].stubborn = True

    sched_box = {}
    orig = Scheduler.journaled

    def watching(self, ts):
        orig(self, ts)
        sched_box["s"] = self
        peak_b.append(sum(1 for m in b_macs if self.tracker.nodes[m].stage in IN_FLIGHT))

    Scheduler.journaled = watching
    try:
        with trio.fail_after(10_000):
            summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure)
    finally:
        Scheduler.journaled = orig
    assert summary.failed == ["b1"] and sorted(summary.ready) == ["a1", "a2", "a3", "a4", "b2", "b3"]
    assert max(peak_b) == 1  # server b's window (1) held
    woken = {name: t for t, name in reversed(cluster.wakes)}  # first wake of each
    failed_at = next(t.time for t in store.transitions(hung) if t.to_stage == Stage.FAILED)
    # Rack ra's nodes went while b1 held b's only slot, although rb comes first in the plan.
    assert all(woken[f"a{i}"] < woken["b2"] for i in (1, 2, 3, 4))
    assert woken["b2"] >= failed_at


async def test_each_server_window_adapts_to_its_own_load(tmp_path, autojump_clock):
    from orchestrator.bootserver.admission import Load

    plan = two_server_plan(tmp_path, main_max=4, b_max=4, adaptive=True)
    quiet = Load(active=0, queued=0, bytes_per_s=0.0, retransmit_rate=0.0)
    lossy = Load(active=0, queued=0, bytes_per_s=0.0, retransmit_rate=50.0)
    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, server_loads={"main": lambda: quiet, "b": lambda: lossy})
    assert summary.ok
    b_sizes = [w for _, w in sched.server_window_history["b"]]
    main_sizes = [w for _, w in sched.server_window_history.get("main", [])]
    assert b_sizes and b_sizes[-1] < 2  # loss on b: halved from its start of 2
    assert all(w >= 2 for w in main_sizes)  # main never shrank for b's loss
    assert sched.windows["b"].size < sched.windows["main"].size


def satellite_outage(plan, names, seconds):
    """Server b as a satellite whose stream is down for the first ``seconds``: its nodes' evidence is held
    back meanwhile and replayed, in order, when it is back (the satellite resends from the cursor). Returns
    (blind, relay)."""
    ips = {str(plan.by_name[n].ip) for n in names}
    macs = {plan.by_name[n].mac for n in names}
    t0 = trio.current_time()
    held: list = []
    replaying = [True]

    def blind():  # down, then replaying (SatelliteLink.blind)
        return trio.current_time() < t0 + seconds or replaying[0]

    async def relay(raw, send):
        async def flush_when_back():
            await trio.sleep_until(t0 + seconds)
            while held:  # stamped with the time they arrive, as satellite.follow stamps a satellite's records
                await send.send(dataclasses.replace(held.pop(0), time=trio.current_time()))
                await trio.sleep(0.01)  # the replay comes in chunks: the scheduler runs between them
            replaying[0] = False

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush_when_back)
            async for ev in raw:
                if (ev.mac in macs or ev.client_ip in ips) and blind():
                    held.append(ev)
                else:
                    await send.send(ev)

    return blind, relay


async def test_no_power_action_while_a_satellites_stream_is_down(tmp_path, autojump_clock):
    plan = two_server_plan(tmp_path, main_max=4, b_max=3)
    b = ["b1", "b2", "b3"]
    # 60 s without b's evidence: every 20 s stage timeout of its nodes passes in the dark.
    blind, relay = satellite_outage(plan, b, 60.0)
    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, server_blind={"b": blind}, relay=relay)
    assert summary.ok and sorted(summary.ready) == sorted(n.name for n in plan.nodes)
    assert cluster.cycles == []  # no power cycle on a timeout that said only "the link is down"
    assert [name for _, name in cluster.wakes].count("b1") == 1  # nor a second magic packet
    for name in b:  # every stage arrived once, replayed from the stream
        stages = [t.to_stage for t in store.transitions(plan.by_name[name].mac)]
        assert stages.count(Stage.KERNEL) == 1 and stages[-1] == Stage.READY


async def test_a_node_still_stuck_after_the_stream_is_back_is_remediated(tmp_path, autojump_clock):
    plan = two_server_plan(tmp_path, main_max=4, b_max=3)
    blind, relay = satellite_outage(plan, ["b1", "b2", "b3"], 60.0)
    hung = plan.by_name["b2"].mac

    def configure(cluster):
        cluster.nodes[hung].hang_in = "vmlinuz"  # really stuck: a power cycle cures it (not stubborn)

    t0 = trio.current_time()
    with trio.fail_after(10_000):
        summary, cluster, sched, peak, store = await rollout(plan, tmp_path, configure, server_blind={"b": blind},
                                                             relay=relay)
    assert summary.ok and "b2" in summary.ready
    assert [name for _, name in cluster.cycles] == ["b2"]
    # Not before the stream was back plus the grace its replay gets.
    assert cluster.cycles[0][0] >= t0 + 60.0 + sched.blind_grace


def test_servers_in_the_plan_are_checked_with_their_line(tmp_path):
    from orchestrator.plan import PlanError

    plan = two_server_plan(tmp_path)
    assert plan.server_of(plan.by_name["b1"]) == "b" and plan.server_of(plan.by_name["a1"]) == "main"
    text = (tmp_path / "plan.yaml").read_text()
    bad = text.replace("  - name: b\n    racks: [rb]", "  - name: main\n    racks: [ra]\n  - name: c\n    racks: [rb, ra]")
    (tmp_path / "plan.yaml").write_text(bad)
    with pytest.raises(PlanError) as e:
        load_plan(tmp_path / "plan.yaml")
    msgs = [(p.line, p.message) for p in e.value.problems]
    assert any(line == 8 and "'main' is the plan's own boot server" in m for line, m in msgs), msgs
    assert any(line == 11 and "rack ra is listed on two servers (main and c)" in m for line, m in msgs), msgs
