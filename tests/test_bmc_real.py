"""The power drivers against real BMC implementations, with the same assertions for each.

Three backends, each in front of a real QEMU process (``-machine none``: no
guest, but QEMU's real run states and QMP, started paused like a lab VM) on
loopback:

* ``builtin``: our lab BMC (:mod:`orchestrator.lab.bmc`) as the lab daemon runs
  it, resets carried out :data:`~orchestrator.lab.bmc.ACTION_DELAY` after the 204;
* ``sushy``: sushy-tools' sushy-emulator (its Flask app, routes, templates, auth
  middleware, werkzeug server) with our QMP systems driver
  (:mod:`orchestrator.lab.sushy_qmp`), HTTP basic auth from a bcrypt htpasswd
  file; systems are named by node name and sushy redirects (307) to their UUID;
* ``ipmi_sim``: OpenIPMI's ipmi_sim with a generated lan.conf and our chassis
  control program (:mod:`orchestrator.lab.ipmi_chassis`), driven by the ipmi
  driver through the real ipmitool (lanplus, cipher suite 3).

Every backend must: power on/off/cycle the VM and report its state; refuse a
wrong password with a message naming the BMC and what to fix; report an
unknown system (Redfish: a path the BMC does not have; IPMI: an address where
no BMC answers) the same way; show a PXE boot override that the driver set
before a power-on. sushy-emulator's own fake driver (power changes 1-11 s after
the 204) is exercised in the slow tier, and so are the full power sequences
(their time is the backends' own delays: ~9 s for the three).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from orchestrator.lab import bmc as bmc_mod
from orchestrator.lab import bmcs
from orchestrator.lab import qmp as q
from orchestrator.power import Target
from orchestrator.power.drivers import IpmiDriver, RedfishDriver
from tests.conftest import IN_CI, REPO, require_tool

T = Target("node07", "52:54:00:85:00:07", "10.85.0.17", 0)
USER, PASSWORD = "admin", "s3cret-bmc"


def free_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Vm:
    """A real QEMU, paused like a lab VM; nothing runs in it (``-machine none``)."""

    def __init__(self, d: Path) -> None:
        require_tool("qemu-system-x86_64")
        self.qmp = str(d / "vm.qmp")
        self.p = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-S", "-nodefaults", "-display", "none",
                                   "-qmp", f"unix:{self.qmp},server=on,wait=off"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.qmp), 10, "QEMU's QMP socket")

    @property
    def running(self) -> bool:
        return q.status(self.qmp) in q.ON_STATES

    def power_off(self) -> None:
        q.force_off(self.qmp)

    def close(self) -> None:
        self.p.terminate()
        self.p.wait(timeout=10)


class Backend:
    kind = ""
    where = ""  # host:port as the driver's messages name it

    def driver(self, *, password: str = PASSWORD, unknown: bool = False, boot_override: str = "none"):
        raise NotImplementedError

    def boot_target(self) -> str:
        """The boot-source override the backend holds now."""
        raise NotImplementedError


class Builtin(Backend):
    kind = "builtin"

    def __init__(self, vm: Vm) -> None:
        self.server = bmc_mod.LabBmc("127.0.0.1", 0, {"node07": vm.qmp}, username=USER, password=PASSWORD,
                                     delay=bmc_mod.ACTION_DELAY)
        self.server.start()
        self.where = f"127.0.0.1:{self.server.address[1]}"

    def driver(self, *, password=PASSWORD, unknown=False, boot_override="none"):
        name = "nosuch" if unknown else "{name}"
        return RedfishDriver(address=f"http://{self.where}/redfish/v1/Systems/{name}", username=USER, password=password,
                             timeout=5, boot_override=boot_override, settle=10, poll=0.2)

    def boot_target(self) -> str:
        return self.server.boot["node07"].get("BootSourceOverrideTarget", "None")

    def close(self) -> None:
        self.server.stop()


class Sushy(Backend):
    kind = "sushy"

    def __init__(self, vm: Vm, d: Path) -> None:
        port = free_port(socket.SOCK_STREAM)
        self.where = f"127.0.0.1:{port}"
        htpasswd = d / "htpasswd"
        htpasswd.write_text(bmcs.htpasswd_line(USER, PASSWORD))
        conf = d / "sushy.conf"
        conf.write_text("\n".join([
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'", f"SUSHY_EMULATOR_LISTEN_PORT = {port}",
            f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}", f"SUSHY_EMULATOR_STATE_DIR = {str(d / 'state')!r}",
            # Hdd at first, so a PXE override must really be sent.
            "BOOTORCH_QMP_SYSTEMS = [{'name': 'node07', 'uuid': '0b5f2a4e-0000-4000-8000-000000000007', "
            f"'qmp': {vm.qmp!r}, 'mac': '{T.mac}', 'boot_device': 'Hdd'}}]", ""]))
        self.log = open(d / "sushy.log", "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "orchestrator.lab.sushy_qmp", "--config", str(conf)],
                                  stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_for(lambda: self._up(), 20, "sushy-emulator to listen")

    def _up(self) -> bool:
        assert self.p.poll() is None, (Path(self.log.name).read_text()[-2000:])
        try:
            return httpx.get(f"http://{self.where}/redfish/v1/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def driver(self, *, password=PASSWORD, unknown=False, boot_override="none"):
        name = "nosuch" if unknown else "{name}"
        return RedfishDriver(address=f"http://{self.where}/redfish/v1/Systems/{name}", username=USER, password=password,
                             timeout=5, boot_override=boot_override, settle=10, poll=0.2)

    def boot_target(self) -> str:
        r = httpx.get(f"http://{self.where}/redfish/v1/Systems/0b5f2a4e-0000-4000-8000-000000000007", auth=(USER, PASSWORD))
        return r.json()["Boot"]["BootSourceOverrideTarget"]

    def close(self) -> None:
        os.killpg(self.p.pid, signal.SIGTERM)
        self.p.wait(timeout=10)
        self.log.close()


class IpmiSim(Backend):
    kind = "ipmi_sim"

    def __init__(self, vm: Vm, d: Path) -> None:
        require_tool("ipmi_sim")
        self.ipmitool = require_tool("ipmitool")
        self.port = free_port(socket.SOCK_DGRAM)
        self.where = f"127.0.0.1:{self.port}"
        self.boot_file = d / "node07.ipmi-boot"
        (d / "state").mkdir()
        conf = d / "lan.conf"

        class L:  # what bmcs.ipmi_lan_conf reads of a lab: its directory and each node's QMP socket
            dir = d

            def qmp(self, node):
                return vm.qmp

        node = type("N", (), {"name": "node07", "mac": T.mac})()
        conf.write_text(bmcs.ipmi_lan_conf(L(), node, "127.0.0.1", self.port, USER, PASSWORD))
        (d / "sim.emu").write_text(bmcs.IPMI_EMU)
        self.log = open(d / "ipmi_sim.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.p = subprocess.Popen(["ipmi_sim", "-c", str(conf), "-f", str(d / "sim.emu"), "-s", str(d / "state"), "-n"],
                                  stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)
        wait_for(lambda: self.p.poll() is not None or f"127.0.0.1:{self.port}" in subprocess.run(
            ["ss", "-Hunl", f"sport = :{self.port}"], capture_output=True, text=True).stdout, 10, "ipmi_sim to listen")
        assert self.p.poll() is None, Path(self.log.name).read_text()

    def driver(self, *, password=PASSWORD, unknown=False, boot_override="none"):
        where = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}" if unknown else self.where
        return IpmiDriver(address=where, username=USER, password=password, ipmitool=self.ipmitool, cipher_suite=3,
                          boot_override=boot_override, settle=10, poll=0.2, retries=1, retry_interval=1)

    def boot_target(self) -> str:
        out = subprocess.run([self.ipmitool, "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port), "-U",
                              USER, "-E", "chassis", "bootparam", "get", "5"], capture_output=True, text=True,
                             env={**os.environ, "IPMI_PASSWORD": PASSWORD}, timeout=30).stdout
        m = re.search(r"Boot Device Selector : (.*)", out)
        return {"Force PXE": "Pxe"}.get(m.group(1).strip() if m else "", m.group(1).strip() if m else "?")

    def close(self) -> None:
        os.killpg(self.p.pid, signal.SIGTERM)
        self.p.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module", params=["builtin", "sushy", "ipmi_sim"])
def backend(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"bt-bmc-{request.param}")
    vm = Vm(d)
    b = None
    try:
        b = {"builtin": lambda: Builtin(vm), "sushy": lambda: Sushy(vm, d), "ipmi_sim": lambda: IpmiSim(vm, d)}[
            request.param]()
        b.vm = vm
        yield b
    finally:
        if b is not None:
            b.close()
        vm.close()


@pytest.fixture
def off(backend):
    """The backend's VM powered off (directly, through QMP) before each test."""
    backend.vm.power_off()
    assert not backend.vm.running
    return backend


