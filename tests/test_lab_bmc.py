"""The escalation ladder through real BMC implementations in the lab (``lab.bmc: ipmi_sim | sushy``).

One rollout per BMC kind, one BIOS node whose NIC ignores magic packets
(``lab.wol_disabled``): its magic packet changes nothing, ``waking`` times out
(20 s), and the ladder power-cycles it through the real BMC -- OpenIPMI's
ipmi_sim driven by ipmitool (the ipmi driver), or sushy-emulator with our QMP
systems driver (the Redfish driver, through sushy's 307 from the node's name to
its UUID). The BMC sees the node Off, so the cycle is a power-on preceded by a
PXE boot override (``power.bmc.boot_override: pxe``). The node must end
``ready``, the rollout exit 0, and its actions show the BMC driver's detail.

Slow (about 40 s per kind: the 12 s waking timeout, then a TCG boot) and root.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.root]

EXE = [sys.executable, "-m", "orchestrator"]
FULL = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"]

BMC = {
    # Each node's BMC on a management address of its own (10.85.0.200 + index), IPMI's UDP 623.
    "ipmi_sim": """\
    driver: ipmi
    address: '10.85.0.20{index}'
    username: admin
    password: {file: %(tmp)s/bmc.password}
    cipher_suite: 3           # ipmi_sim 2.0.33 offers no 17
    boot_override: pxe
    settle: 20s""",
    # One sushy-emulator for all nodes; systems named by node name (sushy redirects to their UUIDs).
    "sushy": """\
    driver: redfish
    address: http://10.85.0.1:9285/redfish/v1/Systems/{name}
    username: admin
    password: {file: %(tmp)s/bmc.password}
    verify_tls: false
    boot_override: pxe
    settle: 20s""",
}


def bmc_plan(tmp_path, kind: str):
    ns = f"bt-bmc-{secrets.token_hex(3)}"
    bmc = BMC[kind] % {"tmp": tmp_path}
    text = f"""\
version: 1
name: bmc-{kind}
state_dir: {tmp_path}/state
network:
  namespace: {ns}
  interface: br-boot
  subnet: 10.85.0.0/24
  server: 10.85.0.1
  gateway: 10.85.0.1
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
  - {{name: b01, mac: '52:54:00:85:00:01', ip: 10.85.0.11}}
power:
  wol: {{method: raw, repeat: 2, interval: 100ms}}
  bmc:
{bmc}
rollout:
  admission: {{max_downloading: 1, power_on_rate: 1}}
  timeouts: {{waking: 12s, pxe_dhcp: 60s, loader: 60s, config: 60s, kernel: 120s, initrd: 120s, os_dhcp: 120s, ssh: 90s}}
  retries: {{wake: 0, power_cycle: 1}}
readiness:
  ssh:
    user: root
    key: {REPO}/var/lab/ssh/id_ed25519
    host_key_policy: strict
  checks:
    - {{name: kernel, kernel: '^6\\.'}}
metrics:
  listen: 127.0.0.1:0
lab:
  manage: true
  namespace: {ns}
  memory_mib: 256
  bmc: {kind}
  wol_disabled: [b01]
"""
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    pw = tmp_path / "bmc.password"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(12) + "\n")  # 16 characters: IPMI's (and ipmi_sim's) limits allow it
    r = subprocess.run([*EXE, "image", "build", str(p), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return p, ns


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture
def lab_ready():
    require_root()
    require_tool("qemu-system-x86_64")


@pytest.mark.parametrize("kind", ["ipmi_sim", "sushy"])
def test_escalation_power_cycles_through_the_real_bmc(tmp_path, lab_ready, kind):
    if kind == "ipmi_sim":
        require_tool("ipmi_sim")
        require_tool("ipmitool")
    plan, ns = bmc_plan(tmp_path, kind)
    lab = tmp_path / "state" / "lab"
    t0 = time.monotonic()
    try:
        r = subprocess.run([*EXE, "rollout", str(plan), "--json", "--keep-lab"], capture_output=True, text=True,
                           timeout=600)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr[-4000:]
        out = json.loads(r.stdout)
        assert out["ok"] and out["ready"] == 1, out
        node = out["nodes"][0]
        assert node["result"] == "ready", node
        assert [t["to"] for t in node["timeline"]][-len(FULL):] == FULL, node["timeline"]
        actions = node["actions"]
        assert [a["action"] for a in actions] == ["wake", "power_cycle"], actions
        cycle = actions[-1]
        assert cycle["ok"] and "stuck in waking" in cycle["reason"], cycle
        # The BMC saw the node Off: the cycle was a power-on, after the PXE boot override, confirmed On.
        assert "instead of a cycle" in cycle["detail"], cycle
        if kind == "ipmi_sim":
            assert cycle["detail"].startswith("ipmitool chassis power on"), cycle
            assert "; on after" in cycle["detail"], cycle
            assert (lab / "b01.ipmi-boot").read_text().strip() == "pxe"  # ipmi_sim passed `chassis bootdev pxe` on
            st = subprocess.run([*EXE, "lab", "status", str(plan), "--json"], capture_output=True, text=True, timeout=60)
            bmcs = json.loads(st.stdout)["services"]["bmcs"]
            assert bmcs["kind"] == "ipmi_sim" and bmcs["nodes"]["b01"]["address"] == "10.85.0.200:623", bmcs
            assert bmcs["nodes"]["b01"]["pid"], bmcs
        else:
            from orchestrator.lab.bmcs import system_uuid
            from orchestrator.plan import load_plan

            uid = system_uuid(load_plan(plan).nodes[0])
            # sushy answered /Systems/b01 with 307 to /Systems/<uuid>: the reset went there.
            assert f"Redfish On on /redfish/v1/Systems/{uid}" in cycle["detail"], cycle
            assert "boot override" in cycle["detail"] and "; On after" in cycle["detail"], cycle
            log = re.sub(r"\x1b\[[0-9;]*m", "", (lab / "sushy.log").read_text())  # werkzeug colours its lines
            assert f"POST /redfish/v1/Systems/{uid}/Actions/ComputerSystem.Reset HTTP/1.1\" 204" in log, log[-2000:]
            assert "GET /redfish/v1/Systems/b01 HTTP/1.1\" 307" in log, log[-2000:]
            assert "system b01: On" in log
        daemon = (lab / "daemon.log").read_text()
        assert "Wake-on-LAN disabled on this NIC" in daemon and "wake b01" not in daemon  # WoL did nothing
        assert "bmc b01" not in daemon  # the builtin BMC does not run with lab.bmc other than builtin
        print(f"\n{kind}: rollout to ready in {took:.0f}s")
    finally:
        subprocess.run([*EXE, "lab", "down", str(plan)], timeout=120, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert ns not in namespaces()
    left = subprocess.run(["pgrep", "-f", str(lab)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of this lab left running: {left}"
