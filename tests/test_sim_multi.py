"""Groundwork for several simulators behind one orchestrator: per-node simulator sockets, per-simulator plans."""

from __future__ import annotations

import json

import trio

from orchestrator.plan import load_plan
from orchestrator.power import Target
from orchestrator.sim.plan import SimPlan, write_sim_plan
from orchestrator.sim.power import SimPowerDriver


async def _answer(path, seen: list, task_status=trio.TASK_STATUS_IGNORED):
    """A control socket speaking the simulator's protocol (here only to see which socket a request reaches)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(4)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def one(stream):
        async with stream:
            line = await stream.receive_some(4096)
            seen.append((str(path), json.loads(line)))
            await stream.send_all(b'{"ok": true, "detail": "on", "state": "on"}\n')

    await trio.serve_listeners(one, [listener])


async def test_a_nodes_own_bmc_names_its_simulators_socket(tmp_path):
    seen: list = []
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(_answer, a, seen)
        await nursery.start(_answer, b, seen)
        driver = SimPowerDriver(a)
        r1 = await driver.on(Target(name="n1", mac="52:54:00:00:00:01", ip="10.1.0.2", bmc=None))
        r2 = await driver.on(Target(name="m1", mac="52:54:00:00:01:01", ip="10.2.0.2", bmc=str(b)))
        assert await driver.status(Target(name="m1", mac="52:54:00:00:01:01", ip="10.2.0.2", bmc=str(b))) == "on"
        nursery.cancel_scope.cancel()
    assert r1.ok and r2.ok
    assert [(p, req["mac"]) for p, req in seen] == [(str(a), "52:54:00:00:00:01"), (str(b), "52:54:00:00:01:01"),
                                                    (str(b), "52:54:00:00:01:01")]


def test_each_simulator_gets_its_own_subnet_macs_names_and_rack(tmp_path):
    sp = SimPlan(nodes=3, namespace="bt-x", interface="btx", control=str(tmp_path / "s.sock"), subnet="10.97.0.0/16",
                 server="10.97.0.1", first_node_ip="10.97.1.1", first_mac="52:54:00:97:00:01", node_prefix="s2n", rack="r2",
                 loader_size=10, kernel_size=10, initrd_size=10)
    plan = load_plan(write_sim_plan(tmp_path, sp))
    assert [(n.name, n.mac, str(n.ip), n.rack) for n in plan.nodes] == [
        ("s2n001", "52:54:00:97:00:01", "10.97.1.1", "r2"), ("s2n002", "52:54:00:97:00:02", "10.97.1.2", "r2"),
        ("s2n003", "52:54:00:97:00:03", "10.97.1.3", "r2")]
    assert str(plan.model.network.subnet) == "10.97.0.0/16" and str(plan.model.network.server) == "10.97.0.1"