@pytest.mark.slow  # ~9 s for the three: the backends' own delays (1 s builtin, ipmi_sim's 1 s cycle timer)
async def test_power_on_off_cycle_and_state(off):
    b = off
    d = b.driver()
    with trio.fail_after(60):
        assert await d.status(T) == "off"
        r = await d.on(T)
        assert r.ok, r.detail
        assert b.vm.running and await d.status(T) == "on"  # on returns once the BMC reports On
        r = await d.off(T)
        assert r.ok, r.detail
        assert not b.vm.running and await d.status(T) == "off"
        r = await d.cycle(T)  # a cycle of a node that is off powers it on
        assert r.ok and "instead of a cycle" in r.detail, r.detail
        await trio.to_thread.run_sync(wait_for, lambda: b.vm.running, 10, "the VM to run")
        r = await d.cycle(T)  # a cycle of a node that is on: it ends on
        assert r.ok and "instead" not in r.detail, r.detail
        await trio.sleep(0.2)
        await trio.to_thread.run_sync(wait_for, lambda: b.vm.running, 10, "the VM to run after the cycle")
        assert await d.status(T) == "on"


async def test_wrong_password_is_a_clear_error_and_nothing_moves(off):
    b = off
    d = b.driver(password="wrong-password")
    with trio.fail_after(60):
        r = await d.on(T)
        assert await d.status(T) is None
    assert not r.ok
    assert b.where in r.detail and "rejected the" in r.detail and f"user {USER!r}" in r.detail, r.detail
    assert "power.bmc.password" in r.detail
    assert "wrong-password" not in r.detail
    assert not b.vm.running


