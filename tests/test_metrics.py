"""Metrics, the Grafana dashboard and the alert rules.

Fast tier: the exposition parses and follows the naming conventions, the
collector never raises, the dashboard and the rules name only metrics the
exporter defines, every panel uses the datasource variable, the endpoint speaks
HTTP/1.1, and ``promtool`` accepts the scrape and the rules.

Slow tier: a real Prometheus (Debian's) scrapes ``serve_metrics`` while the real
Scheduler runs a rollout of the simulated cluster on the real clock -- one node
fails, one is stuck in a stage -- next to a real boot server on loopback serving
TFTP, HTTP and DHCP; then every PromQL expression of the dashboard and of the
rules is evaluated through Prometheus's HTTP API and must return data with the
labels its legend, table columns or annotations use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
import yaml
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.serve import BootServers
from orchestrator.window import WindowTuning
from orchestrator.metrics import Metrics, failure_category, serve_metrics, split_listen
from orchestrator.plan import load_plan
from orchestrator.power import PowerResult
from orchestrator.power.drivers import WolDriver, plan_drivers
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from orchestrator.tracker import Stage, Tracker, plan_nodes, plan_timeouts
from tests.conftest import REPO, require_tool

DASHBOARD = REPO / "grafana" / "dashboards" / "bootorch-rollout.json"
RULES = REPO / "grafana" / "alerts.yaml"
DS = {"type": "prometheus", "uid": "${datasource}"}


# --------------------------------------------------------------------------- helpers


def plan_text(tmp: Path, *, n: int, budget: int = 0) -> str:
    return textwrap.dedent(f"""\
    version: 1
    name: metrics-test
    state_dir: {tmp / 'state'}
    network: {{subnet: 10.9.0.0/24, server: 10.9.0.1}}
    boot: {{root: {tmp / 'root'}}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - name: n[1-{n}]
        mac: 52:54:00:00:00:01
        ip: 10.9.0.11
    rollout:
      admission: {{max_downloading: 4, power_on_rate: 5, adaptive: true}}
      timeouts: {{waking: 6, pxe_dhcp: 6, loader: 6, config: 2, kernel: 6, initrd: 6, os_dhcp: 6, ssh: 3}}
      retries: {{wake: 1, power_cycle: 1}}
      failure_budget: {budget}
    power:
      bmc: {{driver: command, command: "true"}}
    metrics: {{listen: "127.0.0.1:0"}}
    """)


def make_plan(tmp: Path, *, n: int = 4, budget: int = 0):
    (tmp / "root").mkdir(exist_ok=True)
    (tmp / "root" / "pxelinux.0").write_bytes(b"\x90" * 4096)
    (tmp / "root" / "vmlinuz").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    (tmp / "root" / "rootfs.gz").write_bytes(b"\x1f\x8b" + bytes(8190))
    p = tmp / "plan.yaml"
    p.write_text(plan_text(tmp, n=n, budget=budget))
    return load_plan(p)


def populated(tmp_path: Path) -> tuple[Metrics, Tracker, Scheduler, BootServers]:
    """A Metrics attached to real objects in a mid-rollout state (no trio run needed)."""
    plan = make_plan(tmp_path, n=4, budget=1)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    wake, bmc = plan_drivers(plan)
    wake.sent = 6
    running = BootServers(host="127.0.0.1", admission=Admission(max_active=8))
    sched = Scheduler(plan, tracker, Store(tmp_path / "state.db"), wake=wake, bmc=bmc, readiness=None,
                      load=lambda: running.admission.load(0.0), window_tuning=WindowTuning(initial_window=2))
    running.tftp_counters.packets_out, running.tftp_counters.retransmits, running.tftp_counters.bytes_sent = 100, 3, 51200
    running.tftp_counters.transfers_ok, running.tftp_counters.transfers_failed = 5, 1
    running.http_stats.by_status.update({200: 4, 404: 1})
    running.http_stats.bytes_sent = 40000
    running.dhcp_core = SimpleNamespace(counters=Counter({"packets_in": 5, "in_discover": 2, "in_request": 2, "out_offer": 2,
                                                          "out_ack": 2, "malformed": 1}))
    m = Metrics()
    m.attach(tracker=tracker, scheduler=sched, running=running, wake=wake)
    macs = list(tracker.nodes)
    t0 = 1_700_000_000.0
    from orchestrator.events import BootEvent, EventKind

    def dhcp(mac, t, pxe=True):
        return BootEvent(time=t, wall=t, source="dhcp", kind=EventKind.DHCP, mac=mac,
                         detail={"msg": "DISCOVER", "direction": "in", "pxe": pxe})

    for i, mac in enumerate(macs[:3]):
        m.observe_transitions(tracker.wake(mac, t0 + i))
        sched.jobs[mac].actions.append({"time": t0 + i, "action": "wake", "reason": "admitted", "ok": True, "detail": ""})
        m.observe_transitions(tracker.feed(dhcp(mac, t0 + i + 2.0)))
    ready, failed = macs[0], macs[1]
    m.observe_transitions(tracker.feed(dhcp(ready, t0 + 10, pxe=False)))
    m.observe_transitions(tracker.ssh_up(ready, t0 + 12))
    m.observe_transitions(tracker.ready(ready, t0 + 13))
    sched.jobs[ready].result = "ready"
    sched.jobs[failed].actions.append({"time": t0 + 30, "action": "power_cycle", "reason": "stuck", "ok": False, "detail": "x"})
    m.observe_transitions(tracker.fail(failed, t0 + 31, "stuck in pxe_dhcp for 20s after 1 wake(s) and 0 power cycle(s); last evidence: x"))
    sched.jobs[failed].result = "failed"
    return m, tracker, sched, running


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, labels, keywords, variables stripped)."""
    m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr)
    if m:  # Grafana's variable query
        return {m.group(1)}
    s = _STRINGS.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _LABEL_LISTS.sub(" ", s)
    names = set()
    for tok in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", s):
        rest = s[tok.end():].lstrip()
        if rest.startswith("(") or tok.group() in _KEYWORDS:
            continue
        names.add(tok.group())
    return names


