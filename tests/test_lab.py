"""The virtual lab: `bootorch lab up|down|status`, its Wake-on-LAN listener and its Redfish BMC.

Fast tier: the QEMU command line, the KVM probe firmware, and the BMC's routes,
auth and power model against a fake QMP socket.

Slow tier (root, QEMU): a two-node lab from a copy of plans/full.yaml in a
namespace of its own; a magic packet wakes one paused VM; that VM PXE boots
from bootorch's embedded server (``bootorch serve`` inside the namespace) to
SSH; a Redfish ForceRestart makes it PXE boot again; ForceOff + a UDP magic
packet power it off and on; ``lab down`` leaves nothing behind. Every wait
has a deadline, and the fixture takes the lab down also when a step fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.lab import bmc as bmc_mod
from orchestrator.lab import lab as labmod
from orchestrator.lab import procs
from orchestrator.lab import qmp as q
from orchestrator.plan import load_plan
from tests.conftest import IN_CI, REPO, require_root, require_tool

# ------------------------------------------------------------------------------ fast tier


def _plan(tmp_path: Path, *, nodes: int = 2, ns: str = "bt-lab-test", boot_root: Path | None = None,
          key: Path | None = None) -> Path:
    text = (REPO / "plans" / "full.yaml").read_text()
    text = text.replace("state_dir: ../var/lab/state", f"state_dir: {tmp_path / 'state'}")
    text = text.replace("root: ../var/lab/tftpboot", f"root: {boot_root or tmp_path / 'tftpboot'}")
    text = text.replace("key: ../var/lab/ssh/id_ed25519", f"key: {key or tmp_path / 'ssh' / 'id_ed25519'}")
    text = re.sub(r"namespace: bootorch-lab\b", f"namespace: {ns}", text)
    text = text.replace("name: node[02-04]", "name: node02" if nodes == 2 else f"name: node[02-{nodes:02d}]")
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return p


def test_qemu_command_line_is_paused_pxe_on_our_tap(tmp_path):
    plan = load_plan(_plan(tmp_path))
    lab = labmod.Lab(plan)
    node = plan.nodes[0]
    argv = lab.qemu_argv(node, "tcg")
    line = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64" and "-S" in argv and "-no-shutdown" in argv
    assert f"tap,ifname=tap0,script=no,downscript=no,model=e1000,mac={node.mac}" in line
    assert "-boot order=n" in line and "-accel tcg" in line and "-m 256" in line and "-smp 1" in line
    assert f"file:{lab.serial(node)}" in line and f"unix:{lab.qmp(node)},server=on,wait=off" in line
    assert "-display none" in line and f"-pidfile {lab.pidfile(node)}" in line
    # network safety: never user-mode networking, only the tap
    assert "user" not in line.split("-nic", 1)[1].split()[0]
    assert lab.bridge == "br-boot" and lab.server_cidr == "10.77.0.1/24"
    assert lab.dir == tmp_path / "state" / "lab"


def test_kvm_probe_firmware_reset_vector():
    fw = labmod._probe_firmware()
    assert len(fw) == 0x10000
    # mov cx,0xffff; loop $; mov al,1; out 0xf4,al; hlt
    assert fw[0xFFF0:0xFFF0 + 10] == bytes.fromhex("b9ffffe2feb001e6f4f4")


class FakeQemu:
    """A QMP server on a unix socket that keeps a run state like QEMU's."""

    def __init__(self, path: Path, status: str = "prelaunch") -> None:
        self.status = status
        self.log: list[str] = []
        fake = self

        class H(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                for line in self.rfile:
                    cmd = json.loads(line)["execute"]
                    fake.log.append(cmd)
                    ret: object = {}
                    if cmd == "query-status":
                        ret = {"status": fake.status, "running": fake.status == "running"}
                    elif cmd == "cont":
                        fake.status = "running"
                    elif cmd == "stop":
                        fake.status = "paused"
                    elif cmd == "system_reset":
                        if fake.status != "running":
                            fake.status = "prelaunch"
                        # an event in between, as QEMU sends them
                        self.wfile.write(b'{"event": "RESET", "data": {}}\n')
                    self.wfile.write(json.dumps({"return": ret}).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(path), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_bmc(tmp_path):
    vm = FakeQemu(tmp_path / "n1.qmp")
    server = bmc_mod.LabBmc("127.0.0.1", 0, {"node01": str(tmp_path / "n1.qmp")}, username="admin", password="s3cret")
    server.start()
    yield vm, f"http://127.0.0.1:{server.address[1]}/redfish/v1/Systems"
    server.stop()
    vm.close()


def _http(method: str, url: str, body: dict | None = None, auth: tuple[str, str] | None = ("admin", "s3cret")):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_bmc_power_model(fake_bmc):
    vm, base = fake_bmc
    assert _http("GET", f"{base}/node01")[1]["PowerState"] == "Off"
    assert _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "On"})[0] == 204
    assert vm.status == "running"
    st, body = _http("GET", f"{base}/node01")
    assert st == 200 and body["PowerState"] == "On" and body["Id"] == "node01"
    assert "ForceRestart" in body["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"]
    vm.log.clear()
    assert _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "ForceOff"})[0] == 204
    assert vm.log[-2:] == ["stop", "system_reset"] and _http("GET", f"{base}/node01")[1]["PowerState"] == "Off"
    vm.log.clear()
    assert _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "ForceRestart"})[0] == 204
    assert vm.log[-2:] == ["system_reset", "cont"] and vm.status == "running"  # restart of an off VM powers it on
    vm.log.clear()
    assert _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "PowerCycle"})[0] == 204
    assert vm.log == ["qmp_capabilities", "stop", "system_reset", "qmp_capabilities", "query-status", "cont"]
    assert vm.status == "running"
    vm.log.clear()
    _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "On"})
    assert "cont" not in vm.log  # already on: nothing to do


