"""`bootorch rollout` on the virtual lab, end to end: real QEMU PXE ROMs, pxelinux, kernel, SSH.

Slow (TCG boots take ~50 s a node) and root (namespaces, taps). Each test runs a
plan of its own in a namespace of its own, and takes its lab down afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.store import Store
from orchestrator.tracker import Stage
from tests.conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.root]

EXE = [sys.executable, "-m", "orchestrator"]


def lab_plan(tmp_path, *, nodes: int, extra_checks: str = "", lab_extra: str = "", rollout_extra: str = "") -> tuple:
    token = secrets.token_hex(3)
    ns = f"bt-lr-{token}"
    text = f"""\
version: 1
name: labtest
state_dir: {tmp_path}/state
network:
  namespace: {ns}
  interface: br-boot
  subnet: 10.77.0.0/24
  server: 10.77.0.1
  gateway: 10.77.0.1
boot:
  root: {REPO}/var/lab/tftpboot
  config_names: [mac]
  ipxe: loader
profiles:
  ramdisk:
    kernel: vmlinuz
    initrd: rootfs.gz
    root: initramfs
    ip: dhcp
    append: console=ttyS0 panic=10
nodes:
  - name: node[01-{nodes:02d}]
    mac: 52:54:00:77:10:01
    ip: 10.77.0.21
power:
  wol: {{method: raw, repeat: 2, interval: 100ms}}
  bmc:
    driver: redfish
    address: http://10.77.0.1:9200/redfish/v1/Systems/{{name}}
    username: admin
    password: {{file: {tmp_path}/bmc.password}}
    verify_tls: false
rollout:
  admission: {{max_downloading: 2, power_on_rate: 2}}
  timeouts: {{waking: 25s, pxe_dhcp: 60s, loader: 60s, config: 60s, kernel: 120s, initrd: 120s, os_dhcp: 120s, ssh: 90s}}
  retries: {{wake: 1, power_cycle: 1}}
{rollout_extra}
readiness:
  ssh:
    user: root
    key: {REPO}/var/lab/ssh/id_ed25519
    host_key_policy: tofu
  checks:
    - {{name: kernel, kernel: '^6\\.'}}
    - {{name: sshd, service: dropbear}}
{extra_checks}
metrics:
  listen: 127.0.0.1:0
lab:
  manage: true
  namespace: {ns}
  memory_mib: 256
{lab_extra}
"""
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return p, ns


@pytest.fixture
def lab_ready():
    require_root()
    require_tool("qemu-system-x86_64")
    # The shared boot files: built once (a warm cache makes this a few seconds).
    subprocess.run([*EXE, "image", "build", str(REPO / "plans" / "full.yaml")], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)


def lab_down(plan) -> None:
    subprocess.run([*EXE, "lab", "down", str(plan)], timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_rollout_ready_rewake_power_cycle_and_failed_check(tmp_path, lab_ready):
    """node01 boots; node02's NIC ignores magic packets (re-woken, then power-cycled through the
    lab's Redfish BMC); node03 fails a readiness check and ends failed, within the budget of 1."""
    plan, ns = lab_plan(
        tmp_path, nodes=3,
        extra_checks="    - {name: not-node03, command: hostname, expect: '^node0[12]$'}",
        lab_extra="  wol_disabled: [node02]",
        rollout_extra="  failure_budget: 1",
    )
    promtool = require_tool("promtool")
    try:
        out_file = open(tmp_path / "rollout.json", "w+")
        p = subprocess.Popen([*EXE, "rollout", str(plan), "--json"], stdout=out_file, stderr=subprocess.PIPE, text=True)
        err_lines, scrape, port = [], None, None
        for line in p.stderr:  # ends when the rollout does
            err_lines.append(line)
            m = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", line)
            if m:
                port = int(m.group(1))
            if scrape is None and port and "-> kernel" in line:
                # Mid-rollout: scrape inside the lab's namespace, where the rollout runs.
                scrape = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10",
                                         f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True, timeout=30).stdout
        assert p.wait(timeout=900) == 0, "".join(err_lines)[-3000:]
        out_file.seek(0)
        out = json.loads(out_file.read())
        out_file.close()
        assert scrape and "bootorch_nodes{" in scrape
        check = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr
        nodes = {n["name"]: n for n in out["nodes"]}
        path = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"]
        assert [t["to"] for t in nodes["node01"]["timeline"]] == path
        assert nodes["node01"]["result"] == "ready" and nodes["node01"]["attempts"] == 1
        n2 = nodes["node02"]
        assert [a["action"] for a in n2["actions"]] == ["wake", "wake", "power_cycle"]
        assert n2["result"] == "ready" and n2["attempts"] == 2
        assert "Redfish" in n2["actions"][-1]["detail"] and n2["actions"][-1]["ok"]
        n3 = nodes["node03"]
        assert n3["result"] == "failed" and "not-node03" in n3["reason"] and "does not match" in n3["reason"]
        assert out["ready"] == 2 and out["failed"] == 1 and out["ok"]
        serial = (tmp_path / "state" / "lab" / "node01.serial.log").read_text(errors="replace")
        assert "PXELINUX" in serial and "Linux version" in serial
    finally:
        lab_down(plan)
    assert ns not in namespaces()


def test_kill_9_mid_rollout_then_rerun_wakes_nobody_twice(tmp_path, lab_ready):
    plan, ns = lab_plan(tmp_path, nodes=2)
    text = plan.read_text().replace("admission: {max_downloading: 2, power_on_rate: 2}", "admission: {max_downloading: 1, power_on_rate: 1}")
    plan.write_text(text)
    db = tmp_path / "state" / "state.db"
    try:
        p = subprocess.Popen([*EXE, "rollout", str(plan)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        deadline = time.monotonic() + 600
        killed = False
        while time.monotonic() < deadline and p.poll() is None:
            if db.exists():
                s = Store(db)
                cur = s.current()
                s.close()
                stages = {c.node: c.stage for c in cur.values()}
                if stages.get("node01") in (Stage.INITRD, Stage.OS_DHCP, Stage.SSH):
                    os.killpg(p.pid, signal.SIGKILL)  # the manager and the rollout inside the namespace
                    p.wait(timeout=30)
                    killed = True
                    break
            time.sleep(0.5)
        assert killed, "node01 never got past the kernel"
        assert ns in namespaces()  # the lab outlived the kill: its VMs keep booting
        r = subprocess.run([*EXE, "rollout", str(plan), "--json"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout)
        assert out["ready"] == 2
        s = Store(db)
        wakes = [(a.node, a.reason) for a in s.actions() if a.action == "wake"]
        s.close()
        assert sorted(n for n, _ in wakes) == ["node01", "node02"], wakes  # one wake each, across both runs
    finally:
        lab_down(plan)
    assert ns not in namespaces()