def aggregation_labels(expr: str) -> set[str]:
    out: set[str] = set()
    for kind, labels in _LABEL_LISTS.findall(_STRINGS.sub('""', expr)):
        if kind in ("by", "on"):
            out.update(x.strip() for x in labels.split(",") if x.strip())
    return out


def dashboard_queries() -> list[dict]:
    """Every PromQL expression of the dashboard with the labels it must return."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        columns: set[str] = set()
        for tr in panel.get("transformations", []):
            if tr["id"] == "organize":
                columns |= {k for k in tr["options"].get("indexByName", {}) if not k.startswith(("Value", "Time"))}
        for t in panel.get("targets", []):
            labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            if t.get("format") == "table":
                labels |= columns & aggregation_labels(t["expr"])
            out.append({"where": f"panel {panel['title']!r} {t['refId']}", "expr": t["expr"], "labels": labels})
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", q)
            assert m, q
            out.append({"where": f"variable {var['name']}", "expr": q, "labels": {m.group(2)},
                        "promql": f"group by ({m.group(2)}) ({m.group(1)})"})
    return out


def rule_queries() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            text = " ".join(str(v) for v in rule.get("annotations", {}).values())
            labels = set(re.findall(r"\$labels\.(\w+)", text))
            out.append({"where": f"rule {rule.get('alert') or rule.get('record')}", "expr": rule["expr"], "labels": labels})
    return out


def as_promql(expr: str) -> str:
    """Grafana's variables, as they would expand in this test (all instances, 1m rate windows)."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "5s").replace("$__range", "5m")
            .replace('=~"$instance"', '=~".+"'))


# --------------------------------------------------------------------------- exposition


