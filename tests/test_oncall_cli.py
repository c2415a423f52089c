"""On-call commands: status/history views, the control API, and wake/reboot/slurm as real processes (no lab)."""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import subprocess
import textwrap
import time
from types import SimpleNamespace

import pytest
import trio

from orchestrator import control
from orchestrator.cli.oncall import run_status
from orchestrator.oncall import history_rows, node_rows
from orchestrator.plan import load_plan
from orchestrator.store import Store
from orchestrator.tracker import Stage, Transition
from tests.conftest import REPO
from tests.test_oncall_ops import Harness
from tests.test_scheduler import make_plan

EXE = str(REPO / ".venv" / "bin" / "bootorch")


def _t(mac, node, a, b, when, attempt=1, ev="x"):
    return Transition(mac, node, Stage(a), Stage(b), when, attempt, ev, "test")


def test_status_worst_first_and_time_in_stage_survives_a_rewake(tmp_path, capsys):
    plan = make_plan(tmp_path, n=3)
    m = [n.mac for n in plan.nodes]
    store = Store(plan.state_dir / "state.db")
    now = time.time()
    store.append([
        _t(m[0], "n1", "pending", "waking", now - 100), _t(m[0], "n1", "waking", "pxe_dhcp", now - 95),
        _t(m[0], "n1", "pxe_dhcp", "ready", now - 50),
        _t(m[1], "n2", "pending", "waking", now - 60, ev="woken: admitted"),
        _t(m[1], "n2", "waking", "waking", now - 5, ev="re-wake 1: stuck in waking for 20s"),  # the scheduler's restart
        _t(m[2], "n3", "pending", "waking", now - 30), _t(m[2], "n3", "waking", "failed", now - 10, ev="stuck in waking"),
    ])
    store.record_action("n2", "wake", "stuck in waking for 20s", "ok", actor="bootorch")
    rows = node_rows(plan, store, now)
    assert [r["node"] for r in rows] == ["n3", "n2", "n1"]
    n2 = rows[1]
    assert n2["stage"] == "waking" and n2["stuck"] and n2["in_stage_seconds"] >= 59  # not 5 s: the re-wake is not a new stage
    assert n2["evidence"].startswith("re-wake 1") and n2["last_action"]["action"] == "wake"
    store.close()
    args = SimpleNamespace(nodes="n[2-3]", stuck=True, json=True)
    assert run_status(plan, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["node"] for r in out["nodes"]] == ["n3", "n2"]


def test_history_shows_who_did_what_and_why(tmp_path):
    plan = make_plan(tmp_path, n=2)
    store = Store(plan.state_dir / "state.db")
    mac = plan.nodes[0].mac
    store.append([_t(mac, "n1", "pending", "waking", 10.0)])
    store.record_action("n1", "reboot requested", "hung NFS", "accepted", actor="alice@head", when=11.0)
    store.record_action("n2", "wake", "admitted", "ok", when=12.0)
    rows = history_rows(plan, store, ["n1"])
    assert [(r["kind"], r["what"], r["actor"]) for r in rows] == [("stage", "pending -> waking", "test"),
                                                                   ("action", "reboot requested", "alice@head")]
    assert rows[1]["detail"] == "hung NFS -> accepted"
    store.close()


# --------------------------------------------------------------------------- control API, in process