def test_bmc_errors_and_auth(fake_bmc):
    vm, base = fake_bmc
    assert _http("GET", f"{base}/node01", auth=None)[0] == 401
    assert _http("GET", f"{base}/node01", auth=("admin", "wrong"))[0] == 401
    assert _http("GET", f"{base}/node01", auth=("root", "s3cret"))[0] == 401
    assert _http("GET", f"{base}/node99")[0] == 404
    assert _http("POST", f"{base}/node01/Actions/ComputerSystem.Reset", {"ResetType": "Explode"})[0] == 400
    st, body = _http("GET", base)
    assert st == 200 and body["Members"] == [{"@odata.id": "/redfish/v1/Systems/node01"}]
    assert vm.status == "prelaunch"


def test_bmc_without_password_accepts_anyone(tmp_path):
    FakeQemu(tmp_path / "n.qmp", status="running")
    server = bmc_mod.LabBmc("127.0.0.1", 0, {"n": str(tmp_path / "n.qmp")}, username="admin", password=None)
    server.start()
    try:
        st, body = _http("GET", f"http://127.0.0.1:{server.address[1]}/redfish/v1/Systems/n", auth=None)
        assert st == 200 and body["PowerState"] == "On"
    finally:
        server.stop()


def test_qmp_power_on_resets_a_guest_that_shut_down(tmp_path):
    vm = FakeQemu(tmp_path / "v.qmp", status="shutdown")
    assert q.power_on(str(tmp_path / "v.qmp"))
    assert vm.log == ["qmp_capabilities", "query-status", "system_reset", "cont"]
    assert not q.power_on(str(tmp_path / "v.qmp"))
    vm.close()


def test_tail_line(tmp_path):
    f = tmp_path / "s.log"
    f.write_bytes(b"SeaBIOS\r\n\x1b[2Jfoo\r\n[    1.0] Linux version 6.1\r\n\r\n")
    assert labmod.tail_line(f) == "[    1.0] Linux version 6.1"
    assert labmod.tail_line(tmp_path / "none") == ""


# ------------------------------------------------------------------------------ slow tier

#: Seconds from the magic packet to SSH under TCG measured here: 29-55 s; KVM is faster.
BOOT_DEADLINE = 240