def test_exposition_parses_and_follows_conventions(tmp_path):
    m, *_ = populated(tmp_path)
    text = m.exposition().decode()
    fams = families(text)
    assert fams, text
    for name, fam in fams.items():
        assert name.startswith("bootorch_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert fam.documentation, f"{name} has no HELP"
        if fam.type == "counter":
            assert all(s.name == name + "_total" for s in fam.samples), (name, fam.samples)
        if fam.type == "histogram":
            assert name.endswith("_seconds"), name
        assert not any(s.name.endswith("_created") for s in fam.samples), "created series are disabled"
        for s in fam.samples:
            assert "node" not in s.labels or fam.type == "gauge", f"per-node series only as gauges: {s}"
    # units: seconds and bytes only, spelled out
    assert not re.search(r"_(ms|millis|milliseconds|minutes|kb|mb|kib)\b", text)

    def value(name, **labels):
        return next(s.value for fam in fams.values() for s in fam.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("bootorch_nodes", stage="ready") == 1 and value("bootorch_nodes", stage="failed") == 1
    assert value("bootorch_nodes", stage="pxe_dhcp") == 1 and value("bootorch_nodes", stage="pending") == 1
    assert sum(s.value for s in fams["bootorch_nodes"].samples) == 4
    # funnel: 3 got to pxe_dhcp (one of them failed later), 1 to ready
    assert value("bootorch_nodes_reached", stage="pending") == 4 and value("bootorch_nodes_reached", stage="pxe_dhcp") == 3
    assert value("bootorch_nodes_reached", stage="os_dhcp") == 1 and value("bootorch_nodes_reached", stage="ready") == 1
    per_node = [s for s in fams["bootorch_node_stage"].samples]
    assert len(per_node) == 4 and {s.labels["node"] for s in per_node} == {"n1", "n2", "n3", "n4"}
    assert value("bootorch_node_stage_entered_timestamp_seconds", node="n1", stage="ready") == 1_700_000_013.0
    assert value("bootorch_stage_timeout_seconds", stage="ssh") == 3
    assert value("bootorch_rollout_nodes", result="ready") == 1 and value("bootorch_rollout_nodes", result="unfinished") == 2
    assert value("bootorch_rollout_failure_budget_nodes") == 1 and value("bootorch_rollout_aborted") == 0
    assert value("bootorch_admission_window") == 2 and value("bootorch_admission_window_max") == 4
    assert value("bootorch_server_admission_window", server="main") == 2
    assert value("bootorch_server_nodes_in_flight", server="main") == value("bootorch_nodes_in_flight")
    assert value("bootorch_nodes_in_flight") == 1  # n3 (pxe_dhcp); n1 is ready, n2 failed, n4 still pending
    assert value("bootorch_power_actions_total", driver="wol", action="wake", result="ok") == 3
    assert value("bootorch_power_actions_total", driver="command", action="power_cycle", result="failed") == 1
    assert value("bootorch_wol_packets_sent_total") == 6
    assert value("bootorch_dhcp_packets_total", direction="in", type="discover") == 2
    assert value("bootorch_dhcp_packets_total", direction="out", type="ack") == 2
    assert value("bootorch_dhcp_events_total", event="malformed") == 1
    assert value("bootorch_file_sent_bytes_total", protocol="tftp") == 51200
    assert value("bootorch_file_transfers_total", protocol="http", result="failed") == 1
    assert value("bootorch_tftp_retransmits_total") == 3 and value("bootorch_file_transfer_slots") == 8
    assert value("bootorch_http_responses_total", code="404") == 1
    # stage durations: observed on leaving a stage, by stage only
    assert value("bootorch_stage_duration_seconds_count", stage="waking") == 3
    assert value("bootorch_stage_duration_seconds_sum", stage="waking") == 6.0
    assert value("bootorch_stage_duration_seconds_count", stage="ssh") == 1
    assert value("bootorch_node_failures_total", reason="timeout", stage="pxe_dhcp") == 1
    assert value("bootorch_metrics_collect_errors_total") == 0


def test_in_flight_sanity(tmp_path):
    _, tracker, sched, _ = populated(tmp_path)
    assert sched.in_flight() == sum(1 for st in tracker.nodes.values() if st.stage in (Stage.WAKING, Stage.PXE_DHCP))


def test_collector_never_raises(tmp_path):
    m, tracker, sched, running = populated(tmp_path)
    m.attach(scheduler=SimpleNamespace(runs=None), running=SimpleNamespace(tftp_counters=None, http_stats=None))
    text = m.exposition().decode()
    fams = families(text)
    assert "bootorch_nodes" in fams  # the tracker section still works
    errors = next(s.value for s in fams["bootorch_metrics_collect_errors"].samples)
    assert errors >= 3
    m.observe_transitions([object()])  # not a Transition: counted, not raised
    assert m.collect_errors > errors


def test_nothing_attached_and_serve_mode(tmp_path):
    m = Metrics()
    assert families(m.exposition().decode())["bootorch_metrics_collect_errors"].samples[0].value == 0
    plan = make_plan(tmp_path)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    m.attach(tracker=tracker, running=BootServers(host="127.0.0.1"))  # `bootorch serve`: no scheduler
    fams = families(m.exposition().decode())
    assert {s.labels["result"]: s.value for s in fams["bootorch_rollout_nodes"].samples} == {"ready": 0, "failed": 0, "unfinished": 4}
    assert "bootorch_admission_window" not in fams and "bootorch_dhcp_packets" not in fams


def test_injected_registry_not_global():
    from prometheus_client import REGISTRY, CollectorRegistry

    reg = CollectorRegistry()
    m = Metrics(registry=reg)
    assert m.registry is reg
    assert "bootorch_nodes" not in {f.name for f in REGISTRY.collect()}
    Metrics(), Metrics()  # independent instances do not clash


def test_stage_durations_after_a_restart_come_from_the_journal(tmp_path):
    """A transition out of a stage entered before a restart: its entry time is in the tracker's history."""
    plan = make_plan(tmp_path, n=1)
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    mac = next(iter(tracker.nodes))
    tracker.wake(mac, 100.0)  # happened in the previous process: this Metrics never saw it
    m = Metrics().attach(tracker=tracker)
    m.observe_transitions(tracker.restart_stage(mac, 104.0, "re-wake 1"))  # same stage: no observation
    from orchestrator.events import BootEvent, EventKind

    ts = tracker.feed(BootEvent(time=107.0, wall=107.0, source="dhcp", kind=EventKind.DHCP, mac=mac,
                                detail={"msg": "DISCOVER", "direction": "in", "pxe": True}))
    m.observe_transitions(ts)
    fams = families(m.exposition().decode())
    samples = {(s.name, s.labels.get("stage")): s.value for s in fams["bootorch_stage_duration_seconds"].samples}
    # a re-sent wake restarts the stage's timeout clock, not the stage: waking lasted from 100 to 107
    assert samples[("bootorch_stage_duration_seconds_count", "waking")] == 1
    assert samples[("bootorch_stage_duration_seconds_sum", "waking")] == 7.0


@pytest.mark.parametrize("reason,category", [
    ("stuck in kernel for 300s after 1 wake(s) and 1 power cycle(s); last evidence: x", "timeout"),
    ("readiness failed: mount /usr: exit status 1", "readiness"),
    ("was ready before the restart, re-verification failed: ssh down", "reverify"),
    ("operator said so", "other"),
])
def test_failure_category(reason, category):
    assert failure_category(reason) == category


def test_split_listen():
    assert split_listen("127.0.0.1:9810") == ("127.0.0.1", 9810)
    assert split_listen("[::1]:0") == ("::1", 0)
    assert split_listen(":9810") == ("127.0.0.1", 9810)


# --------------------------------------------------------------------------- dashboard and rules


def test_dashboard_and_rules_use_only_exported_metric_names():
    names = Metrics().names()
    queries = dashboard_queries() + rule_queries()
    assert len(queries) >= 25
    used = set()
    for q in queries:
        found = metric_names(q["expr"])
        assert found, f"{q['where']}: no metric in {q['expr']!r}"
        unknown = found - names
        assert not unknown, f"{q['where']}: {sorted(unknown)} not exported (typo?) in {q['expr']!r}"
        used |= found
    # the extraction itself: it must see through functions, label lists and Grafana variables
    assert metric_names('histogram_quantile(0.95, sum by (le, stage) (rate(bootorch_stage_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))') == {"bootorch_stage_duration_seconds_bucket"}
    assert metric_names("a_b > on (job, stage) group_left () c_d * 1e-3") == {"a_b", "c_d"}
    for must in ("bootorch_nodes", "bootorch_node_stage_entered_timestamp_seconds", "bootorch_stage_duration_seconds_bucket",
                 "bootorch_tftp_retransmits_total", "bootorch_admission_window", "bootorch_power_actions_total"):
        assert must in used


def test_every_panel_uses_the_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["id"] is None and dash["uid"] == "bootorch-rollout"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DS
    assert "${DS_" not in DASHBOARD.read_text() and "__inputs" not in dash
    titles = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DS, (panel["title"], t["refId"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for want in ("Stage funnel", "Nodes per stage", "Nodes in a stage now (stuck first)", "TFTP retransmits", "File throughput",
                 "Admission window", "Stage duration heatmap (all stages)", "Stage duration p50 / p95", "Power actions"):
        assert want in titles


def test_provisioning_files():
    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((REPO / "grafana/provisioning/dashboards/bootorch.yaml").read_text())
    assert dash["providers"][0]["type"] == "file" and dash["providers"][0]["options"]["path"]
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts == {"BootorchNodeStuck", "BootorchFailureBudgetClose", "BootorchRetransmitRateHigh"}


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 3 rules found" in r.stdout + r.stderr


def test_promtool_check_metrics(tmp_path):
    promtool = require_tool("promtool")
    m, *_ = populated(tmp_path)
    r = subprocess.run([promtool, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()


# --------------------------------------------------------------------------- the endpoint


async def test_serve_metrics_http(tmp_path):
    m, *_ = populated(tmp_path)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
            assert host == "127.0.0.1" and port > 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                r1 = await client.get("/metrics", headers={"accept-encoding": "identity"})
                assert r1.status_code == 200 and r1.headers["content-type"] == CONTENT_TYPE_LATEST
                assert "bootorch_nodes{stage=\"ready\"} 1.0" in r1.text
                r2 = await client.get("/metrics", headers={"accept-encoding": "gzip"})  # same connection (keep-alive)
                assert r2.headers["content-encoding"] == "gzip" and "bootorch_node_stage{" in r2.text
                assert (await client.head("/metrics")).status_code == 200
                assert (await client.get("/nope")).status_code == 404
                assert (await client.post("/metrics")).status_code == 405
                assert (await client.get("/")).status_code == 200
            # garbage gets a 400, and the server keeps serving
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"\x00\x01 nonsense\r\n\r\n")
            reply = b""
            with trio.move_on_after(5):
                while chunk := await s.receive_some(4096):
                    reply += chunk
            await s.aclose()
            assert reply.startswith(b"HTTP/1.1 400"), reply
            async with httpx.AsyncClient(timeout=5) as client:
                raw = (await client.get(f"http://127.0.0.1:{port}/metrics")).content
            assert b"bootorch_nodes" in raw  # httpx asked for gzip and decoded it: the server still serves
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- slow: a real Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WallClockSend:
    """The sim stamps events with the trio clock; the rollout's tracker runs on Unix time."""

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self._send = send

    async def send(self, ev) -> None:
        await self._send.send(dataclasses.replace(ev, wall=time.time()))


class WolThenSim:
    """A real WolDriver (UDP magic packets to 127.0.0.1:9) that then starts the simulated node."""

    name = "wol"

    def __init__(self, cluster) -> None:
        self.wol = WolDriver(interface=None, method="udp", broadcast="127.0.0.1", port=9, repeat=2, interval=0.01)
        self.cluster = cluster

    @property
    def sent(self) -> int:
        return self.wol.sent

    async def on(self, t) -> PowerResult:
        result = await self.wol.on(t)
        await self.cluster.on(t)
        return result


async def boot_traffic(plan, run, curl: str) -> None:
    """Real TFTP, HTTP and DHCP traffic against the boot server, on loopback, for the panels."""
    from scapy.layers.dhcp import BOOTP, DHCP

    from orchestrator.protocols.dhcp import mac_bytes

    node = plan.nodes[0]
    cfg = f"pxelinux.cfg/01-{node.mac.replace(':', '-')}"
    # Clients that request a file and never ACK: the server retransmits (5 times, 1 s apart), then gives up.
    # Each from its own loopback address (the server caps transfers per client IP).
    silent = []
    for i in range(8):
        s = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await s.bind((f"127.0.0.{20 + i}", 0))
        await s.sendto(b"\x00\x01pxelinux.0\x00octet\x00", ("127.0.0.1", run.tftp))
        silent.append(s)
    try:
        for round_ in range(6):
            for name in ("pxelinux.0", cfg, "vmlinuz", "rootfs.gz"):
                await trio.run_process([curl, "-sS", "--max-time", "10", "-o", "/dev/null",
                                        f"tftp://127.0.0.1:{run.tftp}/{name}"])
            for name in ("vmlinuz", f"ipxe/{node.mac.replace(':', '-')}.ipxe", "missing.bin"):
                await trio.run_process([curl, "-sS", "--max-time", "10", "-o", "/dev/null", f"http://127.0.0.1:{run.http}/{name}"])
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            with sock, trio.move_on_after(5):
                await sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=100 + round_) / DHCP(options=[
                    ("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"), "end"])), ("127.0.0.1", run.dhcp))
                offer = BOOTP(await sock.recv(2048))
                await sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=100 + round_) / DHCP(options=[
                    ("message-type", "request"), ("server_id", "10.9.0.1"), ("requested_addr", offer.yiaddr),
                    ("vendor_class_id", b"PXEClient:Arch:00000"), "end"])), ("127.0.0.1", run.dhcp))
                await sock.recv(2048)
            await trio.sleep(1.0)
    finally:
        for s in silent:
            s.close()