async def test_control_api_streams_a_reboot_and_refuses_a_busy_node(tmp_path, autojump_clock):
    plan = make_plan(tmp_path, n=2)
    h = Harness(plan, tmp_path)
    path = control.socket_path(plan)

    def ask(req):
        return list(control.request(path, req, timeout=30))

    async with trio.open_nursery() as nursery:
        h.cluster.nursery = nursery
        h.sched.standing = True
        nursery.start_soon(h.sched.run, h.recv)
        server = control.ControlServer(plan, h.sched, mode="serve")
        server.request_timeout = math.inf  # MockClock would jump to any deadline while the client thread connects
        await nursery.start(server.serve)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        pong = (await trio.to_thread.run_sync(ask, {"op": "ping"}))[0]
        assert pong["event"] == "pong" and pong["pid"] == os.getpid() and pong["mode"] == "serve"
        await h.boot_all(nursery)

        # Virtual time stands still while the client threads talk: otherwise the autojumping clock could
        # finish alice's reboot (every deadline reached at once) before bob's request arrives.
        autojump_clock.autojump_threshold = math.inf
        first = await trio.to_thread.run_sync(ask, {"op": "reboot", "nodes": ["n1"], "reason": "test", "actor": "alice", "wait": False})
        assert first[0] == {"event": "accepted", "acting": ["n1"], "busy": {}}
        second = await trio.to_thread.run_sync(ask, {"op": "reboot", "nodes": ["n1"], "reason": "again", "actor": "bob"})
        autojump_clock.autojump_threshold = 0
        assert second[0]["acting"] == [] and "reboot by alice" in second[0]["busy"]["n1"]
        assert second[-1] == {"event": "done", "results": {}}
        await h.sched.wait_idle()

        msgs = await trio.to_thread.run_sync(ask, {"op": "reboot", "nodes": ["n2"], "reason": "r", "actor": "carol"})
        assert msgs[0]["acting"] == ["n2"]
        stages = [m["to"] for m in msgs if m["event"] == "transition"]
        assert stages[0] == "waking" and "kernel" in stages and stages[-1] == "ready"
        assert msgs[-1]["event"] == "done" and msgs[-1]["results"]["n2"]["result"] == "ready"

        bad = await trio.to_thread.run_sync(ask, {"op": "reboot", "nodes": ["nope"]})
        assert bad[0]["event"] == "error" and "node names" in bad[0]["error"]
        bad = await trio.to_thread.run_sync(ask, {"op": "format-disk"})
        assert bad[0]["event"] == "error"

        def garbage():
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.sendall(b"{not json\n")
                return s.makefile().readline()

        assert "bad request" in json.loads(await trio.to_thread.run_sync(garbage))["error"]
        assert server.bad_requests == 1
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_control_api_over_tcp_needs_the_token(tmp_path, autojump_clock):
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "token").chmod(0o600)
    plan = make_plan(tmp_path, n=1, extra=f"control: {{listen: '127.0.0.1:0', token: {{file: {tmp_path / 'token'}}}}}")
    h = Harness(plan, tmp_path)

    def ask(port, req):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            return [json.loads(line) for line in s.makefile()]

    async with trio.open_nursery() as nursery:
        h.cluster.nursery = nursery
        nursery.start_soon(h.sched.run, h.recv)
        server = control.ControlServer(plan, h.sched, mode="rollout", token="s3cret")
        server.request_timeout = math.inf  # MockClock would jump to any deadline while the client thread connects
        _, tcp = await nursery.start(server.serve)
        port = tcp[0][1]
        assert "token" in (await trio.to_thread.run_sync(ask, port, {"op": "ping"}))[0]["error"]
        assert "token" in (await trio.to_thread.run_sync(ask, port, {"op": "ping", "token": "guess"}))[0]["error"]
        assert (await trio.to_thread.run_sync(ask, port, {"op": "ping", "token": "s3cret"}))[0]["event"] == "pong"
        nursery.cancel_scope.cancel()


def test_plan_rejects_a_tcp_control_port_without_a_token(tmp_path):
    from orchestrator.plan import PlanError

    with pytest.raises(PlanError) as e:
        make_plan(tmp_path, n=1, extra="control: {listen: '0.0.0.0:9811'}")
    assert "control.token" in str(e.value.problems[0])


def test_orchestrator_lock_is_exclusive(tmp_path):
    lock = control.OrchestratorLock(tmp_path / "c" / "orchestrator.lock")
    with lock:
        with pytest.raises(control.Busy, match=f"pid {os.getpid()}"):
            control.OrchestratorLock(tmp_path / "c" / "orchestrator.lock").acquire()
    control.OrchestratorLock(tmp_path / "c" / "orchestrator.lock").acquire()


# --------------------------------------------------------------------------- real processes


