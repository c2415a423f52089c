"""On-call operations in the scheduler (wake, reboot, power_off), on trio's MockClock against tests/sim_cluster.py."""

from __future__ import annotations

import trio

from orchestrator.power import PowerResult, Target
from orchestrator.scheduler import IN_FLIGHT, Scheduler
from orchestrator.store import Store
from orchestrator.tracker import Stage, Tracker, plan_nodes, plan_timeouts
from tests.sim_cluster import SimCluster, SimReadiness
from tests.test_scheduler import make_plan


class SimSsh:
    """``reboot``/``poweroff`` over a simulated SSH session: works while the node's SSH is up, unless ``broken``."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster, self.broken, self.calls = cluster, False, []

    async def cycle(self, t: Target) -> PowerResult:
        node = self.cluster.nodes[t.mac]
        self.calls.append(("reboot", t.name))
        if self.broken or not node.ssh_up:
            return PowerResult(False, "ssh reboot: Authentication failed")
        self.cluster._boot(node)
        return PowerResult(True, "ssh reboot: sent")

    async def off(self, t: Target) -> PowerResult:
        node = self.cluster.nodes[t.mac]
        self.calls.append(("poweroff", t.name))
        if self.broken or not node.ssh_up:
            return PowerResult(False, "ssh poweroff: Authentication failed")
        if node.scope is not None:
            node.scope.cancel()
            node.scope = None
        node.ssh_up = False
        return PowerResult(True, "ssh poweroff: sent")


class Harness:
    def __init__(self, plan, tmp_path, *, rollout: bool = False) -> None:
        self.plan = plan
        self.send, self.recv = trio.open_memory_channel(10_000)
        self.cluster = SimCluster(self.send)
        for node in plan.nodes:
            self.cluster.add(node.mac, str(node.ip))
        self.ssh = SimSsh(self.cluster)
        self.tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
        self.store = Store(tmp_path / "state.db")
        self.peak_in_flight = 0
        self.sched = Scheduler(plan, self.tracker, self.store, wake=self.cluster, bmc=self.cluster, readiness=SimReadiness(self.cluster),
                               ssh_power=self.ssh, clock=trio.current_time, on_change=self._seen, rollout=rollout, probe_every=1.0)

    def _seen(self, ts) -> None:
        self.peak_in_flight = max(self.peak_in_flight, sum(1 for st in self.tracker.nodes.values() if st.stage in IN_FLIGHT))

    async def boot_all(self, nursery) -> None:
        """Bring every node to ready first (as a rollout would)."""
        op, busy = self.sched.submit("wake", [n.name for n in self.plan.nodes], reason="test setup", actor="tester")
        assert not busy
        await op.done.wait()
        assert all(r["result"] == "ready" for r in op.results.values()), op.results
        self.peak_in_flight = 0


async def _with(h: Harness, body):
    async with trio.open_nursery() as nursery:
        h.cluster.nursery = nursery
        h.sched.standing = True
        nursery.start_soon(h.sched.run, h.recv)
        await h.sched._started.wait()
        await body(nursery)
        nursery.cancel_scope.cancel()


async def test_reboot_goes_over_ssh_and_waits_for_ready_again(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        op, busy = h.sched.submit("reboot", ["n1"], reason="stuck NFS", actor="alice")
        assert not busy
        await op.done.wait()
        assert op.results["n1"]["result"] == "ready"
        assert op.results["n1"]["path"] == ["reboot_ssh"]
        assert h.ssh.calls == [("reboot", "n1")] and h.cluster.cycles == []
        st = h.tracker.nodes[plan.nodes[0].mac]
        assert st.attempt == 2 and st.stage == Stage.READY
        second = [t.to_stage for t in h.store.transitions(plan.nodes[0].mac) if t.attempt == 2]
        assert second[0] == Stage.WAKING and Stage.PXE_DHCP in second and Stage.KERNEL in second and second[-1] == Stage.READY
        audit = [(a.action, a.result, a.actor) for a in h.store.actions("n1")]
        assert ("reboot requested", "accepted", "alice") in audit and ("reboot_ssh", "ok", "alice") in audit
        assert ("reboot", "ready", "alice") in audit

    with trio.fail_after(1000):
        await _with(h, body)


async def test_reboot_falls_back_to_the_bmc_when_ssh_is_broken(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=1)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        h.ssh.broken = True
        op, _ = h.sched.submit("reboot", ["n1"], reason="hung", actor="bob")
        await op.done.wait()
        assert op.results["n1"]["result"] == "ready"
        assert op.results["n1"]["path"] == ["reboot_ssh", "power_cycle"]
        assert [n for _, n in h.cluster.cycles] == ["n1"]

    with trio.fail_after(1000):
        await _with(h, body)


async def test_hard_reboot_skips_ssh(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=1)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        op, _ = h.sched.submit("reboot", ["n1"], reason="kernel panic", actor="bob", hard=True)
        await op.done.wait()
        assert op.results["n1"]["path"] == ["power_cycle"] and h.ssh.calls == []

    with trio.fail_after(1000):
        await _with(h, body)


async def test_second_request_for_a_busy_node_is_refused_with_its_holder(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        first, busy1 = h.sched.submit("reboot", ["n1"], reason="a", actor="alice")
        second, busy2 = h.sched.submit("reboot", ["n1", "n2"], reason="b", actor="bob")
        assert not busy1 and first is not None
        assert list(busy2) == ["n1"] and "reboot by alice" in busy2["n1"]
        assert second is not None and second.names == ["n2"]
        await first.done.wait()
        await second.done.wait()
        assert h.ssh.calls.count(("reboot", "n1")) == 1
        refused = [a for a in h.store.actions("n1") if a.actor == "bob"]
        assert refused and refused[0].result.startswith("busy")
        third, busy3 = h.sched.submit("reboot", ["n1"], reason="c", actor="carol")  # free again once done
        assert not busy3 and third is not None
        await third.done.wait()

    with trio.fail_after(1000):
        await _with(h, body)


async def test_rebooting_many_nodes_is_a_mini_rollout_not_a_storm(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=8, max_downloading=2)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        op, _ = h.sched.submit("reboot", [n.name for n in plan.nodes], reason="new image", actor="ops")
        await op.done.wait()
        assert all(r["result"] == "ready" for r in op.results.values())
        assert h.peak_in_flight <= 2

    with trio.fail_after(5000):
        await _with(h, body)


async def test_power_off_then_wake(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        off, _ = h.sched.submit("power_off", ["n1", "n2"], reason="slurm suspend", actor="slurm")
        await off.done.wait()
        assert {r["result"] for r in off.results.values()} == {"off"}
        assert all(st.stage == Stage.PENDING for st in h.tracker.nodes.values())
        on, _ = h.sched.submit("wake", ["n1"], reason="slurm resume", actor="slurm")
        await on.done.wait()
        assert on.results["n1"]["result"] == "ready" and on.results["n1"]["path"] == ["wake"]

    with trio.fail_after(1000):
        await _with(h, body)


async def test_waking_a_node_that_is_up_does_nothing(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=1)
    h = Harness(plan, tmp_path)

    async def body(nursery):
        await h.boot_all(nursery)
        wakes = len(h.cluster.wakes)
        op, _ = h.sched.submit("wake", ["n1"], reason="r", actor="a")
        await op.done.wait()
        assert op.results["n1"] == {"result": "ready", "reason": "already up", "path": ["none"]}
        assert len(h.cluster.wakes) == wakes

    with trio.fail_after(1000):
        await _with(h, body)


async def test_a_node_that_cannot_boot_fails_the_operation_after_the_ladder(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=1, wake=1, cycles=1)
    h = Harness(plan, tmp_path)
    h.cluster.nodes[plan.nodes[0].mac].hang_in = "vmlinuz"
    h.cluster.nodes[plan.nodes[0].mac].stubborn = True

    async def body(nursery):
        op, _ = h.sched.submit("wake", ["n1"], reason="resume", actor="slurm")
        await op.done.wait()
        assert op.results["n1"]["result"] == "failed" and "stuck in" in op.results["n1"]["reason"]
        assert not h.sched.ops

    with trio.fail_after(1000):
        await _with(h, body)


async def test_a_request_during_a_rollout_takes_the_node_over_without_a_double_wake(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=6, max_downloading=1)
    h = Harness(plan, tmp_path, rollout=True)
    summary = None

    async with trio.open_nursery() as nursery:
        h.cluster.nursery = nursery

        async def go():
            nonlocal summary
            summary = await h.sched.run(h.recv)

        nursery.start_soon(go)
        await h.sched._started.wait()
        op, busy = h.sched.submit("wake", ["n6"], reason="needed first", actor="alice")  # still queued in the rollout
        assert not busy
        await op.done.wait()
        assert op.results["n6"]["result"] == "ready"
    assert summary is not None and summary.ok and len(summary.ready) == 6
    wakes = [name for _, name in h.cluster.wakes]
    assert sorted(wakes) == sorted(n.name for n in plan.nodes)  # one wake each: n6 by the request, not again by its wave
    assert wakes.index("n6") < wakes.index("n5")