class HangingReadiness:
    """SimReadiness, except that one node's checks never return (a hung SSH session)."""

    def __init__(self, inner, hang_ip: str) -> None:
        self.inner, self.hang_ip = inner, hang_ip

    async def port_open(self, host, timeout=None):
        return await self.inner.port_open(host, timeout)

    async def check(self, host, timeout=None):
        return await self.inner.check(host, timeout)

    async def until_ready(self, host, deadline):
        if host == self.hang_ip:
            await trio.sleep_forever()
        return await self.inner.until_ready(host, deadline)


async def prom_query(client: httpx.AsyncClient, expr: str) -> list[dict]:
    r = await client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.slow
async def test_real_prometheus_scrapes_a_rollout_and_every_query_has_data(tmp_path, monkeypatch):
    prometheus = require_tool("prometheus", "/usr/bin/prometheus")
    promtool = require_tool("promtool")
    curl = require_tool("curl")
    import tests.sim_cluster as sim

    # The simulated boot on a quarter of its usual delays: ~4 s per node on the real clock.
    monkeypatch.setattr(sim, "STEPS", [(d * 0.25, kind, payload) for d, kind, payload in sim.STEPS])
    plan = make_plan(tmp_path, n=5, budget=1)
    from orchestrator.bootserver.serve import Ports, serve_plan

    metrics = Metrics()
    tracker = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    metrics.attach(tracker=tracker, timeouts=plan_timeouts(plan))
    nodes = list(plan.nodes)
    failing, stuck = nodes[1], nodes[4]
    prom_dir = Path(tempfile.mkdtemp(prefix="bootorch-prom-"))
    proc = None
    prom_log = open(prom_dir / "log", "wb")
    report: list[tuple[str, str, str]] = []
    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                _, mport = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
                pport = free_port()
                (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [{"job_name": "bootorch", "static_configs": [{"targets": [f"127.0.0.1:{mport}"]}]}],
                }))
                proc = subprocess.Popen([prometheus, f"--config.file={prom_dir / 'prometheus.yml'}",
                                         f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{pport}",
                                         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=prom_log,
                                        start_new_session=True)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pport}", timeout=5) as prom:
                    # Prometheus up and scraping us
                    for _ in range(100):
                        assert proc.poll() is None, (prom_dir / "log").read_text()
                        try:
                            if (await prom.get("/-/ready")).status_code == 200 and await prom_query(prom, 'up{job="bootorch"} == 1'):
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.2)
                    else:
                        raise AssertionError("Prometheus did not come up: " + (prom_dir / "log").read_text())

                    # the boot server, on loopback
                    events_send, events_recv = trio.open_memory_channel(10_000)
                    run = await nursery.start(lambda task_status: serve_plan(
                        plan, Ports(host="127.0.0.1", dhcp=0, pxe=-1, tftp=0, http=0, interface=""), events=events_send,
                        task_status=task_status))

                    async def drain():
                        async for _ in events_recv:
                            pass  # loopback clients are not plan nodes: the sim provides the stage evidence

                    nursery.start_soon(drain)
                    metrics.attach(running=run)

                    # the rollout: the real Scheduler, the simulated cluster, the real clock
                    send, recv = trio.open_memory_channel(10_000)
                    cluster = sim.SimCluster(WallClockSend(send))
                    cluster.name = "sim"
                    cluster.nursery = nursery
                    for n in nodes:
                        cluster.add(n.mac, str(n.ip))
                    cluster.nodes[failing.mac].hang_in = "vmlinuz"  # stops in config, and a power cycle does not help
                    cluster.nodes[failing.mac].stubborn = True
                    wake = WolThenSim(cluster)
                    readiness = HangingReadiness(sim.SimReadiness(cluster), str(stuck.ip))
                    sched = Scheduler(plan, tracker, Store(tmp_path / "state.db"), wake=wake, bmc=cluster, readiness=readiness,
                                      load=lambda: run.admission.load(trio.current_time()), clock=time.time,
                                      on_change=metrics.observe_transitions, window_tuning=WindowTuning(adapt_every=1.0), probe_every=0.25)
                    metrics.attach(scheduler=sched, wake=wake)
                    nursery.start_soon(sched.run, recv)
                    traffic_done = trio.Event()

                    async def traffic():
                        await boot_traffic(plan, run, curl)
                        traffic_done.set()

                    nursery.start_soon(traffic)

                    # wait: 3 ready, 1 failed, 1 stuck in ssh past its timeout, traffic done
                    ssh_timeout = plan_timeouts(plan)[Stage.SSH]
                    mid_scrape = None
                    while True:
                        st = tracker.nodes[stuck.mac]
                        results = [r.result for r in sched.jobs.values()]
                        if mid_scrape is None and any(r == "ready" for r in results):
                            async with httpx.AsyncClient(timeout=5) as c:
                                mid_scrape = (await c.get(f"http://127.0.0.1:{mport}/metrics")).content
                        if (results.count("ready") == 3 and results.count("failed") == 1 and st.stage == Stage.SSH
                                and time.time() - st.since > ssh_timeout + 2 and traffic_done.is_set()):
                            break
                        await trio.sleep(0.25)
                    assert sched.jobs[failing.mac].result == "failed" and sched.jobs[stuck.mac].result is None
                    await trio.sleep(2.5)  # two more scrapes and rule evaluations

                    # promtool is clean on a scrape taken during the rollout
                    checked = await trio.run_process([promtool, "check", "metrics"], stdin=mid_scrape, capture_stdout=True,
                                                     capture_stderr=True, check=False)
                    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked

                    # every expression of the dashboard and of the rules returns data with its labels
                    queries = dashboard_queries() + rule_queries()
                    pending = list(queries)
                    results_by_where: dict[str, list] = {}
                    for _ in range(20):  # bounded: rate windows may need a scrape or two more
                        still = []
                        for q in pending:
                            res = await prom_query(prom, q.get("promql") or as_promql(q["expr"]))
                            if res and all(q["labels"] <= set(s["metric"]) for s in res):
                                results_by_where[q["where"]] = res
                            else:
                                still.append(q)
                        pending = still
                        if not pending:
                            break
                        await trio.sleep(0.5)
                    assert not pending, [(q["where"], q["expr"], q["labels"]) for q in pending]
                    for q in queries:
                        res = results_by_where[q["where"]]
                        shown = []
                        for sample in sorted(res, key=lambda s: -float(s["value"][1]) if s["value"][1] != "NaN" else 0)[:3]:
                            labels = ",".join(f"{k}={v}" for k, v in sorted(sample["metric"].items()) if k in q["labels"])
                            shown.append(f"{{{labels}}} {float(sample['value'][1]):.3g}")
                        promql = " ".join(as_promql(q.get("promql") or q["expr"]).split())
                        report.append((q["where"], f"`{promql}`", f"{len(res)} series: " + "; ".join(shown)))

                    # the stuck node is the one the alert names; the rules load and evaluate in Prometheus itself
                    stuck_rows = results_by_where["rule BootorchNodeStuck"]
                    assert [(s["metric"]["node"], s["metric"]["stage"]) for s in stuck_rows] == [(stuck.name, "ssh")]
                    rules = (await prom.get("/api/v1/rules")).json()["data"]["groups"][0]["rules"]
                    assert all(r["health"] == "ok" for r in rules), rules
                    alerts = {a["labels"]["alertname"]: a for a in (await prom.get("/api/v1/alerts")).json()["data"]["alerts"]}
                    assert alerts["BootorchNodeStuck"]["state"] in ("pending", "firing")
                    assert alerts["BootorchNodeStuck"]["labels"]["node"] == stuck.name
                    assert alerts["BootorchFailureBudgetClose"]["state"] == "firing"
                    assert alerts["BootorchRetransmitRateHigh"]["state"] in ("pending", "firing")
                    failures = await prom_query(prom, "bootorch_node_failures_total")
                    assert [(s["metric"]["reason"], s["metric"]["stage"]) for s in failures] == [("timeout", "config")]
                nursery.cancel_scope.cancel()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        prom_log.close()
        shutil.rmtree(prom_dir, ignore_errors=True)
    out = os.environ.get("BOOTORCH_PROMQL_REPORT")
    if out:  # the README's table of query -> result
        Path(out).write_text("\n".join(" | ".join(row) for row in report) + "\n")
