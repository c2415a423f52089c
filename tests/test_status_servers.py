"""``bootorch status``'s boot servers: each server's window, nodes in flight and waiting, and load, from the
running orchestrator's ``admission`` answer (:func:`orchestrator.control.admission_answer`).

The in-process tests run the scheduler on the simulated cluster (tests/sim_cluster.py) under MockClock with a
plan of two ``servers:`` entries (a satellite and an HTTP cache) beside the plan's own server, answer on a real
Unix socket with :class:`~orchestrator.control.ControlServer`, and read it with the CLI's own ``run_status``
from a thread (the mock clock held still meanwhile). One test runs a real ``bootorch serve`` and ``bootorch status``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import socket
import subprocess

import pytest
import trio

from orchestrator import control
from orchestrator.bootserver.admission import Load
from orchestrator.cli.oncall import run_status
from orchestrator.plan import load_plan
from orchestrator.present import print_servers, server_rows
from orchestrator.satellite import SatelliteLink
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from orchestrator.tracker import Tracker, plan_nodes, plan_timeouts
from orchestrator.window import WindowTuning
from tests.conftest import REPO
from tests.sim_cluster import SimCluster

EXE = str(REPO / ".venv" / "bin" / "bootorch")

PLAN = """\
version: 1
network: {subnet: 10.9.0.0/24, server: 10.9.0.1}
profiles: {p: {kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}
nodes:
  - {name: "a[1-4]", mac: "52:54:00:00:00:01", ip: 10.9.0.11, rack: ra}
  - {name: "s[1-5]", mac: "52:54:00:00:01:01", ip: 10.9.0.21, rack: r1}
  - {name: "h[1-2]", mac: "52:54:00:00:02:01", ip: 10.9.0.31, rack: r2}
servers:
  - name: sat1
    racks: [r1]
    admission: {max_downloading: 4, adaptive: true}
    satellite: {control: "127.0.0.1:9", token: {file: token}}
  - name: cache2
    racks: [r2]
    http: http://10.9.0.2:8080
    admission: {max_downloading: 3}
rollout:
  admission: {max_downloading: 2, power_on_rate: 10, adaptive: false}
  timeouts: {waking: 1000, pxe_dhcp: 1000, loader: 1000, config: 1000, kernel: 1000, initrd: 1000, os_dhcp: 1000, ssh: 1000}
  retries: {wake: 1, power_cycle: 1}
  failure_budget: 1
power:
  bmc: {driver: command, command: "true"}
"""

MAIN_LOAD = Load(active=3, queued=1, bytes_per_s=12.5e6, retransmit_rate=0.5, client_retry_rate=0.25, rtt=0.0012)
SAT_LOAD = Load(active=4, queued=0, bytes_per_s=3e6, retransmit_rate=50.0, client_retry_rate=0.0, rtt=None)


def write_plan(tmp_path, text: str = PLAN):
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "token").chmod(0o600)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p)


def status_args(*, as_json: bool = False) -> argparse.Namespace:
    return argparse.Namespace(nodes=None, stuck=False, json=as_json)


def run_status_captured(plan, *, as_json: bool = False) -> tuple[int, str]:
    """The CLI's ``status`` (blocking: call from a thread), its exit code and stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run_status(plan, status_args(as_json=as_json))
    return code, buf.getvalue()


async def test_status_shows_each_servers_window_flight_waiting_and_load(tmp_path, autojump_clock):
    plan = write_plan(tmp_path)
    send, recv = trio.open_memory_channel(10_000)
    cluster = SimCluster(send)
    for node in plan.nodes:
        # Every node stops before its initrd (in flight, downloading); h2 before its loader (in flight, not downloading).
        cluster.add(node.mac, str(node.ip), hang_in="pxelinux.0" if node.name == "h2" else "rootfs.gz", stubborn=True)
    link = SatelliteLink("sat1", "127.0.0.1", 9, "t0ken", load=SAT_LOAD, connected=True, connects=2, errors=1)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = Store(plan.state_dir / "state.db")
    sched = Scheduler(plan, tracker, store, wake=cluster, bmc=cluster, readiness=None, load=lambda: MAIN_LOAD,
                      clock=trio.current_time, server_loads={"sat1": link.load_reader},
                      window_tuning=WindowTuning(adapt_every=2.0, initial_window=8))
    server = control.ControlServer(plan, sched, mode="rollout", satellites=[link])
    server.request_timeout = math.inf  # MockClock would jump to any deadline while the client thread connects
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            cluster.nursery = nursery
            autojump_clock.autojump_threshold = math.inf  # trio binds a Unix socket in a thread: no jump meanwhile
            await nursery.start(server.serve)
            autojump_clock.autojump_threshold = 0
            nursery.start_soon(sched.run, recv)
            await trio.sleep(10)
            asked_at = trio.current_time()
            # sat1's loss shrank its window (from 4; window.py's rules say how far); its four nodes admitted before stay in flight.
            link.load_at = trio.current_time() - 2.5
            autojump_clock.autojump_threshold = math.inf  # time stands still while the CLI asks from its thread
            code, text = await trio.to_thread.run_sync(run_status_captured, plan)
            jcode, jtext = await trio.to_thread.run_sync(lambda: run_status_captured(plan, as_json=True))
            answer = await trio.to_thread.run_sync(lambda: control.ask(control.socket_path(plan), {"op": "admission"}, timeout=5))
            autojump_clock.autojump_threshold = 0
            nursery.cancel_scope.cancel()
    store.close()

    # The control answer, as the orchestrator sends it.
    assert answer["event"] == "admission" and answer["mode"] == "rollout"
    sat_size = sched.windows["sat1"].size
    assert 1 <= sat_size < 4  # shrunk by the loss it reported
    assert answer["window"] == 2 + sat_size + 3 and answer["max_window"] == 2 + 4 + 3
    by = {s["name"]: s for s in answer["servers"]}
    assert [s["name"] for s in answer["servers"]] == ["main", "sat1", "cache2"]
    main, sat, cache = by["main"], by["sat1"], by["cache2"]
    assert (main["kind"], main["racks"], main["nodes"]) == ("embedded", ["ra"], 4)
    assert (main["window"], main["max_downloading"], main["adaptive"]) == (2, 2, False)
    assert (main["in_flight"], main["downloading"], main["waiting"]) == (2, 2, 2)
    assert main["load"] == {"active": 3, "queued": 1, "bytes_per_s": 12.5e6, "retransmit_rate": 0.5,
                            "client_retry_rate": 0.25, "rtt": 0.0012}
    assert main["link"] is None
    assert (sat["kind"], sat["racks"], sat["nodes"]) == ("satellite", ["r1"], 5)
    assert (sat["window"], sat["max_downloading"], sat["adaptive"]) == (sat_size, 4, True)
    assert (sat["in_flight"], sat["downloading"], sat["waiting"]) == (4, 4, 1)
    changes = sched.server_window_history["sat1"]
    assert changes[-1][1] == sat_size
    assert sat["window_since"] == pytest.approx(asked_at - changes[-1][0]) and sat["window_since"] >= 5.0
    assert sat["load"]["retransmit_rate"] == 50.0 and sat["load"]["active"] == 4 and sat["load"]["rtt"] is None
    assert sat["link"] == {"connected": True, "connects": 2, "errors": 1, "load_age": pytest.approx(2.5)}
    assert (cache["kind"], cache["racks"], cache["nodes"]) == ("http cache", ["r2"], 2)
    assert (cache["window"], cache["max_downloading"], cache["adaptive"]) == (3, 3, False)  # no load signal: fixed
    assert (cache["in_flight"], cache["downloading"], cache["waiting"]) == (2, 1, 0)
    assert cache["load"] is None and cache["link"] is None

    # What status prints: the node table from the journal, then the boot servers.
    assert code == 0 and jcode == 0
    nodes_part, _, servers_part = text.partition("boot servers (")
    assert "a1" in nodes_part and "s5" in nodes_part and "pending" in nodes_part
    assert f"window {2 + sat_size + 3} of 9 in all" in servers_part and "rollout" in servers_part
    lines = {line.split()[0]: line.split() for line in servers_part.splitlines()[1:]}
    assert lines["server"][:5] == ["server", "kind", "racks", "nodes", "window"]
    assert lines["main"] == ["main", "embedded", "ra", "4", "2/2", "fixed", "2", "2", "2", "3", "1", "12.5", "0.5", "0.2",
                             "1.2ms", "-"]
    assert lines["sat1"] == ["sat1", "satellite", "r1", "5", f"{sat_size}/4", "adaptive", "4", "4", "1", "4", "0", "3.0", "50.0",
                             "0.0", "-", "up,", "load", "2.5s", "old"]
    assert lines["cache2"] == ["cache2", "http", "cache", "r2", "2", "3/3", "fixed", "2", "1", "0", "-", "-", "-", "-",
                               "-", "-", "-"]
    # --json carries the same, checked.
    view = json.loads(jtext)["orchestrator"]
    assert view["answered"] is True and view["socket"] == str(control.socket_path(plan))
    jby = {s["name"]: s for s in view["servers"]}
    for name in ("main", "sat1", "cache2"):
        for key in ("window", "max_downloading", "adaptive", "in_flight", "downloading", "waiting", "racks", "kind", "nodes"):
            assert jby[name][key] == by[name][key], (name, key)
    assert jby["sat1"]["load"]["retransmit_rate"] == 50.0 and jby["sat1"]["link"]["load_age"] == pytest.approx(2.5)
    assert len(json.loads(jtext)["nodes"]) == 11


def test_status_without_an_orchestrator_prints_the_nodes_and_says_none_answered(tmp_path):
    plan = write_plan(tmp_path)
    code, text = run_status_captured(plan)
    assert code == 0
    assert "pending 11" in text and "a1" in text and "h2" in text  # the node table, as without this feature
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("boot servers: no orchestrator answers on the control socket (")
    assert str(control.socket_path(plan)) in last
    code, jtext = run_status_captured(plan, as_json=True)
    out = json.loads(jtext)
    assert code == 0 and len(out["nodes"]) == 11
    assert out["orchestrator"] == {"socket": str(control.socket_path(plan)), "answered": False,
                                   "why": "no orchestrator answers on the control socket"}


def test_a_socket_nobody_answers_on_in_time_is_reported_and_status_goes_on(tmp_path):
    plan = write_plan(tmp_path)
    path = control.socket_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as ls:  # listens, never answers (a hung orchestrator)
        ls.bind(str(path))
        ls.listen(1)
        view = control.admission_view(path, timeout=0.2)
    assert view["answered"] is False and "did not answer within 0.2 s" in view["why"]


def test_answers_from_the_wire_are_checked_before_printing():
    hostile = {
        "event": "admission", "pid": -1, "mode": "serve\x1b[2J", "window": True, "max_window": 2 ** 40, "aborted": "yes",
        "servers": [{
            "name": "evil\x1b]52;c;aGk=\x07" + "x" * 500, "kind": "satellite", "racks": ["r\u202e1"] * 5000, "nodes": 1.5,
            "window": 3, "max_downloading": 4, "adaptive": "true", "in_flight": -3, "downloading": None, "waiting": 2,
            "window_since": float("inf"),
            "load": {"active": "7", "queued": 1, "bytes_per_s": -5, "retransmit_rate": float("nan"), "rtt": 0.001},
            "link": {"connected": 1, "load_age": float("-inf"), "connects": 1, "errors": 0},
        }],
    }
    view = {"answered": True, "socket": "/x", **control.admission_from_wire(hostile)}
    s = view["servers"][0]
    assert "\x1b" not in s["name"] and len(s["name"]) <= 32 and s["name"].startswith("evil\\x1b]52")
    assert len(s["racks"]) == control.MAX_RACKS and s["racks_total"] == 5000 and s["racks"][0] == "r\\u202e1"
    assert (s["nodes"], s["in_flight"], s["downloading"], s["waiting"], s["window"]) == (None, None, None, 2, 3)
    assert s["adaptive"] is None and s["window_since"] is None
    assert s["load"] == {"active": None, "queued": 1, "bytes_per_s": None, "retransmit_rate": None, "client_retry_rate": None,
                         "rtt": 0.001}
    assert s["link"]["connected"] is None and s["link"]["load_age"] is None
    assert (view["pid"], view["window"], view["max_window"], view["aborted"]) == (None, None, None, False)
    assert "\x1b" not in view["mode"]
    out = io.StringIO()
    print_servers(view, out)
    text = out.getvalue()
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert max(len(line) for line in text.splitlines()) < 260  # 5000 racks do not make a 30 000-column line
    assert server_rows(view)[1][2] == "r\\u202e1,+4999"  # the racks cell: the first, and how many more
    with pytest.raises(ValueError):
        control.admission_from_wire({"event": "admission", "servers": "all"})


async def test_admission_is_read_only_and_answered_to_group_members(tmp_path, autojump_clock):
    """A peer that is neither our user nor root may ask ``admission`` (no secret in it), still not ``reboot``."""
    plan = write_plan(tmp_path)
    assert "admission" in control.READ_ONLY_OPS and "events" not in control.READ_ONLY_OPS
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = Store(tmp_path / "s.db")
    sched = Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, rollout=False)
    server = control.ControlServer(plan, sched, mode="serve")

    async def exchange(req: dict) -> dict:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(json.dumps(req).encode() + b"\n")
        await server._handle(b, need_token=False, read_only=True)
        return json.loads((await a.receive_some(1 << 20)).split(b"\n")[0])

    with trio.fail_after(100):
        got = await exchange({"op": "admission"})
        refused = await exchange({"op": "reboot", "nodes": ["a1"], "reason": "x"})
    store.close()
    assert got["event"] == "admission" and [s["name"] for s in got["servers"]] == ["main", "sat1", "cache2"]
    assert all(s["in_flight"] == 0 and s["waiting"] == 0 for s in got["servers"])
    # No satellite link followed here (no load reader): its entry says so rather than inventing one.
    assert got["servers"][1]["link"] is None and got["servers"][1]["load"] is None
    assert refused["event"] == "error" and "read-only (ping, plan, admission)" in refused["error"]