def _cli_plan(tmp_path, *, waking="2"):
    """Nodes with a logging 'BMC' (command driver) and no SSH; the boot server on loopback, any ports.

    The subnet is loopback (127.77.0.0/24) so the SSH probe of a node's address never leaves this machine.
    """
    log = tmp_path / "power.log"
    text = textwrap.dedent(f"""\
    version: 1
    state_dir: {tmp_path / 'state'}
    network: {{subnet: 127.77.0.0/24, server: 127.77.0.1, interface: ""}}
    bootserver: {{listen: 127.0.0.1, dhcp_port: 0, proxy_port: 0, tftp_port: 0, http_port: 0}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - {{name: "n[1-2]", mac: "52:54:00:00:00:01", ip: 127.77.0.11}}
    power:
      wol: {{method: udp, broadcast: 127.255.255.255, udp_port: 9}}
      bmc: {{driver: command, command: "sh -c 'echo {{action}} {{name}} >> {log}'"}}
    rollout:
      timeouts: {{waking: {waking}, pxe_dhcp: 2}}
      retries: {{wake: 0, power_cycle: 0}}
    readiness: {{ssh: {{port: 1}}}}
    metrics: {{listen: ""}}
    """)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p), log


def _run(*args, timeout=60, env=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_reboot_without_an_orchestrator_runs_one_and_reports_failure(tmp_path):
    """Nothing boots here: the BMC cycle is done, the node never PXE-boots, the ladder fails it: exit 1, audited."""
    plan, log = _cli_plan(tmp_path)
    r = _run("reboot", str(plan.path), "n1", "--reason", "test reboot", "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["via"] == "direct" and out["acting"] == ["n1"]
    res = out["results"]["n1"]
    assert res["result"] == "failed" and res["path"][0] == "power_cycle" and "stuck in waking" in res["reason"]
    assert log.read_text().splitlines() == ["cycle n1"]
    hist = json.loads(_run("history", str(plan.path), "n1", "--json").stdout)
    actions = [(h["what"], h["detail"]) for h in hist if h["kind"] == "action"]
    assert ("reboot requested", "test reboot -> accepted") in actions and ("power_cycle", "reboot by " in "") is not None
    assert any(w == "reboot" and d.startswith("test reboot -> failed") for w, d in actions)
    assert not control.socket_path(plan).exists()


def test_reboot_goes_through_a_running_serve_and_a_second_one_is_busy(tmp_path):
    plan, log = _cli_plan(tmp_path, waking="5m")  # the first reboot holds n2 until the test ends
    p = subprocess.Popen([EXE, "serve", str(plan.path), "--interface", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if line.startswith("serving"):
                break
        else:
            raise AssertionError("serve did not start")
        assert control.ping(control.socket_path(plan))["mode"] == "serve"
        first = _run("reboot", str(plan.path), "n2", "--no-wait", "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["via"] == "control"
        second = _run("reboot", str(plan.path), "n2", "--json")
        assert second.returncode == 1
        assert "reboot by" in json.loads(second.stdout)["busy"]["n2"]
        assert log.read_text().splitlines() == ["cycle n2"]
        rollout = _run("rollout", str(plan.path))
        assert rollout.returncode == 1 and "another bootorch" in rollout.stderr
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_slurm_resume_failure_exits_nonzero_and_fail_powers_off(tmp_path):
    plan, log = _cli_plan(tmp_path)
    env = {**os.environ, "BOOTORCH_PLAN": str(plan.path)}
    r = _run("slurm", "resume", "n[1-2]", env=env)
    assert r.returncode == 1
    r = _run("slurm", "fail", "n[1-2]", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(log.read_text().splitlines()) == ["off n1", "off n2"]  # resume woke them by magic packet (retries: 0)
    text = (plan.state_dir / "slurm.log").read_text()
    assert "slurm resume n[1-2]" in text and "n1: off" in text and "n1: failed" in text
    nodes = json.loads(_run("status", str(plan.path), "--json").stdout)["nodes"]
    assert {n["stage"] for n in nodes} == {"pending"}
    assert _run("slurm", "resume", "n[1-2]").returncode == 2  # no plan: a usage error, said clearly
