"""`bootorch rollout` on the virtual lab, end to end: real QEMU PXE ROMs, pxelinux, kernel, SSH.

Slow (TCG boots take ~50 s a node) and root (namespaces, taps). Each test runs a
plan of its own in a namespace of its own, with its own boot root and state
directory (so its own per-node host keys, made by ``bootorch image build`` and
checked by readiness under ``host_key_policy: strict``), and takes its lab down
afterwards.
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
  root: {tmp_path}/tftpboot
  config_names: [mac]
  ipxe: loader
bootserver:
  router_advertisements: true
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
    host_key_policy: strict     # each node's own key is pinned by image build
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
    # The plan's boot files and its nodes' own host keys (a warm package cache makes this a few seconds).
    r = subprocess.run([*EXE, "image", "build", str(p), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = json.loads(r.stdout)["host_keys"]
    assert sorted(keys) == [f"node{i:02d}" for i in range(1, nodes + 1)] and len(set(keys.values())) == nodes
    (tmp_path / "host_keys.json").write_text(json.dumps(keys))
    return p, ns


def pinned(tmp_path) -> dict[str, str]:
    """known_hosts as address -> key (base64): what readiness trusts."""
    lines = (tmp_path / "state" / "known_hosts").read_text().splitlines()
    return {line.split()[0]: line.split()[2] for line in lines}


@pytest.fixture
def lab_ready():
    require_root()
    require_tool("qemu-system-x86_64")


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
    # Readiness retries node03's failing check until the ssh stage's timeout: 40 s, not the shared 90 s,
    # which left the rollout waiting 50 s on node03 after node02 was ready (the stage takes 0.3-0.6 s).
    text = plan.read_text().replace("ssh: 90s}", "ssh: 40s}")
    assert "ssh: 40s}" in text
    plan.write_text(text)
    promtool = require_tool("promtool")
    try:
        out_file = open(tmp_path / "rollout.json", "w+")
        p = subprocess.Popen([*EXE, "rollout", str(plan), "--json"], stdout=out_file, stderr=subprocess.PIPE, text=True)
        err_lines, scrape, port, stuck = [], None, None, None
        for line in p.stderr:  # ends when the rollout does
            err_lines.append(line)
            if stuck is None and "node02: wake (stuck in waking" in line:
                # On-call view mid-rollout: node02's paused VM ignores magic packets.
                r = subprocess.run([*EXE, "status", str(plan), "--stuck", "--json"], capture_output=True, text=True, timeout=60)
                stuck = json.loads(r.stdout)["nodes"]
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
        assert stuck is not None, "node02 was never re-woken"
        assert [r["node"] for r in stuck] == ["node02"], stuck
        assert stuck[0]["stage"] == "waking" and stuck[0]["stuck"] and stuck[0]["in_stage_seconds"] >= 25
        assert stuck[0]["evidence"].startswith("re-wake 1: stuck in waking") and stuck[0]["last_action"]["action"] == "wake"
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
        # Per-node host keys: each node fetched its own archive and presented its own key, and readiness
        # (strict) verified exactly that key; known_hosts holds one different key per node address.
        keys = json.loads((tmp_path / "host_keys.json").read_text())
        assert pinned(tmp_path) == {f"10.77.0.{20 + i}": keys[f"node{i:02d}"].split()[1] for i in (1, 2, 3)}
        assert len(set(pinned(tmp_path).values())) == 3
        for i in (1, 2, 3):
            serial = (tmp_path / "state" / "lab" / f"node{i:02d}.serial.log").read_text(errors="replace")
            serial = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", serial)  # pxelinux moves the cursor mid-line
            assert f"Loading hostkeys/10.77.0.{20 + i}.cpio" in serial, f"node{i:02d}"
            assert "bootorch-image: ssh: this node's own host key" in serial, f"node{i:02d}"
    finally:
        lab_down(plan)
    assert ns not in namespaces()


def test_kill_9_mid_rollout_then_rerun_wakes_nobody_twice(tmp_path, lab_ready):
    plan, ns = lab_plan(tmp_path, nodes=2)
    text = plan.read_text().replace("admission: {max_downloading: 2, power_on_rate: 2}", "admission: {max_downloading: 1, power_on_rate: 1}")
    # The kill usually lands in node01's initrd download, which dies with the server: pxelinux does not
    # retry, so the rerun power-cycles node01 once the stage's timeout passes. The stage (download and
    # kernel boot) takes 8-16 s under TCG; 40 s instead of the shared 120 s saves this test 80 s.
    text = text.replace("initrd: 120s", "initrd: 40s")
    assert "initrd: 40s" in text
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


def test_oncall_reboot_over_ssh_busy_bmc_fallback_and_slurm(tmp_path, lab_ready):
    """Between rollouts (no orchestrator running): reboot goes over SSH and waits until ready again, a
    concurrent second reboot of the same node is refused as busy, with SSH broken the reboot falls
    back to the lab's Redfish BMC, and Slurm's fail/resume programs power nodes off and boot them."""
    plan, ns = lab_plan(tmp_path, nodes=2)
    db = tmp_path / "state" / "state.db"
    key = REPO / "var" / "lab" / "ssh" / "id_ed25519"

    def attempts(node):
        s = Store(db)
        ts = [t for t in s.transitions() if t.node == node]
        s.close()
        return ts

    try:
        r = subprocess.run([*EXE, "rollout", str(plan), "--keep-lab", "--json"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]

        # Two reboots of node01 at once: one acts (over SSH), the other reports the node busy.
        cmd = [*EXE, "reboot", str(plan), "node01", "--reason", "lab test", "--json"]
        a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (out_a, err_a), (out_b, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
        results = sorted([(a.returncode, json.loads(out_a), err_a), (b.returncode, json.loads(out_b), err_b)], key=lambda x: x[0])
        (rc_ok, won, err_won), (rc_busy, lost, _) = results
        assert rc_ok == 0, err_won[-3000:]
        assert won["results"]["node01"]["result"] == "ready" and won["results"]["node01"]["path"] == ["reboot_ssh"]
        assert rc_busy == 1 and "busy" in lost["busy"]["node01"]
        second = [t.to_stage.value for t in attempts("node01") if t.attempt == 2]
        assert second == ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"], second

        # SSH broken on node02 (dropbear killed): the reboot falls back to the BMC.
        subprocess.run(["ip", "netns", "exec", ns, "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                        "root@10.77.0.22", "kill $(cat /run/dropbear.pid)"], capture_output=True, timeout=60)
        r = subprocess.run([*EXE, "reboot", str(plan), "node02", "--json"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout)["results"]["node02"]
        assert res["result"] == "ready" and res["path"] == ["power_cycle"], res

        # Slurm: ResumeFailProgram powers both off; ResumeProgram boots them again.
        r = subprocess.run([*EXE, "slurm", "fail", "node[01-02]", "--plan", str(plan)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        lab = json.loads(subprocess.run([*EXE, "lab", "status", str(plan), "--json"], capture_output=True, text=True,
                                        timeout=60).stdout)
        assert {n["name"]: n["power"] for n in lab["nodes"]} == {"node01": "Off", "node02": "Off"}, lab
        r = subprocess.run([*EXE, "slurm", "resume", "node[01-02]", "--plan", str(plan), "--json"], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout)["results"]
        assert all(res[n]["path"][0] == "wake" and res[n]["result"] == "ready" for n in ("node01", "node02")), res
        log = (tmp_path / "state" / "slurm.log").read_text()
        assert "slurm fail node[01-02]" in log and "node02: off" in log and "node02: ready" in log

        hist = json.loads(subprocess.run([*EXE, "history", str(plan), "node01", "--json"], capture_output=True, text=True,
                                         timeout=60).stdout)
        assert any(h["what"] == "reboot" and h["detail"] == "lab test -> ready" for h in hist)
    finally:
        lab_down(plan)
    assert ns not in namespaces()