SERVE_PLAN = """\
version: 1
state_dir: {state}
network: {{subnet: 127.78.0.0/24, server: 127.78.0.1, interface: ""}}
boot: {{root: {root}}}
bootserver: {{listen: 127.0.0.1, dhcp_port: 0, proxy_port: 0, tftp_port: 0, http_port: 0}}
profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
nodes:
  - {{name: "a[1-2]", mac: "52:54:00:00:00:01", ip: 127.78.0.11, rack: ra}}
  - {{name: "s[1-2]", mac: "52:54:00:00:01:01", ip: 127.78.0.21, rack: r1}}
  - {{name: "h[1-2]", mac: "52:54:00:00:02:01", ip: 127.78.0.31, rack: r2}}
servers:
  - name: sat1
    racks: [r1]
    admission: {{max_downloading: 5}}
    satellite: {{control: "127.0.0.1:{dead}", token: {{file: {token}}}}}
  - name: cache2
    racks: [r2]
    http: http://127.78.0.2:8080
    admission: {{max_downloading: 3, adaptive: false}}
rollout:
  admission: {{max_downloading: 12}}
power:
  wol: {{method: udp, broadcast: 127.255.255.255, udp_port: 9}}
  bmc: {{driver: command, command: "true"}}
readiness: {{ssh: {{port: 1}}}}
metrics: {{listen: ""}}
"""