def _ns_python(ns: str, code: str, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _wait(cond, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _links(ns: str) -> list[str]:
    cp = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True, timeout=10)
    return [ln.split(":")[1].strip().split("@")[0] for ln in cp.stdout.splitlines()] if cp.returncode == 0 else []


def _redfish(ns: str, url: str, body: dict | None = None) -> tuple[int, dict | None]:
    code = f"""
import json, sys, urllib.request, urllib.error, base64
req = urllib.request.Request({url!r}, method={'POST' if body is not None else 'GET'!r},
                             data={json.dumps(body).encode() if body is not None else None!r})
req.add_header("Content-Type", "application/json")
req.add_header("Authorization", "Basic " + base64.b64encode(b"admin:anything").decode())
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        d = r.read(); print(json.dumps([r.status, json.loads(d) if d else None]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, None]))
"""
    cp = _ns_python(ns, code)
    assert cp.returncode == 0, cp.stderr
    st, data = json.loads(cp.stdout)
    return st, data


class ServeLog:
    """``bootorch serve PLAN --json`` inside the namespace; its stage changes collected by a thread."""

    def __init__(self, ns: str, plan: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BOOTORCH_NETNS"}
        env["BOOTORCH_NETNS"] = ns  # already inside: do not re-exec
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "orchestrator", "serve",
                                      str(plan), "--json"], stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, cwd=REPO, env=env, start_new_session=True)
        self.transitions: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("type") == "transition":
                self.transitions.append(d)

    def stages(self, node: str, attempt: int | None = None) -> list[str]:
        return [t["to"] for t in self.transitions if t["node"] == node and (attempt is None or t["attempt"] == attempt)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _boot_root(tmp_path: Path, plan: Path) -> tuple[bool, str]:
    """Build the plan's boot files with orchestrator.image; (ok, why not)."""
    try:
        from orchestrator import image
    except ImportError:
        return False, "orchestrator.image does not exist yet: PXE-to-SSH part skipped"
    try:
        image.build_images(load_plan(plan), log=lambda m: None)
    except Exception as e:  # noqa: BLE001 -- e.g. no Debian mirror reachable for the kernel
        return False, f"bootorch image build failed: {e}"
    return True, ""


@pytest.fixture
def lab_plan(tmp_path):
    require_root()
    require_tool("qemu-system-x86_64")
    require_tool("ip")
    ns = f"bt-lab-{secrets.token_hex(3)}"
    plan_file = _plan(tmp_path, nodes=2, ns=ns)
    plan = load_plan(plan_file)
    started: list = []
    try:
        yield plan, ns, plan_file, started
    finally:
        for s in started:
            s.stop()
        labmod.down(plan)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)  # belt and braces