async def test_unknown_system_is_a_clear_error(off):
    b = off
    d = b.driver(unknown=True)
    with trio.fail_after(60):
        r = await d.on(T)
    assert not r.ok
    assert "power.bmc.address" in r.detail, r.detail
    if b.kind == "ipmi_sim":
        assert re.search(r"no IPMI answer from 127\.0\.0\.1:\d+", r.detail), r.detail
    else:
        assert f"BMC at http://{b.where} has no system /redfish/v1/Systems/nosuch (HTTP 404" in r.detail, r.detail
    assert not b.vm.running


async def test_pxe_boot_override_before_power_on(off):
    b = off
    d = b.driver(boot_override="pxe")
    with trio.fail_after(60):
        if b.kind == "ipmi_sim":
            assert await trio.to_thread.run_sync(b.boot_target) != "Pxe"
        elif b.kind == "sushy":
            assert await trio.to_thread.run_sync(b.boot_target) == "Hdd"
        r = await d.on(T)
    assert r.ok, r.detail
    assert await trio.to_thread.run_sync(b.boot_target) == "Pxe"
    assert b.vm.running


@pytest.mark.slow
async def test_stock_sushy_fake_driver_delayed_power_states(tmp_path):
    """sushy-emulator as shipped (``--fake``): power changes land 1-11 s after the 204; on/off wait for them."""
    exe = shutil.which("sushy-emulator") or str(Path(sys.executable).with_name("sushy-emulator"))
    if not os.access(exe, os.X_OK):
        if IN_CI:
            pytest.fail("sushy-emulator is not installed (pip install sushy-tools)")
        pytest.skip("sushy-emulator is not installed")
    port = free_port(socket.SOCK_STREAM)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(bmcs.htpasswd_line(USER, PASSWORD))
    conf = tmp_path / "conf.py"
    conf.write_text(f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\nSUSHY_EMULATOR_STATE_DIR = {str(tmp_path / 'st')!r}\n"
                    "SUSHY_EMULATOR_FAKE_SYSTEMS = [{'uuid': '27946b59-9e44-4fa7-8e91-f3527a1ef094', 'name': 'node07', "
                    "'power_state': 'Off', 'nics': []}]\n")
    log = open(tmp_path / "sushy.log", "wb")
    p = subprocess.Popen([exe, "--fake", "--config", str(conf), "-i", "127.0.0.1", "-p", str(port)], stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await trio.to_thread.run_sync(wait_for, lambda: _answers(port), 20, "sushy-emulator --fake")
        d = RedfishDriver(address=f"http://127.0.0.1:{port}/redfish/v1/Systems/{{name}}", username=USER,
                          password=PASSWORD, timeout=5, settle=20, poll=0.5)
        with trio.fail_after(90):
            t0 = trio.current_time()
            r = await d.on(T)
            assert r.ok and re.search(r"On after \d+\.\ds", r.detail), r.detail
            assert await d.status(T) == "on"
            r = await d.off(T)
            assert r.ok and re.search(r"Off after \d+\.\ds", r.detail), r.detail
            assert await d.status(T) == "off"
        print(f"\nfake sushy: on + off confirmed in {trio.current_time() - t0:.1f}s")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=10)
        log.close()


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/redfish/v1/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_builtin_bmc_is_no_kinder_than_real_ones(tmp_path):
    """Our lab BMC answers like sushy-emulator and real BMCs: open service root, 401 with a Redfish error body
    and WWW-Authenticate, 404 naming the system, resets that land after the 204, 412 for a stale If-Match."""
    vm = Vm(tmp_path)
    server = bmc_mod.LabBmc("127.0.0.1", 0, {"node07": vm.qmp}, username=USER, password=PASSWORD, delay=0.5)
    server.start()
    base = f"http://127.0.0.1:{server.address[1]}/redfish/v1"
    try:
        with httpx.Client(timeout=5) as c:
            assert c.get(base).status_code == 200  # the service root needs no credentials (Redfish spec)
            r = c.get(f"{base}/Systems/node07", auth=(USER, "wrong"))
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
            assert r.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"] == "Base.1.0.GeneralError"
            r = c.get(f"{base}/Systems/nosuch", auth=(USER, PASSWORD))
            assert r.status_code == 404 and r.json()["error"]["message"] == "System nosuch was not found"
            r = c.post(f"{base}/Systems/node07/Actions/ComputerSystem.Reset", json={"ResetType": "On"}, auth=(USER, PASSWORD))
            assert r.status_code == 204 and not vm.running  # answered first ...
            wait_for(lambda: vm.running, 5, "the delayed On")  # ... carried out after
            r = c.get(f"{base}/Systems/node07", auth=(USER, PASSWORD))
            etag = r.headers["ETag"]
            boot = {"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}
            assert c.patch(f"{base}/Systems/node07", json=boot, headers={"If-Match": etag}, auth=(USER, PASSWORD)).status_code == 204
            r = c.patch(f"{base}/Systems/node07", json=boot, headers={"If-Match": etag}, auth=(USER, PASSWORD))
            assert r.status_code == 412  # the resource changed: its old ETag is stale
            r = c.patch(f"{base}/Systems/node07", json={"Boot": {"BootSourceOverrideTarget": "Usb"}}, auth=(USER, PASSWORD))
            assert r.status_code == 400
            assert c.get(f"{base}/Systems/node07", auth=(USER, PASSWORD)).json()["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    finally:
        server.stop()
        vm.close()