def test_a_real_serve_answers_bootorch_status_with_its_servers(tmp_path):
    from tests.test_control_security import Serve

    root = tmp_path / "root"
    root.mkdir()
    for name, data in (("pxelinux.0", b"\x90" * 4096), ("vmlinuz", b"k" * 4096), ("rootfs.gz", b"\x1f\x8b" + bytes(500))):
        (root / name).write_bytes(data)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    with socket.socket() as s:  # a port nobody listens on: the satellite stays unreachable
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p = tmp_path / "plan.yaml"
    p.write_text(SERVE_PLAN.format(state=tmp_path / "state", root=root, dead=dead, token=token))
    plan = load_plan(p)

    def status(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([EXE, "status", str(p), *extra], capture_output=True, text=True, timeout=60)

    srv = Serve(plan, tmp_path)
    try:
        r = status()
        j = status("--json")
    finally:
        assert srv.stop() == 0, srv.err.read_text()
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split() for line in r.stdout.partition("boot servers (")[2].splitlines()[1:]}
    assert "serve; window 16 of 20 in all" in r.stdout  # main 8 (slow start of 12) + sat1 5 + cache2 3
    assert lines["main"] == ["main", "embedded", "ra", "2", "8/12", "adaptive", "0", "0", "0", "0", "0", "0.0", "0.0", "0.0",
                             "-", "-"]  # nothing in flight or waiting; its own servers idle
    assert lines["sat1"] == ["sat1", "satellite", "r1", "2", "5/5", "adaptive", "0", "0", "0", "-", "-", "-", "-", "-", "-",
                             "DOWN,", "no", "load", "yet"]
    assert lines["cache2"] == ["cache2", "http", "cache", "r2", "2", "3/3", "fixed", "0", "0", "0", "-", "-", "-", "-", "-",
                               "-", "-"]
    view = json.loads(j.stdout)["orchestrator"]
    assert j.returncode == 0 and view["answered"] and view["mode"] == "serve"
    sat = next(s for s in view["servers"] if s["name"] == "sat1")
    assert sat["link"]["connected"] is False and sat["load"] is None and sat["link"]["errors"] >= 0
    # The orchestrator gone: the same command prints the nodes and one line, exit 0.
    r = status()
    assert r.returncode == 0 and "pending 6" in r.stdout
    assert "boot servers: no orchestrator answers on the control socket" in r.stdout
    assert all(f"{n} " in r.stdout for n in ("a1", "a2", "s1", "s2", "h1", "h2"))