@pytest.mark.slow
@pytest.mark.root
def test_lab_wake_pxe_boot_redfish_and_down(lab_plan, tmp_path, capsys):
    plan, ns, plan_file, started = lab_plan
    can_boot, why_not = _boot_root(tmp_path, plan_file)
    plan = load_plan(plan_file)
    lab = labmod.Lab(plan)
    n1, n2 = plan.nodes[0], plan.nodes[1]

    st = labmod.up(plan)
    assert labmod.namespace_exists(ns)
    links = _links(ns)
    assert {"br-boot", "tap0", "tap1"} <= set(links), links
    addr = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "br-boot"], capture_output=True,
                          text=True, timeout=10).stdout
    assert "10.77.0.1/24" in addr
    pids = {n["name"]: n["pid"] for n in st["nodes"]}
    assert all(pids.values()) and all(n["state"] == "paused" for n in st["nodes"]), st
    assert st["daemon"]["running"] and st["accel"] in ("kvm", "tcg")
    print(f"\naccel: {st['accel']} ({st['accel_reason']})")
    # the QEMUs and the daemon really run inside our namespace
    in_ns = set(subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split())
    assert {str(p) for p in pids.values()} | {str(st["daemon"]["pid"])} <= in_ns

    # idempotent: a second `up` changes nothing
    st2 = labmod.up(plan)
    assert {n["name"]: n["pid"] for n in st2["nodes"]} == pids and st2["daemon"]["pid"] == st["daemon"]["pid"]

    # BMC: both off
    base = f"http://{plan.model.network.server}:{plan.model.lab.bmc_port}/redfish/v1/Systems"
    assert _redfish(ns, f"{base}/{n1.name}")[1]["PowerState"] == "Off"

    serve = None
    if can_boot:
        serve = ServeLog(ns, plan_file, tmp_path / "serve.err")
        started.append(serve)
        _wait(lambda: b"serving" in (tmp_path / "serve.err").read_bytes(), 30, "bootorch serve to listen")

    # a raw 0x0842 frame from inside the namespace, as the rollout sends it
    t_wake = time.monotonic()
    cp = _ns_python(ns, f"from orchestrator.power import wol; wol.send_raw('br-boot', [{n1.mac!r}])")
    assert cp.returncode == 0, cp.stderr
    _wait(lambda: q.status(str(lab.qmp(n1))) == "running", 10, f"{n1.name} to leave the paused state")
    assert q.status(str(lab.qmp(n2))) in ("prelaunch", "paused")  # the other node stays off
    assert _redfish(ns, f"{base}/{n1.name}")[1]["PowerState"] == "On"
    assert "wake node01" in lab.daemon_log.read_text()

    if not can_boot:
        if IN_CI:
            pytest.fail(why_not)
        print(f"SKIPPED PXE part: {why_not}")
    else:
        _wait(lambda: "os_dhcp" in serve.stages(n1.name, 1), BOOT_DEADLINE, f"{n1.name} to reach os_dhcp")
        ssh_open = _ns_python(ns, f"""
import socket, time
end = time.monotonic() + {BOOT_DEADLINE}
while time.monotonic() < end:
    try:
        s = socket.create_connection(({str(n1.ip)!r}, 22), timeout=2); print(s.recv(64)); s.close(); break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("no ssh")
""", timeout=BOOT_DEADLINE + 10)
        assert ssh_open.returncode == 0 and "SSH-2.0" in ssh_open.stdout, ssh_open
        took = time.monotonic() - t_wake
        print(f"wake -> SSH banner: {took:.1f} s under {st['accel']}")
        stages = serve.stages(n1.name, 1)
        print(f"stages: {' -> '.join(stages)}")
        assert stages[0] == "pxe_dhcp" and stages[-1] == "os_dhcp", stages
        assert {"config", "initrd"} <= set(stages), stages
        serial = lab.serial(n1).read_text(errors="replace")
        assert "iPXE" in serial and "Linux version" in serial
        if "loader" in stages:  # the server handed out pxelinux.0 (not an iPXE script)
            assert "PXELINUX" in serial
        key = plan.resolve_path(plan.model.readiness.ssh.key)
        out = _ns_python(ns, f"""
import paramiko
c = paramiko.SSHClient()
c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
c.connect({str(n1.ip)!r}, username="root", key_filename={str(key)!r}, timeout=10, banner_timeout=20,
          auth_timeout=20, look_for_keys=False, allow_agent=False)
_, o, _ = c.exec_command("uname -r", timeout=20)
print(o.read().decode().strip())
print(c.get_transport().get_remote_server_key().get_base64())
c.close()
""", timeout=90)
        assert out.returncode == 0 and out.stdout.startswith("6."), out
        # the node presented its own host key, the one image build made and pinned for its address
        own = (plan.state_dir / "hostkeys" / n1.name / "dropbear_ed25519_host_key.pub").read_text().split()[1]
        assert out.stdout.split()[-1] == own
        assert f"{n1.ip} ssh-ed25519 {own}" in (plan.state_dir / "known_hosts").read_text()

        # Redfish ForceRestart: the booted VM PXE boots again (a new attempt at the server)
        assert _redfish(ns, f"{base}/{n1.name}/Actions/ComputerSystem.Reset", {"ResetType": "ForceRestart"})[0] == 204
        _wait(lambda: "pxe_dhcp" in serve.stages(n1.name, 2), 120, f"{n1.name} to PXE boot again")

    # ForceOff keeps the VM off (paused, reset); a UDP magic packet powers it on again
    assert _redfish(ns, f"{base}/{n1.name}/Actions/ComputerSystem.Reset", {"ResetType": "ForceOff"})[0] == 204
    # Like real BMCs, the lab BMC answers 204 first and acts a moment later (lab.bmc.ACTION_DELAY).
    _wait(lambda: _redfish(ns, f"{base}/{n1.name}")[1]["PowerState"] == "Off", 10, f"{n1.name} to report Off")
    cp = _ns_python(ns, f"from orchestrator.power import wol; wol.send_udp([{n1.mac!r}], port=9, "
                        f"broadcast='10.77.0.255', interface='br-boot')")
    assert cp.returncode == 0, cp.stderr
    _wait(lambda: q.status(str(lab.qmp(n1))) == "running", 10, f"{n1.name} on again after a UDP magic packet")

    out = labmod.format_status(labmod.status(plan))
    assert "node01" in out and "running" in out

    for s in started:
        s.stop()
    started.clear()
    all_pids = [*pids.values(), st["daemon"]["pid"]]
    removed = labmod.down(plan)
    assert f"namespace {ns}" in removed
    assert not labmod.namespace_exists(ns)
    assert not any(os.path.exists(f"/proc/{p}") and procs.state(p) not in ("Z", "") for p in all_pids)
    assert labmod.down(plan) == []  # idempotent
    assert all(not lab.qmp(n).exists() and not lab.pidfile(n).exists() for n in plan.nodes)


@pytest.mark.slow
@pytest.mark.root
def test_lab_down_cleans_a_half_created_lab(tmp_path):
    """After a crash: namespace and bridge there, one tap, no VMs, stale PID files."""
    require_root()
    ns = f"bt-lab-{secrets.token_hex(3)}"
    plan = load_plan(_plan(tmp_path, nodes=2, ns=ns))
    lab = labmod.Lab(plan)
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        subprocess.run(["ip", "-n", ns, "link", "add", "br-boot", "type", "bridge"], check=True, timeout=10)
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True, timeout=10)
        lab.dir.mkdir(parents=True)
        lab.pidfile(plan.nodes[0]).write_text(f"{os.getpid()}\n")  # a live PID that is not our QEMU
        lab.daemon_pidfile.write_text("999999999\n")
        removed = labmod.down(plan)
        assert f"namespace {ns}" in removed and not labmod.namespace_exists(ns)
        assert not any(r.startswith(("qemu", "daemon")) for r in removed)  # we killed nothing we did not start
        assert not lab.pidfile(plan.nodes[0]).exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