async def test_a_plan_without_servers_shows_main_with_queued_on_call_wakes(tmp_path, autojump_clock):
    """No ``servers:``: one line, the plan's own server; on-call wakes queued behind its window count as waiting."""
    from tests.test_oncall_ops import Harness
    from tests.test_scheduler import make_plan

    plan = make_plan(tmp_path, n=8, max_downloading=3)
    h = Harness(plan, tmp_path)
    for node in h.cluster.nodes.values():
        node.hang_in, node.stubborn = "rootfs.gz", True
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            h.cluster.nursery = nursery
            h.sched.standing = True
            nursery.start_soon(h.sched.run, h.recv)
            await h.sched._started.wait()
            op, busy = h.sched.submit("wake", [n.name for n in plan.nodes], reason="test", actor="tester")
            assert op is not None and not busy
            await trio.sleep(30)
            answer = control.admission_answer(plan, h.sched, {}, mode="serve")
            nursery.cancel_scope.cancel()
    h.store.close()
    assert [s["name"] for s in answer["servers"]] == ["main"]
    main = answer["servers"][0]
    assert (main["kind"], main["racks"], main["nodes"], main["window"], main["adaptive"]) == ("embedded", [], 8, 3, False)
    assert (main["in_flight"], main["downloading"], main["waiting"]) == (3, 3, 5)
    assert main["window_since"] == pytest.approx(30.0, abs=1.0)  # never changed: since the scheduler started
    assert main["load"] is None  # the harness's scheduler reads no load
    view = {"answered": True, "socket": "-", **control.admission_from_wire(json.loads(json.dumps(answer)))}
    row = server_rows(view)[1]
    assert row[:8] == ["main", "embedded", "-", "8", "3/3 fixed", "3", "3", "5"]


async def test_main_carrying_no_node_is_left_out_until_a_reload_gives_it_one(tmp_path, autojump_clock):
    """Every rack on another server: ``main`` admits nobody, so it is neither a row nor part of "in all".
    A reload that adds a node in a rack no ``servers:`` entry lists gives it one (``Scheduler.set_plan``)."""
    text = PLAN.replace('  - {name: "a[1-4]", mac: "52:54:00:00:00:01", ip: 10.9.0.11, rack: ra}\n', "")
    plan = write_plan(tmp_path, text)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = Store(plan.state_dir / "state.db")
    sched = Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, clock=trio.current_time)
    answer = control.admission_answer(plan, sched, {}, mode="serve")
    assert [s["name"] for s in answer["servers"]] == ["sat1", "cache2"]
    assert (answer["window"], answer["max_window"]) == (4 + 3, 4 + 3)

    (tmp_path / "plan.yaml").write_text(PLAN)  # a1..a4 in rack ra: the plan's own server carries them
    reloaded = load_plan(tmp_path / "plan.yaml")
    sched.set_plan(reloaded)
    tracker.set_nodes(plan_nodes(reloaded), [])
    assert sched.server_of[reloaded.nodes[0].mac] == "main" and sched.server_of[reloaded.nodes[4].mac] == "sat1"
    answer = control.admission_answer(reloaded, sched, {}, mode="serve")
    store.close()
    assert [s["name"] for s in answer["servers"]] == ["main", "sat1", "cache2"]
    assert answer["servers"][0]["nodes"] == 4
    assert (answer["window"], answer["max_window"]) == (2 + 4 + 3, 2 + 4 + 3)


async def test_a_node_moved_to_another_rack_by_a_reload_counts_on_its_new_server(tmp_path, autojump_clock):
    from orchestrator.tracker import Stage

    plan = write_plan(tmp_path)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    store = Store(plan.state_dir / "state.db")
    sched = Scheduler(plan, tracker, store, wake=None, bmc=None, readiness=None, clock=trio.current_time)
    a1 = plan.nodes[0]
    tracker.nodes[a1.mac].stage = Stage.KERNEL
    sched._sync_flying(a1.mac)
    assert (sched.in_flight_on("main"), sched.in_flight_on("sat1")) == (1, 0)

    (tmp_path / "plan.yaml").write_text(PLAN.replace("ip: 10.9.0.11, rack: ra}", "ip: 10.9.0.11, rack: r1}"))
    sched.set_plan(load_plan(tmp_path / "plan.yaml"))
    store.close()
    assert sched.server_of[a1.mac] == "sat1"
    assert (sched.in_flight_on("main"), sched.in_flight_on("sat1")) == (0, 1)
